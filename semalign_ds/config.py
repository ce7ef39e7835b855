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


@dataclass
class DataConfig:
    path: str = ""
    """Transfer data: a file, glob or directory of JSONL/text/parquet, read through `datasets`."""
    format: Literal["auto", "jsonl", "text", "parquet"] = "auto"
    text_field: str = "text"
    """Column holding the text (JSONL/parquet)."""
    seq_len: int = 512
    """Tokens per packed sequence; must not exceed either model's limit."""
    max_sequences: int = 1000
    """Transfer-set size in packed sequences (the paper used 1000 examples)."""
    micro_batch_size: int = 8
    """Sequences per rank per micro-step."""


@dataclass
class MethodConfig:
    basis: Literal["output", "input"] = "output"
    """Semantic basis: pinv of the LM head (v1) or unit input-embedding rows (ablation)."""
    random_basis: bool = False
    """Ablation: a random basis of the same shape in place of S_T/S_S (no recomposition)."""
    residual: Literal["layer", "span"] = "layer"
    """Teacher residual of source layer l (layer) or of the whole span of source layers (span)."""
    layer_objective: Literal["relation_geometry", "cosine", "fisher_logits", "hidden_mse", "none"] = "relation_geometry"
    """hidden_mse: baseline layer KD, MSE through a learned linear projection of the unaligned teacher residual."""
    output_objective: Literal["kl", "label_cosine", "ce", "none"] = "kl"
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
    attribution_batches: int = 4
    """Batches of transfer data used for layer attribution."""


@dataclass
class ScheduleConfig:
    mode: Literal["frontier", "full"] = "frontier"
    """frontier: one trainable layer per stage (SemAlign); full: every layer trainable in one stage (baselines)."""
    stages: Optional[list[int]] = None
    """Student layers to train, shallow to deep (1-indexed); null = all."""
    steps_per_stage: int = 100
    tokens_per_stage: Optional[int] = None
    """If set, a stage runs until this many tokens (overrides steps_per_stage)."""
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
    """spool: sequences per shard."""
    epochs: int = 1
    """spool: passes over the spool per stage budget (the stage still stops at steps_per_stage)."""


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


@dataclass
class EvalConfig:
    sets: dict[str, str] = field(default_factory=dict)
    """Named held-out data files (same formats as data.path) for perplexity and teacher agreement."""
    max_sequences: int = 200
    batch_size: int = 8


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


# Fields that change how a run is watched, not what it computes (left out of the resume hash).
_NON_RESULT_KEYS = ("name", "output_dir", "runtime.progress", "runtime.resume", "runtime.checkpoint_every",
                    "runtime.dist_timeout_s", "runtime.topology", "transport.teacher_ranks", "transport.window",
                    "transport.timeout_s", "transport.spool_dir", "tracking", "eval")


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


def _build(cls, raw: Any, prefix: str = ""):
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ValueError(f"config key {prefix or '<root>'!r}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        where = f"{prefix}." if prefix else ""
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
        raise ValueError(f"override {text!r} must look like section.key=value (e.g. schedule.steps_per_stage=200)")
    key, value = text.split("=", 1)
    return key.strip(), yaml.safe_load(value) if value.strip() else ""


def config_from_dict(raw: dict | None, overrides: list[str] = (), check_ranges: bool = True) -> RunConfig:
    """The config tree from a mapping and dotted overrides: unknown keys and wrong types are refused here;
    ranges too unless check_ranges=False (the CLI reports them with the file checks, all at once)."""
    raw = json.loads(json.dumps(raw or {}))
    for text in overrides:
        _set_dotted(raw, *parse_override(text))
    cfg = _build(RunConfig, raw)
    if check_ranges:
        validate(cfg)
    return cfg


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
    ("method.top_k", 0, True, " (0 = full teacher logits, colocated only)"),
    ("method.tau", 0, False, ""),
    ("method.w_layer", 0, True, " (0 switches the layer term off)"),
    ("method.w_out", 0, True, " (0 switches the output term off)"),
    ("method.w_label", 0, True, " (0 switches the label term off)"),
    ("method.min_shared_tokens", 1, True, ""),
    ("pairing.manual", 1, True, " (teacher layers are 1-indexed)"),
    ("pairing.attribution_batches", 1, True, ""),
    ("pairing.attribution_micro_batch", 1, True, " (or null: data.micro_batch_size)"),
    ("schedule.stages", 1, True, " (student layers are 1-indexed)"),
    ("schedule.steps_per_stage", 1, True, ""),
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
    ("transport.epochs", 1, True, ""),
    ("runtime.checkpoint_every", 1, True, ""),
    ("runtime.dist_timeout_s", 0, False, ""),
    ("eval.max_sequences", 1, True, ""),
    ("eval.batch_size", 1, True, ""),
    ("eval.lm_eval.limit", 1, True, " (or null: every example)"),
    ("eval.lm_eval.batch_size", 1, True, ""),
    ("eval.lm_eval.num_fewshot", 0, True, ""),
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
    if cfg.method.top_k == 0 and cfg.runtime.topology != "colocated":
        problems.append(f"method.top_k=0 (full teacher logits) only works with runtime.topology=colocated, not "
                        f"{cfg.runtime.topology}: set method.top_k (e.g. 64)")
    return problems


def validate(cfg: RunConfig) -> None:
    """The checks that need no files (ranges, structure), all reported at once; the checks against files and
    models are in checks.py (`semalign config --check`)."""
    problems = range_problems(cfg)
    if problems:
        raise ValueError(problems[0] if len(problems) == 1 else
                         f"{len(problems)} problems in the config:\n  - " + "\n  - ".join(problems))


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
