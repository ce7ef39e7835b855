"""Progress bars for every long phase (rank 0 only, off with runtime.progress=false)."""
from __future__ import annotations

from tqdm.auto import tqdm


def bar(iterable, desc: str, run=None, enabled: bool | None = None, **kwargs):
    if enabled is None:
        enabled = run is None or (run.info.is_main and run.cfg.runtime.progress)
    return tqdm(iterable, desc=desc, disable=not enabled, dynamic_ncols=True, **kwargs)
