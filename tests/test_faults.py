"""The fault tier's long cases (`pytest -m faults`; the cheap ones run by default in test_trust.py,
test_ownership.py and test_signals.py): what users meet on shared machines, each with its message and a clean
rerun. Concurrent jobs on one directory, a full disk on a small tmpfs (where this process may mount one; skipped
with the reason elsewhere), a DeepSpeed build killed midway, Ctrl-C inside a training loop, a run that failed
validation, and several demos at once. Real `semalign` processes, real signals, real filesystems."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_pipeline import (SEMALIGN, assert_no_row_twice, assert_same_weights, checkpoint_state, env, mlflow_runs,
                           semalign, wait_for, write_config)

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.faults


def start(*args, cwd=None, environ=None) -> subprocess.Popen:
    return subprocess.Popen([*SEMALIGN, *map(str, args)], env=environ or env(), cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, timeout: float = 400) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def remount(point: Path, size_kib: int) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size_kib}k", str(point)], check=True)


# ---------------------------------------------------------------- 1. two jobs, one directory


@pytest.mark.slow
def test_a_second_job_on_a_running_directory_is_refused_and_a_job_elsewhere_runs(tmp_path, tiny_pair):
    cfg = write_config(tmp_path, tiny_pair, schedule={"epochs_per_stage": 1.0})
    first = start("run", "--config", cfg)
    lock = tmp_path / "run" / ".semalign.lock"
    wait_for(first, lock.is_file, "the first job's lock")
    second = start("run", "--config", cfg)  # the same directory, while the first trains
    elsewhere = start("run", "--config", cfg, f"output_dir={tmp_path / 'other'}")
    rc, _, err = finish(second, 120)
    assert rc == 2 and "Traceback" not in err, err[-3000:]
    assert f"(the run directory) is in use by another semalign job: pid {first.pid} on host" in err
    assert first.poll() is None  # refused while the first still runs: it never touched its directory
    for proc in (first, elsewhere):
        rc, _, err = finish(proc)
        assert rc == 0, err[-3000:]
    client, (mlrun,) = mlflow_runs(tmp_path / "run")  # one run, one process's rows: 2 stages x 12 steps, once
    assert sorted(m.step for m in client.get_metric_history(mlrun.info.run_id, "layer_loss")) == list(range(1, 25))
    assert_no_row_twice(client, mlrun)
    assert not lock.exists() and not (tmp_path / "other" / ".semalign.lock").exists()
    assert_same_weights(tmp_path / "run", tmp_path / "other")


# ---------------------------------------------------------------- 2. a full disk


@pytest.mark.slow
def test_a_run_on_a_disk_too_small_stops_before_the_teacher_and_reruns_once_there_is_room(tmp_path, tiny_pair,
                                                                                          tmpfs):
    out = tmpfs(160)  # the tiny student's checkpoints and export need ~0.5 MiB
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = write_config(tmp_path, tiny_pair, tracking={"uri": uri})
    proc = semalign("run", "--config", cfg, f"output_dir={out / 'run'}", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert re.search(r"semalign: error: not enough disk space for this run: the checkpoints, the student export "
                     rf"need about [\d.]+ KiB \(\d+ bytes\) in {out}/run, but its filesystem has [\d.]+ KiB \(\d+ "
                     r"bytes\) free", proc.stderr), proc.stderr[-2000:]
    assert not (out / "run" / "checkpoint").exists() and not list((out / "run").glob("*.tmp"))
    remount(out, 8192)  # room made: the same command, nothing deleted by hand
    semalign("run", "--config", cfg, f"output_dir={out / 'run'}")
    assert json.loads((out / "run" / "semalign.json").read_text())["status"] == "finished"
    (mlrun,) = mlflow_runs(out, uri)[1]
    assert mlrun.info.status == "FINISHED"


@pytest.mark.slow
def test_a_disk_that_fills_during_training_keeps_the_last_checkpoint_and_the_rerun_ends_the_same(tmp_path,
                                                                                                 tiny_pair, tmpfs):
    straight = tmp_path / "straight"
    straight.mkdir()
    semalign("run", "--config", write_config(straight, tiny_pair, schedule={"epochs_per_stage": 1.0}))
    out = tmpfs(8192)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = write_config(tmp_path, tiny_pair, schedule={"epochs_per_stage": 1.0}, tracking={"uri": uri})
    proc = start("run", "--config", cfg, f"output_dir={out / 'run'}")
    wait_for(proc, lambda: checkpoint_state(out / "run").get("step"), "a checkpoint inside stage 1")
    filler = out / "filler"  # someone else's job fills the disk: a few KiB stay free
    with open(filler, "wb") as f:
        f.write(b"\0" * (shutil.disk_usage(out).free - 16 * 1024))
    rc, _, err = finish(proc)
    assert rc == 2 and "Traceback" not in err, err[-3000:]
    assert re.search(rf"semalign: error: the disk is full: the checkpoint needs [\d.]+ KiB \(\d+ bytes\) at "
                     rf"{out}/run/checkpoint.tmp, but its filesystem has [\d.]+ KiB \(\d+ bytes\) free", err), err
    assert not (out / "run" / "checkpoint.tmp").exists() and checkpoint_state(out / "run")["step"]
    filler.unlink()
    semalign("run", "--config", cfg, f"output_dir={out / 'run'}")  # resumes from the kept checkpoint
    assert_same_weights(straight / "run", out / "run")


def test_a_full_disk_while_mlflow_builds_its_store_leaves_nothing_and_a_rerun_builds_it(tmp_path, tmpfs,
                                                                                        monkeypatch):
    import mlflow

    from semalign_ds import files, tracking

    out = tmpfs(4096)
    (out / "semalign.json").write_text("{}")
    filler = out / "filler"
    filler.write_bytes(b"\0" * (3400 * 1024))  # ~0.6 MiB free: less than the ~0.95 MiB store
    monkeypatch.setattr(files, "check_free_space", lambda *a: None)  # past the up-front check: the real ENOSPC
    with pytest.raises(ValueError) as err:
        tracking.ensure_local_store(out, None)
    assert re.search(rf"^the disk is full: creating the MLflow store needs 2.0 MiB \(2097152 bytes\) at "
                     rf"{out}/mlflow.db, but its filesystem has", str(err.value)), err.value
    assert sorted(os.listdir(out)) == ["filler", "semalign.json"]  # no half-created store, no temporaries
    filler.unlink()
    tracking.ensure_local_store(out, None)
    client = mlflow.MlflowClient(tracking.local_store_uri(out))
    client.create_run(client.create_experiment("x"))
    assert sorted(os.listdir(out)) == ["mlflow.db", "semalign.json"]
    tracking._forget_engine(tracking.local_store_uri(out))  # the tmpfs is unmounted after the test


@pytest.mark.slow
def test_a_half_created_store_an_older_semalign_left_is_rebuilt(tmp_path, tmpfs):
    """What a full disk during MLflow's table creation used to leave: a store whose next use fails."""
    import mlflow

    from semalign_ds import tracking

    small = tmpfs(300)
    with pytest.raises(Exception, match="database or disk is full"):
        mlflow.MlflowClient(f"sqlite:///{small / 'mlflow.db'}").search_experiments()
    tracking._forget_engine(f"sqlite:///{small / 'mlflow.db'}")
    out = tmp_path / "run"
    out.mkdir()
    shutil.copy(small / "mlflow.db", out / "mlflow.db")
    (out / "semalign.json").write_text(json.dumps({"kind": "run", "config_hash": "x", "mlflow_run_id": None}))
    tracking.ensure_local_store(out, None)
    client = mlflow.MlflowClient(tracking.local_store_uri(out))
    client.create_run(client.create_experiment("semalign"))  # a usable store


# ---------------------------------------------------------------- 4. a DeepSpeed build killed midway


def _build(ext: Path, session: bool = False) -> subprocess.Popen:
    environ = dict(env(), TORCH_EXTENSIONS_DIR=str(ext), DS_ACCELERATOR="cpu")
    return subprocess.Popen([sys.executable, "-m", "semalign_ds.cluster.extensions"], env=environ,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=session)


@pytest.mark.slow
def test_a_build_killed_midway_does_not_block_the_next(tmp_path):
    ext = tmp_path / "ext"
    first = _build(ext, session=True)
    lock = ext / "deepspeed_shm_comm" / "lock"
    wait_for(first, lock.is_file, "the build's lock", limit=300)
    time.sleep(3)  # the compiler is running
    os.killpg(first.pid, signal.SIGKILL)  # the whole build: python, ninja and the compilers
    first.wait()
    assert lock.is_file()  # what used to make every later process wait forever
    second = _build(ext)
    out, _ = second.communicate(timeout=600)
    assert second.returncode == 0, out[-3000:]
    assert f"removed the stale DeepSpeed build lock {lock}" in out and "DeepSpeed ops ready in" in out
    assert (ext / "deepspeed_shm_comm" / "deepspeed_shm_comm.so").is_file() and not lock.exists()


@pytest.mark.slow  # the DeepSpeed warm-up and a process that loads it; test_trust has the seconds-long unit case
def test_a_stale_build_lock_beside_a_built_op_costs_seconds(tmp_path):
    from workers.engines_common import child_env, warm_deepspeed

    warm_deepspeed()
    built = Path(child_env()["TORCH_EXTENSIONS_DIR"]) / "deepspeed_shm_comm"
    ext = tmp_path / "ext"
    shutil.copytree(built, ext / "deepspeed_shm_comm", ignore=shutil.ignore_patterns("lock"))
    lock = ext / "deepspeed_shm_comm" / "lock"
    code = (f"from torch.utils.file_baton import FileBaton; import time; b = FileBaton({str(lock)!r}); "
            f"assert b.try_acquire(); print('held', flush=True); time.sleep(120)")  # torch's builder, then killed
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    holder.kill()
    holder.wait()
    t0 = time.time()
    proc = _build(ext)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0 and f"removed the stale DeepSpeed build lock {lock}" in out, out[-3000:]
    assert time.time() - t0 < 120 and not lock.exists()


# ---------------------------------------------------------------- 5. Ctrl-C, validation failures, demos


@pytest.mark.slow
def test_ctrl_c_inside_the_training_loop_checkpoints_and_exits_130(tmp_path, tiny_pair):
    cfg = write_config(tmp_path, tiny_pair, schedule={"epochs_per_stage": 1.0})
    run = tmp_path / "run"
    proc = start("run", "--config", cfg)
    wait_for(proc, lambda: checkpoint_state(run).get("stage") == 2, "a checkpoint inside stage 2")
    proc.send_signal(signal.SIGINT)
    rc, _, err = finish(proc, 120)
    assert rc == 130 and "Traceback" not in err, err[-3000:]
    step = checkpoint_state(run)["step"]
    assert f"semalign: interrupted (Ctrl-C) after step {step}; rerun the same command to resume" in err
    assert json.loads((run / "semalign.json").read_text())["status"] == "killed"
    client, (mlrun,) = mlflow_runs(run)
    assert mlrun.info.status == "KILLED"
    semalign("run", "--config", cfg)
    client, (mlrun,) = mlflow_runs(run)
    assert mlrun.info.status == "FINISHED"
    assert_no_row_twice(client, mlrun)


@pytest.mark.slow
def test_a_run_that_failed_validation_leaves_nothing_in_the_way_of_the_corrected_one(tmp_path, tiny_pair):
    cfg = write_config(tmp_path, tiny_pair)
    bad = semalign("run", "--config", cfg, "method.min_shared_tokens=100000", check=False)  # found after loading
    assert bad.returncode == 2 and "min_shared_tokens" in bad.stderr and "Traceback" not in bad.stderr
    assert not (tmp_path / "run").exists()  # handed back: the directory this run created is gone
    semalign("run", "--config", cfg)


@pytest.mark.slow
def test_demos_at_once_in_two_directories_run_and_a_third_in_one_of_them_is_refused(tmp_path):
    environ = dict(env(), SEMALIGN_CACHE=str(tmp_path / "cache"))
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    first = start("demo", "--scale", "tiny", cwd=a, environ=environ)
    wait_for(first, (a / "runs" / "demo" / ".semalign.lock").is_file, "the first demo's lock", limit=300)
    same = start("demo", "--scale", "tiny", cwd=a, environ=environ)
    other = start("demo", "--scale", "tiny", cwd=b, environ=environ)
    rc, _, err = finish(same, 300)
    assert rc == 2 and "output_dir='runs/demo' (the run directory) is in use by another semalign job: pid " \
                       f"{first.pid}" in err, err[-2000:]
    for proc in (first, other):
        rc, out, err = finish(proc)
        assert rc == 0 and "student after" in out, err[-3000:]
