"""Slurm: `semalign slurm render` (no cluster needed), then the real-Slurm tier: a throwaway cluster on this machine
(ci/start_local_slurm.sh: slurmctld + 2 virtual slurmd nodes) runs every template with a tiny CPU configuration.

The tier is skipped, with the reason, where the machine cannot host Slurm (not root, or no Slurm and no apt-get).
Jobs are polled with a hard deadline and cancelled when it passes, so a job that cannot be placed fails the test
instead of hanging it. Site options are overridden on the sbatch command line, as a user would.
"""
from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

from semalign_ds.cluster import slurm

REPO = Path(__file__).resolve().parent.parent
CLUSTER = REPO / "ci" / "start_local_slurm.sh"
SITE = ["--partition=debug", "--account=", "--gpus-per-node=0", "--cpus-per-task=1", "--time=15:00"]
JOB_DEADLINE_S = 300
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
         "PREEMPTED"}


def tiny_config(tmp: Path, pair: dict, **sections) -> Path:
    raw = {"name": "tiny", "output_dir": str(tmp / "run"),
           "teacher": {"path": str(pair["teacher"]), "dtype": "float32"},
           "student": {"path": str(pair["student"]), "dtype": "float32"},
           "data": {"path": str(pair["train"]), "seq_len": 64, "max_sequences": 16, "micro_batch_size": 4},
           "method": {"top_k": 8, "min_shared_tokens": 100, "target_dtype": "float32"},
           "pairing": {"attribution_batches": 1},
           "schedule": {"mode": "frontier", "epochs_per_stage": 0.5, "warmup_steps": 1, "lr": 3.0e-3},  # 2 of 4 of 16
           "runtime": {"device": "cpu", "checkpoint_every": 2, "progress": False},
           "eval": {"sets": {"heldout": str(pair["test"])}, "max_sequences": 4, "batch_size": 4}}
    for key, value in sections.items():
        raw.setdefault(key, {}).update(value)
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def render(tmp: Path, config: Path, template: str, *overrides: str, check: bool = False, **size) -> tuple[str, str]:
    """slurm.render; the check pass off by default: plain_config names paths that do not exist (the check pass
    of render has its own tests below, on the tiny pair)."""
    return slurm.render(str(config), template, list(overrides), cwd=tmp, check=check, **size)


# ---------------------------------------------------------------- render (no cluster)

@pytest.fixture
def plain_config(tmp_path) -> Path:
    """A config for render checks: render reads the config, not the models."""
    return tiny_config(tmp_path, {k: tmp_path / k for k in ("teacher", "student", "train", "test")})


@pytest.mark.parametrize("template", slurm.TEMPLATES)
def test_render_fills_placeholders_from_the_config(tmp_path, plain_config, template):
    script, summary = render(tmp_path, plain_config, template, "schedule.epochs_per_stage=7",
                             f"transport.spool_dir={tmp_path / 'spool'}")
    assert f"SEMALIGN_CONFIG={plain_config}   # filled by semalign slurm render" in script
    assert f"SEMALIGN_PYTHON={sys.executable}" in script and f"SEMALIGN_WORKDIR={tmp_path}" in script
    assert f"SEMALIGN_OVERRIDES='schedule.epochs_per_stage=7 transport.spool_dir={tmp_path / 'spool'}'" in script
    assert re.search(r"^#SBATCH --job-name=tiny(-teach|-train)?$", script, re.M)
    assert ":?set SEMALIGN" not in script  # every required variable was filled
    assert ("SEMALIGN_SPOOL_DIR=" in script) == template.startswith("spool")
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0
    assert "nothing was submitted" in summary and "each rank runs: srun" in summary
    assert "--partition=gpu, --account=my-account" in summary  # the SITE lines still to edit


def test_render_summary_of_a_hetjob(tmp_path, plain_config):
    _, summary = render(tmp_path, plain_config, "hetjob")
    assert "teacher: 12 nodes x 8 tasks, GPUs/node 8" in summary and "student: 4 nodes x 8 tasks" in summary
    assert "ranks: 128 (teacher 0-95, student 96-127)" in summary
    assert "runtime.topology=disaggregated" in summary


def test_render_an_edited_copy(tmp_path, plain_config):
    copy = tmp_path / "mine.sbatch"
    copy.write_text((slurm.SLURM_DIR / "colocated.sbatch").read_text().replace("--nodes=2 ", "--nodes=4 "))
    _, summary = render(tmp_path, plain_config, str(copy), "runtime.topology=disaggregated",
                        "transport.teacher_ranks=24")
    assert "all ranks: 4 nodes x 8 tasks" in summary and "ranks: 32 (teacher 0-23, student 24-31)" in summary


def test_render_cli_prints_and_submits_nothing(tmp_path, plain_config):
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    for tool in ("sbatch", "srun", "salloc"):
        (fake_bin / tool).write_text(f"#!/bin/sh\necho called >> {tmp_path}/submitted\n")
        (fake_bin / tool).chmod(0o755)
    env = dict(os.environ, PATH=f"{fake_bin}:{os.environ['PATH']}", PYTHONPATH=str(REPO))  # this checkout's code
    cmd = [sys.executable, "-m", "semalign_ds.cli", "slurm", "render", "--no-check", "--config", str(plain_config)]
    ok = subprocess.run([*cmd, "--template", "colocated"], env=env, cwd=tmp_path, capture_output=True, text=True,
                        timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("#!/bin/bash") and "nothing was submitted" in ok.stderr
    assert not (tmp_path / "submitted").exists()
    bad = subprocess.run([*cmd, "--template", "nonesuch"], env=env, cwd=tmp_path, capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 2 and "unknown template 'nonesuch'" in bad.stderr and not bad.stdout


@pytest.mark.parametrize("template, overrides, needle", [
    ("nonesuch", [], "unknown template 'nonesuch': use one of colocated, hetjob"),
    ("hetjob", ["transport.teacher_ranks=64"], "teacher_ranks=64 does not match the hetjob's teacher component: "
                                               "12 nodes x 8 tasks = 96"),
    ("colocated", ["runtime.topology=disaggregated", "transport.teacher_ranks=12"], "does not divide the job's 2 "
                                                                                    "nodes x 8 tasks"),
    ("colocated", ["runtime.topology=disaggregated", "transport.teacher_ranks=16"], "at least one rank"),
    ("colocated", ["runtime.topology=spool"], "render --template spool_teacher"),
    ("spool_student", [], "transport.spool_dir is empty"),
    ("colocated", ["schedule.stages=[1, 2]"], "contains whitespace"),
])
def test_render_refuses(tmp_path, plain_config, template, overrides, needle):
    with pytest.raises(ValueError, match=re.escape(needle)):
        render(tmp_path, plain_config, template, *overrides)


def test_render_refuses_a_config_that_does_not_exist(tmp_path):
    with pytest.raises(ValueError, match=f"config file '{tmp_path}/nowhere.yaml' does not exist"):
        render(tmp_path, Path("nowhere.yaml"), "colocated")


def test_render_refuses_a_spool_the_student_cannot_read(tmp_path, plain_config):
    spool = tmp_path / "spool"
    spool.mkdir()
    (spool / "manifest.json").write_text("{}")
    _, summary = render(tmp_path, plain_config, "spool_student", f"transport.spool_dir={spool}")
    assert "--dependency=afterok" in summary
    spool.chmod(0o000)  # checked by permission bits too: root passes os.access, a root-squashed job would not
    try:
        with pytest.raises(ValueError, match="not readable by this user.*the student job could not read"):
            render(tmp_path, plain_config, "spool_student", f"transport.spool_dir={spool}")
    finally:
        spool.chmod(0o755)
    not_dir = tmp_path / "file"
    not_dir.write_text("x")
    with pytest.raises(ValueError, match="is not a directory"):
        render(tmp_path, plain_config, "spool_student", f"transport.spool_dir={not_dir}")
    _, summary = render(tmp_path, plain_config, "spool_student", f"transport.spool_dir={tmp_path / 'later'}")
    assert "does not exist yet: the teacher job writes it" in summary


def test_render_refuses_a_spool_the_teacher_cannot_write(tmp_path, plain_config):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        with pytest.raises(ValueError, match="not writable by this user, so the teacher job could not write"):
            render(tmp_path, plain_config, "spool_teacher", f"transport.spool_dir={locked / 'spool'}")
    finally:
        locked.chmod(0o755)


def test_render_refuses_placeholder_paths_and_names_each(tmp_path, plain_config):
    with pytest.raises(ValueError) as err:
        render(tmp_path, plain_config, "colocated", check=True)
    text = str(err.value)
    assert text.startswith("the job would stop at its start: ") and "--no-check" in text
    for key in ("teacher.path", "student.path", "data.path", "eval.sets.heldout"):
        assert f"{key}='{tmp_path}" in text, key


def test_render_checks_a_real_config_and_takes_the_size_from_flags(tmp_path, tiny_pair):
    cfg = tiny_config(tmp_path, tiny_pair)
    script, summary = render(tmp_path, cfg, "colocated", check=True)
    assert "#SBATCH --nodes=2 " in script and "size: the template's #SBATCH lines (set it with --nodes N" in summary
    script, summary = render(tmp_path, cfg, "colocated", check=True, nodes=[1], gpus_per_node=4)
    assert re.search(r"^#SBATCH --nodes=1 +# SITE: nodes$", script, re.M)
    assert re.search(r"^#SBATCH --ntasks-per-node=4 ", script, re.M) and "--gpus-per-node=4 " in script
    assert "all ranks: 1 nodes x 4 tasks" in summary and "ranks: 4 " in summary and "size: from --nodes" in summary
    script, summary = render(tmp_path, cfg, "hetjob", check=True, nodes=[3, 1])
    assert "teacher: 3 nodes x 8 tasks" in summary and "student: 1 nodes x 8 tasks" in summary
    with pytest.raises(ValueError, match=r"has 2 component\(s\): use --nodes T,S"):
        render(tmp_path, cfg, "hetjob", nodes=[2])


def test_render_template_without_a_name_lists_them_with_exit_0(tmp_path):
    from semalign_ds import cli

    proc = subprocess.run([sys.executable, "-m", "semalign_ds.cli", "slurm", "render", "--template"], cwd=tmp_path,
                          env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and not proc.stderr.strip(), proc.stderr
    for name in slurm.TEMPLATES:
        assert f"\n  {name} " in proc.stdout
    assert cli.main(["slurm", "render", "--template", "colocated"]) == 2  # a name but no config: a clear error


# ---------------------------------------------------------------- the real-Slurm tier

def _cluster(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(CLUSTER), *args], capture_output=True, text=True, timeout=timeout)


USERS = Path(tempfile.gettempdir()) / "semalign-slurm-users"  # the test sessions using the local cluster now


@contextmanager
def _one_at_a_time():
    """Serialise the start/stop decisions of test sessions on this host (two clones' test runs at once)."""
    with open(Path(tempfile.gettempdir()) / "semalign-slurm-fixture.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _live_users() -> list[Path]:
    from semalign_ds import lock

    live = []
    for path in USERS.glob("*.json"):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if lock.alive(record) is not False:
            live.append(path)
    return live


@pytest.fixture(scope="session")
def slurm_cluster():
    """The local cluster, shared by the test sessions on this host: the first one starts it (unless it is already
    up), each registers while it uses it, and the last one out stops it if a test session started it. Skipped with
    the reason where this machine cannot host it."""
    from semalign_ds import lock

    check = _cluster("check")
    if check.returncode == 3:
        pytest.skip(f"real-Slurm tier skipped: this machine cannot host a local Slurm cluster: {check.stdout.strip()}")
    me = USERS / f"{os.getpid()}.json"
    with _one_at_a_time():
        if _cluster("status").returncode != 0:
            start = _cluster("start", timeout=300)
            if start.returncode == 4:
                pytest.skip(f"real-Slurm tier skipped: apt-get could not install Slurm: {start.stderr.strip()[-800:]}")
            assert start.returncode == 0, f"local Slurm did not start:\n{start.stdout}\n{start.stderr[-4000:]}"
            USERS.mkdir(exist_ok=True)
            (USERS / "started-by-tests").touch()
        USERS.mkdir(exist_ok=True)
        me.write_text(json.dumps(lock.identity()))
    try:
        yield
    finally:
        with _one_at_a_time():
            me.unlink(missing_ok=True)
            if not _live_users() and (USERS / "started-by-tests").exists():
                _cluster("stop", timeout=120)
                (USERS / "started-by-tests").unlink()


def job_env() -> dict:
    """The submitter's environment without launcher or Slurm variables (sbatch passes it on to the job)."""
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "MLFLOW_TRACKING_URI",
            "TORCHELASTIC_RUN_ID", "LOCAL_SIZE", "CROSS_RANK")
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
    env["PYTHONPATH"] = str(REPO)
    return env


def submit(script: Path, logs: Path, *options: str) -> str:
    proc = subprocess.run(["sbatch", "--parsable", *SITE, f"--output={logs}/%x-%j.out", *options, str(script)],
                          cwd=script.parent, env=job_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"sbatch refused {script.name}: {proc.stderr}"
    return proc.stdout.strip().split(";")[0]


def job_fields(jobid: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "-o", "show", "job", jobid], capture_output=True, text=True, timeout=30).stdout
    first = out.splitlines()[0] if out else ""  # a het job prints one line per component; the first is the job
    return dict(re.findall(r"(\w+)=(\S*)", first))


def wait_job(jobid: str, logs: Path, deadline_s: float = JOB_DEADLINE_S) -> dict[str, str]:
    """Poll until the job ends; past the deadline cancel it and fail with its log."""
    end = time.time() + deadline_s
    while time.time() < end:
        fields = job_fields(jobid)
        if fields.get("JobState") in FINAL:
            return fields
        time.sleep(0.5)
    subprocess.run(["scancel", jobid], timeout=30)
    pytest.fail(f"job {jobid} still {job_fields(jobid).get('JobState')} after {deadline_s}s; cancelled.\n"
                f"{job_log(logs, jobid)[-4000:]}")


def job_log(logs: Path, jobid: str) -> str:
    return "".join(p.read_text(errors="replace") for p in sorted(logs.glob(f"*-{jobid}.out")))


def assert_succeeded(fields: dict, logs: Path, jobid: str) -> None:
    assert fields.get("JobState") == "COMPLETED" and fields.get("ExitCode") == "0:0", \
        f"job {jobid}: {fields.get('JobState')} {fields.get('ExitCode')}\n{job_log(logs, jobid)[-6000:]}"


def assert_student_and_mlflow(run: Path) -> object:
    """The run's products: the exported student, the last checkpoint, and one FINISHED MLflow run."""
    assert (run / "student" / "model.safetensors").is_file() and (run / "checkpoint" / "run.json").is_file()
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{run / 'mlflow.db'}")
    (mlrun,) = client.search_runs([client.get_experiment_by_name("semalign").experiment_id])
    assert mlrun.info.status == "FINISHED"
    return client, mlrun


@pytest.fixture
def rendered(tmp_path, tiny_pair):
    """render(template, *overrides, **config sections) -> job script path in tmp_path, as a user would write it."""
    def make(template: str, *overrides: str, **sections) -> Path:
        cfg = tiny_config(tmp_path, tiny_pair, **sections)
        script, _ = render(tmp_path, cfg, template, *overrides, check=True)
        path = tmp_path / f"{template}.sbatch"
        path.write_text(script)
        return path
    return make


def test_unset_template_variable_stops_the_job(slurm_cluster, tmp_path):
    script = tmp_path / "colocated.sbatch"
    shutil.copy(slurm.SLURM_DIR / "colocated.sbatch", script)  # not rendered, SEMALIGN_CONFIG not exported
    jobid = submit(script, tmp_path, "--nodes=1", "--ntasks-per-node=1")
    fields = wait_job(jobid, tmp_path)
    assert fields["JobState"] == "FAILED"
    assert "SEMALIGN_CONFIG: set SEMALIGN_CONFIG to the run config YAML" in job_log(tmp_path, jobid)


def test_config_missing_on_the_node_is_a_clear_job_error(slurm_cluster, rendered, tmp_path):
    script = rendered("colocated")
    (tmp_path / "config.yaml").unlink()
    jobid = submit(script, tmp_path, "--nodes=1", "--ntasks-per-node=1")
    fields = wait_job(jobid, tmp_path)
    assert fields["JobState"] == "FAILED" and fields["ExitCode"] == "2:0"
    assert f"config file '{tmp_path}/config.yaml' does not exist" in job_log(tmp_path, jobid)


@pytest.mark.slow  # ~1 min: two preemptions of a two-node job; in the fault tier
@pytest.mark.faults
def test_colocated_two_nodes_stopped_twice_by_signals_resumes_each_time(slurm_cluster, rendered, tmp_path):
    steps, run = 30, tmp_path / "run"
    script = rendered("colocated", schedule={"epochs_per_stage": 15})  # 2 ranks x 4 of 16 sequences: 30 steps
    jobid = submit(script, tmp_path, "--nodes=2", "--ntasks-per-node=1")
    wait_for_checkpoint(run, jobid, tmp_path, stage=1)
    # 1. what --signal=B:USR1@120 does before the time limit: USR1 to the batch shell, which forwards it to the
    # ranks; they agree on a step, checkpoint, exit 75, and the script requeues the job
    assert subprocess.run(["scancel", "--batch", "--signal=USR1", jobid], timeout=30).returncode == 0
    release_requeued(jobid, tmp_path)  # a requeued job waits ~2 min (BeginTime) before it may start again
    # 2. scancel (SIGTERM to every rank): checkpoint, exit 75, the job CANCELLED and not requeued by the script
    wait_for_checkpoint(run, jobid, tmp_path, stage=2)
    assert subprocess.run(["scancel", jobid], timeout=30).returncode == 0
    fields = wait_job(jobid, tmp_path)
    assert fields["JobState"] == "CANCELLED", fields
    end = time.time() + 60  # the ranks finish their exit path within Slurm's KillWait
    while json.loads((run / "semalign.json").read_text())["status"] != "killed" and time.time() < end:
        time.sleep(0.2)
    assert json.loads((run / "semalign.json").read_text())["status"] == "killed"
    assert subprocess.run(["scontrol", "requeue", jobid], timeout=30).returncode == 0  # the user resumes it
    release_requeued(jobid, tmp_path)
    fields = wait_job(jobid, tmp_path)
    assert_succeeded(fields, tmp_path, jobid)
    log = job_log(tmp_path, jobid)
    assert fields["Restarts"] == "2" and all(f"restart {n}) on n[1-2]" in log for n in range(3))
    assert f"semalign: job {jobid} wrote a checkpoint after USR1; requeueing it" in log
    assert "stopped by SIGUSR1 after step" in log and "stopped by SIGTERM after step" in log
    assert "Traceback" not in log and "Exited with exit code 75" in log
    client, mlrun = assert_student_and_mlflow(run)
    assert mlrun.data.tags["world_size"] == "2"
    logged = [m.step for m in client.get_metric_history(mlrun.info.run_id, "layer_loss")]
    # resumed at the step it stopped after: every step of both stages trained and logged exactly once
    assert sorted(logged) == list(range(1, 2 * steps + 1)), logged


def wait_for_checkpoint(run: Path, jobid: str, logs: Path, deadline_s: float = 240, stage: int = 1) -> dict:
    """The first mid-stage checkpoint of `stage` (run.json with a step), while the job is running."""
    progress, end = run / "checkpoint" / "run.json", time.time() + deadline_s
    while time.time() < end:
        try:
            state = json.loads(progress.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            state = {}
        if state.get("stage") == stage and state.get("step") and job_fields(jobid).get("JobState") == "RUNNING":
            return state
        if job_fields(jobid).get("JobState") in FINAL:
            break
        time.sleep(0.05)
    subprocess.run(["scancel", jobid], timeout=30)
    pytest.fail(f"job {jobid} wrote no mid-stage checkpoint to requeue after:\n{job_log(logs, jobid)[-4000:]}")


def release_requeued(jobid: str, logs: Path) -> None:
    """Let a requeued job start again now instead of after its BeginTime delay, once its first run is gone from
    the nodes (slurmd refuses a job credential issued in the same second as the revoked one)."""
    end = time.time() + 60
    while time.time() < end:
        pending = job_fields(jobid).get("JobState") == "PENDING"
        states = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], capture_output=True, text=True, timeout=30).stdout
        if pending and "completing" not in states:
            time.sleep(2)
            subprocess.run(["scontrol", "update", f"jobid={jobid}", "starttime=now"], timeout=30, check=True)
            return
        time.sleep(0.2)
    fields = job_fields(jobid)
    pytest.fail(f"job {jobid} did not go back to PENDING after a requeue: {fields.get('JobState')} "
                f"{fields.get('ExitCode')}\n{job_log(logs, jobid)[-6000:]}")


def test_hetjob_teacher_component_streams_to_student_component(slurm_cluster, rendered, tmp_path):
    script = rendered("hetjob")
    jobid = submit(script, tmp_path, "--nodes=1", "--ntasks-per-node=1")  # both components: n1 teacher, n2 student
    fields = wait_job(jobid, tmp_path)
    assert_succeeded(fields, tmp_path, jobid)
    assert "teacher 1 ranks on n1, student 1 ranks on n2" in job_log(tmp_path, jobid)
    _, mlrun = assert_student_and_mlflow(tmp_path / "run")
    assert mlrun.data.tags["topology"] == "disaggregated" and mlrun.data.params["transport.teacher_ranks"] == "1"
    assert mlrun.data.metrics["transport/wire_bytes"] > 0  # the packets crossed from n1's rank to n2's


def test_spool_student_job_trains_after_the_teacher_job(slurm_cluster, rendered, tmp_path):
    spool = tmp_path / "spool"
    teacher = rendered("spool_teacher", f"transport.spool_dir={spool}")
    student = rendered("spool_student", f"transport.spool_dir={spool}")
    teacher_id = submit(teacher, tmp_path, "--nodes=1", "--ntasks-per-node=1")
    student_id = submit(student, tmp_path, "--nodes=1", "--ntasks-per-node=1", f"--dependency=afterok:{teacher_id}")
    assert_succeeded(wait_job(teacher_id, tmp_path), tmp_path, teacher_id)
    assert (spool / "manifest.json").is_file()
    fields = wait_job(student_id, tmp_path)
    assert_succeeded(fields, tmp_path, student_id)
    assert fields["Dependency"] in ("(null)", f"afterok:{teacher_id}(ok)")
    assert fields["StartTime"] >= job_fields(teacher_id)["EndTime"]  # ISO timestamps: it waited for the teacher
    _, mlrun = assert_student_and_mlflow(tmp_path / "run")
    assert mlrun.data.tags["topology"] == "spool"
