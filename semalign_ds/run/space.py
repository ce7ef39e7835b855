"""Disk space a run will write, checked before the teacher's pass: a full disk found at the start costs nothing.

`estimate(...)` is the one place that says how many bytes a run writes where (swap it for exact figures when a
resolved run spec provides them):
    the output directory   checkpoint/ (the student's weights + every rank's ZeRO-2 partition: fp32 master and two
                           AdamW moments of the trainable parameters), twice while a new checkpoint replaces the
                           old, the student/ export, and when MLflow's store is the run directory's own: its copy of
                           the student (tracking.log_model copy, or auto under the size limit) and the store itself;
                           less what an earlier attempt already wrote
    this rank's store      a disk packet store (transport.store disk): this rank's samples x packet bytes, times the
                           ranks of this node (they share its disk), less the shards already committed
`check_run(ctx, plan, packet_bytes)` compares each with its filesystem's free bytes on every rank and stops every
rank together (a collective: no rank is left waiting in the next collective) with one error naming each shortfall.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from semalign_ds import files
from semalign_ds.cluster.distributed import all_reduce
from semalign_ds.models.adapters import get_adapter
from semalign_ds.run.resume import ADAM_BYTES
from semalign_ds.tracking import STORE_BYTES

if TYPE_CHECKING:
    from semalign_ds.config import RunConfig
    from semalign_ds.run.context import RunContext


@dataclass(frozen=True)
class Need:
    what: str
    directory: Path
    bytes: int


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


def _numel(module) -> int:
    return sum(p.numel() for p in module.parameters())


def estimate(cfg: RunConfig, out: Path, student, stage_layers: list[list[int]], store_dir: Path | None,
             store_bytes: int) -> list[Need]:
    """What the run writes where (see the module docstring). stage_layers: the trainable layers of each stage;
    store_dir/store_bytes: this rank's disk packet store and its full size (None/0: packets stay in memory)."""
    adapter = get_adapter(student)
    model = sum(p.numel() * p.element_size() for p in student.parameters())
    trainable = max(sum(_numel(adapter.layer(k)) for k in layers) for layers in stage_layers)
    checkpoint = model + trainable * ADAM_BYTES
    own_store = cfg.tracking.enabled and not (cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI"))
    copy = own_store and (cfg.tracking.log_model == "copy" or (
        cfg.tracking.log_model == "auto" and model <= cfg.tracking.log_model_copy_max_mb * 2**20))
    written = _size(out / "checkpoint") + _size(out / "student")
    needs = [Need("the checkpoints, the student export" + (" and its MLflow copy" if copy else ""), out,
                  max(0, 2 * checkpoint + model * (2 if copy else 1) + (STORE_BYTES if own_store else 0) - written))]
    if store_dir is not None and store_bytes:
        local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        committed = sum(p.stat().st_size for p in store_dir.glob("shard-*.safetensors")) if store_dir.is_dir() else 0
        needs.append(Need(f"the packet store ({local_ranks} rank(s) of this node)", store_dir,
                          max(0, store_bytes - committed) * local_ranks))
    return needs


def shortfalls(needs: list[Need]) -> list[str]:
    """A line per need its filesystem cannot hold."""
    lines = []
    for need in needs:
        free = files.free_bytes(need.directory)
        if need.bytes > free:
            lines.append(f"{need.what} need about {files.human(need.bytes)} ({need.bytes} bytes) in "
                         f"{need.directory}, but its filesystem has {files.human(free)} ({free} bytes) free")
    return lines


def check_run(ctx: RunContext, plan, store_dir: Path | None, store_bytes: int) -> None:
    """Every rank checks what it writes; all stop together (ValueError) when any rank is short of space."""
    needs = estimate(ctx.cfg, ctx.out, ctx.student, [list(s.layers) for s in plan.stages], store_dir, store_bytes)
    mine = [n for n in needs if ctx.writes or n.directory != ctx.out]  # the output directory: its writer only
    lines = shortfalls(mine)
    short = all_reduce([float(bool(lines))], ctx.info.device, ctx.group, op="max")[0]
    if lines:
        raise ValueError("not enough disk space for this run: " + "; ".join(lines) + ". Free space there (or "
                         "point output_dir / transport.store_dir at a larger disk), then rerun")
    if short:
        raise ValueError("another rank of this run found too little disk space for its part (its error says "
                         "where); free space there, then rerun")
