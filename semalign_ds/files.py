"""Writing files the way a run must: atomically, with room checked first, and OS errors a user can act on.

- `write_json(path, obj)`: write to a hidden temporary beside `path`, fsync, rename over it: a reader (or a
  rerun after a kill) sees the old file or the new one, never half of one.
- `check_free_space(directory, bytes_needed, what)`: ValueError before the work when the filesystem of
  `directory` (or of its nearest existing parent) has less room than `bytes_needed`.
- `user_error(err, path, bytes_needed)`: the OSErrors a user fixes (disk full, read-only filesystem, no
  permission) as one ValueError naming the path and, for a full disk, the bytes needed; None for other errors.
  A full disk is found wherever the writer reports it: an OSError, SQLite's "database or disk is full" (MLflow's
  store), safetensors' error carrying the OS error, anywhere in the exception's chain.
- `writing(path, bytes_needed, what, cleanup)`: a block that writes `what`; a full disk inside it removes the
  `cleanup` paths (the half-written temporaries a rerun would otherwise trip over) and becomes one ValueError
  with the path, the bytes needed and the bytes free.
- `write_bytes(path, data, what)`: `data` written atomically under `writing`.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import re
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


_FULL_TEXT = re.compile(r"database or disk is full|No space left on device|Disk quota exceeded|StorageFull|"
                        r"(os error|code:) ?(28|122)\b")


def _chain(err: BaseException):
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def os_error(err: BaseException) -> OSError | None:
    """The OSError a user can fix behind `err` (itself or anywhere in its chain), as an OSError: a full disk
    reported by SQLite or safetensors in words becomes OSError(ENOSPC); None if there is none."""
    for link in _chain(err):
        if isinstance(link, OSError) and link.errno in _FIXES:
            return link
    for link in _chain(err):
        if _FULL_TEXT.search(str(link)):
            return OSError(errno.ENOSPC, f"{type(link).__name__}: {str(link)[:300]}")
    return None


def is_disk_full(err: BaseException) -> bool:
    found = os_error(err)
    return found is not None and found.errno in (errno.ENOSPC, errno.EDQUOT)


@contextlib.contextmanager
def writing(path, bytes_needed: int | None, what: str, cleanup=()):
    """Write `what` to `path` inside the block. A full disk (however the writer reports it) removes every path of
    `cleanup` (files or folders: the block's temporaries) and raises a ValueError naming `what`, the path, the
    bytes needed and the bytes free; other errors pass unchanged."""
    try:
        yield
    except Exception as err:
        if not is_disk_full(err):
            raise
        for stale in cleanup:
            _remove(Path(stale))
        raise ValueError(full_message(what, path, bytes_needed)) from err


def _remove(path: Path) -> None:
    with contextlib.suppress(OSError):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def full_message(what: str, path, bytes_needed: int | None) -> str:
    """'<what> needs 1.2 GiB (n bytes) at <path>, but its filesystem has 3.0 MiB (m bytes) free: ...'."""
    try:
        free = free_bytes(Path(path))
        has = f"{human(free)} ({free} bytes)"
    except OSError:
        has = "an unknown amount"
    need = f"needs {human(bytes_needed)} ({bytes_needed} bytes)" if bytes_needed else "needs more space"
    return (f"the disk is full: {what} {need} at {path}, but its filesystem has {has} free; free space (or quota) "
            f"there, or point the output at a larger disk, then rerun (it resumes; nothing half-written is left "
            f"in the way)")


def write_bytes(path, data: bytes, what: str) -> Path:
    """Write `data` to `path` atomically (hidden temporary, fsync, rename); a full disk is `writing`'s error."""
    path = Path(path)
    tmp = tmp_name(path)
    with writing(path, len(data), what, cleanup=[tmp]):
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    return path


def user_error(err: BaseException, path=None, bytes_needed: int | None = None) -> ValueError | None:
    """A ValueError for an OSError the user can fix (ENOSPC, EDQUOT, EROFS, EACCES, EPERM; anywhere in the
    chain, or a full disk in SQLite's or safetensors' words), naming the path and the fix; None for any other
    error (a bug or a hardware fault: let it surface as it is)."""
    err = os_error(err)
    if err is None:
        return None
    where = path or err.filename
    what = _FIXES[err.errno]
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        need = f" writing {human(bytes_needed)} ({bytes_needed} bytes)" if bytes_needed else " writing"
        try:
            free = f"; {human(free_bytes(Path(str(where)).parent))} free there" if where else ""
        except OSError:
            free = ""
        said = f" [{err.strerror}]" if err.strerror != os.strerror(err.errno) else ""  # the writer's own words
        return ValueError(f"{what}{need}{f' to {where}' if where else ''}{free}: free space (or quota) on that "
                          f"filesystem, or point the output at a larger disk, then rerun (the run resumes){said}")
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


def cache_root(part: str | None = None) -> Path:
    """Where semalign caches what it builds once (semantic bases, converted GGUF checkpoints, real models, demo
    assets, lm-eval tasks and teacher scores): $SEMALIGN_CACHE, else ~/.cache/semalign_ds; `part` a folder in it."""
    root = Path(os.environ.get("SEMALIGN_CACHE") or Path.home() / ".cache" / "semalign_ds").expanduser()
    return root / part if part else root


def cache_lock(path):
    """An exclusive lock on `path` (its folder created) for building something into the cache once, whoever else
    on the machine wants it at the same time: `with cache_lock(root / ".name.lock"): ...` (filelock)."""
    from filelock import FileLock

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(path))
