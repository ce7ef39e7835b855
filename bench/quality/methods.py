"""What the quality benchmark runs: methods as config overrides, model pairs, and the sizes (budgets).

Every method is a set of dotted overrides of configs/demo.yaml run through `semalign_ds.run.pipeline.run`, so the
baselines use the project's own code paths (schedule.mode full, method.layer_objective hidden_mse, ...).
Equal budget: within a pair every trained method sees the same transfer set, the same micro-batch size and the
same number of optimizer steps (frontier: tokens_per_stage per student layer; full: the same total in one stage),
hence the same number of tokens. The learning rate is chosen per method on the target validation split over the
same grid (`Size.lr_grid`); ablations keep SemAlign v2's chosen rate (one change at a time), and the other pairs
reuse the main pair's choice per method.
"""
from __future__ import annotations

from dataclasses import dataclass, field

FULL = ("schedule.mode=full",)
NO_LAYER = ("method.layer_objective=none",)


@dataclass(frozen=True)
class Method:
    name: str
    label: str
    group: str  # reference | baseline | semalign | ablation
    overrides: tuple[str, ...] = ()
    train: bool = True
    lr_from: str | None = None  # None: searched on validation; else the chosen rate of that method
    note: str = ""
    setting: str | None = None  # real pairs: the teacher setting (spool) its packets come from


METHODS: dict[str, Method] = {m.name: m for m in [
    Method("no_transfer", "no transfer (student as pretrained)", "reference", train=False),
    Method("sft", "SFT (CE, all layers)", "baseline", FULL + NO_LAYER + ("method.output_objective=ce",)),
    Method("logit_kd", "logit KD (KL, all layers)", "baseline", FULL + NO_LAYER),
    Method("kd_labels", "KD + labels (KL + CE, all layers)", "baseline", FULL + NO_LAYER + ("method.w_label=1.0",)),
    Method("hidden_mse_kd", "hidden MSE KD + KL (learned proj., all layers)", "baseline",
           FULL + ("method.layer_objective=hidden_mse",)),
    Method("sft_frontier", "SFT, frontier schedule", "baseline", NO_LAYER + ("method.output_objective=ce",)),
    Method("semalign_v2", "SemAlign v2 (geometry + KL, frontier)", "semalign"),
    Method("semalign_v2_labels", "SemAlign v2 + labels", "semalign", ("method.w_label=1.0",)),
    Method("semalign_v1", "SemAlign v1 (cosine + label cosine)", "semalign",
           ("method.layer_objective=cosine", "method.output_objective=label_cosine")),
    Method("abl_random_basis", "v2, random basis (no recomposition)", "ablation", ("method.map=random",),
           lr_from="semalign_v2"),
    Method("abl_no_kl", "v2 without KL (layer objective only)", "ablation", ("method.output_objective=none",),
           lr_from="semalign_v2"),
    Method("abl_no_layer", "v2 without layer objective (= KL, frontier)", "ablation", NO_LAYER,
           lr_from="semalign_v2"),
    Method("abl_residual_span", "v2, residual span", "ablation", ("method.residual=span",), lr_from="semalign_v2"),
    Method("abl_default_pairing", "v2, default pairing (no attribution re-pairing)", "ablation",
           ("pairing.critical_layer=false",), lr_from="semalign_v2"),
    Method("abl_w_layer_0.1", "v2, layer weight 0.1 (KL weight 1)", "ablation", ("method.w_layer=0.1",),
           lr_from="semalign_v2"),
]}

# ---- the real pairs (issue 11; bench/quality/real.py): SmolLM2-135M teaches; packets come from one spool per
# teacher setting (what changes the packets), shared by every method that reads it. A method's overrides start with
# its setting's. SemAlign rows pin w_label 0 (METHOD.md's v2 terms) unless they say "labels".
# The real pairs' budget and fixed settings (every method's overrides come after these).
REAL_BASE = ("method.preset=null", "schedule.mode=frontier", "transport.codec=lossless", "runtime.progress=false",
             "runtime.resume=false", "runtime.checkpoint_every=100000",
             "data.max_sequences=256", "data.micro_batch_size=8", "data.seq_len=128", "schedule.epochs_per_stage=1",
             "schedule.warmup_steps=3", "method.w_label=0.0", "pairing.attribution_batches=2",
             "pairing.attribution_micro_batch=4", "method.target_dtype=float32", "method.min_shared_tokens=1000")

SETTINGS: dict[str, tuple[str, ...]] = {
    "nothing": ("method.layer_objective=none", "method.output_objective=ce", "pairing.critical_layer=false"),
    "kl64": ("method.layer_objective=none", "method.top_k=64", "pairing.critical_layer=false"),
    "kl256": ("method.layer_objective=none", "method.top_k=256", "pairing.critical_layer=false"),
    "kl4096": ("method.layer_objective=none", "method.top_k=4096", "pairing.critical_layer=false"),
    "uld64": ("method.layer_objective=none", "method.output_objective=uld", "pairing.critical_layer=false"),
    **{f"res_{m}": (f"method.map={m}",) for m in ("pinv", "logit", "random", "none")},
    **{f"state_{m}": ("method.layer_objective=fisher_logits", f"method.map={m}") for m in ("pinv", "logit", "random")},
    **{f"mse_{m}": ("method.layer_objective=mse", f"method.map={m}") for m in ("pinv", "logit", "random")},
    "pair_ablation": ("pairing.attribution=ablation",),
    "pair_formula": ("pairing.critical_layer=false",),
}


def _real(name: str, label: str, group: str, setting: str, extra: tuple = (), lr_from: str | None = "r_geo_pinv",
          mode: tuple = ()) -> Method:
    return Method(name, label, group, SETTINGS[setting] + mode + extra, lr_from=lr_from, setting=setting)


_MAP_LABEL = {"pinv": "pinv-pinv map (paper)", "logit": "logit-matching map", "random": "random basis",
              "none": "no map"}
REAL_METHODS: dict[str, Method] = {m.name: m for m in [
    Method("no_transfer", "no transfer (student as pretrained)", "reference", train=False),
    _real("r_sft", "SFT (CE, all layers)", "baseline", "nothing", mode=FULL, lr_from=None),
    _real("r_kd64", "logit KD top-64 (all layers)", "baseline", "kl64", mode=FULL, lr_from=None),
    _real("r_kd256", "logit KD top-256 (all layers)", "baseline", "kl256", mode=FULL, lr_from="r_kd64"),
    _real("r_kd4096", "logit KD top-4096 (all layers)", "baseline", "kl4096", mode=FULL, lr_from="r_kd64"),
    _real("r_kd_ce", "KD top-64 + CE (all layers)", "baseline", "kl64", ("method.w_label=1.0",), lr_from=None,
          mode=FULL),
    _real("r_hidden_mse", "hidden-MSE KD + KL (learned proj., all layers)", "baseline", "res_none",
          ("method.layer_objective=hidden_mse",), lr_from=None, mode=FULL),
    _real("r_uld", "ULD KD (sorted probabilities, all layers)", "baseline", "uld64", mode=FULL, lr_from="r_kd64"),
    _real("r_kl_frontier", "KL only, frontier (no layer term)", "ablation", "kl64"),
    _real("r_geo_pinv", "SemAlign v2: geometry + KL, pinv-pinv map", "semalign", "res_pinv", lr_from=None),
    *[_real(f"r_geo_{m}", f"geometry + KL, {_MAP_LABEL[m]}", "ablation", f"res_{m}")
      for m in ("logit", "random", "none")],
    *[_real(f"r_cos_{m}", f"cosine + KL, {_MAP_LABEL[m]}", "ablation", f"res_{m}", ("method.layer_objective=cosine",))
      for m in ("pinv", "logit", "random")],
    *[_real(f"r_fisher_{m}", f"Fisher-logits + KL, {_MAP_LABEL[m]}", "ablation", f"state_{m}",
            lr_from=None if m == "logit" else "r_geo_pinv") for m in ("pinv", "logit", "random")],
    *[_real(f"r_mse_{m}", f"MSE + KL, {_MAP_LABEL[m]}", "ablation", f"mse_{m}") for m in ("pinv", "logit", "random")],
    _real("r_geo_balanced", "geometry + KL, layer gradient held at 0.3 x the KL gradient", "ablation", "res_pinv",
          ("method.layer_balance=0.3",)),
    _real("r_geo_full", "geometry + KL, full schedule (all layers at once)", "ablation", "res_pinv", mode=FULL),
    _real("r_geo_full_labels", "geometry + KL + CE, full schedule (all layers at once)", "ablation", "res_pinv",
          ("method.w_label=1.0",), lr_from="r_geo_labels", mode=FULL),
    _real("r_geo_ablation_pairing", "geometry + KL, pairing by ablation", "ablation", "pair_ablation"),
    _real("r_geo_formula_pairing", "geometry + KL, pairing by the formula (no attribution)", "ablation",
          "pair_formula"),
    _real("r_geo_labels", "SemAlign v2 + labels (geometry + KL + CE)", "semalign", "res_pinv", ("method.w_label=1.0",),
          lr_from=None),
]}


@dataclass(frozen=True)
class PairPlan:
    name: str
    label: str
    methods: tuple[str, ...]
    real: bool = False  # a SmolLM2 pair (bench/quality/real.py), not one of the tiny from-scratch pairs (run.py)


PAIRS: dict[str, PairPlan] = {p.name: p for p in [
    PairPlan("main", "Llama teacher -> smaller Llama student (same tokenizer)", tuple(METHODS)),
    PairPlan("cross_family", "GPT-NeoX teacher -> Llama student (cross-family)",
             ("no_transfer", "sft", "logit_kd", "hidden_mse_kd", "semalign_v2")),
    PairPlan("cross_tokenizer", "Llama teacher with a larger BPE vocabulary -> Llama student (cross-tokenizer)",
             ("no_transfer", "sft", "logit_kd", "semalign_v2")),
    PairPlan("mamba", "GPT-NeoX teacher -> Mamba student (transformer -> state-space)",
             ("no_transfer", "sft", "logit_kd", "semalign_v2", "abl_random_basis")),
    PairPlan("code", "SmolLM2-135M -> a small code student with SmolLM2's tokenizer (3 x 192)", tuple(REAL_METHODS),
             real=True),
    PairPlan("pruned", "SmolLM2-135M -> SmolLM2 pruned to 4 of its 30 layers (same tokenizer)",
             ("no_transfer", "r_sft", "r_kd64", "r_geo_pinv"), real=True),
    PairPlan("demo", "SmolLM2-135M -> the demo's 4096-token student (cross-tokenizer)",
             ("no_transfer", "r_sft", "r_kd64", "r_uld", "r_geo_pinv"), real=True),
]}
REAL_PAIRS = tuple(p for p in PAIRS if PAIRS[p].real)
METHODS.update({k: v for k, v in REAL_METHODS.items() if k != "no_transfer"})


@dataclass(frozen=True)
class Size:
    name: str
    demo_scale: str
    lr_grid: tuple[float, ...]
    seeds: int
    overrides: tuple[str, ...]
    eval_sequences: int
    device: str = "cpu"
    workers: int = 2
    extra: dict = field(default_factory=dict)  # recipe of the extra models (assets.py)


# method.w_label=0.0 pins METHOD.md's v2 weights (1, 1, 0) under every method; methods that add labels say so.
# (The project default became w_label 1.0 from these very results: docs/RESULTS.md.) method.preset=null and
# schedule.mode=frontier: the rows build on the paper's frontier schedule with the keys they name, not on whatever
# the `best` preset (the project default, whose values the field defaults are) is at the time; transport.codec=
# lossless: the rows measure the methods on the teacher's packets as emitted (bench/quality/codec.py measures the
# codecs).
_COMMON = ("method.preset=null", "schedule.mode=frontier", "transport.codec=lossless", "runtime.progress=false",
           "runtime.resume=false", "runtime.checkpoint_every=100000",
           "pairing.attribution_batches=2", "schedule.warmup_steps=3", "method.w_label=0.0")

SIZES: dict[str, Size] = {s.name: s for s in [
    Size("tiny", "tiny", (3e-3,), 1,
         _COMMON + ("data.seq_len=32", "data.max_sequences=48", "data.micro_batch_size=4",
                    "schedule.tokens_per_stage=256", "schedule.warmup_steps=1", "method.min_shared_tokens=100",
                    "method.top_k=16"),
         eval_sequences=8, workers=1,
         extra={"cross_vocab": 448, "mamba_layers": 1, "mamba_state": 4}),
    Size("small", "default", (1e-3, 3e-3, 1e-2), 3,
         _COMMON + ("data.micro_batch_size=8", "schedule.tokens_per_stage=63488"),  # 62 steps of 8 x 128
         eval_sequences=64, workers=2,
         extra={"cross_vocab": 6144, "mamba_layers": 2, "mamba_state": 16}),
    Size("medium", "quality-medium", (1e-3, 3e-3, 1e-2), 3,
         _COMMON + ("data.micro_batch_size=16", "schedule.tokens_per_stage=122880", "runtime.device=cuda",
                    "teacher_engine.offload=none", "pairing.attribution_batches=4"),
         eval_sequences=256, device="cuda", workers=8,
         extra={"cross_vocab": 12288, "mamba_layers": 2, "mamba_state": 16}),
]}

# The demo recipe `quality-medium` (assets.recipe_of: passed to the demo as data): a bigger pair
# (teacher 8 x 512, student 4 x 256, 8k vocabulary, 256 tokens) pretrained on one GPU; the target domain is small
# (~550 sequences of 256 tokens), so the teacher sees it ~4 times and the transfer runs ~3.5 epochs of it.
MEDIUM_RECIPE_CHANGES = dict(vocab_size=8192, seq_len=256, batch=16, teacher_steps=400,
                             teacher=dict(layers=8, hidden=512, heads=8, intermediate=1376, lr=1e-3),
                             student=dict(layers=4, hidden=256, heads=4, intermediate=688, lr=2e-3),
                             transfer_sequences=1000, general_test_max_seqs=256)


def lr_of_run(method: Method, chosen: dict[str, float]) -> float | None:
    """The learning rate a final run of `method` uses, given the rates chosen on the main pair."""
    return chosen.get(method.lr_from or method.name)
