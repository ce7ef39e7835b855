"""Launch environment and process groups: one init and one shutdown read the environment.

Launchers (torchrun, the deepspeed launcher, srun) set RANK/WORLD_SIZE/LOCAL_RANK (or SLURM_* variables); a plain
`python`/`semalign` call is a single rank on a free local port. The backend follows the device: gloo on CPU, NCCL
on CUDA. DS_ACCELERATOR is set from the configured device before deepspeed is first imported.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from semalign_ds import log
from semalign_ds.cluster.launch import Launch, resolve_launch

@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    backend: str
    device: torch.device
    local_world_size: int = 1  # ranks on this node (the launcher's)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def broadcast_from_first(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """`tensor` of the group's first rank, on every rank of the group (in place; returned)."""
    if dist.is_initialized():
        src = dist.get_global_rank(group, 0) if group is not None else 0
        dist.broadcast(tensor, src=src, group=group)
    return tensor


def all_reduce_tensor(t: torch.Tensor, device, group=None, op: str = "sum") -> torch.Tensor:
    """Element-wise sums (op "sum") or maxima ("max") of `t` over the group, reduced on `device` (the backend's:
    NCCL needs CUDA tensors), returned on t's device. The one all-reduce of the project's counters and sums."""
    if not dist.is_initialized():
        return t
    packed = t.to(device)
    dist.all_reduce(packed, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX, group=group)
    return packed.to(t.device)


def all_reduce(values: list[float], device, group=None, op: str = "sum") -> list[float]:
    """all_reduce_tensor of a list of numbers (float64)."""
    return all_reduce_tensor(torch.tensor(values, dtype=torch.float64), device, group, op).tolist()


def resolve_device(device: str) -> str:
    """'auto' becomes 'cuda' when a GPU is visible, else 'cpu'; recorded in the resolved config."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise ValueError(f"runtime.device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("runtime.device is 'cuda' but no GPU is visible; set runtime.device=cpu")
    return device


def setup_env(device: str) -> Launch:
    """Tell DeepSpeed which accelerator to use (before its first import), where its JIT-built ops live (this
    environment's own folder, stale build locks cleared: extensions.py), and set RANK/WORLD_SIZE/LOCAL_RANK/
    MASTER_ADDR/MASTER_PORT from whichever launcher started us (launch.resolve_launch; single rank if none: a
    free port). Returns the launch."""
    from semalign_ds.cluster import extensions

    os.environ.setdefault("DS_ACCELERATOR", "cpu" if device == "cpu" else "cuda")
    extensions.prepare(device)
    launch = resolve_launch(os.environ)
    os.environ.update(launch.torch_env())
    return launch


def init(device: str, timeout_s: float = 600.0) -> DistInfo:
    """Initialise the default process group (idempotent) and return this rank's place in it."""
    launch = setup_env(device)
    backend = "gloo" if device == "cpu" else "nccl"
    local_rank = int(os.environ["LOCAL_RANK"])
    if device == "cuda":
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    dev = torch.device("cuda", local_rank) if device == "cuda" else torch.device("cpu")
    log.setup(dist.get_rank())
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, backend, dev, launch.local_world_size)


def barrier(group=None) -> None:
    """Wait for every rank of `group` (None: the world); nothing to wait for without a process group."""
    if dist.is_initialized():
        dist.barrier(group=group)


def shutdown() -> None:
    """Destroy the process group (the CLI calls it after a command succeeds: a clean exit for NCCL/gloo)."""
    if dist.is_initialized():
        dist.destroy_process_group()
