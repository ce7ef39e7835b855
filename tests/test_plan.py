"""`semalign plan` and the cost model behind it (semalign_ds/plan.py, throughput.py); the run's throughput metrics.

The shapes are the public Llama configs in bench/throughput/shapes (config.json only, no weights). Predictions are
checked against the figures measured on one H200 in issue 6, parameter counts against instantiated models, and
the verdicts against cases that must and must not fit.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from semalign_ds import cli, config as cfgmod
from semalign_ds.planning import plan, throughput as tp
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


# A made-up device whose round numbers make every figure computable by hand (no fitted constant is asserted).
ROUND = tp.DeviceProfile("round", {"bfloat16": 100.0, "float32": 10.0}, 0.5, 0.5, 10.0, 1000.0, 100.0, 10.0, 1.0,
                         80.0, 100.0, 1.0, 1.0, False, 1.0, (6.0, 3.0), (9.0, 4.0), "test")
TOY = tp.ModelShape(layers=2, hidden=1024, inter=4096, heads=8, kv_heads=8, head_dim=128, vocab=32768, tied=False,
                    gated=False)


def test_model_shape_and_forward_flops_by_hand():
    layer = 1024 * 1024 * 4 + 2 * 1024 * 4096 + 2 * 1024  # q, k, v, o; up + down; two norms
    assert TOY.layer_params == layer
    assert TOY.total_params == 2 * layer + 2 * 32768 * 1024 + 1024  # + embedding + head + final norm
    # 2 x (layers + head) x tokens + attention 2 T^2 heads head_dim per layer: B 4, T 512
    weights = 2 * layer + 32768 * 1024
    assert tp.forward_flops(TOY, 4, 512) == 2 * weights * 2048 + 2 * 4 * 512 * 512 * 8 * 128 * 2


def test_teacher_pass_is_the_slowest_of_compute_fetch_and_gather_by_hand():
    flops, weights = tp.forward_flops(TOY, 4, 512), TOY.total_params * 2
    one = tp.teacher_pass_seconds(TOY, 4, 512, 2, ROUND, world=1, nodes=1, offload="cpu", dtype="bfloat16")
    assert one["compute_s"] == pytest.approx(flops / (100e12 * 0.5))
    assert one["fetch_s"] == pytest.approx(weights / 10e9) and one["gather_s"] == 0
    assert one["pass_s"] == max(one["compute_s"], one["fetch_s"])
    four = tp.teacher_pass_seconds(TOY, 4, 512, 2, ROUND, world=4, nodes=1, offload="cpu", dtype="bfloat16")
    assert four["fetch_s"] == pytest.approx(one["fetch_s"] / 4)  # each rank fetches its quarter of the shard
    assert four["gather_s"] == pytest.approx(weights * 3 / 4 / 100e9)  # and gathers the other three quarters
    across = tp.teacher_pass_seconds(TOY, 4, 512, 2, ROUND, world=8, nodes=2, offload="nvme", dtype="bfloat16")
    assert across["gather_s"] == pytest.approx(weights * 7 / 8 / 10e9)  # between nodes: the network's 10 GB/s
    assert across["fetch_s"] == pytest.approx(weights / 8 / 1e9)  # NVMe at 1 GB/s


def test_packet_bytes_per_token_by_hand():
    from semalign_ds.spec import PacketLayout

    flagship = PacketLayout(1024, tuple(range(1, 17)), 2048, "bfloat16", 64, 128256, True, True, True, False)
    assert flagship.bytes_per_token == 16 * 2048 * 2 + 64 * (4 + 4) + 4 + 8 + 1  # targets, top-k, tail, ids, mask
    assert flagship.parts()["targets"] == 16 * 2048 * 2 and flagship.bytes_per_sample == 1024 * 66061 + 8
    full = PacketLayout(16, (1, 2), 32, "float32", 0, 100, True, True, True, True)
    assert full.bytes_per_token == 2 * 32 * 4 + 100 * 4 + 8 + 1 + 2  # full logits; cross-tokenizer masks
    uld = PacketLayout(16, (), 32, "float32", 8, 100, False, True, False, False)
    assert uld.bytes_per_token == 8 * 4 + 4 + 8 + 1  # sorted values and the tail, no ids, no targets


def test_transfers_dominate_small_batches_and_more_ranks_split_the_shard():
    s70 = shape("llama-3.1-70b")
    small = tp.teacher_pass_seconds(s70, 1, 1024, 2, H200, world=1, nodes=1, offload="cpu", dtype="bfloat16")
    assert small["fetch_s"] > small["compute_s"] and small["pass_s"] == small["fetch_s"]
    eight = tp.teacher_pass_seconds(s70, 1, 1024, 2, H200, world=8, nodes=1, offload="cpu", dtype="bfloat16")
    assert eight["fetch_s"] == pytest.approx(small["fetch_s"] / 8) and eight["gather_s"] > 0
    resident = tp.teacher_pass_seconds(s70, 1, 1024, 2, H200, world=1, nodes=1, offload="none", dtype="bfloat16")
    assert resident["fetch_s"] == 0


def test_stage_costs_order():
    s1 = shape("llama-3.2-1b")
    first, last = (tp.student_step_flops(s1, 8, 1024, k) for k in (1, 16))
    full = tp.student_step_flops(s1, 8, 1024, 1, full=True)
    assert last < first < full
    stage = tp.student_memory(s1, 8, 1024, 1, 2, 1, 64, H200)
    whole = tp.student_memory(s1, 8, 1024, 1, 2, 1, 64, H200, full=True)
    assert stage["optimizer_state"] < whole["optimizer_state"] / 10 and stage["total"] < whole["total"]


def test_the_flagship_config_fits_one_node_of_eight_h200(capsys):
    rc, out = run_plan(capsys, "--config", str(REPO / "configs" / "llama70b_to_1b.yaml"), "--nodes", "1",
                       "--gpus-per-node", "8", f"teacher.path={SHAPES / 'llama-3.1-70b'}",
                       f"student.path={SHAPES / 'llama-3.2-1b'}")
    assert rc == 0 and "verdict: FITS" in out
    for label in ("teacher tokens/s", "tokens per weight pass", "device memory per rank", "host memory per node",
                  "attribution peak per rank", "semantic bases + map", "packets", "wall time", "stages",
                  "tokens per stage", "bytes per token moved"):
        assert label in out
    assert "teacher passes per sample  1 " in out
    built = plan.build_plan(cfg70(), shape("llama-3.1-70b"), shape("llama-3.2-1b"), 1, 8, H200)
    # 5 epochs of 1000 sequences in steps of 8 x 8: ceil(5000 / 64) = 79, whatever the number of ranks
    assert built.figures["steps_per_stage"] == 79 and built.figures["tokens_per_stage"] == 79 * 64 * 1024
    four = plan.build_plan(cfg70(), shape("llama-3.1-70b"), shape("llama-3.2-1b"), 4, 8, H200)
    assert four.fits and four.figures["steps_per_stage"] == 20  # ceil(5000 / 256): the same 5 epochs
    assert built.figures["attribution_gib"] < H200.device_mem_gib and built.figures["map_gib"] < 40


def test_attribution_on_the_training_micro_batch_does_not_fit_and_the_advice_fixes_it():
    big = plan.build_plan(cfg70("pairing.attribution_micro_batch=8"), shape("llama-3.1-70b"), shape("llama-3.2-1b"),
                          1, 8, H200)
    assert not big.fits and any("layer attribution needs" in p for p in big.problems)
    advice = next(a for a in big.advice if "attribution" in a)
    fitting = int(advice.split("pairing.attribution_micro_batch=")[1].split(",")[0])
    fixed = plan.build_plan(cfg70(f"pairing.attribution_micro_batch={fitting}"), shape("llama-3.1-70b"),
                            shape("llama-3.2-1b"), 1, 8, H200)
    assert fixed.fits and fixed.figures["attribution_gib"] <= H200.device_mem_gib
    skipped = plan.build_plan(cfg70("pairing.critical_layer=false"), shape("llama-3.1-70b"), shape("llama-3.2-1b"),
                              1, 8, H200)
    assert skipped.fits and "attribution_gib" not in skipped.figures
    assert skipped.figures["wall_s"] < fixed.figures["wall_s"]


def test_a_store_too_big_for_host_memory_goes_to_disk_or_is_named():
    long = cfg70("data.max_sequences=200000", "pairing.critical_layer=false", "transport.codec=lossless")
    auto = plan.build_plan(long, shape("llama-3.1-70b"), shape("llama-3.2-1b"), 1, 8, H200)
    assert auto.fits and auto.figures["store_host_bytes_per_rank"] == 0  # 12.3 TiB of packets: a local spool
    forced = plan.build_plan(cfg70("data.max_sequences=200000", "pairing.critical_layer=false",
                                   "transport.store=memory", "transport.codec=lossless"), shape("llama-3.1-70b"), shape("llama-3.2-1b"), 1, 8, H200)
    assert not forced.fits and any("transport.store=disk" in a for a in forced.advice)
    compact = plan.build_plan(cfg70("data.max_sequences=200000", "pairing.critical_layer=false"),
                              shape("llama-3.1-70b"), shape("llama-3.2-1b"), 1, 8, H200)
    assert compact.fits and compact.figures["store_host_bytes_per_rank"] > 0  # 82x smaller: host memory again


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
    split = plan.build_plan(cfg70("runtime.topology=disaggregated", "transport.teacher_ranks=6",
                                  "pairing.critical_layer=false"), shape("llama-3.1-70b"), shape("llama-3.2-1b"),
                            1, 8, H200)
    for p in (spool, colocated, split):
        assert p.figures["teacher_passes_per_sample"] == 1.0
    assert spool.figures["wall_s"] == pytest.approx(colocated.figures["wall_s"])  # both: one pass, then the stages
    assert split.figures["teacher_tokens_per_s"] == pytest.approx(6 / 8 * colocated.figures["teacher_tokens_per_s"])
    assert split.figures["steps_per_stage"] > colocated.figures["steps_per_stage"]  # 2 student ranks, same epochs
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
    meter = tp.RunMeter(device=torch.device("cpu"), world_size=2)
    packet = SupervisionPacket(ids_BT=torch.zeros(2, 5, dtype=torch.long), mask_BT=torch.ones(2, 5, dtype=torch.bool),
                               sample_ids_B=torch.arange(2), targets={1: torch.zeros(2, 5, 4)})
    fetched = meter.source(lambda: packet)
    assert meter.student(lambda p: {"loss": 1.0}, fetched) == {"loss": 1.0}
    assert meter.source(lambda: None) is None  # the end of a source is not a read
    m = meter.flush()
    assert set(m) == {"source_tokens_per_s", "bytes_per_token_moved", "student_tokens_per_s"}
    assert m["bytes_per_token_moved"] == packet.nbytes() / 10 and m["source_tokens_per_s"] > 0
    assert meter.flush() == {}


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="VmHWM is Linux's /proc")
def test_a_child_of_a_large_process_reports_its_own_peak_rss():
    """ru_maxrss carries the parent's peak across fork+exec (CI's 1.3 GiB pytest made every run it spawned log
    1.3 GiB); the run's host/peak_rss_bytes must be the child's own."""
    ballast = torch.ones(600 * 2**20 // 4)  # 600 MiB resident in this (the parent) process
    code = "from semalign_ds.planning.throughput import peak_rss_bytes; print(peak_rss_bytes())"
    child = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                 cwd=REPO).stdout)
    assert float(ballast.sum()) > 0
    assert 1 * 2**20 < child < 400 * 2**20


def test_two_nodes_say_why_the_teacher_is_slower_and_placeholders_name_the_shapes(capsys):
    two = plan.build_plan(cfg70(), shape("llama-3.1-70b"), shape("llama-3.2-1b"), 2, 8, H200)
    one = plan.build_plan(cfg70(), shape("llama-3.1-70b"), shape("llama-3.2-1b"), 1, 8, H200)
    assert two.figures["teacher_pass_s"] > one.figures["teacher_pass_s"]
    assert any("all-gather crosses nodes" in a for a in two.advice)
    assert not any("crosses nodes" in a for a in one.advice)
    rc, out = run_plan(capsys, "--config", str(REPO / "configs" / "llama70b_to_1b.yaml"), "--nodes", "1",
                       "--gpus-per-node", "8")
    assert rc == 2 and "bench/throughput/shapes/" in out and "teacher.path=bench/throughput/shapes/llama-3.1-70b" in out
