"""Build the DeepSpeed config dicts of the two engines from the editable JSON templates in ds_configs/.

Pure functions (no deepspeed import): a template is a plain dict; the run's values (micro batch, bf16, world
size, offload device, ...) are filled in. Rules:
- a key whose value is "auto", or that is missing, gets the run's value;
- a key the user set to a concrete value is kept; if the run needs a different value for it (e.g. the template
  pins train_micro_batch_size_per_gpu=4 but the run uses 2) that is a ValueError naming the key and the fix;
- keys starting with "_" (comments; JSON has none) are dropped at every level;
- pinned host memory only exists with a GPU: on a CPU device offload_param.pin_memory is forced off;
- the teacher is inference only and the student's optimizer is a torch AdamW the engine is handed, so an
  "optimizer" or "scheduler" section in a template is a ValueError.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

AUTO = "auto"
REPO_ROOT = Path(__file__).resolve().parents[2]  # ds_configs/ lives here
_NO_OPTIMIZER_KEYS = ("optimizer", "scheduler")
_QUIET = {"steps_per_print": 2**31 - 1, "wall_clock_breakdown": False}


def find_template(path: str, key: str) -> Path:
    """A DeepSpeed template path as given, or relative to the project's root (where ds_configs/ lives)."""
    for candidate in (Path(path), REPO_ROOT / path):
        if candidate.is_file():
            return candidate
    raise ValueError(f"{key}={path!r} does not exist (also looked in {REPO_ROOT}); point it at a JSON file "
                     f"such as ds_configs/student_zero2.json")


def load_template(path) -> dict:
    """A DeepSpeed JSON template as a dict; ValueError naming the file if it is missing or not a JSON object."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise ValueError(f"DeepSpeed template {str(file)!r} does not exist; point the engine's ds_config at one "
                         "of the JSON files in ds_configs/ (or a copy of one)")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"DeepSpeed template {str(file)!r} is not valid JSON ({err}); fix the file") from err
    if not isinstance(data, dict):
        raise ValueError(f"DeepSpeed template {str(file)!r} must hold a JSON object, got {type(data).__name__}")
    return data


def _strip_comments(value):
    if isinstance(value, dict):
        return {k: _strip_comments(v) for k, v in value.items() if not str(k).startswith("_")}
    if isinstance(value, list):
        return [_strip_comments(v) for v in value]
    return value


def _fill(section: dict, key: str, value, where: str) -> None:
    """Set section[key] = value when missing or "auto"; ValueError when the user set something else."""
    current = section.get(key, AUTO)
    if current == AUTO:
        section[key] = value
    elif current != value:
        raise ValueError(f"{where}{key} is {current!r} in the DeepSpeed template but this run needs {value!r}; "
                         f"set it to \"auto\" (or remove it) in the template, or change the run's setting")


def _section(config: dict, key: str, where: str) -> dict:
    section = config.setdefault(key, {})
    if not isinstance(section, dict):
        raise ValueError(f"{where}{key} must be a JSON object in the DeepSpeed template, got {section!r}")
    return section


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _fill_batch_and_precision(cfg: dict, *, bf16: bool, micro_batch: int, grad_accum: int, world_size: int) -> None:
    _check_positive(micro_batch=micro_batch, grad_accum=grad_accum, world_size=world_size)
    _fill(cfg, "train_micro_batch_size_per_gpu", micro_batch, "")
    _fill(cfg, "gradient_accumulation_steps", grad_accum, "")
    _fill(cfg, "train_batch_size", micro_batch * grad_accum * world_size, "")  # world_size: the engine's DP ranks
    _fill(_section(cfg, "bf16", ""), "enabled", bool(bf16), "bf16.")
    fp16 = _section(cfg, "fp16", "")
    if fp16.get("enabled") is True:
        raise ValueError("fp16.enabled is true in the DeepSpeed template; semalign_ds runs fp32 or bf16 "
                         "(set fp16.enabled to false and choose bf16 with the run's dtype)")
    fp16["enabled"] = False
    for key, value in _QUIET.items():
        cfg.setdefault(key, value)


def _refuse_optimizer(cfg: dict, role: str, why: str) -> None:
    for key in _NO_OPTIMIZER_KEYS:
        if key in cfg:
            raise ValueError(f"the {role} DeepSpeed template has a {key!r} section; remove it: {why}")


def _resolve_hidden_autos(zero: dict, hidden_size: int | None, table: dict) -> None:
    """Fill size-dependent "auto" keys from the hidden size, or drop them (DeepSpeed's default) without one."""
    for key, factor in table.items():
        if zero.get(key) == AUTO:
            if hidden_size is None:
                del zero[key]
            else:
                zero[key] = int(factor(hidden_size))


def _check_no_auto(value, where: str = "") -> None:
    if value == AUTO:
        raise ValueError(f"{where.rstrip('.')} is \"auto\" in the DeepSpeed template but nothing fills it; "
                         "set a concrete value")
    if isinstance(value, dict):
        for key, sub in value.items():
            _check_no_auto(sub, f"{where}{key}.")


_TEACHER_SIZED = {
    "stage3_prefetch_bucket_size": lambda h: 0.9 * h * h,
    "stage3_param_persistence_threshold": lambda h: 10 * h,
}
_STUDENT_SIZED = {
    "reduce_bucket_size": lambda h: h * h,
    "allgather_bucket_size": lambda h: h * h,
}


def _fill_offload(zero: dict, *, offload: str, nvme_path, device: str) -> None:
    if offload not in ("cpu", "nvme", "none"):
        raise ValueError(f"teacher offload must be 'cpu', 'nvme' or 'none', got {offload!r}")
    if offload == "none":
        param = zero.get("offload_param")
        if isinstance(param, dict) and param.get("device", AUTO) not in (AUTO, "none"):
            raise ValueError(f"zero_optimization.offload_param.device is {param['device']!r} in the DeepSpeed "
                             "template but this run uses offload 'none'; use a template without offload_param")
        zero.pop("offload_param", None)
        return
    param = _section(zero, "offload_param", "zero_optimization.")
    where = "zero_optimization.offload_param."
    _fill(param, "device", offload, where)
    if offload == "nvme":
        if nvme_path is not None:
            _fill(param, "nvme_path", str(nvme_path), where)
        if param.get("nvme_path", AUTO) == AUTO:
            raise ValueError("NVMe offload needs a swap folder: set the teacher's nvme_path (fast local disk, one "
                             "per node) or zero_optimization.offload_param.nvme_path in the template")
    if device == "cpu" or param.get("pin_memory", AUTO) == AUTO:
        param["pin_memory"] = device != "cpu"  # pinned memory needs a GPU


def _device_type(device) -> str:
    """'cpu' or 'cuda' from a str / torch.device; None: 'cuda' when a GPU is visible (lazy check)."""
    if device is None:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    kind = str(getattr(device, "type", device)).split(":")[0]
    if kind not in ("cpu", "cuda"):
        raise ValueError(f"runtime.device must be 'cpu' or 'cuda' for the DeepSpeed config, got {device!r}")
    return kind


def teacher_ds_config(template: dict, *, offload: str, nvme_path=None, bf16: bool, micro_batch: int,
                      world_size: int, device=None, hidden_size: int | None = None) -> dict:
    """The teacher engine's config: ZeRO-3 inference (no optimizer), parameters offloaded per `offload`.

    `device` is the compute device ('cpu'/'cuda' or a torch.device; pass it — None only guesses from GPU
    visibility); `hidden_size` (the teacher's D_T) fills the size dependent "auto" keys (prefetch bucket
    0.9 D^2, persistence threshold 10 D) like HF's integration.
    """
    device = _device_type(device)
    cfg = _strip_comments(copy.deepcopy(template))
    _refuse_optimizer(cfg, "teacher", "the teacher engine runs inference only")
    _fill_batch_and_precision(cfg, bf16=bf16, micro_batch=micro_batch, grad_accum=1, world_size=world_size)
    zero = _section(cfg, "zero_optimization", "")
    _fill(zero, "stage", 3, "zero_optimization.")
    _fill_offload(zero, offload=offload, nvme_path=nvme_path, device=device)
    _resolve_hidden_autos(zero, hidden_size, _TEACHER_SIZED)
    _check_no_auto(cfg)
    return cfg


def student_ds_config(template: dict, *, bf16: bool, micro_batch: int, grad_accum: int, world_size: int,
                      grad_clip: float, hidden_size: int | None = None) -> dict:
    """The student engine's config: ZeRO-2, no optimizer section (a torch AdamW is passed to the engine).

    `grad_clip` <= 0 turns clipping off (DeepSpeed's 0.0). `hidden_size` (D_S) fills "auto" bucket sizes.
    """
    cfg = _strip_comments(copy.deepcopy(template))
    _refuse_optimizer(cfg, "student", "the student's optimizer is a torch AdamW built from the run's lr and "
                      "weight decay, with a step-based warmup + cosine schedule")
    _fill_batch_and_precision(cfg, bf16=bf16, micro_batch=micro_batch, grad_accum=grad_accum,
                              world_size=world_size)
    _fill(cfg, "gradient_clipping", float(max(grad_clip, 0.0)), "")
    zero = _section(cfg, "zero_optimization", "")
    _fill(zero, "stage", 2, "zero_optimization.")
    _resolve_hidden_autos(zero, hidden_size, _STUDENT_SIZED)
    _check_no_auto(cfg)
    return cfg
