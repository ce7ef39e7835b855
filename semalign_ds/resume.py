"""Run-level checkpoints and resume.

<output_dir>/checkpoint/ holds `model/` (the student, a HF folder), inside a stage each rank's ZeRO-2 optimizer
partition (engines/checkpoint.py), and run.json (stages done, the stage and step to resume, the MLflow run id,
the config hash; for a student reading a spool, its reader position). A checkpoint is written whole into
checkpoint.tmp/ and renamed into place, so a kill at any moment leaves the previous checkpoint intact. No pickle.
Barriers run over the run's role group (`r.group`: the student ranks of a disaggregated run; None = the world).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from semalign_ds import config as cfgmod
from semalign_ds.distributed import barrier
from semalign_ds.progress import phase

CKPT, TMP, OLD = "checkpoint", "checkpoint.tmp", "checkpoint.old"
RUN_FILE = "run.json"
REPO_ROOT = Path(__file__).resolve().parent.parent


def _current(out: Path) -> Path | None:
    for name in (CKPT, OLD):  # OLD only survives a kill between the two renames of _commit
        if (out / name / RUN_FILE).is_file():
            return out / name
    return None


def read_progress(out: Path, cfg) -> dict:
    """The last checkpoint's run state, or {} for a fresh run; refuses a directory of another config."""
    ckpt = _current(out)
    if ckpt is None:
        return {}
    progress = json.loads((ckpt / RUN_FILE).read_text())
    want = cfgmod.result_hash(cfg)
    if progress.get("config_hash") != want:
        raise ValueError(
            f"output_dir {str(out)!r} holds a checkpoint of a different configuration (config hash "
            f"{progress.get('config_hash')} != {want}; its config is in {out / 'config.yaml'}); use another "
            f"output_dir, or set runtime.resume=false to start over and overwrite it")
    barrier()
    if ckpt.name == OLD and torch.distributed.get_rank() == 0:
        ckpt.rename(out / CKPT)
    barrier()
    progress["model_dir"] = str(out / CKPT / "model")
    return progress


def _write(r, stage=None, step: int | None = None) -> None:
    from semalign_ds.engines.checkpoint import save_stage_state

    tmp = r.out / TMP
    group = getattr(r, "group", None)
    if r.info.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier(group)
    if stage is not None:
        save_stage_state(tmp, stage, step)
    elif r.info.is_main:
        r.student.save_pretrained(tmp / "model")
    if r.info.is_main:
        meta = {k: v for k, v in r.progress.items() if k != "model_dir"}
        meta.update(config_hash=cfgmod.result_hash(r.cfg), world_size=r.info.world_size,
                    stage=stage.k if stage is not None else None, step=step)
        (tmp / RUN_FILE).write_text(json.dumps(meta, indent=2))
        _commit(r.out)
    barrier(group)


def _commit(out: Path) -> None:
    shutil.rmtree(out / OLD, ignore_errors=True)
    if (out / CKPT).exists():
        (out / CKPT).rename(out / OLD)
    (out / TMP).rename(out / CKPT)
    shutil.rmtree(out / OLD, ignore_errors=True)


def save_inside(r, stage, step: int) -> None:
    """Mid-stage checkpoint: weights, optimizer partitions and the step to resume from."""
    _write(r, stage, step)


def save_boundary(r) -> None:
    """Stage-boundary checkpoint: the next stage starts with a fresh engine, so weights suffice."""
    _write(r)


def resume_stage(r, stage, k: int) -> int:
    """The step to start stage k at: 0, or the saved step when the checkpoint is inside this stage."""
    p = r.progress
    if not resume_step(p, k):
        return 0
    if p.get("world_size") != r.info.world_size:
        raise ValueError(f"the checkpoint in {r.out / CKPT} was written by {p.get('world_size')} ranks inside "
                         f"stage {k}; resume it with the same number of ranks")
    from semalign_ds.engines.checkpoint import load_stage_state

    with phase(f"resume stage {k} at step {p['step']}", r):
        load_stage_state(r.out / CKPT, stage)
    return int(p["step"])


def resume_step(progress: dict, k: int) -> int:
    """The step stage k resumes at according to the checkpoint's progress (pure: teacher ranks use it too)."""
    return int(progress.get("step") or 0) if progress.get("stage") == k else 0


def record_spool_position(r, k: int, next_micro: int, spool_id: str) -> None:
    """After each packet read from a spool: the next micro-batch index of stage k (saved with the checkpoint)."""
    r.progress["spool"] = {"stage": k, "next_micro_batch": next_micro, "spool": spool_id}


def check_spool_position(r, k: int, first_micro: int, spool_id: str) -> None:
    """A resumed student reads from exactly where the checkpoint left off, in the same spool."""
    p = r.progress.get("spool")
    if not p or p.get("stage") != k:
        return
    if p.get("spool") != spool_id:
        raise ValueError(f"the checkpoint in {r.out / CKPT} was trained from another spool (binding {p.get('spool')}, "
                         f"this one {spool_id}); resume with the same --from-spool, or set runtime.resume=false")
    if p.get("next_micro_batch") != first_micro:
        raise ValueError(f"the checkpoint in {r.out / CKPT} read the spool up to micro-batch "
                         f"{p.get('next_micro_batch')} of stage {k} but resumes at {first_micro}; it is inconsistent: "
                         f"set runtime.resume=false to start over")


def find_template(path: str, key: str) -> Path:
    """A DeepSpeed template path as given, or relative to the project's root (where ds_configs/ lives)."""
    for candidate in (Path(path), REPO_ROOT / path):
        if candidate.is_file():
            return candidate
    raise ValueError(f"{key}={path!r} does not exist (also looked in {REPO_ROOT}); point it at a JSON file "
                     f"such as ds_configs/student_zero2.json")


def replace_dir(tmp: Path, final: Path) -> None:
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
