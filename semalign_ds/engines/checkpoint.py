"""Exact resume of a student stage: safetensors + JSON, no pickle.

A stage checkpoint directory holds
    model/                     the student (HF save_pretrained, safetensors; written by DP rank 0 only — ZeRO-2
                               keeps the weights replicated). LoRA wrappers are saved unwrapped (base weights under
                               the original names), so the folder loads with from_pretrained.
    optim_rank{r}.safetensors  DP rank r's ZeRO-2 partition: the fp32 master partition of each param group
                               ("fp32.{i}"), its AdamW state ("state.{i}.{name}": exp_avg, exp_avg_sq, step) and the
                               RNG state; metadata: format, DP world size, partition sizes, non-tensor state.
    progress.json              {"stage", "step", "optimizer_steps", "dp_world_size", "extra"} — written last: a
                               directory without it is incomplete.
Every file is written under a temporary name and renamed into place.

Resume: load the student from `model_dir(directory)`, build a fresh StudentStage for the same stage with the same
settings and number of ranks, then `load_stage_state(directory, stage)`; it restores the master weights and
optimizer state and re-broadcasts the trainable weights from them. Save and load are collective over the
student's data-parallel group.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file

from semalign_ds import files
from semalign_ds.cluster.distributed import barrier
from semalign_ds.engines.student import StudentStage
from semalign_ds.method.lora import lora_layers

FORMAT = "semalign_ds.zero2.v1"
PROGRESS = "progress.json"


def model_dir(directory) -> Path:
    return Path(directory) / "model"


def _optim_file(directory, rank: int) -> Path:
    return Path(directory) / f"optim_rank{rank}.safetensors"


def _dp(stage: StudentStage) -> tuple[int, int, object]:
    """(DP rank, DP world size, DP group) of the stage's engine."""
    group = stage.engine.data_parallel_group
    if not dist.is_initialized():
        return 0, 1, None
    return dist.get_rank(group), dist.get_world_size(group), group


def unwrapped_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with LoRA wrappers removed: `x.base_layer.weight` -> `x.weight`, the adapters' own
    weights dropped (they live in the optimizer state's checkpoint; the model folder stays a plain checkpoint)."""
    prefixes = [name + "." for name, _ in lora_layers(model)]
    out = {}
    for key, value in model.state_dict().items():
        prefix = next((p for p in prefixes if key.startswith(p)), None)
        if prefix is None:
            out[key] = value
        elif key[len(prefix):].startswith("base_layer."):
            out[prefix + key[len(prefix) + len("base_layer."):]] = value
    return out


def _save_model(model: torch.nn.Module, target: Path) -> None:
    tmp, old = target.with_name(target.name + ".tmp"), target.with_name(target.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, state_dict=unwrapped_state_dict(model))
    if target.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


def _partition_tensors(stage: StudentStage) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    opt = stage.engine.optimizer
    tensors: dict[str, torch.Tensor] = {"rng.cpu": torch.get_rng_state()}
    scalars: dict[str, object] = {}
    sizes = []
    for i, master in enumerate(opt.single_partition_of_fp32_groups):
        tensors[f"fp32.{i}"] = master.detach().cpu().clone()
        sizes.append(master.numel())
        for name, value in opt.optimizer.state.get(master, {}).items():
            if torch.is_tensor(value):
                tensors[f"state.{i}.{name}"] = value.detach().cpu().clone()
            else:
                scalars[f"state.{i}.{name}"] = value
    rank, world, _ = _dp(stage)
    meta = {"format": FORMAT, "dp_rank": str(rank), "dp_world_size": str(world),
            "partition_sizes": json.dumps(sizes), "scalars": json.dumps(scalars)}
    return tensors, meta


def save_stage_state(directory, stage: StudentStage, step: int, extra: dict | None = None) -> None:
    """Write the stage's resumable state into `directory` (collective over the student's DP group)."""
    if stage.engine is None:
        raise RuntimeError("save_stage_state needs a live stage (call it before finish())")
    gas = stage.engine.gradient_accumulation_steps()
    if stage.engine.micro_steps % gas:
        raise ValueError(f"save_stage_state in the middle of gradient accumulation ({stage.engine.micro_steps} "
                         f"micro-steps, accumulation {gas}); save after an optimizer step")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rank, world, group = _dp(stage)
    if rank == 0:
        (directory / PROGRESS).unlink(missing_ok=True)  # incomplete until rewritten below
        _save_model(stage.model, model_dir(directory))
    tensors, meta = _partition_tensors(stage)
    target = _optim_file(directory, rank)
    tmp = target.with_name(target.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, target)
    barrier(group)
    if rank == 0:
        files.write_json(directory / PROGRESS, {"stage": stage.k, "step": int(step), "optimizer_steps": stage.steps,
                                           "dp_world_size": world, "extra": extra or {}})
    barrier(group)


def read_progress(directory) -> dict:
    """progress.json of a complete stage checkpoint; ValueError if absent or unreadable."""
    path = Path(directory) / PROGRESS
    if not path.is_file():
        raise ValueError(f"{str(directory)!r} holds no complete stage checkpoint ({PROGRESS} missing); "
                         "resume from another checkpoint or start the stage afresh")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read {path}: {err}; the checkpoint is damaged") from err


def _read_partition(directory, rank: int) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    path = _optim_file(directory, rank)
    if not path.is_file():
        raise ValueError(f"{str(path)!r} is missing: the checkpoint was written by fewer student ranks")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    if meta.get("format") != FORMAT:
        raise ValueError(f"{str(path)!r} is not a semalign_ds ZeRO-2 partition (format {meta.get('format')!r})")
    return tensors, meta


def _check_layout(progress: dict, stage: StudentStage, world: int, meta: dict, directory) -> None:
    if progress["stage"] != stage.k:
        raise ValueError(f"{str(directory)!r} is a checkpoint of stage {progress['stage']}, not stage {stage.k}")
    if int(progress["dp_world_size"]) != world:
        raise ValueError(f"{str(directory)!r} was saved by {progress['dp_world_size']} student ranks; resume needs "
                         f"the same number (now {world})")
    sizes = [m.numel() for m in stage.engine.optimizer.single_partition_of_fp32_groups]
    if json.loads(meta["partition_sizes"]) != sizes:
        raise ValueError(f"{str(directory)!r}: saved partition sizes {meta['partition_sizes']} differ from this "
                         f"stage's {sizes}; build the stage with the same adapter, LoRA and DeepSpeed settings")


def load_stage_state(directory, stage: StudentStage) -> dict:
    """Restore what save_stage_state wrote into a freshly built stage; returns progress.json's content."""
    progress = read_progress(directory)
    rank, world, _ = _dp(stage)
    tensors, meta = _read_partition(directory, rank)
    _check_layout(progress, stage, world, meta, directory)
    opt = stage.engine.optimizer
    scalars = json.loads(meta["scalars"])
    for i, master in enumerate(opt.single_partition_of_fp32_groups):
        master.data.copy_(tensors[f"fp32.{i}"])
        state = {key.split(".", 2)[2]: value.to(master.device) for key, value in tensors.items()
                 if key.startswith(f"state.{i}.")}
        state.update({key.split(".", 2)[2]: value for key, value in scalars.items() if key.startswith(f"state.{i}.")})
        if state:
            opt.optimizer.state[master] = state
    opt.update_lp_params()  # master -> model weights, all-gathered over the DP group
    torch.set_rng_state(tensors["rng.cpu"])
    stage.steps = int(progress["optimizer_steps"])
    stage.engine.global_steps = stage.steps
    stage.engine.micro_steps = stage.steps * stage.engine.gradient_accumulation_steps()
    return progress
