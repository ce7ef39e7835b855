"""signals.py with real signals sent to this process (and to two gloo ranks): where a loop polls, a signal only
sets the flag and the loop stops at a step boundary; elsewhere it stops at once. The whole path through
`semalign run` (checkpoint, exit 75, MLflow KILLED, resume) is in tests/test_pipeline.py."""
from __future__ import annotations

import os
import signal
import time

import pytest
import torch.multiprocessing as mp

from semalign_ds.run import signals

pytestmark = pytest.mark.faults


def send(sig: int) -> None:
    os.kill(os.getpid(), sig)
    time.sleep(0.01)  # Python runs the handler at the next bytecode boundary of the main thread


def test_outside_a_polling_loop_a_signal_stops_at_once():
    with signals.handled():
        with pytest.raises(signals.Preempted, match="stopped by SIGTERM; rerun the same command to resume"):
            send(signal.SIGTERM)
    with signals.handled():
        with pytest.raises(KeyboardInterrupt):
            send(signal.SIGINT)


def test_inside_a_polling_loop_a_signal_only_sets_the_flag():
    before = signal.getsignal(signal.SIGTERM)
    with signals.handled():
        with signals.graceful():
            send(signal.SIGUSR1)
            assert signals.requested() == "SIGUSR1"
            send(signal.SIGTERM)  # a second one (srun's SIGTERM once another rank exited): logged only
            assert signals.stop_requested() == "SIGUSR1"  # no process group: this process's flag
        with pytest.raises(signals.Preempted, match="SIGUSR1"):  # a flag set before a section: stop at once
            with signals.graceful():
                pass
    assert signal.getsignal(signal.SIGTERM) is before and signals.requested() is None


def test_a_stopping_process_ignores_later_sigterms():
    before = {sig: signal.getsignal(sig) for sig in signals.SIGNALS}
    try:
        with signals.handled(then_ignore=True):  # no signal: the previous handlers come back
            pass
        assert {sig: signal.getsignal(sig) for sig in signals.SIGNALS} == before
        with pytest.raises(signals.Preempted):
            with signals.handled(then_ignore=True):
                send(signal.SIGUSR1)
        assert signal.getsignal(signal.SIGTERM) is signal.getsignal(signal.SIGUSR1) is signal.SIG_IGN
        send(signal.SIGTERM)  # ignored: the exit path runs to its end (exit 75)
        assert signal.getsignal(signal.SIGINT) is before[signal.SIGINT]
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


def test_a_second_ctrl_c_stops_at_once():
    with signals.handled(), signals.graceful():
        send(signal.SIGINT)
        assert signals.requested() == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            send(signal.SIGINT)


def test_graceful_steps_checkpoints_after_the_step_in_progress():
    done, saved = [], []
    with signals.handled():
        with pytest.raises(signals.Preempted, match="stopped by SIGTERM after step 3"):
            for step in signals.graceful_steps(range(10), saved.append):
                done.append(step)
                if step == 2:
                    send(signal.SIGTERM)  # arrives mid-step: the step finishes, then the checkpoint
    assert done == [0, 1, 2] and saved == [3]


def _rank(rank: int, world: int, init_file: str, results) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    got = []
    with signals.handled(), signals.graceful():
        got.append(signals.stop_requested())  # nobody signalled yet
        if rank == 1:
            send(signal.SIGUSR1)
        got.append(signals.stop_requested())  # rank 0 learns of rank 1's signal: both stop at this step
    results[rank] = got
    dist.destroy_process_group()


def test_every_rank_stops_at_the_same_step(tmp_path):
    # spawned, not forked: a process group an earlier in-process test left in this process must not be inherited
    results = mp.get_context("spawn").Manager().dict()
    mp.start_processes(_rank, args=(2, str(tmp_path / "rdv"), results), nprocs=2, start_method="spawn")
    assert dict(results) == {0: [None, "SIGUSR1"], 1: [None, "SIGUSR1"]}



def test_ctrl_c_inside_a_training_loop_still_exits_130(monkeypatch, capsys, tmp_path):
    """A Ctrl-C in a polling loop checkpoints at the step (Preempted), yet it is still Ctrl-C: exit 130, not 75."""
    from semalign_ds import cli
    from semalign_ds.run import guard

    def stopped(cfg, command, work, config_problems=()):
        raise signals.Preempted("SIGINT", "after step 3")
    monkeypatch.setattr(guard, "owned_run", stopped)
    monkeypatch.setattr("semalign_ds.versions.check", lambda: None)
    (tmp_path / "c.yaml").write_text("name: x\n")
    assert cli.main(["run", "--config", str(tmp_path / "c.yaml")]) == signals.EXIT_INTERRUPTED == 130
    err = capsys.readouterr().err
    assert err.strip() == "semalign: interrupted (Ctrl-C) after step 3; rerun the same command to resume from that " \
                          "checkpoint"

    def terminated(cfg, command, work, config_problems=()):
        raise signals.Preempted("SIGTERM", "after step 3")
    monkeypatch.setattr(guard, "owned_run", terminated)
    assert cli.main(["run", "--config", str(tmp_path / "c.yaml")]) == signals.EXIT_REQUEUE == 75
