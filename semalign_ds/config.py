"""One typed config tree for a SemAlign run: strict YAML, dotted overrides, errors that name the key.

Every choice METHOD.md leaves open is a field here with its default, and the resolved tree is saved with each run
and logged as MLflow params. `load_config(path, overrides)` is the only way in.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml


@dataclass
class ModelConfig:
    path: str = ""
    """Directory of a Hugging Face checkpoint (config.json + safetensors, and a tokenizer)."""
    dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    """Compute dtype of the model's weights."""
    trust_remote_code: bool = False
    """Run code shipped with the checkpoint; off unless you trust it."""
    gguf_file: Optional[str] = None
    """A GGUF checkpoint (a file name inside `path`, or an absolute path; needs the `gguf` package): it is
    dequantised and converted once into a safetensors folder cached under $SEMALIGN_CACHE (keyed by the file's
    hash), which the run then loads. null = `path` is a Hugging Face safetensors folder."""


@dataclass
class DataConfig:
    path: str = ""
    """Transfer data: a file, glob or directory of JSONL/text/parquet, read through `datasets`."""
    format: Literal["auto", "jsonl", "text", "parquet"] = "auto"
    text_field: str = "text"
    """Column holding the text (JSONL/parquet)."""
    seq_len: int = 512
    """Student tokens per packed sequence; must not exceed either model's limit."""
    teacher_seq_len: Optional[int] = None
    """Different tokenizers only: teacher positions per block (the teacher reads each block's characters with its
    own tokenizer); null = the longest block's need rounded up to a multiple of 8. Too short is an error."""
    max_sequences: int = 1000
    """Transfer-set size in packed sequences (the paper used 1000 examples)."""
    micro_batch_size: int = 8
    """Sequences per rank per micro-step."""
    replay_path: Optional[str] = None
    """General-domain documents (the student's own domain; a file, glob or directory of JSONL/text/parquet, read
    with data.text_field) mixed into the transfer set against forgetting: with data.replay_fraction > 0 that share
    of the packed sequences comes from here and the teacher supervises them like the rest. null = no mix."""
    replay_fraction: float = 0.0
    """Share of the transfer set's packed sequences taken from data.replay_path (0 <= f < 1; > 0 needs
    data.replay_path): of max_sequences N, N - round(f N) come from data.path and the rest from the replay data."""


@dataclass
class MethodConfig:
    preset: Optional[Literal["paper_v1", "paper_v2", "best"]] = "best"
    """A named complete method configuration (PRESETS below): its values apply to every key of it that the config
    file and the overrides leave unset; config.yaml and the MLflow params record the resolved values and the name.
    Default `best`: the configuration the quality benchmark chose on validation (docs/RESULTS.md). null = no
    preset: the field defaults below apply."""
    basis: Literal["output", "input"] = "output"
    """Semantic basis of the pinv and random maps: pinv of the LM head (v1) or unit input-embedding rows."""
    map: Literal["pinv", "logit", "random", "none"] = "pinv"
    """The alignment map M (D_S x D_T) from teacher to student space. pinv: M = S_S S_T^T (the paper, METHOD §2);
    logit: the logit-matching map pinv(W_S diag(g_S)) W_T diag(g_T) over the shared vocabulary (METHOD §8: the
    student state whose logits best match the teacher's, least squares; g = final-norm gains); random: random
    unit bases in place of S_T / S_S (ablation); none: no map, the targets are the raw teacher residuals (D_T
    wide), only for relation_geometry (width-agnostic) and hidden_mse (its own learned projection; hidden_mse
    implies none when method.map is not set)."""
    residual: Literal["layer", "span"] = "layer"
    """Teacher residual of source layer l (layer) or of the whole span of source layers (span)."""
    layer_objective: Literal["relation_geometry", "cosine", "fisher_logits", "mse", "hidden_mse",
                             "none"] = "relation_geometry"
    """relation_geometry (v2), cosine (v1), fisher_logits (ACL); mse: mean squared error between the student residual
    and the mapped teacher residual M R_T WITHOUT the per-token normalisation (on unit vectors MSE = 2 - 2 cos, i.e.
    the cosine objective again); hidden_mse: baseline layer KD, MSE through a learned linear projection of the
    unaligned teacher residual (method.map none)."""
    layer_balance: Optional[float] = None
    """Gradient-balanced layer weight: when set (a fraction > 0), every micro-step sets the layer term's weight so
    that its gradient on the trainable parameters has this fraction of the norm of the weighted output term's
    gradient (w_layer must be > 0 to keep the term on; its value is then unused). Costs one extra forward and two
    extra backward passes per micro-step; logs grad_cos_layer_kl and w_layer_effective. null = fixed w_layer."""
    log_grad_cosine: bool = False
    """Log grad_cos_layer_kl (cosine between the layer and output terms' gradients) every step without balancing
    (the same extra forward and two backward passes; always logged with layer_balance). Watching only: not part of
    the result hash."""
    output_objective: Literal["kl", "uld", "label_cosine", "ce", "none"] = "kl"
    """kl: KL to the teacher's top-k (+ tail bucket; across tokenizers over the shared vocabulary, the rest of the
    teacher's mass in the tail, at exact positions); uld: sorted-probability matching (needs no shared ids)."""
    top_k: int = 64
    """Teacher logits sent as top-k plus a tail bucket; 0 = full logits (colocated only)."""
    tau: float = 1.0
    """KL temperature."""
    w_layer: float = 1.0
    w_out: float = 1.0
    w_label: float = 1.0
    """Weight of a cross-entropy label term. 1 by default: the quality benchmark (docs/RESULTS.md) found v2 with
    labels closes ~2x the gap of v2 without (20.1% vs 10.7%); 0 = v2 as its abstract reads."""
    min_shared_tokens: int = 1000
    """Fewest shared vocabulary entries accepted between teacher and student."""
    target_dtype: Literal["float32", "bfloat16"] = "bfloat16"
    """dtype of the aligned targets the teacher emits."""


@dataclass
class PairingConfig:
    critical_layer: bool = True
    """Re-pair the student layer nearest the teacher's most attributed layer to it (METHOD §3)."""
    interpolate: bool = False
    """Mix two neighbouring teacher layers for non-integer depth ratios."""
    manual: Optional[list[int]] = None
    """Explicit source layer per student layer (overrides the formula)."""
    attribution: Literal["grad_x_act", "ablation"] = "grad_x_act"
    """How teacher layers are scored for the critical layer: grad_x_act (METHOD §3, one forward + backward per
    batch) or ablation (METHOD §8: the rise of the teacher's LM loss when layer l's residual contribution is removed,
    i.e. layer l returns its input; L_T + 1 forwards per batch). The critical layer is the argmax either way."""
    attribution_batches: int = 4
    """Micro-batches of transfer data (per rank) used for layer attribution."""
    attribution_micro_batch: Optional[int] = None
    """Sequences per attribution forward+backward (null = data.micro_batch_size); attribution keeps every layer's
    activations for the backward, so it needs a smaller micro-batch than the teacher's inference."""


@dataclass
class ScheduleConfig:
    mode: Literal["frontier", "full"] = "frontier"
    """frontier: one trainable layer per stage (the paper's schedule); full: every listed layer trainable in one stage,
    with the frontier stages' total budget, every paired layer's target supervising at once (the `best` preset's
    choice, and the baselines')."""
    stages: Optional[list[int]] = None
    """Student layers to train, shallow to deep (1-indexed); null = all."""
    epochs_per_stage: float = 1.0
    """Passes over the transfer set per stage (fractions allowed); the same work on 1 rank or 128: steps =
    ceil(epochs * micro-batches per rank per epoch / grad_accum). Printed and logged at the start of every run."""
    tokens_per_stage: Optional[int] = None
    """If set, a stage trains on this many token positions (over all ranks) instead of epochs_per_stage."""
    adapter: Literal["full", "lora"] = "full"
    lora_rank: int = 16
    lora_alpha: float = 32.0
    lora_targets: Optional[list[str]] = None
    """Sub-module names for LoRA; null = the family's defaults (up/down/v/o as v1)."""
    lr: float = 3.0e-4
    warmup_steps: int = 10
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    grad_accum: int = 1


@dataclass
class TeacherEngineConfig:
    ds_config: str = "ds_configs/teacher_zero3_offload_cpu.json"
    """DeepSpeed ZeRO-3 inference template (edit it; pure functions fill the rest)."""
    offload: Literal["cpu", "nvme", "none"] = "cpu"
    nvme_path: Optional[str] = None


@dataclass
class StudentEngineConfig:
    ds_config: str = "ds_configs/student_zero2.json"
    """DeepSpeed ZeRO-2 training template."""


@dataclass
class TransportConfig:
    """How packets travel from teacher to student (DESIGN.md "Topologies")."""

    teacher_ranks: Optional[int] = None
    """disaggregated: how many of the world's ranks are teacher ranks (the rest are student ranks)."""
    window: int = 2
    """stream: packets in flight per teacher->student link (the teacher computes ahead by this many)."""
    timeout_s: float = 120.0
    """stream: how long one side waits for the other before failing with a clear error."""
    spool_dir: str = ""
    """spool: the directory of shards + manifest (`semalign teach --out` / `semalign train --from-spool`)."""
    shard_sequences: int = 256
    """spool and local packet store: sequences per shard."""
    store: Literal["auto", "memory", "disk"] = "auto"
    """Where colocated and disaggregated runs keep the teacher's packets (one teacher pass per sample, every stage
    trains from them): host memory, or a local spool per rank (store_dir); auto: memory when this rank's share
    fits in transport.store_memory_fraction of the node's RAM, else disk."""
    store_dir: str = ""
    """Local spool of the disk store; empty = <output_dir>/packets. Point it at node-local scratch on clusters."""
    store_memory_fraction: float = 0.25
    """auto store: the share of the node's RAM (split over its local ranks) the memory store may take."""
    keep_spool: bool = False
    """Keep the disk store after the run (removed at the end by default)."""


@dataclass
class RuntimeConfig:
    device: Literal["auto", "cpu", "cuda"] = "auto"
    topology: Literal["colocated", "disaggregated", "spool"] = "colocated"
    """colocated: every rank teacher shard + student; disaggregated: teacher ranks stream to student ranks;
    spool: the student reads packets a teacher job wrote to disk."""
    checkpoint_every: int = 50
    """Optimizer steps between checkpoints inside a stage (and at every stage boundary)."""
    resume: bool = True
    """Resume from the output directory's last checkpoint when one exists."""
    progress: bool = True
    dist_timeout_s: float = 600.0


@dataclass
class TrackingConfig:
    enabled: bool = True
    uri: Optional[str] = None
    """MLflow tracking URI; null = MLFLOW_TRACKING_URI, else sqlite:///<output_dir>/mlflow.db."""
    experiment: str = "semalign"
    log_model: Literal["auto", "copy", "link", "never"] = "auto"
    """The exported student as an MLflow LoggedModel of the run: copy its files into MLflow, link to the export
    without copying, auto (copy up to log_model_copy_max_mb, else link), or never."""
    log_model_copy_max_mb: float = 1024.0
    """auto: the largest student (MiB on disk) whose files are copied into MLflow."""


@dataclass
class LmEvalConfig:
    """lm-evaluation-harness tasks for `semalign eval` (student before/after and teacher)."""

    tasks: list[str] = field(default_factory=list)
    """Task names: lm-eval's own (hellaswag, arc_easy, ... need their data sets, e.g. on a cluster), local YAML
    tasks under include_path, or the shipped `stdlib_docmodule` (built from this Python's stdlib, no download)."""
    include_path: list[str] = field(default_factory=list)
    """Folders of local task YAMLs (with local JSONL data: dataset_path json, data_files absolute)."""
    limit: Optional[float] = None
    """Documents per task (an int), a fraction (< 1), or null = all. Recorded with the scores."""
    num_fewshot: Optional[int] = None
    """Few-shot examples per prompt; null = each task's default."""
    batch_size: int = 8
    teacher: bool = True
    """Also score the teacher (once: cached by its weights, task and settings). A teacher too large for one
    device: set false and score it with lm-eval's own multi-GPU launch."""


@dataclass
class EvalConfig:
    sets: dict[str, str] = field(default_factory=dict)
    """Named held-out data files (same formats as data.path) for perplexity and teacher agreement."""
    max_sequences: int = 200
    batch_size: int = 8
    lm_eval: LmEvalConfig = field(default_factory=LmEvalConfig)


@dataclass
class RunConfig:
    name: str = "semalign"
    output_dir: str = ""
    """Where checkpoints, the student export and artifacts go; empty = runs/<name>."""
    seed: int = 0
    teacher: ModelConfig = field(default_factory=ModelConfig)
    student: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    pairing: PairingConfig = field(default_factory=PairingConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    teacher_engine: TeacherEngineConfig = field(default_factory=TeacherEngineConfig)
    student_engine: StudentEngineConfig = field(default_factory=StudentEngineConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    transport: TransportConfig = field(default_factory=TransportConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# method.preset: named complete method configurations (every key of PRESET_KEYS). A preset's value applies where
# the config file and the overrides leave the key unset; an explicit value always wins. Not part of a preset: the
# data, the budget (schedule.epochs_per_stage / tokens_per_stage), the learning rate and its schedule (the quality
# benchmark equalises the budget and picks the rate per method on validation).
PRESET_KEYS = ("method.basis", "method.map", "method.residual", "method.layer_objective", "method.output_objective",
               "method.top_k", "method.tau", "method.w_layer", "method.w_out", "method.w_label",
               "method.layer_balance", "pairing.critical_layer", "pairing.interpolate", "pairing.attribution",
               "schedule.mode", "schedule.adapter", "schedule.lora_rank", "schedule.lora_alpha",
               "schedule.lora_targets")
_PAPER = {"method.basis": "output", "method.map": "pinv", "method.residual": "layer", "method.top_k": 64,
          "method.tau": 1.0, "method.w_layer": 1.0, "method.w_out": 1.0, "method.w_label": 0.0,
          "method.layer_balance": None, "pairing.critical_layer": True, "pairing.interpolate": False,
          "pairing.attribution": "grad_x_act", "schedule.mode": "frontier", "schedule.lora_alpha": 32.0,
          "schedule.lora_targets": None}
PRESETS: dict[str, dict[str, Any]] = {
    # The paper's v1 (arXiv 2510.24208 v1; METHOD.md): output-side pinv bases folded into M = S_S S_T^T (§1-2);
    # grad x act attribution with critical-layer re-pairing (§3); the cosine layer objective (§4, "v1") with the
    # label-cosine output term as v1's label term (§5: no KL, no CE); frontier schedule (§6) with LoRA r = 16 on
    # the family's up/down/v/o projections (§6-7, v1's appendix). v1 trained only k_dag, which is known only after
    # attribution: here every stage trains (set schedule.stages to restrict).
    "paper_v1": {**_PAPER, "method.layer_objective": "cosine", "method.output_objective": "label_cosine",
                 "schedule.adapter": "lora", "schedule.lora_rank": 16},
    # The paper's v2 as its abstract reads (METHOD.md §4-5 defaults): relation geometry + top-k KL (k = 64, tau 1),
    # weights (1, 1, 0): no label term; pinv map, v1 pairing, full-parameter frontier schedule.
    "paper_v2": {**_PAPER, "method.layer_objective": "relation_geometry", "method.output_objective": "kl",
                 "schedule.adapter": "full", "schedule.lora_rank": 16},
    # The default: the SemAlign configuration with the lowest target VALIDATION perplexity in the real-teacher
    # quality benchmark (SmolLM2-135M -> a code student; docs/RESULTS.md, bench/quality/real.py): relation geometry
    # + top-64 KL + a CE label term (w 1, 1, 1), pinv map, attribution pairing, every paired layer trained at once
    # (schedule.mode full, the frontier stages' total budget in one stage). It beat the frontier rows by 10% ppl.
    "best": {**_PAPER, "method.layer_objective": "relation_geometry", "method.output_objective": "kl",
             "method.w_label": 1.0, "schedule.mode": "full", "schedule.adapter": "full", "schedule.lora_rank": 16},
}

# Fields that change how a run is watched, not what it computes (left out of the resume hash).
_NON_RESULT_KEYS = ("name", "output_dir", "runtime.progress", "runtime.resume", "runtime.checkpoint_every",
                    "runtime.dist_timeout_s", "runtime.topology", "transport.teacher_ranks", "transport.window",
                    "transport.timeout_s", "transport.spool_dir", "transport.store", "transport.store_dir",
                    "transport.store_memory_fraction", "transport.keep_spool", "method.log_grad_cosine", "tracking",
                    "eval")


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if origin is Literal:
        if value not in args:
            raise ValueError(f"config key {key!r}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ValueError(f"config key {key!r}: expected a list, got {type(value).__name__} {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"config key {key!r}: expected a mapping, got {type(value).__name__} {value!r}")
        return {_coerce(k, args[0], key): _coerce(v, args[1], f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if tp in (int, str, bool, float) and (type(value) is not tp):
        raise ValueError(f"config key {key!r}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
    return value


_REPLACED = {
    "schedule.steps_per_stage": "schedule.epochs_per_stage (a stage budget in passes over the transfer set, the same "
                                "on any number of ranks) or schedule.tokens_per_stage",
    "transport.epochs": "schedule.epochs_per_stage (every topology trains the same budget; nothing is capped)",
    "method.random_basis": "method.map=random (method.map: pinv | logit | random | none)",
}


def _build(cls, raw: Any, prefix: str = ""):
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ValueError(f"config key {prefix or '<root>'!r}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    where = f"{prefix}." if prefix else ""
    for key in unknown:
        if f"{where}{key}" in _REPLACED:
            raise ValueError(f"config key '{where}{key}' was replaced by {_REPLACED[where + key]}")
    if unknown:
        raise ValueError(
            f"unknown config key '{where}{unknown[0]}'; valid keys under {prefix or 'the root'}: "
            f"{', '.join(sorted(names))}"
        )
    kwargs = {name: _coerce(raw[name], hints[name], f"{prefix}.{name}" if prefix else name) for name in raw}
    return cls(**kwargs)


def _set_dotted(raw: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"override {dotted!r}: {part!r} is not a section")
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ValueError(f"override {text!r} must look like section.key=value (e.g. schedule.epochs_per_stage=3)")
    key, value = text.split("=", 1)
    return key.strip(), yaml.safe_load(value) if value.strip() else ""


def config_from_dict(raw: dict | None, overrides: list[str] = (), check_ranges: bool = True) -> RunConfig:
    """The config tree from a mapping and dotted overrides: unknown keys and wrong types are refused here;
    ranges too unless check_ranges=False (the CLI reports them with the file checks, all at once)."""
    raw = json.loads(json.dumps(raw or {}))
    for text in overrides:
        _set_dotted(raw, *parse_override(text))
    cfg = _build(RunConfig, raw)
    resolve(cfg, _leaf_keys(raw))
    if check_ranges:
        validate(cfg)
    return cfg


def _leaf_keys(raw: dict, prefix: str = "") -> set[str]:
    """The dotted keys a raw config sets (what the user wrote in the file or the overrides)."""
    keys = set()
    for key, value in raw.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        keys.add(dotted)
        if isinstance(value, dict):
            keys |= _leaf_keys(value, dotted)
    return keys


def resolve(cfg: RunConfig, explicit: set[str]) -> None:
    """Fill what the user left unset (`explicit`: the dotted keys they set): the preset's values, then
    hidden_mse -> method.map none. Idempotent, so a saved config.yaml reloads to the same config."""
    for key, value in PRESETS.get(cfg.method.preset, {}).items():
        if key not in explicit:
            section, name = key.split(".")
            hints = typing.get_type_hints(type(getattr(cfg, section)))
            setattr(getattr(cfg, section), name, _coerce(value, hints[name], key))
    if cfg.method.layer_objective == "hidden_mse" and "method.map" not in explicit:
        cfg.method.map = "none"  # its learned projection reads the raw teacher residual


def load_config(path: str | Path | None, overrides: list[str] = (), check_ranges: bool = True) -> RunConfig:
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"config file {str(path)!r} does not exist; pass --config with a YAML file (see configs/)")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ValueError(f"config file {str(path)!r} is not valid YAML: {err}") from None
    return config_from_dict(raw, overrides, check_ranges)


# Range of every numeric field: (dotted key, lowest value, whether the lowest itself is allowed, the fix).
# A list value (schedule.stages, pairing.manual) is checked item by item; null passes where the type allows it
# (the parser refuses null elsewhere). Keys absent from this config tree are skipped, so fields that other
# branches add or remove (schedule.epochs_per_stage, pairing.attribution_micro_batch, eval.lm_eval.*) can be
# listed before they land. Choices (Literal fields) are checked when the config is parsed.
RANGES: tuple[tuple[str, float, bool, str], ...] = (
    ("seed", 0, True, ""),
    ("data.seq_len", 1, True, ""),
    ("data.max_sequences", 1, True, ""),
    ("data.micro_batch_size", 1, True, ""),
    ("method.top_k", 0, True, " (0 = full teacher logits)"),
    ("method.tau", 0, False, ""),
    ("method.w_layer", 0, True, " (0 switches the layer term off)"),
    ("method.w_out", 0, True, " (0 switches the output term off)"),
    ("method.w_label", 0, True, " (0 switches the label term off)"),
    ("method.min_shared_tokens", 1, True, ""),
    ("method.layer_balance", 0, False, " (or null: a fixed method.w_layer)"),
    ("data.teacher_seq_len", 1, True, " (or null: derived from the text)"),
    ("pairing.manual", 1, True, " (teacher layers are 1-indexed)"),
    ("pairing.attribution_batches", 1, True, ""),
    ("pairing.attribution_micro_batch", 1, True, " (or null: data.micro_batch_size)"),
    ("schedule.stages", 1, True, " (student layers are 1-indexed)"),
    ("schedule.epochs_per_stage", 0, False, " (e.g. 1.0 = one pass over the transfer set per stage)"),
    ("schedule.tokens_per_stage", 1, True, " (or null)"),
    ("schedule.lora_rank", 1, True, ""),
    ("schedule.lora_alpha", 0, False, ""),
    ("schedule.lr", 0, False, " (e.g. 3e-4)"),
    ("schedule.warmup_steps", 0, True, ""),
    ("schedule.weight_decay", 0, True, ""),
    ("schedule.grad_clip", 0, True, " (0 turns gradient clipping off)"),
    ("schedule.grad_accum", 1, True, ""),
    ("transport.teacher_ranks", 1, True, " (or null)"),
    ("transport.window", 1, True, ""),
    ("transport.timeout_s", 0, False, ""),
    ("transport.shard_sequences", 1, True, ""),
    ("transport.store_memory_fraction", 0, False, ""),
    ("runtime.checkpoint_every", 1, True, ""),
    ("runtime.dist_timeout_s", 0, False, ""),
    ("eval.max_sequences", 1, True, ""),
    ("eval.batch_size", 1, True, ""),
    ("eval.lm_eval.limit", 1, True, " (or null: every example)"),
    ("eval.lm_eval.batch_size", 1, True, ""),
    ("eval.lm_eval.num_fewshot", 0, True, ""),
    ("tracking.log_model_copy_max_mb", 0, True, ""),
)
# Strings that must not be empty, and the fix
NON_EMPTY = {"name": "give the run a name", "tracking.experiment": "name the MLflow experiment",
             "data.text_field": "name the column that holds the text"}


def _out_of_range(value, low: float, inclusive: bool) -> bool:
    if isinstance(value, float) and not math.isfinite(value):
        return True
    return value < low or (value == low and not inclusive)


def range_problems(cfg: RunConfig) -> list[str]:
    """Every field outside its range, and the structural rules; one message per problem (key, value, fix)."""
    problems = []
    for key, low, inclusive, fix in RANGES:
        try:
            value = get_dotted(cfg, key)
        except AttributeError:
            continue
        items = value if isinstance(value, list) else [value]
        if any(v is not None and _out_of_range(v, low, inclusive) for v in items):
            problems.append(f"{key}={value!r} must be {'>=' if inclusive else '>'} {low:g}"
                            f"{' (each item)' if isinstance(value, list) else ''}{fix}")
    for key, fix in NON_EMPTY.items():
        if not str(get_dotted(cfg, key)).strip():
            problems.append(f"{key} is empty; {fix}")
    stages = cfg.schedule.stages
    if stages is not None and not stages:
        problems.append("schedule.stages is empty; list student layers (1-indexed) or use null for all")
    elif stages and stages != sorted(set(stages)):
        problems.append(f"schedule.stages={stages} must be increasing (shallow to deep) without repeats")
    if cfg.schedule.lora_targets is not None and not cfg.schedule.lora_targets:
        problems.append("schedule.lora_targets is empty; list sub-module names or use null for the family's "
                        "defaults")
    if not 0 < cfg.transport.store_memory_fraction <= 1:
        problems.append(f"transport.store_memory_fraction={cfg.transport.store_memory_fraction} must be in (0, 1]")
    return problems + _method_problems(cfg.method)


def validate(cfg: RunConfig) -> None:
    """The checks that need no files (ranges, structure), all reported at once; the checks against files and
    models are in checks.py (`semalign config --check`)."""
    problems = range_problems(cfg)
    if problems:
        raise ValueError(problems[0] if len(problems) == 1 else
                         f"{len(problems)} problems in the config:\n  - " + "\n  - ".join(problems))


def _method_problems(m: MethodConfig) -> list[str]:
    """The method options that constrain each other (map, layer objective, gradient balancing)."""
    problems = []
    if m.map == "none" and m.layer_objective in ("cosine", "fisher_logits", "mse"):
        problems.append(f"config keys 'method.map'=none and 'method.layer_objective'={m.layer_objective} do not go "
                         f"together: {m.layer_objective} compares the student with the teacher's target in student "
                         "space, which needs a map; set method.map to pinv, logit or random, or use "
                         "method.layer_objective=relation_geometry (width-agnostic) with method.map=none")
    if m.layer_objective == "hidden_mse" and m.map != "none":
        problems.append(f"config keys 'method.layer_objective'=hidden_mse and 'method.map'={m.map} contradict each "
                         "other: hidden_mse learns its own projection of the raw teacher residual; set "
                         "method.map=none or leave method.map unset")
    if m.map == "logit" and m.basis != "output":
        problems.append("config key 'method.basis'=input has no effect with method.map=logit (the map is built "
                         "from both LM heads and final-norm gains); leave method.basis=output")
    if m.output_objective == "uld" and m.top_k == 0:
        problems.append("method.top_k must be > 0 with method.output_objective 'uld' (the teacher sends its top-k "
                        "probabilities, sorted)")
    if m.layer_balance is None and not m.log_grad_cosine:
        return problems
    key = "method.layer_balance" if m.layer_balance is not None else "method.log_grad_cosine"
    if m.layer_objective == "none" or m.w_layer <= 0:
        problems.append(f"config key {key!r} compares the layer and output terms' gradients but there is no layer "
                         "term: set method.layer_objective and method.w_layer > 0, or unset it")
    if m.output_objective == "none" or m.w_out <= 0:
        problems.append(f"config key {key!r} holds the layer gradient against the output term's gradient but "
                         "there is no output term (method.output_objective none or method.w_out 0): set "
                         f"method.output_objective (e.g. kl) and method.w_out > 0, or unset {key}")
    return problems


def get_dotted(cfg: Any, dotted: str) -> Any:
    node = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def to_dict(cfg: RunConfig) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def flatten(cfg: RunConfig) -> dict[str, Any]:
    """Dotted key -> value, for MLflow params."""
    out: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict) and node and not prefix.endswith("eval.sets"):
            for k, v in node.items():
                walk(v, f"{prefix}.{k}" if prefix else k)
        else:
            out[prefix] = node

    walk(to_dict(cfg), "")
    return out


def result_hash(cfg: RunConfig) -> str:
    """Hash of everything that changes what a run computes (a resume directory must match it)."""
    flat = {k: v for k, v in flatten(cfg).items()
            if not any(k == p or k.startswith(p + ".") for p in _NON_RESULT_KEYS)}
    return hashlib.sha256(json.dumps(flat, sort_keys=True, default=str).encode()).hexdigest()[:16]


def resolved_output_dir(cfg: RunConfig) -> Path:
    return Path(cfg.output_dir or f"runs/{cfg.name}")
