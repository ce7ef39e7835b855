"""The run config: typed models (pydantic v2) with each field's type, range, default and doc in one place.

`load_config(path, overrides)` (or `config_from_dict`) is the only way in: strict YAML, dotted overrides, an unknown
key is refused with the nearest valid one, a wrong type or a value out of range names the key, cross-field rules
are validators that run once. `semalign config --schema` prints the JSON Schema of `RunConfig`.

Presets (`method.preset`): a preset is a complete method and schedule configuration (every key of PRESET_KEYS).
Choosing one sets all of them; the keys a user sets on top, where they differ from the preset, are recorded in
`method.overrides`, so the resolved config and the MLflow params say exactly what ran. Field defaults are the
default preset's (`best`) values. A resolved config reloads to itself, and switching its preset switches every
value that was not an override.
"""
from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from semalign_ds.files import json_digest


def _non_empty(value: str) -> str:
    if not value.strip():
        raise ValueError("is empty")
    return value


PosInt = Annotated[int, Field(ge=1)]
NonNegInt = Annotated[int, Field(ge=0)]
PosFloat = Annotated[float, Field(gt=0, allow_inf_nan=False)]
NonNegFloat = Annotated[float, Field(ge=0, allow_inf_nan=False)]
NonEmptyStr = Annotated[str, AfterValidator(_non_empty)]


class Section(BaseModel):
    """A config section: unknown keys refused, every field documented by the docstring under it."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)


class ModelConfig(Section):
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


class DataConfig(Section):
    path: str = ""
    """Transfer data: a file, glob or directory of JSONL/text/parquet, read through `datasets`."""
    format: Literal["auto", "jsonl", "text", "parquet"] = "auto"
    """File format; auto: from the file suffix."""
    text_field: NonEmptyStr = "text"
    """Column holding the text (JSONL/parquet)."""
    seq_len: PosInt = 512
    """Student tokens per packed sequence; must not exceed either model's limit."""
    teacher_seq_len: Optional[PosInt] = None
    """Different tokenizers only: teacher positions per block (the teacher reads each block's characters with its
    own tokenizer); null = the longest block's need rounded up to a multiple of 8. Too short is an error."""
    max_sequences: PosInt = 1000
    """Transfer-set size in packed sequences (the paper used 1000 examples)."""
    micro_batch_size: PosInt = 8
    """Sequences per rank per micro-step."""
    chat: bool = False
    """Conversation data: every record holds a `messages` list of {role, content} (system, user, assistant, tool;
    multi-turn) or a `prompt` + `completion` pair (strings or message lists), in JSONL, parquet or a `datasets`
    save_to_disk folder; each model renders it with its own chat template, and the losses cover the answers only
    (data.train_on_prompts). Eval sets are then conversations too, scored as answer bits per byte."""
    chat_template: Optional[str] = None
    """data.chat: a Jinja file with the student's chat template; null = the student tokenizer's own (a tokenizer
    without one needs this file)."""
    teacher_chat_template: Optional[str] = None
    """data.chat: a Jinja file with the teacher's chat template; null = the teacher tokenizer's own."""
    train_on_prompts: bool = False
    """data.chat: supervise every real token (prompts and template text too), not only the answers (the assistant
    contents and the token that closes each)."""
    chat_overlong: Literal["drop", "truncate"] = "drop"
    """data.chat: a conversation longer than data.seq_len student tokens is dropped, or truncated to its longest
    prefix of whole messages ending with an answer that fits (dropped if none fits); counted and logged either way."""

    replay_path: Optional[str] = None
    """General-domain documents (the student's own domain; a file, glob or directory of JSONL/text/parquet, read
    with data.text_field) mixed into the transfer set against forgetting: with data.replay_fraction > 0 that share
    of the packed sequences comes from here and the teacher supervises them like the rest. null = no mix."""
    replay_fraction: Annotated[float, Field(ge=0, lt=1)] = 0.0
    """Share of the transfer set's packed sequences taken from data.replay_path (0 <= f < 1; > 0 needs
    data.replay_path): of max_sequences N, N - round(f N) come from data.path and the rest from the replay data."""

    @model_validator(mode="after")
    def _rules(self) -> "DataConfig":
        if self.replay_fraction > 0 and not self.replay_path:
            raise ValueError(f"data.replay_fraction={self.replay_fraction} needs data.replay_path (the general-domain "
                             f"documents to mix in); set it, or data.replay_fraction=0")
        if self.replay_path and self.replay_fraction == 0:
            raise ValueError(f"data.replay_path={self.replay_path!r} is set but data.replay_fraction is 0, so nothing "
                             f"would be mixed in; set data.replay_fraction (e.g. 0.25) or unset data.replay_path")
        if not self.chat:
            stray = [k for k, v in (("chat_template", self.chat_template), ("teacher_chat_template",
                                    self.teacher_chat_template), ("train_on_prompts", self.train_on_prompts),
                                    ("chat_overlong", self.chat_overlong != "drop")) if v]
            if stray:
                raise ValueError("\n".join(f"data.{k} is set but data.chat is false; set data.chat=true for "
                                           f"conversation data, or remove data.{k}" for k in stray))
        return self


class MethodConfig(Section):
    preset: Optional[Literal["paper_v1", "paper_v2", "best", "sft", "kd", "kd_ce", "hidden_mse"]] = "best"
    """A named complete method and schedule configuration (PRESETS): choosing one sets every key of PRESET_KEYS;
    keys set on top of it are recorded in method.overrides. best (the default): what the real-teacher quality
    benchmark chose on validation (docs/RESULTS.md); paper_v1, paper_v2: the paper; sft, kd, kd_ce, hidden_mse:
    the baselines. null: no preset (the field defaults, which are best's values, plus what you set)."""
    overrides: dict[str, Any] = Field(default_factory=dict)
    """Written by semalign, not read: the preset keys this config sets to values other than the preset's (dotted
    key -> value). Recomputed on every load from the values themselves."""
    basis: Literal["output", "input"] = "output"
    """Semantic basis of the pinv and random maps: pinv of the LM head (v1) or unit input-embedding rows."""
    map: Literal["pinv", "logit", "random", "none"] = "pinv"
    """The alignment map M (D_S x D_T) from teacher to student space. pinv: M = S_S S_T^T (the paper, METHOD §2);
    logit: the logit-matching map pinv(W_S diag(g_S)) W_T diag(g_T) over the shared vocabulary (METHOD §8); random:
    random unit bases in place of S_T / S_S (ablation); none: no map, the targets are the raw teacher residuals
    (D_T wide), only for relation_geometry (width-agnostic) and hidden_mse (its own learned projection;
    hidden_mse implies none when method.map is not set)."""
    residual: Literal["layer", "span"] = "layer"
    """Teacher residual of source layer l (layer) or of the whole span of source layers (span)."""
    layer_objective: Literal["relation_geometry", "cosine", "fisher_logits", "mse", "hidden_mse",
                             "none"] = "relation_geometry"
    """relation_geometry (v2), cosine (v1), fisher_logits (ACL); mse: mean squared error between the student
    residual and the mapped teacher residual M R_T without the per-token normalisation; hidden_mse: baseline layer
    KD, MSE through a learned linear projection of the unaligned teacher residual (method.map none); none."""
    layer_balance: Optional[PosFloat] = None
    """Gradient-balanced layer weight: when set (a fraction > 0), every micro-step sets the layer term's weight so
    that its gradient on the trainable parameters has this fraction of the norm of the weighted output term's
    gradient (w_layer must be > 0 to keep the term on; its value is then unused). Costs one extra forward and two
    extra backward passes per micro-step; logs grad_cos_layer_kl and w_layer_effective. null = fixed w_layer."""
    log_grad_cosine: bool = False
    """Log grad_cos_layer_kl (cosine between the layer and output terms' gradients) every step without balancing
    (the same extra forward and two backward passes). Watching only: not part of the result hash."""
    output_objective: Literal["kl", "uld", "label_cosine", "ce", "none"] = "kl"
    """kl: KL to the teacher's top-k (+ tail bucket; across tokenizers over the shared vocabulary, the rest of the
    teacher's mass in the tail, at exact positions); uld: sorted-probability matching (needs no shared ids);
    label_cosine (v1); ce: cross-entropy on the labels; none."""
    top_k: NonNegInt = 64
    """Teacher logits sent as top-k plus a tail bucket; 0 = full logits (colocated only)."""
    tau: PosFloat = 1.0
    """KL temperature."""
    w_layer: NonNegFloat = 1.0
    """Weight of the layer objective (0 switches it off)."""
    w_out: NonNegFloat = 1.0
    """Weight of the output objective (0 switches it off)."""
    w_label: NonNegFloat = 1.0
    """Weight of a cross-entropy label term on every trained position (0 switches it off)."""
    min_shared_tokens: PosInt = 1000
    """Fewest shared vocabulary entries accepted between teacher and student."""
    target_dtype: Literal["float32", "bfloat16"] = "bfloat16"
    """dtype of the aligned targets the teacher emits."""

    @model_validator(mode="after")
    def _rules(self) -> "MethodConfig":
        problems = method_problems(self)
        if problems:
            raise ValueError("\n".join(problems))
        return self


class PairingConfig(Section):
    critical_layer: bool = True
    """Re-pair the student layer nearest the teacher's most attributed layer to it (METHOD §3)."""
    interpolate: bool = False
    """Mix two neighbouring teacher layers for non-integer depth ratios."""
    manual: Optional[list[PosInt]] = None
    """Explicit source layer per student layer (overrides the formula; teacher layers are 1-indexed)."""
    attribution: Literal["grad_x_act", "ablation"] = "grad_x_act"
    """How teacher layers are scored for the critical layer: grad_x_act (METHOD §3, one forward + backward per
    batch) or ablation (METHOD §8: the rise of the teacher's LM loss when layer l's residual contribution is
    removed; L_T + 1 forwards per batch). The critical layer is the argmax either way."""
    attribution_batches: PosInt = 4
    """Micro-batches of transfer data (per rank) used for layer attribution."""
    attribution_micro_batch: Optional[PosInt] = None
    """Sequences per attribution forward+backward (null = data.micro_batch_size); attribution keeps every layer's
    activations for the backward, so it needs a smaller micro-batch than the teacher's inference."""


class ScheduleConfig(Section):
    mode: Literal["frontier", "full"] = "full"
    """frontier: one trainable layer per stage (the paper's schedule); full: every listed layer trainable in one
    stage, with the frontier stages' total budget, every paired layer's target supervising at once."""
    stages: Optional[list[PosInt]] = None
    """Student layers to train, shallow to deep (1-indexed); null = all."""
    epochs_per_stage: PosFloat = 1.0
    """Passes over the transfer set per stage (fractions allowed); the same work on 1 rank or 128: steps =
    ceil(epochs * micro-batches per rank per epoch / grad_accum). Printed and logged at the start of every run."""
    tokens_per_stage: Optional[PosInt] = None
    """If set, a stage trains on this many token positions (over all ranks) instead of epochs_per_stage."""
    adapter: Literal["full", "lora"] = "full"
    """Train the frontier layer's parameters (full) or a LoRA on its projections (lora)."""
    lora_rank: PosInt = 16
    """LoRA rank."""
    lora_alpha: PosFloat = 32.0
    """LoRA scale numerator (scale = alpha / rank)."""
    lora_targets: Optional[list[str]] = None
    """Sub-module names for LoRA; null = the family's defaults (up/down/v/o as v1)."""
    lr: PosFloat = 3.0e-4
    """Peak learning rate (linear warmup, then cosine decay to 0 over each stage)."""
    warmup_steps: NonNegInt = 10
    """Optimizer steps of linear warmup at the start of each stage."""
    weight_decay: NonNegFloat = 0.0
    """AdamW weight decay."""
    grad_clip: NonNegFloat = 1.0
    """Gradient norm clipping (0 turns it off)."""
    grad_accum: PosInt = 1
    """Micro-steps per optimizer step."""

    @model_validator(mode="after")
    def _rules(self) -> "ScheduleConfig":
        if self.stages is not None and not self.stages:
            raise ValueError("schedule.stages is empty; list student layers (1-indexed) or use null for all")
        if self.stages and self.stages != sorted(set(self.stages)):
            raise ValueError(f"schedule.stages={self.stages} must be increasing (shallow to deep) without repeats")
        if self.lora_targets is not None and not self.lora_targets:
            raise ValueError("schedule.lora_targets is empty; list sub-module names or use null for the family's "
                             "defaults")
        return self


class TeacherEngineConfig(Section):
    ds_config: str = "ds_configs/teacher_zero3_offload_cpu.json"
    """DeepSpeed ZeRO-3 inference template (edit it; pure functions fill the rest)."""
    offload: Literal["cpu", "nvme", "none"] = "cpu"
    """Where the teacher's parameters live between uses: host memory, node-local NVMe, or the device."""
    nvme_path: Optional[str] = None
    """offload nvme: the directory on node-local NVMe."""


class StudentEngineConfig(Section):
    ds_config: str = "ds_configs/student_zero2.json"
    """DeepSpeed ZeRO-2 training template."""


class TransportConfig(Section):
    """How packets travel from teacher to student (DESIGN.md "Topologies")."""

    teacher_ranks: Optional[PosInt] = None
    """disaggregated: how many of the world's ranks are teacher ranks (the rest are student ranks)."""
    window: PosInt = 2
    """stream: packets in flight per teacher->student link (the teacher computes ahead by this many)."""
    timeout_s: PosFloat = 120.0
    """stream: how long one side waits for the other before failing with a clear error."""
    spool_dir: str = ""
    """spool: the directory of shards + manifest (`semalign teach --out` / `semalign train --from-spool`)."""
    shard_sequences: PosInt = 256
    """spool and local packet store: sequences per shard."""
    store: Literal["auto", "memory", "disk"] = "auto"
    """Where colocated and disaggregated runs keep the teacher's packets (one teacher pass per sample, every stage
    trains from them): host memory, or a local spool per rank (store_dir); auto: memory when a node's student
    ranks' packets fit in transport.store_memory_fraction of its RAM, else disk."""
    store_dir: str = ""
    """Local spool of the disk store; empty = <output_dir>/packets. Point it at node-local scratch on clusters."""
    store_memory_fraction: Annotated[float, Field(gt=0, le=1)] = 0.25
    """auto store: the share of the node's RAM (split over its student ranks) the memory store may take."""
    keep_spool: bool = False
    """Keep the disk store after the run (removed at the end by default)."""
    codec: Literal["lossless", "compact"] = "compact"
    """How packets are kept and moved (transport/codec.py). compact: each layer's targets as target_rank
    coefficients over a basis fitted on a first window of targets (target_bits each, a per-token scale), top-k
    logits in logit_bits, ids in the fewest bytes the vocabulary allows; lossless: the teacher's tensors as
    emitted."""
    target_rank: PosInt = 32
    """compact: coefficients per token and layer (the most, with target_energy)."""
    target_energy: Optional[Annotated[float, Field(gt=0, le=1)]] = None
    """compact: the smallest rank per layer (at most target_rank) whose basis explains this share of the first
    window's variance; null = target_rank for every layer."""
    target_bits: Literal[8, 16] = 8
    """compact: bits per target coefficient (8: int8 with a per-token scale; 16: float16)."""
    logit_bits: Literal[8, 16] = 8
    """compact: bits per top-k logit value (8: uint8 steps below the token's top value; 16: float16)."""
    fit_tokens: PosInt = 8192
    """compact: tokens of the first window the bases are fitted on (one extra teacher forward each, counted as
    teacher_codec_passes_per_sample)."""
    scope: Literal["auto", "run", "window"] = "auto"
    """How long packets are kept. run: every sample's packets for the whole run (each taught once; the store grows
    with data.max_sequences); window (colocated only): teach window_sequences samples per rank, train on them,
    drop them (the store stays one window; each stage teaches again, so a frontier schedule costs one teacher
    pass per stage); auto: window for schedule.mode full (one stage: nothing to reuse), run for the frontier
    schedule (`semalign plan` prints what re-teaching per stage would cost instead)."""
    window_sequences: PosInt = 1024
    """window scope: the most sequences per rank in one window (at least 2 x data.micro_batch_size)."""


class RuntimeConfig(Section):
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where the engines run; auto: cuda when a GPU is visible, else cpu."""
    topology: Literal["colocated", "disaggregated", "spool"] = "colocated"
    """colocated: every rank teacher shard + student; disaggregated: teacher ranks stream to student ranks;
    spool: the student reads packets a teacher job wrote to disk."""
    checkpoint_every: PosInt = 50
    """Optimizer steps between checkpoints inside a stage (and at every stage boundary)."""
    resume: bool = True
    """Resume from the output directory's last checkpoint when one exists."""
    progress: bool = True
    """Progress bars on the first rank."""
    dist_timeout_s: PosFloat = 600.0
    """Collective timeout of the process groups."""


class TrackingConfig(Section):
    enabled: bool = True
    """Record the run in MLflow."""
    uri: Optional[str] = None
    """MLflow tracking URI; null = MLFLOW_TRACKING_URI, else sqlite:///<output_dir>/mlflow.db."""
    experiment: NonEmptyStr = "semalign"
    """MLflow experiment name."""
    log_model: Literal["auto", "copy", "link", "never"] = "auto"
    """The exported student as an MLflow LoggedModel of the run: copy its files into MLflow, link to the export
    without copying, auto (copy up to log_model_copy_max_mb, else link), or never."""
    log_model_copy_max_mb: NonNegFloat = 1024.0
    """auto: the largest student (MiB on disk) whose files are copied into MLflow."""


class LmEvalConfig(Section):
    """lm-evaluation-harness tasks for `semalign eval` (student before/after and teacher)."""

    tasks: list[str] = Field(default_factory=list)
    """Task names: lm-eval's own (hellaswag, arc_easy, ... need their data sets, e.g. on a cluster), local YAML
    tasks under include_path, or the shipped `stdlib_docmodule` (built from this Python's stdlib, no download)."""
    include_path: list[str] = Field(default_factory=list)
    """Folders of local task YAMLs (with local JSONL data: dataset_path json, data_files absolute)."""
    limit: Optional[PosFloat] = None
    """Documents per task: a whole number (e.g. 100), a fraction of each task below 1 (e.g. 0.5), or null = all.
    Recorded with the scores."""
    num_fewshot: Optional[NonNegInt] = None
    """Few-shot examples per prompt; null = each task's default."""
    batch_size: PosInt = 8
    """Sequences per lm-eval forward."""
    teacher: bool = True
    """Also score the teacher (once: cached by its weights, task and settings). A teacher too large for one
    device: set false and score it with lm-eval's own multi-GPU launch."""

    @model_validator(mode="after")
    def _limit(self) -> "LmEvalConfig":
        if self.limit is not None and self.limit >= 1:
            if self.limit != int(self.limit):
                raise ValueError(f"eval.lm_eval.limit={self.limit} must be a whole number of documents (>= 1) or a "
                                 f"fraction below 1")
            self.limit = int(self.limit)
        return self


class EvalConfig(Section):
    sets: dict[str, str] = Field(default_factory=dict)
    """Named held-out data files (same formats as data.path) for perplexity and teacher agreement."""
    max_sequences: PosInt = 200
    """Sequences per held-out set."""
    batch_size: PosInt = 8
    """Sequences per evaluation forward."""
    lm_eval: LmEvalConfig = Field(default_factory=LmEvalConfig)
    """`semalign eval` settings."""
    generations: NonNegInt = 3
    """data.chat: held-out prompts (each eval set's first conversations, up to their last answer) whose greedy
    answers by the student before and after and by the teacher are logged as an MLflow table; 0 = none."""
    max_new_tokens: PosInt = 64
    """data.chat: the longest generated answer in tokens (greedy decoding stops earlier at the model's end of turn)."""


class RunConfig(Section):
    name: NonEmptyStr = "semalign"
    """The run's name (MLflow run name prefix; output_dir default)."""
    output_dir: str = ""
    """Where checkpoints, the student export and artifacts go; empty = runs/<name>."""
    seed: NonNegInt = 0
    """Seed of the data order and of everything random in the run."""
    teacher: ModelConfig = Field(default_factory=ModelConfig)
    """The teacher model."""
    student: ModelConfig = Field(default_factory=ModelConfig)
    """The student model (its trained copy is exported to <output_dir>/student)."""
    data: DataConfig = Field(default_factory=DataConfig)
    """The transfer data."""
    method: MethodConfig = Field(default_factory=MethodConfig)
    """The objectives and the map (METHOD.md §1-5)."""
    pairing: PairingConfig = Field(default_factory=PairingConfig)
    """Which teacher layer supervises each student layer (METHOD.md §3)."""
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    """Stages, budget and optimizer (METHOD.md §6)."""
    teacher_engine: TeacherEngineConfig = Field(default_factory=TeacherEngineConfig)
    """DeepSpeed ZeRO-3 inference of the teacher."""
    student_engine: StudentEngineConfig = Field(default_factory=StudentEngineConfig)
    """DeepSpeed ZeRO-2 training of the student."""
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)
    """Device, topology, checkpoints."""
    transport: TransportConfig = Field(default_factory=TransportConfig)
    """Packets between teacher and student."""
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    """MLflow."""
    eval: EvalConfig = Field(default_factory=EvalConfig)
    """Held-out evaluation."""

    @model_validator(mode="after")
    def _rules(self) -> "RunConfig":
        terms = active_terms(self.method)
        teacher_output = ("layer" in terms) or ("out" in terms and self.method.output_objective in ("kl", "uld"))
        if self.transport.scope == "window" and self.runtime.topology != "colocated":
            raise ValueError(f"transport.scope=window teaches and trains window by window inside one colocated run; "
                             f"runtime.topology={self.runtime.topology} keeps every packet (a spool, a stream): use "
                             f"transport.scope=run or auto")
        if self.transport.window_sequences < 2 * self.data.micro_batch_size:
            raise ValueError(f"transport.window_sequences={self.transport.window_sequences} must be at least 2 x "
                             f"data.micro_batch_size ({2 * self.data.micro_batch_size}): a window holds whole "
                             f"micro-batches")
        if not teacher_output and self.runtime.topology != "colocated":
            raise ValueError(f"runtime.topology={self.runtime.topology} moves the teacher's packets, but this method "
                             f"needs no teacher output (layer objective {self.method.layer_objective}, output "
                             f"objective {self.method.output_objective}): run it with runtime.topology=colocated "
                             "(`semalign run`), which loads no teacher")
        return self


# ---------------------------------------------------------------- the method rules (one place)


def method_problems(m: MethodConfig) -> list[str]:
    """The method options that constrain each other (map, layer objective, weights, gradient balancing)."""
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
    if not active_terms(m):
        problems.append("no loss term is active: set method.layer_objective with method.w_layer > 0, "
                        "method.output_objective with method.w_out > 0, or method.w_label > 0")
    if m.layer_balance is None and not m.log_grad_cosine:
        return problems
    key = "method.layer_balance" if m.layer_balance is not None else "method.log_grad_cosine"
    if "layer" not in active_terms(m):
        problems.append(f"config key {key!r} compares the layer and output terms' gradients but there is no layer "
                        "term: set method.layer_objective and method.w_layer > 0, or unset it")
    if "out" not in active_terms(m):
        problems.append(f"config key {key!r} holds the layer gradient against the output term's gradient but "
                        "there is no output term (method.output_objective none or method.w_out 0): set "
                        f"method.output_objective (e.g. kl) and method.w_out > 0, or unset {key}")
    return problems


def active_terms(m) -> list[str]:
    """The loss terms with a positive weight: layer, out, label (of a MethodConfig, or anything with its weight and
    objective fields, e.g. the student engine's ObjectiveSpec)."""
    terms = []
    if m.w_layer > 0 and m.layer_objective != "none":
        terms.append("layer")
    if m.w_out > 0 and m.output_objective != "none":
        terms.append("out")
    if m.w_label > 0:
        terms.append("label")
    return terms


# ---------------------------------------------------------------- presets

PRESET_KEYS = ("method.basis", "method.map", "method.residual", "method.layer_objective", "method.output_objective",
               "method.top_k", "method.tau", "method.w_layer", "method.w_out", "method.w_label",
               "method.layer_balance", "pairing.critical_layer", "pairing.interpolate", "pairing.attribution",
               "schedule.mode", "schedule.adapter", "schedule.lora_rank", "schedule.lora_alpha",
               "schedule.lora_targets")
# Not part of a preset: the data, the budget (schedule.epochs_per_stage / tokens_per_stage), the learning rate and
# its schedule (the quality benchmark equalises the budget and picks the rate per method on validation).
_PAPER = {"method.basis": "output", "method.map": "pinv", "method.residual": "layer",
          "method.layer_objective": "relation_geometry", "method.output_objective": "kl", "method.top_k": 64,
          "method.tau": 1.0, "method.w_layer": 1.0, "method.w_out": 1.0, "method.w_label": 0.0,
          "method.layer_balance": None, "pairing.critical_layer": True, "pairing.interpolate": False,
          "pairing.attribution": "grad_x_act", "schedule.mode": "frontier", "schedule.adapter": "full",
          "schedule.lora_rank": 16, "schedule.lora_alpha": 32.0, "schedule.lora_targets": None}
_LOGITS_ONLY = {"method.layer_objective": "none", "pairing.critical_layer": False, "schedule.mode": "full"}
PRESETS: dict[str, dict[str, Any]] = {
    # The paper's v1 (arXiv 2510.24208 v1; METHOD.md): output-side pinv bases folded into M = S_S S_T^T (§1-2);
    # grad x act attribution with critical-layer re-pairing (§3); the cosine layer objective (§4, "v1") with the
    # label-cosine output term as v1's label term (§5: no KL, no CE); frontier schedule (§6) with LoRA r = 16 on
    # the family's up/down/v/o projections (§6-7, v1's appendix). v1 trained only k_dag, which is known only after
    # attribution: here every stage trains (set schedule.stages to restrict).
    "paper_v1": {**_PAPER, "method.layer_objective": "cosine", "method.output_objective": "label_cosine",
                 "schedule.adapter": "lora"},
    # The paper's v2 as its abstract reads (METHOD.md §4-5 defaults): relation geometry + top-k KL (k = 64, tau 1),
    # weights (1, 1, 0): no label term; pinv map, v1 pairing, full-parameter frontier schedule.
    "paper_v2": dict(_PAPER),
    # The default: the SemAlign configuration with the lowest target VALIDATION perplexity in the real-teacher
    # quality benchmark (SmolLM2-135M -> a code student; docs/RESULTS.md, bench/quality/real.py): relation geometry
    # + top-64 KL + a CE label term (w 1, 1, 1), pinv map, attribution pairing, every paired layer trained at once
    # (schedule.mode full, the frontier stages' total budget in one stage).
    "best": {**_PAPER, "method.w_label": 1.0, "schedule.mode": "full"},
    # Baselines (the quality benchmark's rows): SFT = cross-entropy on the labels only (the output term is the CE;
    # no label term on top, so CE counts once): no teacher output at all, so no teacher is loaded.
    "sft": {**_PAPER, **_LOGITS_ONLY, "method.output_objective": "ce"},
    # Logit KD: top-64 KL only, every layer trained at once; KD + CE: the same with the CE label term.
    "kd": {**_PAPER, **_LOGITS_ONLY},
    "kd_ce": {**_PAPER, **_LOGITS_ONLY, "method.w_label": 1.0},
    # Layer KD with a learned projection of the unaligned teacher residual (FitNets-style) + KL, all layers at once.
    "hidden_mse": {**_PAPER, "method.layer_objective": "hidden_mse", "method.map": "none", "schedule.mode": "full"},
}
DEFAULT_PRESET = "best"

# Fields that change how a run is watched, not what it computes (left out of the resume hash). The preset label
# and the overrides record are derived from the values, which are hashed.
_NON_RESULT_KEYS = ("name", "output_dir", "runtime.progress", "runtime.resume", "runtime.checkpoint_every",
                    "runtime.dist_timeout_s", "runtime.topology", "transport.teacher_ranks", "transport.window",
                    "transport.timeout_s", "transport.spool_dir", "transport.store", "transport.store_dir",
                    "transport.store_memory_fraction", "transport.keep_spool", "method.log_grad_cosine", "tracking",
                    "eval", "method.preset", "method.overrides")

_REPLACED = {
    "schedule.steps_per_stage": "schedule.epochs_per_stage (a stage budget in passes over the transfer set, the same "
                                "on any number of ranks) or schedule.tokens_per_stage",
    "transport.epochs": "schedule.epochs_per_stage (every topology trains the same budget; nothing is capped)",
    "method.random_basis": "method.map=random (method.map: pinv | logit | random | none)",
}


def _get_raw(raw: dict, dotted: str, default: Any = None) -> Any:
    node: Any = raw
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def _set_dotted(raw: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"override {dotted!r}: {part!r} is not a section")
    node[parts[-1]] = value


_MISSING = object()


def _same(a: Any, b: Any) -> bool:
    """Config values equal as the parser reads them (1 == 1.0, '3e-4' == 3e-4)."""
    if isinstance(a, str) and isinstance(b, (int, float)) and not isinstance(b, bool):
        try:
            return float(a) == b
        except ValueError:
            return False
    return a == b


def resolve_preset(raw: dict, overrides: list[str]) -> dict:
    """The raw tree with the preset applied: the keys the file sets to other values than its own preset's, and
    every key the overrides name, stay as given (the user's); every other preset key takes the final preset's
    value; method.overrides records the user's keys that differ from the final preset."""
    raw = json.loads(json.dumps(raw or {}, default=str))
    method = raw.get("method")
    if isinstance(method, dict):
        method.pop("overrides", None)  # a record of an earlier resolution: recomputed below
    file_preset = _get_raw(raw, "method.preset", DEFAULT_PRESET)
    base = PRESETS.get(file_preset, {}) if isinstance(file_preset, str) else {}
    explicit = {k for k in PRESET_KEYS
                if (v := _get_raw(raw, k, _MISSING)) is not _MISSING and not (k in base and _same(v, base[k]))}
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(raw, key, value)
        explicit |= {key} & set(PRESET_KEYS)
    preset = _get_raw(raw, "method.preset", DEFAULT_PRESET)
    values = PRESETS.get(preset, PRESETS[DEFAULT_PRESET]) if isinstance(preset, str) or preset is None else {}
    for key in PRESET_KEYS:
        if key not in explicit and key in values:
            _set_dotted(raw, key, values[key])
    if _get_raw(raw, "method.layer_objective") == "hidden_mse" and "method.map" not in explicit:
        _set_dotted(raw, "method.map", "none")  # its learned projection reads the raw teacher residual
        explicit.add("method.map")
    record = {k: _get_raw(raw, k) for k in sorted(explicit)
              if preset not in PRESETS or not _same(_get_raw(raw, k), PRESETS[preset][k])}
    _set_dotted(raw, "method.overrides", record)
    return raw


# ---------------------------------------------------------------- parsing


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ValueError(f"override {text!r} must look like section.key=value (e.g. schedule.epochs_per_stage=3)")
    key, value = text.split("=", 1)
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError as err:
        raise ValueError(f"override {text!r}: the value is not valid YAML ({err.problem})") from None
    return key.strip(), parsed


def _section_of(loc: tuple) -> type[BaseModel]:
    cls: type[BaseModel] = RunConfig
    for part in loc:
        field = cls.model_fields.get(str(part))
        ann = getattr(field, "annotation", None)
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            break
        cls = ann
    return cls


def _doc(loc: tuple) -> str:
    cls = _section_of(loc[:-1])
    field = cls.model_fields.get(str(loc[-1]))
    text = " ".join((field.description or "").split()) if field is not None else ""
    return text.split(". ")[0].split(": ")[0].strip().rstrip(".")


_STRUCTURAL = ("extra_forbidden", "missing", "model_type", "model_attributes_type", "dict_type", "list_type",
               "int_type", "int_parsing", "int_from_float", "float_type", "float_parsing", "bool_type",
               "bool_parsing", "string_type", "literal_error", "none_required")


def _message(err: dict) -> str:
    loc = tuple(err["loc"])
    key = ".".join(str(p) for p in loc)
    kind, value, ctx = err["type"], err.get("input"), err.get("ctx") or {}
    if kind == "extra_forbidden":
        parent, where = loc[:-1], ".".join(str(p) for p in loc[:-1])
        valid = sorted(_section_of(parent).model_fields)
        near = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.6)
        hint = f"; did you mean '{where + '.' if where else ''}{near[0]}'?" if near else ""
        return f"unknown config key {key!r}{hint} (valid keys under {where or 'the root'}: {', '.join(valid)})"
    doc = _doc(loc) if loc and not _is_section(loc) else ""
    about = f" ({doc})" if doc else ""
    if kind == "value_error":  # our validators: full sentences, except the non-empty check
        msg = err["msg"].removeprefix("Value error, ")
        return f"{key} is empty; give it a value{about}" if msg == "is empty" else msg
    bounds = {"greater_than_equal": (">=", "ge"), "greater_than": (">", "gt"), "less_than_equal": ("<=", "le"),
              "less_than": ("<", "lt")}
    if kind in bounds:
        op, name = bounds[kind]
        return f"{key}={value!r} must be {op} {ctx.get(name):g}{about}"
    if kind == "finite_number":
        return f"{key}={value!r} must be a finite number{about}"
    if kind == "literal_error":
        return f"config key {key!r}: {value!r} is not one of {ctx.get('expected')}"
    msg = err["msg"]
    return f"config key {key!r}: {msg[0].lower() + msg[1:]}, got {type(value).__name__} {value!r}{about}"


def _is_section(loc: tuple) -> bool:
    """The location names a section (a model-level rule failed), not a field."""
    ann = getattr(_section_of(loc[:-1]).model_fields.get(str(loc[-1])), "annotation", None)
    return isinstance(ann, type) and issubclass(ann, BaseModel)


def _problems(err: ValidationError) -> tuple[list[str], list[str], list[tuple]]:
    """(structural problems, value problems, locations of the value problems) of a validation error."""
    structural, values, locs = [], [], []
    for e in err.errors(include_url=False):
        msg = _message(e)
        for line in msg.split("\n"):
            (structural if e["type"] in _STRUCTURAL else values).append(line)
        if e["type"] not in _STRUCTURAL:
            locs.append(tuple(e["loc"]))
    return structural, values, locs


def format_problems(found: list[str]) -> str:
    if len(found) == 1:
        return found[0]
    return f"{len(found)} problems in the config:\n  - " + "\n  - ".join(found)


def _replaced_keys(raw: dict, prefix: str = "") -> None:
    for key, value in raw.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if dotted in _REPLACED:
            raise ValueError(f"config key {dotted!r} was replaced by {_REPLACED[dotted]}")
        if isinstance(value, dict):
            _replaced_keys(value, dotted)


def parse(raw: dict | None, overrides: list[str] = ()) -> tuple[RunConfig, list[str]]:
    """(config, value problems): unknown keys and wrong types raise at once (nothing else can be checked); ranges
    and cross-field rules are returned as problems, with the offending values reset to their defaults in the
    returned config, so the check pass can report them together with the paths."""
    resolved = resolve_preset(raw or {}, list(overrides))
    _replaced_keys(resolved)
    try:
        return RunConfig.model_validate(resolved), []
    except ValidationError as err:
        structural, values, locs = _problems(err)
    if structural:
        raise ValueError(format_problems(structural + values))
    cleaned = json.loads(json.dumps(resolved))
    for loc in filter(None, locs):  # the offending field, or the section whose rule failed, back to its default
        node = cleaned
        for part in loc[:-1]:
            node = node.get(part, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(loc[-1], None)
    try:
        return RunConfig.model_validate(cleaned), values
    except ValidationError:
        raise ValueError(format_problems(values)) from None


def config_from_dict(raw: dict | None, overrides: list[str] = ()) -> RunConfig:
    """The config from a mapping and dotted overrides; every problem raises one ValueError listing them all."""
    cfg, problems = parse(raw, overrides)
    if problems:
        raise ValueError(format_problems(problems))
    return cfg


def read_yaml(path: str | Path | None) -> dict:
    if path is None:
        return {}
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file {str(path)!r} does not exist; pass --config with a YAML file (see configs/)")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"config file {str(path)!r} is not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"config file {str(path)!r} must hold a mapping of sections (name:, teacher:, data:, ...), "
                         f"not a {type(raw).__name__}")
    return raw


def load_config(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    return config_from_dict(read_yaml(path), overrides)


def load_config_with_problems(path: str | Path | None, overrides: list[str] = ()) -> tuple[RunConfig, list[str]]:
    """For the check pass: the config and its value problems (reported together with the paths' problems)."""
    return parse(read_yaml(path), overrides)


def json_schema() -> dict:
    """The JSON Schema of a config file (`semalign config --schema`), for editors to complete and check."""
    schema = RunConfig.model_json_schema()
    schema["title"] = "semalign_ds run config"
    return schema


# ---------------------------------------------------------------- views of a config


def get_dotted(cfg: Any, dotted: str) -> Any:
    node = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def to_dict(cfg: RunConfig) -> dict:
    return cfg.model_dump(mode="json")


def to_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def overrides_text(cfg: RunConfig) -> str:
    """method.overrides as one line: `key=value, ...` or `none`."""
    items = cfg.method.overrides.items()
    return ", ".join(f"{k}={json.dumps(v)}" for k, v in items) if items else "none"


def flatten(cfg: RunConfig) -> dict[str, Any]:
    """Dotted key -> value, for MLflow params (method.overrides as one line)."""
    out: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict) and node and not prefix.endswith("eval.sets") and prefix != "method.overrides":
            for k, v in node.items():
                walk(v, f"{prefix}.{k}" if prefix else k)
        else:
            out[prefix] = node

    walk(to_dict(cfg), "")
    out["method.overrides"] = overrides_text(cfg)
    return out


def result_hash(cfg: RunConfig) -> str:
    """Hash of everything that changes what a run computes (a resume directory must match it)."""
    flat = {k: v for k, v in flatten(cfg).items()
            if not any(k == p or k.startswith(p + ".") for p in _NON_RESULT_KEYS)}
    return json_digest(flat)


def resolved_output_dir(cfg: RunConfig) -> Path:
    return Path(cfg.output_dir or f"runs/{cfg.name}")

