"""Progress bars for every long phase (rank 0 only, off with runtime.progress=false): attribution, map build,
teacher load, resume, spool shards, the stages, evaluation.

`bar(iterable, desc, run)` wraps a loop; `phase(desc, run)` marks one long call that has no loop of its own
(loading the teacher, restoring a checkpoint): a one-step bar that shows its elapsed time when it is done.
"""
from __future__ import annotations

from contextlib import contextmanager

from tqdm.auto import tqdm


def _enabled(run, enabled: bool | None) -> bool:
    if enabled is not None:
        return enabled
    return run is None or (run.info.is_main and run.cfg.runtime.progress)


def bar(iterable, desc: str, run=None, enabled: bool | None = None, **kwargs):
    return tqdm(iterable, desc=desc, disable=not _enabled(run, enabled), dynamic_ncols=True, **kwargs)


@contextmanager
def phase(desc: str, run=None, enabled: bool | None = None):
    """A bar of one step around a long call: shown when it starts, completed (with its time) when it ends."""
    with tqdm(total=1, desc=desc, disable=not _enabled(run, enabled), dynamic_ncols=True,
              bar_format="{desc}: {bar} {elapsed}") as shown:
        yield
        shown.update(1)
