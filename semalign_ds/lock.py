"""One job per directory: a lock file that names its holder, refuses a second job at once, and is taken over
when its holder is dead.

The lock is `<dir>/.semalign.lock`, a small JSON record of the holder: pid, host, the host's boot id and the
process's pid namespace, the process's start time (clock ticks since boot, so a recycled pid is not mistaken for
the holder), the wall time it took the lock, its command line and its Slurm job id. It is created atomically with
its content (written to a temporary, then hard-linked to the lock's name: link() fails when the name exists, on
local disks and on the shared filesystems clusters use, NFS included); a filesystem without hard links falls
back to an exclusive create.

A second job finds the lock and asks whether its holder still runs:
  - a holder on this host (same hostname, boot and pid namespace) whose process is gone, a zombie, or a
    different process under the same pid is stale: the lock is taken over (one taker at a time: the takeover is
    serialised by a flock on a file in this host's temporary directory, which every local filesystem supports);
  - a live holder on this host: refused, naming the pid and how to stop it;
  - a holder on another host (or in another container) cannot be probed from here: refused, naming the host,
    pid and Slurm job, and how to take over once that job is dead (delete the lock file).
`held(directory, what, key)` is the context manager the commands use; `holder(directory)` describes a current
holder (None if there is none) for messages elsewhere.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import socket
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

LOCK_NAME = ".semalign.lock"
_WRITING_GRACE_S = 5.0  # an unreadable lock younger than this may still be being written (exclusive-create path)

log = logging.getLogger(__name__)


class LockHeld(ValueError):
    """The directory is in use by another job; the message names the holder and the way out."""


# ---------------------------------------------------------------- who is this process


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().strip()
    except OSError:
        return None


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state letter, start time in clock ticks since boot) of a local process; None without /proc or process."""
    text = _read(f"/proc/{pid}/stat")
    if not text:
        return None
    fields = text.rsplit(")", 1)[-1].split()  # the command name (in parentheses) may contain spaces
    return fields[0], int(fields[19])


def _pid_namespace() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def identity() -> dict:
    """This process as a lock holder."""
    stat = _proc_stat(os.getpid())
    return {"pid": os.getpid(), "host": socket.gethostname(), "boot_id": _read("/proc/sys/kernel/random/boot_id"),
            "pid_ns": _pid_namespace(), "start_ticks": stat[1] if stat else None,
            "since": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join([_program(), *sys.argv[1:]])[:500],
            "slurm_job": os.environ.get("SLURM_JOB_ID")}


def _program() -> str:
    name = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python"
    return "semalign" if name in ("cli.py", "semalign") else name


def _same_host(holder: dict) -> bool:
    return holder.get("host") == socket.gethostname() and holder.get("pid_ns") == _pid_namespace()


def alive(holder: dict) -> bool | None:
    """True: the holder runs; False: it is gone (stale lock); None: it runs elsewhere and cannot be probed."""
    if not _same_host(holder):
        return None
    boot = _read("/proc/sys/kernel/random/boot_id")
    if boot and holder.get("boot_id") and boot != holder["boot_id"]:
        return False  # the host rebooted since
    pid = int(holder.get("pid") or 0)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's live process
    stat = _proc_stat(pid)
    if stat is None:
        return True  # no /proc (not Linux): the pid exists
    state, start = stat
    return state not in ("Z", "X") and holder.get("start_ticks") in (None, start)


def _is_me(holder: dict) -> bool:
    me = identity()
    return _same_host(holder) and holder.get("pid") == me["pid"] and holder.get("start_ticks") == me["start_ticks"]


# ---------------------------------------------------------------- the lock file


def lock_path(directory) -> Path:
    return Path(directory) / LOCK_NAME


def read_holder(path: Path) -> dict | None:
    """The lock's record; None if the file is absent; {} if it is unreadable (being written, or not ours)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError):
        return {}
    try:
        record = json.loads(text)
    except json.JSONDecodeError:
        return {}
    return record if isinstance(record, dict) and "pid" in record else {}


def _create(path: Path, record: dict) -> bool:
    """Create the lock with its content in one step; False if it exists."""
    text = json.dumps(record, indent=1, sort_keys=True) + "\n"
    tmp = path.with_name(f"{LOCK_NAME}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.link(tmp, path)
        return True
    except FileExistsError:  # NFS may report a link whose reply was lost as existing: the link count tells
        return os.stat(tmp).st_nlink == 2
    except OSError as err:
        if err.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.ENOSYS):
            raise
        return _create_exclusive(path, text)
    finally:
        tmp.unlink(missing_ok=True)


def _create_exclusive(path: Path, text: str) -> bool:
    """For filesystems without hard links: exclusive create, then the content (readers allow a grace period)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    return True


@contextlib.contextmanager
def _takeover_guard(path: Path):
    """Serialise stale-lock takeovers of `path` among this host's processes (a local flock)."""
    folder = Path(tempfile.gettempdir()) / f"semalign-locks-{os.getuid()}"
    folder.mkdir(mode=0o700, exist_ok=True)
    name = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:24]
    with open(folder / f"{name}.guard", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _take_over_if_stale(path: Path, seen: dict) -> bool:
    """Remove the lock if it still holds the stale record `seen`; True if removed (or already gone)."""
    with _takeover_guard(path):
        now = read_holder(path)
        if now is None:
            return True
        if now != seen or alive(now) is not False:
            return False
        path.unlink(missing_ok=True)
    log.warning("took over the lock %s of pid %s on %s (since %s), which is no longer running", path,
                seen.get("pid"), seen.get("host"), seen.get("since"))
    return True


def describe(holder: dict) -> str:
    """'pid 123 on host n1 (Slurm job 45, since 2026-..., `semalign run --config x.yaml`)'."""
    extra = [f"Slurm job {holder['slurm_job']}"] if holder.get("slurm_job") else []
    extra += [f"since {holder['since']}"] if holder.get("since") else []
    extra += [f"`{holder['command']}`"] if holder.get("command") else []
    return f"pid {holder.get('pid')} on host {holder.get('host')}" + (f" ({', '.join(extra)})" if extra else "")


def _refusal(path: Path, holder: dict, what: str, key: str, directory: Path) -> LockHeld:
    head = f"{key}={str(directory)!r} ({what}) is in use by another semalign job:"
    if not holder:
        return LockHeld(f"{head} an unknown process holds {path} (not a readable lock record); if no job "
                        f"uses that directory, delete {path} and rerun, or choose another {key}")
    state = alive(holder)
    if state:
        return LockHeld(f"{head} {describe(holder)}, which is running on this host; two jobs must not write one "
                        f"directory: wait for it to finish, stop it (kill {holder.get('pid')}: a run stops at a "
                        f"checkpoint), or choose another {key}")
    probe = f"`squeue -j {holder['slurm_job']}`" if holder.get("slurm_job") else \
        f"`ps -p {holder.get('pid')}` on {holder.get('host')}"
    return LockHeld(f"{head} {describe(holder)}, on another host, which cannot be checked from here; if that job "
                    f"is no longer running ({probe} shows nothing), take over by deleting {path} and rerun; "
                    f"otherwise wait for it, or choose another {key}")


def acquire(directory, what: str, key: str, reentrant: bool = False) -> Path:
    """Take the lock of `directory` (created if absent); LockHeld naming the holder if another job has it.
    reentrant: a lock left by this very process (an earlier in-process run that failed) is taken over."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = lock_path(directory)
    record = identity()
    for _ in range(50):
        if _create(path, record):
            return path
        holder = read_holder(path)
        if holder is None:
            continue  # released in between: try again
        if holder and _is_me(holder):
            if not reentrant:
                raise RuntimeError(f"internal: {path} is already held by this process")
            path.unlink(missing_ok=True)
            continue
        if not holder and time.time() - _mtime(path) < _WRITING_GRACE_S:
            time.sleep(0.1)  # being written by an exclusive create
            continue
        if holder and alive(holder) is False and _take_over_if_stale(path, holder):
            continue
        raise _refusal(path, holder, what, key, directory)
    raise LockHeld(f"{key}={str(directory)!r}: could not take {path} (other processes keep taking it); "
                   f"is another job starting there right now?")


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def release(path: Path) -> None:
    """Remove the lock if this process holds it (a lock taken over by someone else is left to them)."""
    holder = read_holder(path)
    if holder and _is_me(holder):
        path.unlink(missing_ok=True)
    elif holder is not None:
        log.warning("the lock %s is no longer this process's (%s); left in place", path, describe(holder or {}))


@contextlib.contextmanager
def held(directory, what: str, key: str):
    """Hold the lock of `directory` for the duration of the block (see `acquire`)."""
    path = acquire(directory, what, key)
    try:
        yield path
    finally:
        release(path)


def holder(directory) -> dict | None:
    """The live (or unprobeable) holder of the directory's lock; None if nobody holds it."""
    found = read_holder(lock_path(directory))
    if not found or alive(found) is False:
        return None
    return found
