"""Run-level checkpoints and resume: the typed progress of a run and where it is saved.

<output_dir>/checkpoint/ holds `model/` (the student, a HF folder), inside a stage each rank's ZeRO-2 optimizer
partition (engines/checkpoint.py), and run.json (the Progress below). A checkpoint is written whole into
checkpoint.tmp/ and renamed into place, so a kill at any moment leaves the previous checkpoint intact. No pickle.
Barriers run over the run's role group (`ctx.group`: the student ranks of a disaggregated run; None = the world).
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from semalign_ds import config as cfgmod
from semalign_ds import files
from semalign_ds.cluster.distributed import barrier
from semalign_ds.engines.ds_config import find_template  # noqa: F401  (where the run looks for a template)
from semalign_ds.progress import phase

if TYPE_CHECKING:
    from semalign_ds.run.context import RunContext

CKPT, TMP, OLD = "checkpoint", "checkpoint.tmp", "checkpoint.old"
RUN_FILE = "run.json"
ADAM_BYTES = 12  # per trainable parameter in the ZeRO-2 partitions: fp32 master + exp_avg + exp_avg_sq


@dataclass
class Progress:
    """Where a run stands; saved as run.json with every checkpoint. Only the training loop changes it."""

    config_hash: str = ""
    mlflow_run_id: str | None = None
    world_size: int = 1
    pairing_done: bool = False
    stages_done: list[int] = field(default_factory=list)
    stage: int | None = None  # the stage a mid-stage checkpoint is inside (None at a boundary)
    step: int | None = None  # its optimizer steps done
    teacher_samples: int = 0  # samples the teacher emitted for this run, over all its attempts
    packets: str | None = None  # binding digest of the packets trained on (a resume must read the same)
    model_dir: str | None = None  # the checkpoint's student weights (not saved; set when read)

    def resume_step(self, k: int) -> int:
        """The step stage k resumes at (pure: teacher ranks of a split run compute it too)."""
        return int(self.step or 0) if self.stage == k else 0

    def to_json(self) -> str:
        return json.dumps({k: v for k, v in dataclasses.asdict(self).items() if k != "model_dir"}, indent=2)

    @classmethod
    def from_json(cls, text: str) -> "Progress":
        raw = json.loads(text)
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in names})


def _current(out: Path) -> Path | None:
    for name in (CKPT, OLD):  # OLD only survives a kill between the two renames of _commit
        if (out / name / RUN_FILE).is_file():
            return out / name
    return None


def read_progress(out: Path, cfg) -> Progress:
    """The last checkpoint's progress, or a fresh one; refuses a directory of another config."""
    want = cfgmod.result_hash(cfg)
    ckpt = _current(out)
    if ckpt is None:
        return Progress(config_hash=want)
    progress = Progress.from_json((ckpt / RUN_FILE).read_text())
    if progress.config_hash != want:
        raise ValueError(
            f"output_dir {str(out)!r} holds a checkpoint of a different configuration (config hash "
            f"{progress.config_hash} != {want}; its config is in {out / 'config.yaml'}); use another "
            f"output_dir, or set runtime.resume=false to start over and overwrite it")
    barrier()
    if ckpt.name == OLD and torch.distributed.get_rank() == 0:
        ckpt.rename(out / CKPT)
    barrier()
    progress.model_dir = str(out / CKPT / "model")
    return progress


def _write(ctx: RunContext, progress: Progress, stage=None, step: int | None = None) -> None:
    from semalign_ds.engines.checkpoint import save_stage_state

    tmp = ctx.out / TMP
    if ctx.info.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier(ctx.group)
    # a full disk: checkpoint.tmp goes (the last whole checkpoint stays), one error with the bytes needed and free
    with files.writing(tmp, checkpoint_bytes(ctx.student, stage), "the checkpoint",
                       cleanup=[tmp] if ctx.info.is_main else []):
        if stage is not None:
            save_stage_state(tmp, stage, step)
        elif ctx.info.is_main:
            ctx.student.save_pretrained(tmp / "model")
        if ctx.info.is_main:
            progress.world_size = ctx.info.world_size
            progress.stage, progress.step = (stage.k, step) if stage is not None else (None, None)
            files.write_json(tmp / RUN_FILE, json.loads(progress.to_json()), indent=2)
            _commit(ctx.out)
    barrier(ctx.group)


def checkpoint_bytes(student, stage=None) -> int:
    """A checkpoint's size: the student's weights, and inside a stage the trainable parameters' fp32 master and
    two AdamW moments (all ranks' partitions together)."""
    weights = sum(p.numel() * p.element_size() for p in student.parameters())
    trainable = sum(p.numel() for p in stage.model.parameters() if p.requires_grad) if stage is not None else 0
    return weights + ADAM_BYTES * trainable


def _commit(out: Path) -> None:
    shutil.rmtree(out / OLD, ignore_errors=True)
    if (out / CKPT).exists():
        (out / CKPT).rename(out / OLD)
    (out / TMP).rename(out / CKPT)
    shutil.rmtree(out / OLD, ignore_errors=True)


def save_inside(ctx: RunContext, progress: Progress, stage, step: int) -> None:
    """Mid-stage checkpoint: weights, optimizer partitions and the step to resume from."""
    _write(ctx, progress, stage, step)


def save_boundary(ctx: RunContext, progress: Progress) -> None:
    """Stage-boundary checkpoint: the next stage starts with a fresh engine, so weights suffice."""
    _write(ctx, progress)


def resume_stage(ctx: RunContext, progress: Progress, stage, k: int) -> int:
    """The step to start stage k at: 0, or the saved step when the checkpoint is inside this stage."""
    if not progress.resume_step(k):
        return 0
    if progress.world_size != ctx.info.world_size:
        raise ValueError(f"the checkpoint in {ctx.out / CKPT} was written by {progress.world_size} ranks inside "
                         f"stage {k}; resume it with the same number of ranks")
    from semalign_ds.engines.checkpoint import load_stage_state

    with phase(f"resume stage {k} at step {progress.step}", ctx):
        load_stage_state(ctx.out / CKPT, stage)
    return int(progress.step)


def check_packets(ctx: RunContext, progress: Progress, digest: str) -> None:
    """A resumed run trains on packets of the same binding as before (e.g. the same --from-spool)."""
    if progress.packets not in (None, digest):
        raise ValueError(f"the checkpoint in {ctx.out / CKPT} was trained on other teacher packets (binding "
                         f"{progress.packets}, now {digest}); resume with the same --from-spool and config, or set "
                         f"runtime.resume=false")
    progress.packets = digest


def replace_dir(tmp: Path, final: Path) -> None:
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
