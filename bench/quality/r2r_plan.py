"""What bench/quality/real2real.py runs: the real-to-real pairs, the methods (every key a row depends on pinned), the
ablations of issue 21's item 6, and the budget of the paper's regime.

Every row pins all of config.PRESET_KEYS (method.preset=null + explicit values), so no row moves when the project's
presets or field defaults change. Equal budget within a pair: the same transfer set, micro-batch and epochs per
student layer (a frontier row runs E epochs per stage; a full-schedule row one stage of E x L_S epochs, the
pipeline's budget rule), hence the same optimizer steps and tokens.
"""
from __future__ import annotations

from dataclasses import dataclass

# the keys of config.PRESET_KEYS, as the paper's v2 sets them
_V2 = {"method.basis": "output", "method.map": "pinv", "method.residual": "layer",
       "method.layer_objective": "relation_geometry", "method.output_objective": "kl", "method.top_k": 64,
       "method.tau": 1.0, "method.w_layer": 1.0, "method.w_out": 1.0, "method.w_label": 0.0,
       "method.layer_balance": None, "pairing.critical_layer": True, "pairing.interpolate": False,
       "pairing.attribution": "grad_x_act", "schedule.mode": "frontier", "schedule.adapter": "full",
       "schedule.lora_rank": 16, "schedule.lora_alpha": 32.0, "schedule.lora_targets": None}
_BEST = {**_V2, "method.w_label": 1.0, "schedule.mode": "full"}
_NO_TEACHER_LAYERS = {"method.layer_objective": "none", "pairing.critical_layer": False, "schedule.mode": "full"}
_SFT = {**_V2, **_NO_TEACHER_LAYERS, "method.output_objective": "ce"}
_KD = {**_V2, **_NO_TEACHER_LAYERS}
REPLAY = 0.25  # share of the transfer set from the student's own domain in the *_replay rows


def _overrides(values: dict) -> tuple[str, ...]:
    def text(v) -> str:
        return "null" if v is None else str(v).lower() if isinstance(v, bool) else str(v)

    return ("method.preset=null", *(f"{k}={text(v)}" for k, v in values.items()))


@dataclass(frozen=True)
class Row:
    name: str
    label: str
    group: str  # main | replay | ablation
    values: dict
    extra: tuple[str, ...] = ()
    lr_scale: float = 1.0  # the learning-rate ablation: x the method's rate
    replay: bool = False

    @property
    def overrides(self) -> tuple[str, ...]:
        return _overrides(self.values) + self.extra

    @property
    def teacher(self) -> dict:
        """What changes the packets (one spool per distinct value): the objective keys and the data mix."""
        keys = ("method.layer_objective", "method.output_objective", "method.top_k", "method.map",
                "pairing.critical_layer", "pairing.attribution")
        return {**{k: self.values[k] for k in keys}, "replay": self.replay}


ROWS: dict[str, Row] = {r.name: r for r in [
    Row("sft", "SFT (CE, all layers)", "main", _SFT),
    Row("kd", "logit KD top-64 over the shared vocabulary + tail (all layers)", "main", _KD),
    Row("paper_v2", "SemAlign paper v2 (geometry + KL, frontier)", "main", _V2),
    Row("best", "SemAlign best preset (geometry + KL + CE, all layers)", "main", _BEST),
    Row("sft_replay", f"SFT, {REPLAY:.0%} replay of the student's domain", "replay", _SFT,
        (f"data.replay_fraction={REPLAY}",), replay=True),
    Row("best_replay", f"best, {REPLAY:.0%} replay of the student's domain", "replay", _BEST,
        (f"data.replay_fraction={REPLAY}",), replay=True),
    # issue 21 item 6: why transfer across tokenizers loses to SFT, one term at a time (all from `best`)
    Row("abl_no_layer", "best without the layer targets (KL + CE)", "ablation", {**_BEST, **_NO_TEACHER_LAYERS}),
    Row("abl_no_kl", "best without the KL (layer targets + CE)", "ablation",
        {**_BEST, "method.output_objective": "none"}),
    Row("abl_uld", "best with ULD instead of the shared-vocabulary KL", "ablation",
        {**_BEST, "method.output_objective": "uld"}),
    Row("abl_topk1024", "best with top-1024 KL (less mass in the tail bucket)", "ablation",
        {**_BEST, "method.top_k": 1024}),
    Row("abl_lr_third", "best at a third of its learning rate", "ablation", _BEST, lr_scale=1 / 3),
    Row("abl_lr_triple", "best at three times its learning rate", "ablation", _BEST, lr_scale=3.0),
]}
MAIN = ("sft", "kd", "paper_v2", "best")
ABLATIONS = tuple(n for n, r in ROWS.items() if r.group == "ablation")


@dataclass(frozen=True)
class Pair:
    name: str
    label: str
    teacher: str  # a real_models.CATALOGUE name, or "demo-teacher"
    student: str  # a real_models.CATALOGUE name, or "demo-student"
    stages: tuple[int, ...] | None = None  # student layers trained (None: all)


PAIRS: dict[str, Pair] = {p.name: p for p in [
    Pair("gemma_demo", "Gemma 3 270M -> the demo's 2 x 128 student (262k SentencePiece -> 4,096 byte-level BPE)",
         "gemma3-270m", "demo-student"),
    Pair("gemma_smollm2", "Gemma 3 270M -> SmolLM2-135M (two real families and tokenizers; 4 of its 30 layers "
         "trained)", "gemma3-270m", "smollm2", stages=(1, 10, 20, 30)),
    Pair("smollm2_demo", "SmolLM2-135M -> the demo's student (49k byte-level BPE -> 4,096)", "smollm2", "demo-student"),
]}


@dataclass(frozen=True)
class Budget:
    """The paper's regime (1000 samples, several epochs per layer), or what the 2-core machine affords."""

    sequences: int
    epochs_per_stage: float
    micro_batch: int = 8
    seq_len: int = 128
    eval_sequences: int = 64

    def overrides(self) -> tuple[str, ...]:
        return ("runtime.progress=false", "runtime.resume=false", "runtime.checkpoint_every=100000",
                f"data.max_sequences={self.sequences}", f"data.micro_batch_size={self.micro_batch}",
                f"data.seq_len={self.seq_len}", f"schedule.epochs_per_stage={self.epochs_per_stage}",
                "schedule.warmup_steps=5", "pairing.attribution_batches=2", "pairing.attribution_micro_batch=4",
                "method.target_dtype=float32", "method.min_shared_tokens=1000")


FULL = Budget(sequences=1000, epochs_per_stage=3.0)
REDUCED = Budget(sequences=128, epochs_per_stage=2.0, eval_sequences=32)
MEDIUM = Budget(sequences=512, epochs_per_stage=3.0)  # the paper's epochs on half its samples: ~40 min on 2 cores
LR = 1e-3  # the demo's rate; the full run searches LR_GRID on target_val per main row
LR_GRID = (3e-4, 1e-3, 3e-3)
