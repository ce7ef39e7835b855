"""Writing files the way a run must: atomically, with room checked first, and OS errors a user can act on.

- `write_json(path, obj)`: write to a hidden temporary beside `path`, fsync, rename over it: a reader (or a
  rerun after a kill) sees the old file or the new one, never half of one.
- `check_free_space(directory, bytes_needed, what)`: ValueError before the work when the filesystem of
  `directory` (or of its nearest existing parent) has less room than `bytes_needed`.
- `user_error(err, path, bytes_needed)`: the OSErrors a user fixes (disk full, read-only filesystem, no
  permission) as one ValueError naming the path and, for a full disk, the bytes needed; None for other errors.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
from pathlib import Path

# The OS errors a user can fix, and what to tell them
_FIXES = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exhausted",
    errno.EROFS: "the filesystem is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
}


def tmp_name(path: Path) -> Path:
    """The temporary a write of `path` goes through: hidden, in the same directory (same filesystem)."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def write_json(path, obj, indent: int | None = 1) -> Path:
    """Write `obj` as JSON (sorted keys) to `path` atomically; OS errors a user can fix become ValueErrors."""
    path = Path(path)
    tmp = tmp_name(path)
    text = json.dumps(obj, indent=indent, sort_keys=True)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        reraise(err, path, len(text.encode()))
    return path


def reraise(err: OSError, path=None, bytes_needed: int | None = None):
    """Raise `user_error(...)` from `err` when the user can fix it, else `err` itself."""
    fix = user_error(err, path, bytes_needed)
    if fix is None:
        raise err
    raise fix from err


def existing_parent(path) -> Path:
    """`path` itself if it exists, else its nearest existing parent."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def free_bytes(directory) -> int:
    return shutil.disk_usage(existing_parent(directory)).free


def human(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(nbytes) < 1024 or unit == "TiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return f"{nbytes} B"


def check_free_space(directory, bytes_needed: int, what: str) -> None:
    """ValueError naming `what`, the directory, the bytes needed and the bytes free if it does not fit."""
    free = free_bytes(directory)
    if bytes_needed > free:
        raise ValueError(f"{what} needs {human(bytes_needed)} ({bytes_needed} bytes) in {directory} but its "
                         f"filesystem has {human(free)} free; free space there or point it at a larger disk")


def user_error(err: BaseException, path=None, bytes_needed: int | None = None) -> ValueError | None:
    """A ValueError for an OSError the user can fix (ENOSPC, EDQUOT, EROFS, EACCES, EPERM), naming the path
    and the fix; None for any other error (a bug or a hardware fault: let it surface as it is)."""
    if not isinstance(err, OSError) or err.errno not in _FIXES:
        return None
    where = path or err.filename
    what = _FIXES[err.errno]
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        need = f" writing {human(bytes_needed)} ({bytes_needed} bytes)" if bytes_needed else " writing"
        try:
            free = f"; {human(free_bytes(Path(str(where)).parent))} free there" if where else ""
        except OSError:
            free = ""
        return ValueError(f"{what}{need}{f' to {where}' if where else ''}{free}: free space (or quota) on that "
                          f"filesystem, or point the output at a larger disk, then rerun (the run resumes)")
    target = f"cannot write {where}" if where else "cannot write"
    if err.errno == errno.EROFS:
        return ValueError(f"{target}: {what}; point the output at a writable directory")
    return ValueError(f"{target}: {what}; fix its permissions (e.g. chmod u+w) or point the output at a "
                      f"directory you can write")


def json_digest(obj, length: int = 16) -> str:
    """sha256 (first `length` hex) of a JSON-able object in canonical form (sorted keys): the one hash of configs,
    packet bindings and cache keys."""
    import hashlib

    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:length]
