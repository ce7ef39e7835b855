"""A run owns its directory: the marker `<dir>/semalign.json` and the rule that protects everything else.

The marker: {"kind": "run" | "spool", "config_hash", "mlflow_run_id", "status": "running" | "finished" |
"failed" | "killed", "semalign_version", "created", "updated"}.
`run`, `train` (kind run, the output_dir) and `teach` (kind spool, --out) write only into a directory that is
  - absent (it is created), or
  - empty: no entry at all, hidden files included (a `.nfs*`, `.DS_Store` or `lost+found` makes it not empty;
    the only exception is a marker temporary this module left behind when killed mid-write), or
  - marked by semalign as the same kind with the same config hash (a rerun: it resumes, or, when finished,
    changes nothing).
Anything else is refused before a byte is written: a file, a directory the user cannot write (permissions or a
read-only filesystem), a non-empty directory without a marker, a marker of the other kind or of another config.
`check` decides (pure, writes nothing); `claim` creates the directory and writes the marker (after `check`);
`update` records the status and the MLflow run id; `release_new(out)` takes back the claim of a new
directory whose run was refused before it began (a validation error): nothing is left to block the corrected
rerun. Only the run's writing rank calls `claim`, `update` and `release_new`; it holds the directory's job lock
(lock.py) meanwhile.
"""
from __future__ import annotations

import json
import os
import re
from datetime import datetime, timezone
from pathlib import Path

from semalign_ds import __version__
from semalign_ds import files

MARKER = "semalign.json"
KINDS = ("run", "spool")
STATUSES = ("running", "finished", "failed", "killed")
_FIELDS = ("kind", "config_hash", "mlflow_run_id", "status", "semalign_version", "created", "updated")
_OURS = re.compile(r"^\.semalign\.json\.\d+\.tmp$|^\.semalign\.lock(\.\d+\.tmp)?$")  # marker temporary, job lock
_KEYS = {"run": "output_dir", "spool": "--out (transport.spool_dir)"}
_WRITERS = {"run": "`semalign run` or `semalign train`", "spool": "`semalign teach`"}


def _key(kind: str, key: str | None) -> str:
    assert kind in KINDS, kind
    return key or _KEYS[kind]


def read(out) -> dict | None:
    """The directory's marker, None if it has none; ValueError if the marker is not one semalign wrote."""
    path = Path(out) / MARKER
    if not path.is_file():
        return None
    try:
        marker = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not a readable semalign marker ({err}); if {out} is yours and you want to "
                         f"start over, delete it (or choose another directory)") from None
    if not isinstance(marker, dict) or marker.get("kind") not in KINDS or not marker.get("config_hash"):
        raise ValueError(f"{path} is not a semalign marker (no kind/config_hash); choose another directory, or "
                         f"delete {out} if it is yours and you want to start over")
    return marker


def _entries(out: Path) -> list[str]:
    return sorted(e for e in os.listdir(out) if not _OURS.match(e))


def _check_writable(out: Path, key: str) -> None:
    """ValueError if nothing could be written at `out`: a parent that is a file, a read-only filesystem, no
    write permission (checked on `out`, or on its nearest existing parent when it is absent)."""
    target = files.existing_parent(out)
    if not target.is_dir():
        raise ValueError(f"{key}={str(out)!r}: {target} is a file, so the directory cannot be created there; "
                         f"choose a path under a directory")
    if os.statvfs(target).f_flag & os.ST_RDONLY:
        raise ValueError(f"{key}={str(out)!r}: {target} is on a read-only filesystem; choose a writable directory")
    if not os.access(target, os.W_OK | os.X_OK):
        raise ValueError(f"{key}={str(out)!r}: {target} is not writable by this user (permission denied); fix its "
                         f"permissions (chmod u+w) or choose a directory you can write")


def check(out, kind: str, config_hash: str, key: str | None = None) -> dict | None:
    """May a `kind` of this config write into `out`? Returns the existing marker (a rerun) or None (a new
    directory); ValueError with the fix otherwise. Writes nothing."""
    key, out = _key(kind, key), Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{key}={str(out)!r} is a file, not a directory; point {key} at a new or empty directory "
                         f"(semalign never writes over a file it did not create)")
    marker = read(out) if out.is_dir() else None
    if marker is None:
        _check_writable(out, key)
        entries = _entries(out) if out.is_dir() else []
        if entries:
            shown = ", ".join(entries[:5]) + (f", ... ({len(entries)} entries)" if len(entries) > 5 else "")
            raise ValueError(f"{key}={str(out)!r} is not empty ({shown}) and was not written by semalign (it has no "
                             f"{MARKER}); semalign writes only into a new or empty directory, or one it wrote "
                             f"itself: choose another {key}")
        return None
    if marker["kind"] != kind:
        raise ValueError(f"{key}={str(out)!r} holds a semalign {marker['kind']} (written by "
                         f"{_WRITERS[marker['kind']]}), not a {kind}; choose another {key}")
    if marker["config_hash"] != config_hash:
        raise ValueError(f"{key}={str(out)!r} holds a {kind} of a different configuration (config hash "
                         f"{marker['config_hash']} != {config_hash}; its config is in {out / 'config.yaml'}); "
                         f"choose another {key}, or delete that directory to start over with this config")
    if marker.get("status") != "finished":
        _check_writable(out, key)
    return marker


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def claim(out, kind: str, config_hash: str, key: str | None = None) -> dict:
    """`check`, then create the directory and write the marker (status running; a rerun keeps its MLflow run id
    and creation time). Returns the marker written."""
    out = Path(out)
    old = check(out, kind, config_hash, key) or {}
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        files.reraise(err, out)
    marker = {"kind": kind, "config_hash": config_hash, "mlflow_run_id": old.get("mlflow_run_id"),
              "status": "running", "semalign_version": __version__, "created": old.get("created") or _now(),
              "updated": _now()}
    files.write_json(out / MARKER, marker)
    return marker


def release_new(out) -> bool:
    """Undo `claim` on a directory that was new (absent or empty) when claimed, as long as its run wrote nothing
    but the marker and config.yaml (no MLflow run, no checkpoint): those two files go. True if released; False
    (nothing touched) once the run has produced anything. The caller removes the directory if it created it."""
    out = Path(out)
    marker = read(out) if out.is_dir() else None
    if marker is None or marker.get("mlflow_run_id") or set(_entries(out)) - {MARKER, "config.yaml"}:
        return False
    for name in ("config.yaml", MARKER):
        (out / name).unlink(missing_ok=True)
    return True


def update(out, **fields) -> dict:
    """Set fields of the marker (status, mlflow_run_id) in place, atomically; returns the marker."""
    assert set(fields) <= set(_FIELDS) and fields.get("status", "running") in STATUSES, fields
    marker = read(out)
    if marker is None:  # deleted by someone while the run went on
        raise ValueError(f"{out} has no {MARKER} to update (was it deleted?)")
    marker.update(fields, updated=_now())
    files.write_json(Path(out) / MARKER, marker)
    return marker


def mlflow_run_id(out) -> str | None:
    """The MLflow run this directory owns (None: none yet, or no marker)."""
    marker = read(out) if Path(out).is_dir() else None
    return (marker or {}).get("mlflow_run_id")


def note_mlflow_run(out, run_id: str | None) -> None:
    """Record the MLflow run a marked directory owns (a Python caller of pipeline.run that did not claim the
    directory has no marker: nothing to record)."""
    if run_id and Path(out).is_dir() and read(out) is not None:
        update(out, mlflow_run_id=run_id)
