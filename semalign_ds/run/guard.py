"""One owned command: `run`, `train` and `teach` go through `owned_run`, which holds the rules a user trusts.

    1. a finished directory of this config (marker status finished, same kind and config hash): nothing is
       done; the result is read back (eval.json of a run, manifest.json of a spool) and the command exits 0
    2. the check pass (checks.check_all): every problem at once, before anything is written or loaded
    3. on the writing rank (rank 0): the directory's job lock (lock.py; a second job is refused at once, naming
       the holder), then steps 1 and the ownership check again under it (another job may have finished or
       claimed the directory meanwhile), then ownership.claim: the directory is created and marked; status running
    4. the work, under signals.handled() (SIGTERM/SIGUSR1/SIGINT: checkpoint at a step boundary where the
       loop polls, else stop at once)
    5. the marker's status: finished, killed (a signal or Ctrl-C) or failed (anything else). A new directory
       whose run stopped on a user error before it produced anything (no MLflow run, no checkpoint) is handed
       back instead: its marker and config.yaml removed (the directory too if the run created it), so the
       corrected rerun starts clean
The MLflow run's own status is set where the run is (pipeline._guarded); its id goes into the marker there
(ownership.note_mlflow_run), so a rerun continues it.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from semalign_ds import lock
from semalign_ds.run import checks, ownership, signals
from semalign_ds import config as cfgmod

if TYPE_CHECKING:
    from semalign_ds.config import RunConfig

log = logging.getLogger(__name__)


def target(cfg: cfgmod.RunConfig, command: str) -> tuple[Path, str]:
    """(the directory the command writes, its ownership kind)."""
    if command == "teach":
        return Path(cfg.transport.spool_dir), "spool"
    return cfgmod.resolved_output_dir(cfg), "run"


def finished_result(out: Path, kind: str) -> dict:
    """What a finished directory holds, read back: eval.json of a run (its "table"), the spool's manifest."""
    name = "eval.json" if kind == "run" else "manifest.json"
    path = out / name
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        result = {}
    if kind == "run" and "table" not in result:
        result["table"] = f"(no readable {path}; the student is in {out / 'student'})"
    return result


_WHAT = {"run": "the run directory", "spool": "the spool being written"}
_KEY = {"run": "output_dir", "spool": "--out (transport.spool_dir)"}


def finished_before(out: Path, kind: str, config_hash: str) -> dict | None:
    """Step 1: the stored result of a finished directory of this config, else None."""
    marker = ownership.read(out) if out.is_dir() else None
    if marker and (marker["kind"], marker["config_hash"], marker.get("status")) == (kind, config_hash, "finished"):
        log.info("%s holds a finished %s of this config: nothing to do (delete it to redo it)", out, kind)
        return {**finished_result(out, kind), "finished_before": True}
    return None


def owned_run(cfg: cfgmod.RunConfig, command: str, work: Callable[[cfgmod.RunConfig], dict],
              config_problems: list[str] = ()) -> dict:
    """Steps 1-5 of the module docstring around `work(cfg)`; returns its result (or the finished one).
    config_problems: the values config.parse refused, reported in step 2 with the rest."""
    from semalign_ds.cluster.launch import resolve_launch

    out, kind = target(cfg, command)
    config_hash = cfgmod.result_hash(cfg)
    done = None if config_problems else finished_before(out, kind, config_hash)
    if done:
        return done
    launch = resolve_launch(os.environ)
    checks.check_all(cfg, command, world_size=launch.world_size, config_problems=config_problems)
    writer = launch.rank == 0
    created = not out.exists()
    try:
        with lock.held(out, _WHAT[kind], _KEY[kind]) if writer else contextlib.nullcontext():
            new = False
            if writer:
                done = finished_before(out, kind, config_hash)
                if done:
                    return done
                new = ownership.check(out, kind, config_hash) is None
                ownership.claim(out, kind, config_hash)
            return _owned_work(cfg, work, out, writer, new)
    except _HandedBack as back:  # the lock is released: the directory can go if this run created it
        _remove_if_created(out, created)
        raise back.error from None
    except ValueError:  # e.g. refused under the lock: no empty directory of ours is left behind
        _remove_if_created(out, created)
        raise


def _remove_if_created(out: Path, created: bool) -> None:
    """Remove `out` if this run created it and it is empty (rmdir: anything in it keeps it)."""
    if created:
        with contextlib.suppress(OSError):
            out.rmdir()


class _HandedBack(Exception):
    """A new directory was handed back after a user error (carried in `error`)."""

    def __init__(self, error: ValueError):
        super().__init__(str(error))
        self.error = error


def _owned_work(cfg: RunConfig, work, out: Path, writer: bool, new: bool) -> dict:
    """Steps 4-5 of the module docstring."""
    status = "failed"
    try:
        with signals.handled(then_ignore=True):
            result = work(cfg)
        status = "finished"
        return result
    except (KeyboardInterrupt, signals.Preempted):
        status = "killed"
        raise
    except ValueError as err:
        if writer and new and ownership.release_new(out):
            status = None
            raise _HandedBack(err) from None
        raise
    finally:
        if writer and status is not None:
            _set_status(out, status)


def _set_status(out: Path, status: str) -> None:
    """Record the final status; a failure to write it (a full disk) must not hide the run's own error."""
    try:
        ownership.update(out, status=status)
    except (OSError, ValueError) as err:
        log.warning("could not record status %s in %s: %s", status, out / ownership.MARKER, err)
