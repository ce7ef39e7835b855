"""The library's logging: `logging` under the `semalign_ds` logger, the rank in every line, rank 0 verbose (INFO),
the other ranks only warnings and errors (N ranks would otherwise print everything N times).

    [rank 0] resuming stage 2 at step 6
    [rank 3] WARNING: SIGTERM received: finishing the current step, then a checkpoint and exit 75
The CLI calls `setup` before any work (the rank read from the launcher's variables) and `distributed.init`
again once the process group knows it. Results a command prints (the evaluation table, a rendered job
script) are its output on stdout, not log lines.
"""
from __future__ import annotations

import logging
import sys

LOGGER = "semalign_ds"


class _Stderr(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a line is logged (tests and callers may redirect it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


class _RankFormatter(logging.Formatter):
    def __init__(self, rank: int):
        super().__init__()
        self.rank = rank

    def format(self, record: logging.LogRecord) -> str:
        level = "" if record.levelno == logging.INFO else f"{record.levelname}: "
        text = f"[rank {self.rank}] {level}{record.getMessage()}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


def setup(rank: int = 0, verbose: bool | None = None) -> logging.Logger:
    """(Re)configure the library's logger for this rank; idempotent. verbose None: rank 0 only."""
    logger = logging.getLogger(LOGGER)
    for handler in [h for h in logger.handlers if getattr(h, "_semalign", False)]:
        logger.removeHandler(handler)
    handler = _Stderr()
    handler._semalign = True
    handler.setFormatter(_RankFormatter(rank))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO if (rank == 0 if verbose is None else verbose) else logging.WARNING)
    logger.propagate = False
    return logger
