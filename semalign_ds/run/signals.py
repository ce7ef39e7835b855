"""Preemption and interruption: SIGTERM (how Slurm cancels and preempts), SIGUSR1 (`#SBATCH --signal=B:USR1@120`,
forwarded to the ranks by the slurm/ templates before the time limit) and SIGINT (Ctrl-C).

Inside `handled()` (the CLI's owned commands), a signal is handled in one of two ways:
  - in a `graceful()` section (a loop that polls: the student's optimizer steps) the handler only sets a flag;
    the loop asks `stop_requested(group, device)` after each step (all ranks agree, so none is left waiting in
    a collective), writes a checkpoint and raises `Preempted`;
  - elsewhere (loading models, attribution, evaluation) there is no step to finish: SIGTERM/SIGUSR1 raise
    `Preempted` at once and SIGINT raises KeyboardInterrupt, so a rerun resumes from the last checkpoint.
A second SIGINT always raises KeyboardInterrupt (the user insists); a second SIGTERM/SIGUSR1 is only logged, so the
exit path (checkpoint, MLflow KILLED, marker) is not cut short by the SIGTERM srun sends the other ranks once one
of them exits. The CLI maps Preempted to exit code
EXIT_REQUEUE (75, EX_TEMPFAIL), which the templates turn into `scontrol requeue` after a SIGUSR1, and a Ctrl-C
(SIGINT, checkpointed at the step or not) to EXIT_INTERRUPTED (130), as shells report it.
"""
from __future__ import annotations

import logging
import signal
from contextlib import contextmanager

EXIT_REQUEUE = 75  # EX_TEMPFAIL: "try again later"
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report Ctrl-C
SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

log = logging.getLogger(__name__)
_state = {"requested": None, "graceful": 0}


class Preempted(Exception):
    """The run stopped on a signal (SIGTERM / SIGUSR1 / SIGINT), its last checkpoint intact; rerun to resume."""

    def __init__(self, signal_name: str, where: str = ""):
        self.signal_name, self.where = signal_name, where
        super().__init__(f"stopped by {signal_name}{' ' + where if where else ''}; rerun the same command to "
                         f"resume from the last checkpoint")


def requested() -> str | None:
    """The name of the first signal received in this process (e.g. 'SIGTERM'), None if none."""
    return _state["requested"]


def _handler(signum: int, frame) -> None:
    name = signal.Signals(signum).name
    first = _state["requested"] is None
    if first:
        _state["requested"] = name
    if signum == signal.SIGINT and not (first and _state["graceful"]):
        raise KeyboardInterrupt
    if not first:  # already stopping (e.g. srun's SIGTERM after another rank exited 75): let the exit path finish
        log.warning("%s received while stopping; finishing the exit path", name)
        return
    if not _state["graceful"]:
        raise Preempted(name)
    ctrl_c = signum == signal.SIGINT
    log.warning("%s received: finishing the current step, then a checkpoint and exit %d%s", name,
                EXIT_INTERRUPTED if ctrl_c else EXIT_REQUEUE, " (Ctrl-C again to stop now)" if ctrl_c else "")


@contextmanager
def handled(then_ignore: bool = False):
    """Install the handlers for the duration of a command (main thread only); restore the previous ones and
    clear the flag afterwards. then_ignore: after a signal, SIGTERM/SIGUSR1 stay ignored for the rest of the
    process (it is on its way out with exit 75: srun's SIGTERM to the slower ranks, sent once the first rank
    exited, must not turn their 75 into a death by signal)."""
    previous = {sig: signal.signal(sig, _handler) for sig in SIGNALS}
    _state.update(requested=None, graceful=0)
    try:
        yield
    finally:
        stopping = then_ignore and _state["requested"] is not None
        for sig, handler in previous.items():
            signal.signal(sig, signal.SIG_IGN if stopping and sig != signal.SIGINT else handler)
        _state.update(requested=None, graceful=0)


@contextmanager
def graceful():
    """A section whose loop polls `stop_requested` after each unit of work: signals only set the flag here.
    A signal that arrived before the section is honoured at once."""
    if _state["requested"]:
        raise Preempted(_state["requested"])
    _state["graceful"] += 1
    try:
        yield
    finally:
        _state["graceful"] -= 1


def stop_requested(group=None, device=None) -> str | None:
    """Did any rank of `group` get a signal? Collective when a process group is up (every rank of the group
    calls it at the same point, e.g. after each optimizer step), so all ranks stop at the same step."""
    import torch.distributed as dist

    name = requested()
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return name
    from semalign_ds.cluster.distributed import all_reduce

    flag = int(all_reduce([SIGNALS.index(signal.Signals[name]) + 1 if name else 0], device or "cpu", group, "max")[0])
    return SIGNALS[flag - 1].name if flag else None


def graceful_steps(steps, on_stop=None, group=None, device=None):
    """Iterate `steps` (e.g. optimizer steps) in a graceful section. After each step's work (when the loop asks
    for the next one) every rank of `group` learns whether any rank got a signal; if so `on_stop(done)` runs
    (done = the steps finished, e.g. to write a checkpoint) and Preempted is raised."""
    with graceful():
        for step in steps:
            yield step
            name = stop_requested(group, device)
            if name:
                if on_stop is not None:
                    on_stop(step + 1)
                raise Preempted(name, f"after step {step + 1}")
