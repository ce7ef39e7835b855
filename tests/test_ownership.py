"""ownership.py: which directories a run may write into (the marker semalign.json); lock.py: one job per
directory, with real processes as holders (alive, killed, a zombie, a recycled pid, another host); files.py:
atomic JSON and the OS errors a user can fix, on real filesystems (a tmpfs mount for a full or read-only disk,
where allowed). Part of the fault tier (`pytest -m faults`)."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from semalign_ds import files, lock
from semalign_ds.run import ownership

pytestmark = pytest.mark.faults
REPO = Path(__file__).resolve().parent.parent

H = "0123456789abcdef"


def tree(root: Path) -> dict[str, bytes]:
    """Every file under root with its bytes (hidden ones included): 'nothing was written' means this is equal."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_absent_and_empty_directories_are_free_and_claim_marks_them(tmp_path):
    out = tmp_path / "a" / "b"
    assert ownership.check(out, "run", H) is None
    marker = ownership.claim(out, "run", H)
    assert marker["status"] == "running" and marker["mlflow_run_id"] is None
    assert json.loads((out / ownership.MARKER).read_text()) == marker and os.listdir(out) == [ownership.MARKER]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert ownership.check(empty, "spool", H) is None


def test_a_rerun_of_the_same_config_keeps_the_mlflow_run_and_creation_time(tmp_path):
    first = ownership.claim(tmp_path / "r", "run", H)
    ownership.note_mlflow_run(tmp_path / "r", "abc123")
    ownership.update(tmp_path / "r", status="killed")
    again = ownership.claim(tmp_path / "r", "run", H)
    assert again["mlflow_run_id"] == "abc123" and again["created"] == first["created"]
    assert again["status"] == "running" and ownership.mlflow_run_id(tmp_path / "r") == "abc123"


@pytest.mark.parametrize("entry", ["config.yaml", ".hidden", ".nfs000123", "lost+found"])
def test_a_directory_with_anything_in_it_and_no_marker_is_refused(tmp_path, entry):
    out = tmp_path / "out"
    out.mkdir()
    (out / entry).mkdir() if entry == "lost+found" else (out / entry).write_text("mine")
    before = tree(out)
    with pytest.raises(ValueError, match=rf"output_dir='{out}' is not empty \({re.escape(entry)}\) and was not "
                                         r"written by semalign \(it has no semalign.json\).*choose another output_dir"):
        ownership.claim(out, "run", H)
    assert tree(out) == before


def test_a_marker_temporary_left_by_a_kill_does_not_make_a_directory_foreign(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / ".semalign.json.4242.tmp").write_text("{")  # killed between writing the temporary and renaming it
    assert ownership.check(out, "run", H) is None


def test_a_file_another_kind_and_another_config_are_refused(tmp_path):
    file = tmp_path / "f"
    file.write_text("x")
    with pytest.raises(ValueError, match=r"--out \(transport.spool_dir\)='.*/f' is a file, not a directory"):
        ownership.check(file, "spool", H)
    with pytest.raises(ValueError, match=r"is a file, so the directory cannot be created there"):
        ownership.check(file / "sub", "run", H)
    ownership.claim(tmp_path / "run", "run", H)
    with pytest.raises(ValueError, match=r"holds a semalign run \(written by `semalign run` or `semalign train`\), "
                                         r"not a spool"):
        ownership.check(tmp_path / "run", "spool", H)
    with pytest.raises(ValueError, match=r"holds a run of a different configuration \(config hash 0123456789abcdef "
                                         r"!= ffff.*choose another output_dir, or delete that directory"):
        ownership.check(tmp_path / "run", "run", "ffff")
    assert file.read_text() == "x"


@pytest.mark.parametrize("text", ["{", "[]", '{"kind": "bogus", "config_hash": "x"}'])
def test_a_marker_semalign_did_not_write_is_refused(tmp_path, text):
    (tmp_path / ownership.MARKER).write_text(text)
    with pytest.raises(ValueError, match="semalign marker"):
        ownership.check(tmp_path, "run", H)


def test_update_checks_its_fields(tmp_path):
    with pytest.raises(ValueError, match="no semalign.json to update"):
        ownership.update(tmp_path, status="finished")
    ownership.claim(tmp_path / "r", "run", H)
    with pytest.raises(AssertionError):
        ownership.update(tmp_path / "r", status="done")
    assert ownership.update(tmp_path / "r", status="finished")["status"] == "finished"
    ownership.note_mlflow_run(tmp_path / "unmarked", "x")  # a directory nobody claimed: nothing to record
    assert not (tmp_path / "unmarked").exists()


def test_read_only_filesystem_is_refused_before_anything_is_written(tmpfs):
    ro = tmpfs(64, read_only=True)
    with pytest.raises(ValueError, match=rf"output_dir='{ro}/run': {ro} is on a read-only filesystem"):
        ownership.check(ro / "run", "run", H)
    with pytest.raises(ValueError, match="read-only filesystem"):
        ownership.check(ro, "run", H)


def test_write_json_on_a_full_disk_names_the_path_and_bytes_and_leaves_no_temporary(tmpfs):
    full = tmpfs(16)
    big = {"x": "y" * 40_000}
    with pytest.raises(ValueError, match=rf"the disk is full writing 39.1 KiB \(40009 bytes\) to {full}/big.json; "
                                         r".* free there: free space"):
        files.write_json(full / "big.json", big, indent=None)
    assert os.listdir(full) == []
    files.write_json(full / "small.json", {"a": 1})
    assert json.loads((full / "small.json").read_text()) == {"a": 1} and os.listdir(full) == ["small.json"]


def test_check_free_space(tmpfs):
    small = tmpfs(64)
    files.check_free_space(small, 1024, "the spool")
    with pytest.raises(ValueError, match=rf"the spool needs 1.0 MiB \(1048576 bytes\) in {small}/spool but its "
                                         r"filesystem has 64.0 KiB free"):
        files.check_free_space(small / "spool", 1 << 20, "the spool")


def test_user_error_covers_only_what_a_user_fixes():
    import errno

    assert "read-only" in str(files.user_error(OSError(errno.EROFS, "ro", "/x")))
    assert "permission denied" in str(files.user_error(PermissionError(errno.EACCES, "no", "/x")))
    assert files.user_error(OSError(errno.EIO, "io error", "/x")) is None  # hardware: not the user's to fix
    assert files.user_error(RuntimeError("bug")) is None


# ---------------------------------------------------------------- one job per directory (lock.py)


def holder_process(directory: Path) -> subprocess.Popen:
    """Another process that takes the directory's lock and keeps it (until killed)."""
    code = (f"from semalign_ds import lock; import time; lock.acquire({str(directory)!r}, 'the run directory', "
            f"'output_dir'); print('held', flush=True); time.sleep(120)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_the_lock_names_its_holder_and_goes_with_it(tmp_path):
    path = lock.acquire(tmp_path / "out", "the run directory", "output_dir")
    record = json.loads(path.read_text())
    assert record["pid"] == os.getpid() and record["host"] and record["since"] and record["command"]
    assert record["start_ticks"] is not None and record["boot_id"]  # Linux: a recycled pid is told apart
    assert ownership.check(tmp_path / "out", "run", H) is None  # the lock alone does not make it foreign
    lock.release(path)
    assert os.listdir(tmp_path / "out") == []


def test_a_live_holder_refuses_a_second_job_at_once_by_name(tmp_path):
    proc = holder_process(tmp_path / "out")
    try:
        with pytest.raises(lock.LockHeld) as err:
            lock.acquire(tmp_path / "out", "the run directory", "output_dir")
        text = str(err.value)
        assert f"output_dir='{tmp_path}/out' (the run directory) is in use by another semalign job: pid {proc.pid} on " \
               f"host " in text and "which is running on this host" in text and f"kill {proc.pid}" in text
        assert lock.holder(tmp_path / "out")["pid"] == proc.pid
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("reaped", [True, False])  # a dead holder, and a zombie its parent has not waited for
def test_a_dead_holder_on_this_host_is_taken_over(tmp_path, reaped, caplog):
    proc = holder_process(tmp_path / "out")
    proc.send_signal(signal.SIGKILL)
    if reaped:
        proc.wait()
    else:
        import time

        while lock._proc_stat(proc.pid) and lock._proc_stat(proc.pid)[0] != "Z":
            time.sleep(0.01)
    path = lock.acquire(tmp_path / "out", "the run directory", "output_dir")
    assert json.loads(path.read_text())["pid"] == os.getpid()
    assert f"took over the lock {path} of pid {proc.pid}" in caplog.text
    lock.release(path)
    proc.wait()


def test_a_recycled_pid_is_not_the_holder(tmp_path):
    """A record naming a live process that started at another time (the pid was reused) is stale."""
    proc = holder_process(tmp_path / "other")
    record = json.loads(lock.lock_path(tmp_path / "other").read_text())
    proc.kill()
    proc.wait()
    record["start_ticks"] -= 1  # same pid number, another start: what a reused pid looks like
    (tmp_path / "out").mkdir()
    lock.lock_path(tmp_path / "out").write_text(json.dumps({**record, "pid": os.getpid()}))
    lock.release(lock.acquire(tmp_path / "out", "the run directory", "output_dir"))


def test_a_holder_on_another_host_names_how_to_take_over(tmp_path):
    (tmp_path / "out").mkdir()
    path = lock.lock_path(tmp_path / "out")
    path.write_text(json.dumps({"pid": 4242, "host": "node17", "pid_ns": "pid:[1]", "boot_id": "x",
                                "start_ticks": 5, "since": "2026-11-30T10:00:00+00:00", "command": "semalign run",
                                "slurm_job": "9876"}))
    with pytest.raises(lock.LockHeld) as err:
        lock.acquire(tmp_path / "out", "the run directory", "output_dir")
    text = str(err.value)
    assert "pid 4242 on host node17 (Slurm job 9876, since 2026-11-30T10:00:00+00:00, `semalign run`)" in text
    assert "on another host, which cannot be checked from here" in text and "`squeue -j 9876` shows nothing" in text
    assert f"take over by deleting {path} and rerun" in text
    path.unlink()  # what the message says to do, once that job is gone
    lock.release(lock.acquire(tmp_path / "out", "the run directory", "output_dir"))


def test_an_unreadable_lock_is_refused_with_its_path(tmp_path):
    (tmp_path / "out").mkdir()
    path = lock.lock_path(tmp_path / "out")
    path.write_text("not a record")
    os.utime(path, (0, 0))  # long past the grace period of a lock being written
    with pytest.raises(lock.LockHeld, match=f"an unknown process holds {path} .* delete {path} and rerun"):
        lock.acquire(tmp_path / "out", "the run directory", "output_dir")


def test_many_takers_of_a_stale_lock_one_wins(tmp_path):
    """Processes racing to take over one dead holder's lock: exactly one gets it, the others are refused by name."""
    dead = holder_process(tmp_path / "out")
    dead.kill()
    dead.wait()
    code = ("import sys, time; from semalign_ds import lock\n"
            "try:\n    lock.acquire(sys.argv[1], 'the run directory', 'output_dir'); print('won', flush=True)\n"
            "    time.sleep(3)\nexcept lock.LockHeld as err:\n    print('refused', err, flush=True)\n")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "out")], stdout=subprocess.PIPE,
                              text=True, env=dict(os.environ, PYTHONPATH=str(REPO))) for _ in range(4)]
    outs = [p.communicate(timeout=60)[0] for p in procs]
    assert sum(o.startswith("won") for o in outs) == 1, outs
    assert all(o.startswith("won") or "is in use by another semalign job" in o for o in outs), outs


def test_release_new_hands_back_only_an_untouched_directory(tmp_path):
    out = tmp_path / "out"
    ownership.claim(out, "run", H)
    (out / "config.yaml").write_text("a: 1\n")
    assert ownership.release_new(out) and os.listdir(out) == []
    ownership.claim(out, "run", H)
    ownership.update(out, mlflow_run_id="abc")  # an MLflow run exists: the directory holds a result now
    assert not ownership.release_new(out) and ownership.read(out)["mlflow_run_id"] == "abc"


# ---------------------------------------------------------------- a full disk at each writer (tmpfs)


def small_student():
    import transformers as tr

    config = tr.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, vocab_size=512, max_position_embeddings=64)
    return tr.AutoModelForCausalLM.from_config(config)  # ~0.6 MiB of float32 weights


def fake_ctx(out: Path, student=None, tokenizer=None):
    """The parts of a RunContext the writers read (one rank, no process group)."""
    from types import SimpleNamespace

    from semalign_ds.tracking import NullTracker

    info = SimpleNamespace(is_main=True, world_size=1, rank=0)
    return SimpleNamespace(out=out, info=info, group=None, student=student, tok_S=tokenizer, writes=True,
                           tracker=NullTracker(), cfg=SimpleNamespace(tracking=SimpleNamespace(log_model="never",
                                                                                               log_model_copy_max_mb=1)))


def full_error(err: str, what: str) -> None:
    assert re.search(rf"^the disk is full: {what} needs [\d.]+ [KMG]?i?B \(\d+ bytes\) at .*, but its filesystem has "
                     rf"[\d.]+ [KMG]?i?B \(\d+ bytes\) free; free space", err), err


def test_a_full_disk_while_writing_a_checkpoint_keeps_the_last_one_and_no_temporary(tmpfs):
    from semalign_ds.run import resume

    out = tmpfs(900)  # room for one checkpoint of the small student, not for a second beside it
    ctx = fake_ctx(out, small_student())
    progress = resume.Progress(config_hash=H)
    resume.save_boundary(ctx, progress)
    before = tree(out / "checkpoint")
    with torch_no_grad():
        for p in ctx.student.parameters():
            p.add_(1.0)
    with pytest.raises(ValueError) as err:
        resume.save_boundary(ctx, progress)  # safetensors reports the full disk in its own words
    full_error(str(err.value), "the checkpoint")
    assert sorted(os.listdir(out)) == ["checkpoint"] and tree(out / "checkpoint") == before


def torch_no_grad():
    import torch

    return torch.no_grad()


def test_a_full_disk_while_exporting_the_student_leaves_no_half_export(tmpfs, tiny_pair):
    from semalign_ds.models.loading import load_tokenizer
    from semalign_ds.run import pipeline

    out = tmpfs(200)
    ctx = fake_ctx(out, small_student(), load_tokenizer(tiny_pair["student"]))
    with pytest.raises(ValueError) as err:
        pipeline.export_student(ctx)
    full_error(str(err.value), "the student export")
    assert os.listdir(out) == []


def test_a_full_disk_while_saving_a_plot_or_a_shard_leaves_nothing(tmpfs):
    import torch

    from semalign_ds.evaluation import report
    from semalign_ds.transport import spool

    out = tmpfs(16)
    with pytest.raises(ValueError) as err:
        report.loss_curves([{"step": i, "stage": 1, "loss": 1.0 / i} for i in range(1, 50)], out / "loss.png")
    full_error(str(err.value), "the plot loss.png")
    layout = [["ids", "int64", [64, 128]]]
    shard = spool.ShardFile(out, 0, layout, {"binding": "b"})  # sparse: room is taken as rows arrive
    with pytest.raises(ValueError, match=rf"the disk is full writing 64.\d KiB \(\d+ bytes\) to {out}/shard-"):
        shard.write(0, {"ids": torch.ones(64, 128, dtype=torch.int64), "mask": torch.ones(64, 128)})
    assert os.listdir(out) == []


def test_the_mlflow_store_is_not_begun_without_room(tmpfs, monkeypatch):
    from semalign_ds import tracking

    out = tmpfs(512)
    (out / "semalign.json").write_text("{}")
    with pytest.raises(ValueError, match=rf"creating the MLflow store needs 2.0 MiB \(2097152 bytes\) in {out} "
                                         rf"but its filesystem has [\d.]+ KiB free"):
        tracking.ensure_local_store(out, None)
    assert os.listdir(out) == ["semalign.json"]


def test_a_full_disk_under_mlflows_artifacts_names_where_and_how_much(tmp_path, tmpfs, store):
    from semalign_ds import tracking

    run_dir = store(tmp_path / "run")  # the store on a roomy disk, its artifacts on a full one
    artifacts = tmpfs(16)
    tracker = tracking.MlflowTracker(tracking.local_store_uri(run_dir), "semalign", "x", artifact_dir=artifacts)
    big = tmp_path / "big.json"
    big.write_text("x" * 60_000)
    with pytest.raises(ValueError) as err:
        tracker.log_artifact(big)
    full_error(str(err.value), "copying big.json into MLflow's artifacts")
    assert f"at {artifacts}/" in str(err.value)
    tracker.finish("FAILED")
    tracking._forget_engine(tracking.local_store_uri(run_dir))
