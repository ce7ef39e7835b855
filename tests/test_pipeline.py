"""The colocated pipeline end to end, as users run it (`semalign run` in a subprocess): outputs, MLflow, resume."""
from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parent.parent
SEMALIGN = [sys.executable, "-m", "semalign_ds.cli"]


def write_config(tmp: Path, pair: dict, **sections) -> Path:
    raw = {
        "name": "tiny", "output_dir": str(tmp / "run"),
        "teacher": {"path": str(pair["teacher"]), "dtype": "float32"},
        "student": {"path": str(pair["student"]), "dtype": "float32"},
        "data": {"path": str(pair["train"]), "seq_len": 64, "max_sequences": 48, "micro_batch_size": 4},
        "method": {"top_k": 8, "min_shared_tokens": 100, "target_dtype": "float32"},
        # the frontier schedule (several stages: boundaries, per-stage checkpoints and resume); the default `best`
        # preset's full schedule runs in test_demo and test_quality_dry
        "schedule": {"mode": "frontier", "epochs_per_stage": 0.5, "warmup_steps": 1, "lr": 3.0e-3},  # 6 of 4 of 48
        "runtime": {"device": "cpu", "checkpoint_every": 3, "progress": False},
        "eval": {"sets": {"heldout": str(pair["test"])}, "max_sequences": 8, "batch_size": 4},
    }
    for key, value in sections.items():
        raw.setdefault(key, {}).update(value)
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def env() -> dict:
    e = dict(os.environ)
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "MLFLOW_TRACKING_URI"):
        e.pop(var, None)
    e["PYTHONPATH"] = str(REPO)
    return e


def semalign(*args, timeout=240, check=True):
    proc = subprocess.run([*SEMALIGN, *map(str, args)], env=env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"semalign {args} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def student_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "student" / "model.safetensors")


def test_run_produces_checkpoint_mlflow_and_eval(tmp_path, tiny_pair):
    cfg = write_config(tmp_path, tiny_pair)
    proc = semalign("run", "--config", cfg, "schedule.epochs_per_stage=0.3")  # ceil(0.3 * 12) = 4 steps
    run = tmp_path / "run"
    assert "student after" in proc.stdout
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(run / "student")
    AutoTokenizer.from_pretrained(run / "student")
    before = AutoModelForCausalLM.from_pretrained(tiny_pair["student"])
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, dict(before.named_parameters())[n])}
    assert changed and all(n.startswith(("model.layers.0.", "model.layers.1.")) for n in changed)
    pairing = json.loads((run / "pairing.json").read_text())
    assert [row["student_layer"] for row in pairing["rows"]] == [1, 2] and len(pairing["scores_abs"]) == 4
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["schedule"]["epochs_per_stage"] == 0.3
    summary = json.loads((run / "eval.json").read_text())
    assert set(summary["perplexity"]["heldout"]) == {"student_before", "student_after", "teacher"}
    # one tokenizer: every model predicts the same tokens over the same bytes, so bits per byte ~ log perplexity
    ppl, bpb = summary["perplexity"]["heldout"], summary["bits_per_byte"]["heldout"]
    for name in ("student_after", "teacher"):
        assert bpb[name] / bpb["student_before"] == pytest.approx(math.log(ppl[name]) / math.log(ppl["student_before"]))
    assert "heldout bits/byte" in proc.stdout

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{run / 'mlflow.db'}")
    (mlrun,) = client.search_runs([client.get_experiment_by_name("semalign").experiment_id])
    params = mlrun.data.params
    assert params["schedule.epochs_per_stage"] == "0.3" and params["plan.steps_per_stage"] == "4"
    assert params["plan.tokens_per_stage"] == str(4 * 4 * 64) and params["plan.store"] == "memory"
    assert "plan: 2 stage(s) [1, 2]; each: 4 optimizer steps" in proc.stdout
    assert mlrun.info.status == "FINISHED"
    history = client.get_metric_history(mlrun.info.run_id, "layer_loss")
    assert [h.step for h in history] == list(range(1, 9))  # one global step axis over both stages
    stages = client.get_metric_history(mlrun.info.run_id, "stage")
    assert [h.value for h in stages] == [1] * 4 + [2] * 4
    assert mlrun.data.metrics["teacher_passes_per_sample"] == 1.0  # one teacher forward per sample, not per step
    for metric in ("out_loss", "lr", "tokens_per_s", "eval/heldout/student_after_ppl", "eval/heldout/teacher_bpb",
                   "teacher_tokens_per_s",
                   "teacher_attribution_passes_per_sample"):
        assert metric in mlrun.data.metrics
    artifacts = {a.path for a in client.list_artifacts(mlrun.info.run_id)}
    assert {"config.yaml", "pairing.json", "attribution.png", "loss_curves.png", "eval.md"} <= artifacts
    assert mlrun.info.run_name == "tiny | relation_geometry+kl+ce [best + 2 overrides] | frontier | colocated x1"
    (model_output,) = mlrun.outputs.model_outputs  # the exported student as a LoggedModel, linked both ways
    assert client.get_logged_model(model_output.model_id).source_run_id == mlrun.info.run_id


@pytest.fixture(scope="module")
def straight(tmp_path_factory, tiny_pair) -> Path:
    """An uninterrupted run of 12 steps per stage: the weights every interrupted run must end with."""
    tmp = tmp_path_factory.mktemp("straight")
    semalign("run", "--config", write_config(tmp, tiny_pair, schedule={"epochs_per_stage": 1.0}))
    return tmp


@pytest.mark.faults
def test_killed_run_resumes_to_the_same_weights(tmp_path, tiny_pair, straight):
    killed = tmp_path / "killed"
    killed.mkdir()
    cfg = write_config(killed, tiny_pair, schedule={"epochs_per_stage": 1.0})
    proc = subprocess.Popen([*SEMALIGN, "run", "--config", str(cfg)], env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    progress = killed / "run" / "checkpoint" / "run.json"
    deadline = time.time() + 180
    state = {}
    while time.time() < deadline and proc.poll() is None:
        if progress.is_file():
            try:
                state = json.loads(progress.read_text())
            except json.JSONDecodeError:
                state = {}
            if state.get("stage") == 2 and state.get("step"):
                proc.send_signal(signal.SIGKILL)
                break
        time.sleep(0.01)
    proc.wait(timeout=30)
    assert state.get("stage") == 2 and state.get("step") in (3, 6, 9), f"never killed mid-stage 2: {state}"
    assert not (killed / "run" / "student").exists()
    left = json.loads((killed / "run" / ".semalign.lock").read_text())  # the killed job's lock stays behind...
    assert left["pid"] == proc.pid
    semalign("run", "--config", cfg)  # ...and the rerun takes it over: its holder is dead
    assert not (killed / "run" / ".semalign.lock").exists()
    assert_same_weights(straight / "run", killed / "run")
    client, (mlrun,) = mlflow_runs(killed / "run")  # the steps replayed after the kill are not logged twice
    logged = [m.step for m in client.get_metric_history(mlrun.info.run_id, "layer_loss")]
    assert sorted(logged) == list(range(1, 25)) and mlrun.info.status == "FINISHED"  # 2 stages x 12, global
    assert_no_row_twice(client, mlrun)


def assert_no_row_twice(client, mlrun) -> None:
    """A resumed run logs each metric row once: a step-axis row once per step, a run-level (step 0) figure only
    again when its value changed (e.g. the time of a teach phase the restart redid)."""
    from collections import Counter

    for key in mlrun.data.metrics:
        rows = client.get_metric_history(mlrun.info.run_id, key)
        twice = [s for s, n in Counter(m.step for m in rows if m.step).items() if n > 1]
        same = [v for v, n in Counter(m.value for m in rows if not m.step).items() if n > 1]
        assert not twice and not same, (key, twice, same)


def assert_same_weights(a_dir: Path, b_dir: Path) -> None:
    a, b = student_weights(a_dir), student_weights(b_dir)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def mlflow_runs(run_dir: Path, uri: str | None = None) -> tuple:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri or f"sqlite:///{run_dir / 'mlflow.db'}")
    return client, client.search_runs([client.get_experiment_by_name("semalign").experiment_id])


def wait_for(proc, ready, what: str, limit: float = 180.0) -> None:
    deadline = time.time() + limit
    while time.time() < deadline and proc.poll() is None:
        if ready():
            return
        time.sleep(0.01)
    proc.kill()
    raise AssertionError(f"never saw {what} (exit {proc.poll()})")


def checkpoint_state(run: Path) -> dict:
    try:
        return json.loads((run / "checkpoint" / "run.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}


@pytest.mark.faults
def test_sigterm_checkpoints_marks_killed_exits_75_and_resumes_to_the_same_weights(tmp_path, tiny_pair, straight):
    cfg = write_config(tmp_path, tiny_pair, schedule={"epochs_per_stage": 1.0})
    run = tmp_path / "run"
    proc = subprocess.Popen([*SEMALIGN, "run", "--config", str(cfg)], env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    wait_for(proc, lambda: checkpoint_state(run).get("stage") == 2, "a checkpoint inside stage 2")
    proc.send_signal(signal.SIGTERM)  # what Slurm sends on scancel / preemption
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-3000:]
    assert "Traceback" not in err and "semalign: stopped by SIGTERM after step" in err
    state = checkpoint_state(run)  # at the step the signal interrupted (no step is trained twice: see below)
    assert state["stage"] == 2 and 3 <= state["step"] <= 12 and not (run / "student").exists()
    assert json.loads((run / "semalign.json").read_text())["status"] == "killed"
    client, (mlrun,) = mlflow_runs(run)
    assert mlrun.info.status == "KILLED" and "SIGTERM" in mlrun.data.tags["stopped_by"]

    first = semalign("run", "--config", cfg)  # the rerun resumes: same weights, same MLflow run, no step twice
    assert_same_weights(straight / "run", run)
    client, (again,) = mlflow_runs(run)
    assert again.info.run_id == mlrun.info.run_id and again.info.status == "FINISHED"
    assert "stopped_by" not in again.data.tags
    steps = [m.step for m in client.get_metric_history(again.info.run_id, "layer_loss")]
    assert sorted(steps) == list(range(1, 25)), steps  # both stages' steps, each once, on the global axis
    assert json.loads((run / "semalign.json").read_text())["status"] == "finished"

    before = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
    done = semalign("run", "--config", cfg)  # a finished directory: its result, nothing run, nothing written
    table = lambda text: [l for l in text.splitlines() if l.startswith("|")]  # noqa: E731
    assert table(done.stdout) == table(first.stdout) and "student after" in done.stdout
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()} == before
    assert len(mlflow_runs(run)[1]) == 1


@pytest.mark.faults
def test_ctrl_c_exits_130_with_one_line(tmp_path, tiny_pair):
    cfg = write_config(tmp_path, tiny_pair)
    run = tmp_path / "run"
    proc = subprocess.Popen([*SEMALIGN, "run", "--config", str(cfg)], env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    wait_for(proc, lambda: (run / "semalign.json").is_file(), "the output directory claimed")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err, err[-3000:]
    assert "semalign: interrupted (Ctrl-C); rerun the same command to resume" in err
    assert json.loads((run / "semalign.json").read_text())["status"] == "killed"
    if (run / "mlflow.db").exists():  # interrupted before or after the MLflow run began: never left RUNNING
        assert all(r.info.status == "KILLED" for r in mlflow_runs(run)[1])


@pytest.mark.faults
def test_teach_onto_a_full_disk_is_a_clear_error(tmp_path, tiny_pair, tmpfs):
    out = tmpfs(400)  # the tiny lossless spool needs about 1 MiB
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = write_config(tmp_path, tiny_pair, tracking={"uri": uri}, transport={"codec": "lossless"})
    proc = semalign("teach", "--config", cfg, "--out", out, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert re.search(rf"semalign: error: the spool \(\d+ sequences x 64 tokens\) needs [\d.]+ [KM]iB \(\d+ bytes\) in "
                     rf"{out} but its filesystem has [\d.]+ KiB free", proc.stderr), proc.stderr[-2000:]
    assert json.loads((out / "semalign.json").read_text())["status"] == "failed"
    assert not list(out.glob("shard-*"))
    (mlrun,) = mlflow_runs(out, uri)[1]
    assert mlrun.info.status == "FAILED" and "needs" in mlrun.data.tags["error"]


@pytest.mark.faults
def test_resume_dir_of_another_config_is_refused(tmp_path, tiny_pair):
    cfg = write_config(tmp_path, tiny_pair, schedule={"epochs_per_stage": 0.1})
    semalign("run", "--config", cfg)
    before = (tmp_path / "run" / "config.yaml").read_bytes()
    proc = semalign("run", "--config", cfg, "method.top_k=4", check=False)
    assert proc.returncode == 2
    assert "different configuration" in proc.stderr and "choose another output_dir" in proc.stderr
    assert (tmp_path / "run" / "config.yaml").read_bytes() == before


BAD_INPUT = [
    ("schedule.stages=[3]", "schedule.stages"),
    ("data.seq_len=512", "data.seq_len"),
    ("method.top_k=100000", "method.top_k"),
    ("method.min_shared_tokens=100000", "method.min_shared_tokens"),
    ("student.path=/nonexistent/model", "student.path"),
    ("pairing.manual=[1,9]", "pairing.manual"),
]

_BAD_INPUT_SCRIPT = """
import contextlib, io, json, sys
from semalign_ds.cli import main
results = {}
for i, override in enumerate(sys.argv[2:]):  # a directory each: a failed run's directory belongs to its config
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(["run", "--config", sys.argv[1], override, f"output_dir={sys.argv[1]}.run{i}"])
    results[override] = [rc, err.getvalue()]
print(json.dumps(results))
"""


def test_bad_input_is_a_clear_error(tmp_path, tiny_pair):
    """Each bad value fails with exit code 2 and a message naming its key (one process for all cases)."""
    cfg = write_config(tmp_path, tiny_pair)
    proc = subprocess.run([sys.executable, "-c", _BAD_INPUT_SCRIPT, str(cfg), *[o for o, _ in BAD_INPUT]],
                          env=env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    for override, needle in BAD_INPUT:
        rc, message = results[override]
        assert rc == 2 and needle in message, (override, rc, message)


def test_reduced_demo_runs_end_to_end(tmp_path):
    proc = semalign("demo", "--scale", "tiny", "--cache-dir", tmp_path / "cache", f"output_dir={tmp_path / 'demo'}",
                    "runtime.progress=false", "data.replay_fraction=0.25", timeout=400)
    for row in ("student before", "student after", "teacher", "teacher margin", "target bits/byte",
                "general (the student's own domain", "a rise is forgetting)"):
        assert row in proc.stdout
    summary = json.loads((tmp_path / "demo" / "eval.json").read_text())
    assert set(summary["perplexity"]) == set(summary["bits_per_byte"]) == {"target", "general"}
    saved = yaml.safe_load((tmp_path / "demo" / "config.yaml").read_text())  # the student's own code mixed in
    assert saved["data"]["replay_fraction"] == 0.25 and saved["data"]["replay_path"].endswith("general_replay.jsonl")
    assert (tmp_path / "demo" / "student" / "model.safetensors").is_file()


# ---------------------------------------------------------------- windowed store (transport.scope window)

WINDOWED = {"schedule": {"mode": "full", "epochs_per_stage": 0.5}, "transport": {"scope": "window",
                                                                                 "window_sequences": 12}}


@pytest.fixture(scope="module")
def windowed(tmp_path_factory, tiny_pair):
    tmp = tmp_path_factory.mktemp("windowed")
    semalign("run", "--config", write_config(tmp, tiny_pair, **WINDOWED))
    return tmp / "run"


def test_a_windowed_store_holds_one_window_whatever_the_data(tmp_path, tiny_pair, windowed):
    """48 sequences in 4 windows of 12 and 12 sequences in one: the store's peak is the same (one window), every
    sample is taught once, and the windowed run logs what its store held."""
    small = tmp_path / "small"
    small.mkdir()
    cfg = write_config(small, tiny_pair, **WINDOWED)
    semalign("run", "--config", cfg, "data.max_sequences=12")
    _, (big_run,) = mlflow_runs(windowed)
    _, (small_run,) = mlflow_runs(small / "run")
    big, little = big_run.data.metrics, small_run.data.metrics
    assert big["store_peak_bytes"] == little["store_peak_bytes"] > 0
    assert big["teacher_passes_per_sample"] == little["teacher_passes_per_sample"] == 1.0
    assert big_run.data.params["plan.scope"] == "window" and big["packet_bytes_per_token"] < 200


def test_a_windowed_run_killed_mid_window_resumes_to_the_same_weights(tmp_path, tiny_pair, windowed):
    killed = tmp_path / "killed"
    killed.mkdir()
    cfg = write_config(killed, tiny_pair, **WINDOWED, runtime={"checkpoint_every": 2})  # windows: 3 steps each
    proc = subprocess.Popen([*SEMALIGN, "run", "--config", str(cfg)], env=env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    progress, deadline, state = killed / "run" / "checkpoint" / "run.json", time.time() + 240, {}
    while time.time() < deadline and proc.poll() is None:
        try:
            state = json.loads(progress.read_text()) if progress.is_file() else {}
        except json.JSONDecodeError:
            state = {}
        if state.get("step", 0) >= 4 and state["step"] % 3:  # checkpointed inside a window, not at its end
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait(timeout=30)
    assert state.get("step") in (4, 8, 10), f"never killed inside a window: {state}"
    semalign("run", "--config", cfg)
    assert_same_weights(windowed, killed / "run")
    _, (mlrun,) = mlflow_runs(killed / "run")
    assert mlrun.data.metrics["teacher_passes_per_sample"] > 1.0  # the window taught again is counted
