"""The topologies end to end, as users run them: disaggregated (torchrun, teacher ranks stream to student ranks)
and spool (`semalign teach` then `semalign train --from-spool`) against the colocated run on the same data."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "workers"))

from engines_common import warm_deepspeed  # noqa: E402
from test_pipeline import SEMALIGN, env, semalign, student_weights, write_config  # noqa: E402

from semalign_ds.transport import spool  # noqa: E402

TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
COMMON = {"transport": {"shard_sequences": 16, "timeout_s": 60.0}}


def torchrun(nproc: int, *args, timeout=400):
    warm_deepspeed()
    cmd = [TORCHRUN, "--standalone", "--nproc_per_node", str(nproc), "-m", "semalign_ds.cli",
           *map(str, args)]
    proc = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"torchrun {args} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-6000:]}")
    return proc


def mlflow_run(run_dir: Path):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("semalign").experiment_id])
    return client, run


def losses(run_dir: Path) -> dict[str, list[float]]:
    client, run = mlflow_run(run_dir)
    return {m: [h.value for h in sorted(client.get_metric_history(run.info.run_id, m), key=lambda h: h.step)]
            for m in ("layer_loss", "out_loss")}


def assert_same_training(a: Path, b: Path, tol: float = 1e-5) -> None:
    la, lb = losses(a), losses(b)
    for name in la:
        assert len(la[name]) == len(lb[name]) == 12, name  # 2 stages x 6 steps
        assert la[name] == pytest.approx(lb[name], rel=tol, abs=tol), name
    wa, wb = student_weights(a), student_weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.allclose(wa[name], wb[name], atol=tol, rtol=tol), name


def assert_plan_agrees(run_dir: Path, config: Path, *overrides: str, gpus: int = 1, spool_run: bool = False) -> None:
    """`semalign plan` on the run's config (CPU profile) against what the run logged: the store kind and the packet
    bytes per token exactly (both come from the one RunSpec), and within 20%: steps and tokens per stage, teacher
    passes per sample, the packets' bytes (a rank's memory store; a spool's size), peak host memory per rank."""
    proc = semalign("plan", "--config", config, "--nodes", "1", "--gpus-per-node", gpus, "--device-profile", "cpu",
                    "--json", *overrides)
    figures = json.loads(proc.stdout)["figures"]
    _, mlrun = mlflow_run(run_dir)
    params, metrics = mlrun.data.params, mlrun.data.metrics
    packets = ("spool_bytes", float(params["plan.store_bytes"])) if spool_run else \
        ("store_host_bytes_per_rank", metrics["store/host_bytes"])
    got = {"steps_per_stage": float(params["plan.steps_per_stage"]),
           "tokens_per_stage": float(params["plan.tokens_per_stage"]),
           "teacher_passes_per_sample": metrics["teacher_passes_per_sample"], packets[0]: packets[1],
           "host_gib": metrics["host/peak_rss_bytes"] / 2**30}
    want = {**{k: figures[k] for k in got}, "host_gib": figures["host_gib"] / gpus}
    assert (params["plan.store"], int(params["plan.bytes_per_token"])) == \
        (figures["store_kind"], figures["bytes_per_token"])
    for key in got:
        assert got[key] == pytest.approx(want[key], rel=0.2), (key, got[key], want[key])


def test_the_plan_agrees_with_a_colocated_run(tmp_path, tiny_pair, colocated):
    assert_plan_agrees(colocated, write_config(tmp_path, tiny_pair, **COMMON))


def sources(run_dir: Path) -> list[int]:
    return [row["source_layer"] for row in json.loads((run_dir / "pairing.json").read_text())["rows"]]


@pytest.fixture(scope="module")
def colocated(tmp_path_factory, tiny_pair):
    tmp = tmp_path_factory.mktemp("colocated")
    semalign("run", "--config", write_config(tmp, tiny_pair, **COMMON))
    return tmp / "run"


@pytest.fixture(scope="module")
def spool_dir(tmp_path_factory, tiny_pair):
    tmp = tmp_path_factory.mktemp("teach")
    semalign("teach", "--config", write_config(tmp, tiny_pair, **COMMON), "--out", tmp / "spool")
    return tmp / "spool"


# ---------------------------------------------------------------- disaggregated


def test_one_teacher_rank_streams_to_one_student_rank_like_colocated(tmp_path, tiny_pair, colocated):
    cfg = write_config(tmp_path, tiny_pair, **COMMON)
    proc = torchrun(2, "run", "--config", cfg, "runtime.topology=disaggregated", "transport.teacher_ranks=1")
    run = tmp_path / "run"
    assert "teacher rank 0: streamed 12 packets (48 samples)" in proc.stdout and "student after" in proc.stdout
    assert sources(run) == sources(colocated)  # attribution ran on the teacher rank's ZeRO-3 subgroup
    assert_same_training(run, colocated)
    _, mlrun = mlflow_run(run)
    assert mlrun.data.tags["role"] == "student" and mlrun.info.status == "FINISHED"
    metrics = mlrun.data.metrics
    assert metrics["transport/wire_bytes_per_token"] > 0 and 0 <= metrics["transport/teacher_idle_fraction"] <= 1
    assert metrics["teacher_passes_per_sample"] == 1.0  # each sample streamed once, kept for both stages
    assert "teacher" not in json.loads((run / "eval.json").read_text())["perplexity"]["heldout"]
    assert_plan_agrees(run, cfg, "runtime.topology=disaggregated", "transport.teacher_ranks=1", gpus=2)


def test_two_teacher_ranks_stream_to_one_student_rank_like_colocated(tmp_path, tiny_pair, colocated):
    manual = sources(colocated)  # no attribution here: two teacher ranks would attribute over other batches
    cfg = write_config(tmp_path, tiny_pair, **COMMON, pairing={"manual": manual})
    # lossless: the compact codec's bases are fitted on sums all-reduced over the teacher ranks, whose float64
    # rounding follows the number of ranks; int8 coefficients then round a few values differently (1 step)
    proc = torchrun(3, "run", "--config", cfg, "runtime.topology=disaggregated", "transport.teacher_ranks=2",
                    "transport.codec=lossless")
    assert "teacher rank 0: streamed 6 packets" in proc.stdout and "teacher rank 1: streamed 6 packets" in proc.stdout
    _, mlrun = mlflow_run(tmp_path / "run")
    assert mlrun.data.metrics["teacher_passes_per_sample"] == 1.0
    reference = tmp_path / "lossless"
    semalign("run", "--config", write_config(tmp_path, tiny_pair, **COMMON, pairing={"manual": manual}),
             "transport.codec=lossless", f"output_dir={reference}")
    assert_same_training(tmp_path / "run", reference)  # ZeRO-3 over the 2-rank teacher group, lockstep rounds


# ---------------------------------------------------------------- spool


def _wait_then_kill(proc, ready, what: str, limit: float = 240.0) -> None:
    deadline = time.time() + limit
    while time.time() < deadline and proc.poll() is None:
        if ready():
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
            return
        time.sleep(0.002)
    proc.kill()
    raise AssertionError(f"never got to kill it {what} (exit {proc.poll()})")


def test_a_teacher_killed_mid_shard_resumes_to_the_same_shards(tmp_path, tiny_pair, spool_dir):
    cfg = write_config(tmp_path, tiny_pair, **COMMON)
    out = tmp_path / "spool"
    proc = subprocess.Popen([*SEMALIGN, "teach", "--config", str(cfg), "--out", str(out)], env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_then_kill(proc, lambda: (out / "shard-00000.json").is_file() and any(out.glob("shard-*.safetensors.tmp")),
                    "mid-shard")
    assert list(out.glob("shard-*.safetensors.tmp")) and not (out / spool.MANIFEST).exists()
    proc = semalign("train", "--config", cfg, "--from-spool", out, check=False)  # a partial spool is never read
    assert proc.returncode == 2 and "no manifest.json" in proc.stderr
    semalign("teach", "--config", cfg, "--out", out)
    want = json.loads((spool_dir / spool.MANIFEST).read_text())
    got = json.loads((out / spool.MANIFEST).read_text())
    assert [r["sha256"] for r in got["shards"]] == [r["sha256"] for r in want["shards"]]
    assert len(got["shards"]) == 3 and not list(out.glob("*.tmp"))


def test_spool_training_matches_colocated_and_resumes_after_a_kill(tmp_path, tiny_pair, spool_dir, colocated):
    straight = tmp_path / "straight"
    straight.mkdir()
    semalign("train", "--config", write_config(straight, tiny_pair, **COMMON), "--from-spool", spool_dir)
    # the same packets (float32 targets); a colocated process may compute the student's linear layers through
    # DeepSpeed's zero3_linear_wrap (the teacher's zero.Init leaves it in place), hence a tolerance
    assert_same_training(straight / "run", colocated)
    _, mlrun = mlflow_run(straight / "run")
    assert mlrun.data.metrics["teacher_passes_per_sample"] == 1.0
    assert mlrun.data.metrics["transport/spool_read_bytes_per_token"] > 0
    assert mlrun.data.params["plan.steps_per_stage"] == "6"  # the budget, not a transport.epochs cap
    manifest = json.loads((spool_dir / spool.MANIFEST).read_text())
    assert float(mlrun.data.params["plan.store_bytes"]) == manifest["bytes"]
    assert_plan_agrees(straight / "run", straight / "config.yaml", "runtime.topology=spool",
                       f"transport.spool_dir={spool_dir}", spool_run=True)

    killed = tmp_path / "killed"
    killed.mkdir()
    cfg = write_config(killed, tiny_pair, **COMMON)
    proc = subprocess.Popen([*SEMALIGN, "train", "--config", str(cfg), "--from-spool", str(spool_dir)], env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = {}

    def mid_stage_2() -> bool:
        try:
            state.update(json.loads((killed / "run" / "checkpoint" / "run.json").read_text()))
        except (OSError, json.JSONDecodeError):
            return False
        return state.get("stage") == 2 and bool(state.get("step"))
    _wait_then_kill(proc, mid_stage_2, "mid-stage 2")
    assert state["step"] == 3 and state["packets"] == json.loads((spool_dir / spool.MANIFEST).read_text())[
        "binding_digest"]
    semalign("train", "--config", cfg, "--from-spool", spool_dir)
    a, b = student_weights(straight / "run"), student_weights(killed / "run")
    assert all(torch.equal(a[name], b[name]) for name in a)


def test_a_spool_of_another_configuration_is_refused(tmp_path, tiny_pair, spool_dir):
    cfg = write_config(tmp_path, tiny_pair, **COMMON)
    proc = semalign("train", "--config", cfg, "--from-spool", spool_dir, "method.tau=2.0", check=False)
    assert proc.returncode == 2
    assert "different configuration" in proc.stderr and "method (method.*" in proc.stderr


def test_a_run_killed_while_teaching_into_a_disk_store_resumes_without_recomputing_shards(tmp_path, tiny_pair,
                                                                                          colocated):
    cfg = write_config(tmp_path, tiny_pair, **COMMON)
    run = tmp_path / "run"
    store = run / "packets" / "rank-00000"
    proc = subprocess.Popen([*SEMALIGN, "run", "--config", str(cfg), "transport.store=disk"], env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_then_kill(proc, lambda: (store / "shard-00000.json").is_file() and not (store / spool.MANIFEST).exists(),
                    "while teaching")
    semalign("run", "--config", cfg, "transport.store=disk")
    a, b = student_weights(colocated), student_weights(run)  # memory store, uninterrupted: the same packets
    assert all(torch.equal(a[name], b[name]) for name in a)
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{run / 'mlflow.db'}")
    (mlrun,) = client.search_runs([client.get_experiment_by_name("semalign").experiment_id],
                                  "attributes.status = 'FINISHED'")
    metrics = mlrun.data.metrics
    assert metrics["teach/restored_samples"] >= 16 and metrics["teach/emitted_samples"] <= 32  # shard 0 kept
    assert metrics["teach/restored_samples"] + metrics["teach/emitted_samples"] == 48
    assert metrics["teacher_passes_per_sample"] == 1.0 and metrics["store/disk_bytes"] > 0
    assert not (run / "packets").exists()  # removed at the end (transport.keep_spool=false)
