"""The dependency versions this code is tested with, checked at start: engines/ patches DeepSpeed internals
(teacher.allow_subgroup_zero3, engines/checkpoint.py reads ZeRO-2 partitions) and uses transformers' DeepSpeed
integration, so a version outside the range is a clear error before any work, not a crash mid-run.

TESTED is the one table; pyproject.toml's dependencies carry the same ranges (tests/test_trust.py compares them).
Set SEMALIGN_ALLOW_UNTESTED_VERSIONS=1 to run anyway (a warning names each version outside its range).
"""
from __future__ import annotations

import logging
import os
from importlib.metadata import PackageNotFoundError, version

from packaging.specifiers import SpecifierSet
from packaging.version import Version

# package -> tested range (last verified: deepspeed 0.19.8, transformers 5.24.0, torch 2.13.0, mlflow 3.17.2, pydantic 2.14.4)
TESTED = {
    "deepspeed": ">=0.19,<0.20",
    "transformers": ">=5.0,<6",
    "torch": ">=2.4,<3",
    "mlflow": ">=3.0,<4",
    "pydantic": ">=2.5,<3",  # config.py's models use the v2 API
}
OVERRIDE = "SEMALIGN_ALLOW_UNTESTED_VERSIONS"

log = logging.getLogger(__name__)


def installed(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def problems(found: dict[str, str | None] | None = None) -> list[str]:
    """One line per package missing or outside its tested range (`found`: package -> version, for tests)."""
    found = {p: installed(p) for p in TESTED} if found is None else found
    out = []
    for package, spec in TESTED.items():
        got = found.get(package)
        if got is None:
            out.append(f"{package} is not installed; install {package}{spec}")
        elif not SpecifierSet(spec).contains(Version(Version(got).base_version)):  # 2.13.0+cpu -> 2.13.0
            out.append(f"{package} {got} is outside the tested range {package}{spec}; install "
                       f"'{package}{spec}'")
    return out


def check(found: dict[str, str | None] | None = None) -> None:
    """ValueError listing every dependency outside its tested range (a warning with the override set)."""
    bad = problems(found)
    if not bad:
        return
    if os.environ.get(OVERRIDE) == "1":
        for line in bad:
            log.warning("%s (running anyway: %s=1)", line, OVERRIDE)
        return
    raise ValueError("; ".join(bad) + f" (or set {OVERRIDE}=1 to run untested versions at your own risk)")


def summary() -> str:
    """'torch 2.13.0, deepspeed 0.19.8, ...' for `semalign --version`."""
    return ", ".join(f"{p} {installed(p) or 'not installed'}" for p in TESTED)
