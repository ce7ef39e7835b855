"""`semalign plan` and the cost model behind it (semalign_ds/plan.py, throughput.py); the run's throughput metrics.

The shapes are the public Llama configs in bench/throughput/shapes (config.json only, no weights). Predictions are
checked against the figures measured on one H200 in issue 6, parameter counts against instantiated models, and
the verdicts against cases that must and must not fit.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from semalign_ds import cli, config as cfgmod, plan, throughput as tp
from semalign_ds.transport.packet import SupervisionPacket

REPO = Path(__file__).resolve().parent.parent
SHAPES = REPO / "bench" / "throughput" / "shapes"
H200 = tp.get_profile("h200")


def shape(name: str) -> tp.ModelShape:
    from semalign_ds.models.loading import load_config

    return tp.ModelShape.from_config(load_config(SHAPES / name))


def cfg70(*overrides: str):
    return cfgmod.load_config(REPO / "configs" / "llama70b_to_1b.yaml",
                              [f"teacher.path={SHAPES / 'llama-3.1-70b'}", f"student.path={SHAPES / 'llama-3.2-1b'}",
                               *overrides])


def run_plan(capsys, *args: str) -> tuple[int, str]:
    rc = cli.main(["plan", *args])
    captured = capsys.readouterr()
    return rc, captured.out + captured.err


@pytest.mark.parametrize("tied", [False, True])
def test_parameter_count_matches_an_instantiated_model(tied):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=96, hidden_size=48, intermediate_size=80, num_hidden_layers=3,
                         num_attention_heads=6, num_key_value_heads=2, tie_word_embeddings=tied)
    model = LlamaForCausalLM(config)
    assert tp.ModelShape.from_config(config).total_params == sum(p.numel() for p in model.parameters())


def test_public_shapes_have_their_published_sizes():
    assert shape("llama-3.1-8b").total_params == pytest.approx(8.03e9, rel=0.005)
    assert shape("llama-3.1-70b").total_params == pytest.approx(70.55e9, rel=0.005)
    assert shape("llama-3.2-1b").total_params == pytest.approx(1.236e9, rel=0.005)


def test_teacher_pass_reproduces_the_h200_measurements():
    s8 = shape("llama-3.1-8b")
    big = tp.teacher_pass_seconds(s8, 64, 1024, 2, H200, world=1, nodes=1, offload="cpu", dtype="bfloat16")
    assert big["pass_s"] == pytest.approx(1.91, rel=0.06) and big["compute_s"] > big["fetch_s"]  # offload hidden
    assert big["fetch_s"] == pytest.approx(0.29, rel=0.03)  # the PCIe floor: 16 GB / 55 GB/s
    floor = tp.forward_flops(s8, 16, 1024) / (H200.matmul_tflops["bfloat16"] * 1e12)
    assert floor == pytest.approx(0.33, rel=0.05)
    s70 = shape("llama-3.1-70b")
    one = tp.teacher_pass_seconds(s70, 16, 1024, 2, H200, world=1, nodes=1, offload="cpu", dtype="bfloat16")
    assert 16 * 1024 / one["pass_s"] == pytest.approx(4.0e3, rel=0.06)
    roof = tp.forward_flops(s70, 16, 1024) / (H200.matmul_tflops["bfloat16"] * 1e12)
    assert 16 * 1024 / roof == pytest.approx(5.6e3, rel=0.05)


def test_transfers_dominate_small_batches_and_more_ranks_split_the_shard():
    s70 = shape("llama-3.1-70b")
    small = tp.teacher_pass_seconds(s70, 1, 1024, 2, H200, world=1, nodes=1, offload="cpu", dtype="bfloat16")
    assert small["fetch_s"] > small["compute_s"] and small["pass_s"] == small["fetch_s"]
    eight = tp.teacher_pass_seconds(s70, 1, 1024, 2, H200, world=8, nodes=1, offload="cpu", dtype="bfloat16")
    assert eight["fetch_s"] == pytest.approx(small["fetch_s"] / 8) and eight["gather_s"] > 0
    resident = tp.teacher_pass_seconds(s70, 1, 1024, 2, H200, world=1, nodes=1, offload="none", dtype="bfloat16")
    assert resident["fetch_s"] == 0


def test_bytes_per_token_and_stage_costs():
    assert tp.bytes_per_token(16, 2048, 64, 128256, 2) == 16 * 2048 * 2 + 64 * 12 + 4 + 9
    assert tp.bytes_per_token(2, 32, 0, 100, 4) == 2 * 32 * 4 + 400 + 9
    s1 = shape("llama-3.2-1b")
    first, last = (tp.student_step_flops(s1, 8, 1024, k) for k in (1, 16))
    full = tp.student_step_flops(s1, 8, 1024, 1, full=True)
    assert last < first < full
    stage = tp.student_memory(s1, 8, 1024, 1, 2, 1, 64, H200)
    whole = tp.student_memory(s1, 8, 1024, 1, 2, 1, 64, H200, full=True)
    assert stage["optimizer_state"] < whole["optimizer_state"] / 10 and stage["total"] < whole["total"]


def test_plan_for_70b_to_1b_says_attribution_does_not_fit_and_how_to_fix(capsys):
    rc, out = run_plan(capsys, "--config", str(REPO / "configs" / "llama70b_to_1b.yaml"), "--nodes", "1",
                       "--gpus-per-node", "8", f"teacher.path={SHAPES / 'llama-3.1-70b'}",
                       f"student.path={SHAPES / 'llama-3.2-1b'}")
    assert rc == 1 and "WILL NOT FIT" in out and "layer attribution needs" in out
    assert "data.micro_batch_size to" in out and "pairing.critical_layer=false" in out
    for label in ("teacher tokens/s", "tokens per weight pass", "device memory per rank", "host memory per node",
                  "spool size on disk", "wall time", "bytes per token moved"):
        assert label in out
    assert "runtime.topology=spool" in out  # one teacher pass per sample instead of one per stage step


def test_following_the_advice_makes_the_plan_fit():
    built = plan.build_plan(cfg70(), shape("llama-3.1-70b"), shape("llama-3.2-1b"), 1, 8, H200)
    advice = next(a for a in built.advice if "attribution" in a)
    fitting = int(advice.split("data.micro_batch_size to ")[1].split(",")[0])
    fixed = plan.build_plan(cfg70(f"data.micro_batch_size={fitting}"), shape("llama-3.1-70b"),
                            shape("llama-3.2-1b"), 1, 8, H200)
    assert fixed.fits and fixed.figures["attribution_gib"] <= H200.device_mem_gib
    skipped = plan.build_plan(cfg70("pairing.critical_layer=false"), shape("llama-3.1-70b"), shape("llama-3.2-1b"),
                              1, 8, H200)
    assert skipped.fits and skipped.figures["teacher_tokens_per_s"] == pytest.approx(8 * 4.0e3, rel=0.06)


def test_device_and_host_overflow_name_the_setting_to_change():
    big = plan.build_plan(cfg70("data.micro_batch_size=64", "pairing.critical_layer=false"),
                          shape("llama-3.1-70b"), shape("llama-3.2-1b"), 1, 8, H200)
    assert not big.fits and any("device memory per rank" in p for p in big.problems)
    advice = next(a for a in big.advice if a.startswith("set data.micro_batch_size="))
    fitting = int(advice.split("=")[1].split()[0])
    ok = plan.build_plan(cfg70(f"data.micro_batch_size={fitting}", "pairing.critical_layer=false"),
                         shape("llama-3.1-70b"), shape("llama-3.2-1b"), 1, 8, H200)
    assert not any("device memory" in p for p in ok.problems)
    cpu = plan.build_plan(cfg70("pairing.critical_layer=false", "data.micro_batch_size=1"),
                          shape("llama-3.1-70b"), shape("llama-3.2-1b"), 1, 1, tp.get_profile("cpu"))
    assert any("offload=nvme" in a for a in cpu.advice) and not cpu.fits


def test_topologies_and_user_errors(capsys):
    spool = plan.build_plan(cfg70("runtime.topology=spool", "pairing.critical_layer=false"),
                            shape("llama-3.1-70b"), shape("llama-3.2-1b"), 1, 8, H200)
    colocated = plan.build_plan(cfg70("pairing.critical_layer=false"), shape("llama-3.1-70b"),
                                shape("llama-3.2-1b"), 1, 8, H200)
    assert spool.figures["teacher_passes_per_sample"] == 1.0 and spool.figures["wall_s"] < colocated.figures["wall_s"]
    split = plan.build_plan(cfg70("runtime.topology=disaggregated", "transport.teacher_ranks=6",
                                  "pairing.critical_layer=false"), shape("llama-3.1-70b"), shape("llama-3.2-1b"),
                            1, 8, H200)
    assert split.figures["teacher_tokens_per_s"] == pytest.approx(6 / 8 * colocated.figures["teacher_tokens_per_s"])
    with pytest.raises(ValueError, match="transport.teacher_ranks"):
        plan.build_plan(cfg70("runtime.topology=disaggregated"), shape("llama-3.1-70b"), shape("llama-3.2-1b"),
                        1, 8, H200)
    config = str(REPO / "configs" / "llama70b_to_1b.yaml")
    rc, out = run_plan(capsys, "--config", config, "--nodes", "1", "--gpus-per-node", "8")
    assert rc == 2 and "teacher.path" in out  # the placeholder path: a clear error, exit 2
    rc, out = run_plan(capsys, "--config", config, "--nodes", "1", "--gpus-per-node", "8", "--device-profile", "tpu",
                       f"teacher.path={SHAPES / 'llama-3.1-70b'}", f"student.path={SHAPES / 'llama-3.2-1b'}")
    assert rc == 2 and "--device-profile 'tpu' is unknown" in out


def test_plan_of_a_tiny_cpu_run_fits(tmp_path, tiny_pair, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"teacher": {"path": str(tiny_pair["teacher"]), "dtype": "float32"},
                                      "student": {"path": str(tiny_pair["student"]), "dtype": "float32"},
                                      "data": {"path": str(tiny_pair["train"]), "seq_len": 64},
                                      "method": {"target_dtype": "float32"}, "runtime": {"device": "cpu"}}))
    rc, out = run_plan(capsys, "--config", str(config), "--nodes", "1", "--gpus-per-node", "2")
    assert rc == 0 and "verdict: FITS" in out and "device profile             cpu" in out


def test_run_meter_reports_rates_per_world():
    teacher = torch.nn.Linear(10, 10, bias=False)  # 100 float32 parameters = 400 bytes per weight pass
    meter = tp.RunMeter(teacher, offloaded=True, in_process=True, device=torch.device("cpu"), world_size=2)
    packet = SupervisionPacket(ids_BT=torch.zeros(2, 5, dtype=torch.long), mask_BT=torch.ones(2, 5, dtype=torch.bool),
                               sample_ids_B=torch.arange(2), targets={1: torch.zeros(2, 5, 4)})
    fetched = meter.source(lambda: packet)
    assert meter.student(lambda p: {"loss": 1.0}, fetched) == {"loss": 1.0}
    assert meter.source(lambda: None) is None  # the end of a source is not a pass
    m = meter.flush()
    assert m["tokens_per_weight_pass"] == 10 and m["bytes_per_token_moved"] == packet.nbytes() / 10
    assert m["teacher_tokens_per_s"] > 0 and m["student_tokens_per_s"] > 0
    assert m["h2d_gbps_effective"] == pytest.approx(400 * m["teacher_tokens_per_s"] / 20 / 1e9)  # t = 20 / rate
    assert meter.flush() == {}
    spool = tp.RunMeter(None, offloaded=True, in_process=False, device="cpu", world_size=1)
    spool.student(lambda p: None, spool.source(lambda: packet))
    assert set(spool.flush()) == {"source_tokens_per_s", "bytes_per_token_moved", "student_tokens_per_s"}


def test_a_run_logs_throughput_metrics_to_mlflow(tmp_path, tiny_pair):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({
        "name": "meter", "output_dir": str(tmp_path / "run"),
        "teacher": {"path": str(tiny_pair["teacher"]), "dtype": "float32"},
        "student": {"path": str(tiny_pair["student"]), "dtype": "float32"},
        "data": {"path": str(tiny_pair["train"]), "seq_len": 32, "max_sequences": 16, "micro_batch_size": 2},
        "method": {"top_k": 8, "min_shared_tokens": 100, "target_dtype": "float32"},
        "pairing": {"critical_layer": False}, "schedule": {"steps_per_stage": 2, "stages": [1]},
        "runtime": {"device": "cpu", "progress": False}}))
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "MLFLOW_TRACKING_URI")}
    env["PYTHONPATH"] = str(REPO)
    proc = subprocess.run([sys.executable, "-m", "semalign_ds.cli", "run", "--config", str(config)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'run' / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("semalign").experiment_id])
    metrics = run.data.metrics
    for name in ("teacher_tokens_per_s", "tokens_per_weight_pass", "h2d_gbps_effective", "student_tokens_per_s",
                 "bytes_per_token_moved"):
        assert metrics[f"stage1/{name}"] > 0, name
    assert metrics["stage1/tokens_per_weight_pass"] == 2 * 32
