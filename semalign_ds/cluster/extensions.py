"""DeepSpeed's JIT-built ops (its shared-memory comm op, built by torch's C++ extension builder on the first
`init_distributed`): built once, at setup, into a directory this user owns, and never waited on forever.

Where: TORCH_EXTENSIONS_DIR when the user set it (it must be writable); else `<venv>/torch_extensions/<tag>`
inside the environment (`sys.prefix`, when it is a venv this user can write), else
`~/.cache/semalign_ds/torch_extensions/<hash of sys.prefix>/<tag>`. The tag is torch's own build-folder name
(`py311_cpu`, `py311_cu128`) with DeepSpeed's accelerator: one environment per folder, so two environments on a
host never rebuild the op over each other, and a CPU and a GPU node sharing a venv keep their own builds.

Stale build locks: torch's builder takes `<dir>/<op>/lock` (an empty file created exclusively and held open
for the whole build) even to load an op already built, and every later process waits while it exists. A build
killed midway leaves it, and everything after hangs. `clear_stale_locks(root)` runs before DeepSpeed starts:
  - a lock some process on this host holds open (found in /proc) is a live build: waited on (torch waits);
  - a lock nobody here holds, on a local filesystem, is stale: removed, with a warning naming it;
  - on a shared filesystem a build on another node may hold it: waited on while the op's folder shows activity,
    and removed once it has been idle for STALE_S; the wait names the file.
`python -m semalign_ds.cluster.extensions` (scripts/setup.sh runs it) builds the shm op there and prints where;
it needs no rendezvous, so no port.
"""
from __future__ import annotations

import hashlib
import logging
import os
import sys
import time
from pathlib import Path

STALE_S = 600.0  # a shared-filesystem build lock with no local holder and no activity this long is stale
POLL_S = 2.0
_NETWORK_FS = ("nfs", "nfs4", "lustre", "gpfs", "beegfs", "cifs", "smb3", "smbfs", "ceph", "glusterfs", "9p",
               "afs", "panfs", "wekafs", "orangefs", "pvfs2", "fuse")

log = logging.getLogger(__name__)


def _tag(device: str) -> str:
    """torch's build-folder name (`py311_cpu`, `py311_cu128`) for the accelerator DeepSpeed will use."""
    import torch

    python = f"py{sys.version_info.major}{sys.version_info.minor}"
    if device == "cpu":
        return f"{python}_cpu"
    if torch.version.hip:
        return f"{python}_rocm{torch.version.hip.replace('.', '')}"
    return f"{python}_cu{(torch.version.cuda or 'none').replace('.', '')}"


def default_dir(device: str) -> Path:
    """Where this environment builds its ops when TORCH_EXTENSIONS_DIR is unset (see the module docstring)."""
    prefix = Path(sys.prefix)
    if sys.prefix != sys.base_prefix and os.access(prefix, os.W_OK | os.X_OK):
        return prefix / "torch_extensions" / _tag(device)
    env = hashlib.sha256(str(prefix.resolve()).encode()).hexdigest()[:12]
    return Path.home() / ".cache" / "semalign_ds" / "torch_extensions" / env / _tag(device)


def prepare(device: str) -> Path:
    """Point TORCH_EXTENSIONS_DIR at a directory this user can write (unless the user set one: then check it),
    and clear its stale build locks. Call before DeepSpeed is imported."""
    configured = os.environ.get("TORCH_EXTENSIONS_DIR")
    root = Path(configured) if configured else default_dir(device)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(_unwritable(root, configured, err)) from None
    if not os.access(root, os.W_OK | os.X_OK):
        raise ValueError(_unwritable(root, configured, "permission denied"))
    os.environ["TORCH_EXTENSIONS_DIR"] = str(root)
    clear_stale_locks(root)
    return root


def _unwritable(root: Path, configured: str | None, why) -> str:
    if configured:
        return (f"TORCH_EXTENSIONS_DIR={configured!r} cannot be written by this user ({why}): DeepSpeed builds its "
                f"ops there; unset it (semalign then uses the environment's own folder) or point it at a directory "
                f"you own")
    return (f"cannot create {root} for DeepSpeed's built ops ({why}); set TORCH_EXTENSIONS_DIR to a directory you "
            f"own")


# ---------------------------------------------------------------- stale build locks


def _proc_links(name: str):
    """(pid, target) of /proc/<pid>/<name> links (fd/* or cwd) of this host's processes this user may read."""
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            links = list((proc / "fd").iterdir()) if name == "fd" else [proc / name]
        except OSError:
            continue
        for link in links:
            try:
                yield int(proc.name), os.readlink(link)
            except OSError:
                continue


def holders(path: Path) -> list[int]:
    """Pids of this host's processes that have `path` open (torch's builder holds its lock open)."""
    target = str(path.resolve())
    return sorted({pid for pid, link in _proc_links("fd") if link == target})


def builders(folder: Path) -> list[int]:
    """Pids of processes working in `folder` (ninja and the compilers of a build run there), e.g. the orphans of a
    build whose Python process was killed."""
    target = str(folder.resolve())
    return sorted({pid for pid, link in _proc_links("cwd") if link == target})


def filesystem_type(path: Path) -> str:
    """The type of the filesystem holding `path` (from /proc/mounts; '' if unknown)."""
    best, kind = "", ""
    target = str(path.resolve())
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return ""
    for line in mounts:
        parts = line.split()
        if len(parts) < 3:
            continue
        point = parts[1].replace("\\040", " ")
        if (target == point or target.startswith(point.rstrip("/") + "/")) and len(point) >= len(best):
            best, kind = point, parts[2]
    return kind


def _shared(path: Path) -> bool:
    kind = filesystem_type(path)
    return any(kind == name or kind.startswith(name + ".") for name in _NETWORK_FS)


def _last_activity(folder: Path) -> float:
    times = [folder.stat().st_mtime]
    for entry in folder.iterdir():
        try:
            times.append(entry.stat().st_mtime)
        except OSError:
            continue
    return max(times)


def clear_stale_locks(root: Path, stale_s: float = STALE_S) -> list[Path]:
    """Remove the build locks under `root` that no live build holds (see the module docstring); returns them."""
    removed = []
    for lock in sorted(Path(root).glob("*/lock")):
        if _settle(lock, stale_s):
            removed.append(lock)
    return removed


def _settle(lock: Path, stale_s: float) -> bool:
    """Wait for or remove one build lock; True if it was removed as stale."""
    announced = False
    while lock.exists():
        pids = holders(lock)
        if pids:
            log.warning("DeepSpeed op build in progress (pid %s holds %s); waiting for it", ", ".join(map(str, pids)),
                        lock)
            return False  # torch's builder waits on a live build itself
        orphans = builders(lock.parent)
        if orphans:  # the compilers of a killed build still write there: let them finish first
            if not announced:
                log.warning("waiting for processes %s still building in %s (their build was killed)",
                            ", ".join(map(str, orphans)), lock.parent)
                announced = True
            time.sleep(POLL_S)
            continue
        if not _shared(lock.parent):
            return _remove(lock, "no process holds it")
        try:
            idle = time.time() - _last_activity(lock.parent)
        except OSError:
            continue  # the build finished and tidied up meanwhile
        if idle >= stale_s:
            return _remove(lock, f"no process on this host holds it and {lock.parent} has been idle {idle:.0f} s")
        if not announced:
            log.warning("waiting for %s: a DeepSpeed op build on another host, or a stale lock (it is removed after "
                        "%.0f s without activity; delete it yourself if no build runs)", lock, stale_s)
            announced = True
        time.sleep(POLL_S)
    return False


def _remove(lock: Path, why: str) -> bool:
    try:
        lock.unlink()
    except FileNotFoundError:
        return False
    log.warning("removed the stale DeepSpeed build lock %s (%s): a build was killed before it finished", lock, why)
    return True


def build(device: str = "cpu") -> Path:
    """Build (or load, if built) DeepSpeed's shm comm op into this environment's folder; returns the folder."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if device == "cpu" else "cuda")
    root = prepare(device)
    from deepspeed.comm.torch import build_shm_op

    build_shm_op()
    return root


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    device = "cuda" if os.environ.get("DS_ACCELERATOR", "") == "cuda" or _has_gpu() else "cpu"
    root = build(device)
    print(f"DeepSpeed ops ready in {root} (TORCH_EXTENSIONS_DIR)")
    return 0


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    sys.exit(main())
