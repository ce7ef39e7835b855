"""The RunSpec: one resolution of the config that plan and run both read (rules checked by hand)."""
from __future__ import annotations

import json

import pytest

from semalign_ds import config as cfgmod
from semalign_ds import spec as specmod
from semalign_ds.planning.throughput import ModelShape

T = ModelShape(layers=8, hidden=64, inter=128, heads=4, kv_heads=4, head_dim=16, vocab=500, tied=False, gated=True)
S = ModelShape(layers=2, hidden=32, inter=64, heads=2, kv_heads=2, head_dim=16, vocab=500, tied=False, gated=True)


def resolve(*overrides, world=1, per_node=None, ram=1e12, n=100, cross=False):
    cfg = cfgmod.config_from_dict({"data": {"seq_len": 16, "max_sequences": n, "micro_batch_size": 4}},
                                  list(overrides))
    roles = specmod.Roles.build(cfg.runtime.topology, world, cfg.transport.teacher_ranks, per_node)
    return specmod.resolve(cfg, T, S, roles, n, ram, cross)


def test_the_default_method_needs_targets_logits_and_attribution():
    spec = resolve()
    assert spec.method.needs_targets and spec.method.needs_logits and spec.method.needs_attribution
    assert spec.method.target_kind == "residual" and spec.trained_layers == [1, 2]
    # compact: ids in 2 bytes (V 500) + mask + per layer 32 int8 coefficients + a float16 scale + top-64 uint8
    # values + their float16 scale + a float16 tail + 64 ids of 2 bytes
    assert spec.packets.bytes_per_token == 2 + 1 + 2 * (32 + 2) + 64 + 2 + 2 + 64 * 2
    lossless = resolve("transport.codec=lossless").packets
    # 2 layers x 32 x bf16 + top-64 (float32 values, int32 ids) + tail + ids + mask, per token
    assert lossless.bytes_per_token == 2 * 32 * 2 + 64 * 8 + 4 + 9
    assert spec.scope == "window" and spec.budget.windows.count == 1  # full schedule: 100 samples, one window
    assert spec.store_bytes_per_rank == 100 * (16 * spec.packets.bytes_per_token + 8)


def test_a_windowed_store_holds_one_window_whatever_the_data():
    small, big = resolve(n=4000), resolve(n=16000)
    assert small.store_bytes_per_rank == big.store_bytes_per_rank  # 4 N sequences: the same window
    assert big.budget.windows.count == 4 * small.budget.windows.count and big.teacher_passes_per_sample == 1.0
    assert big.budget.stages[0].steps == 4 * small.budget.stages[0].steps  # the same epochs over 4x the data
    kept = resolve("transport.scope=run", n=16000)
    assert small.budget.windows.size == 1000 and kept.store_bytes_per_rank == 16 * small.store_bytes_per_rank
    frontier = resolve("schedule.mode=frontier", n=4000)
    assert frontier.scope == "run" and frontier.teacher_passes_per_sample == 1.0
    reteach = resolve("schedule.mode=frontier", "transport.scope=window", n=4000)
    assert reteach.teacher_passes_per_sample == 2.0 and reteach.store_bytes_per_rank < frontier.store_bytes_per_rank


def test_sft_and_kd_need_what_they_use():
    sft = resolve("method.preset=sft")
    assert not sft.method.needs_teacher and sft.store == "none" and sft.store_bytes_per_rank == 0
    kd = resolve("method.preset=kd")
    assert kd.method.needs_logits and not kd.method.needs_targets and not kd.method.needs_attribution
    assert kd.packets.parts()["targets"] == 0
    fisher = resolve("method.layer_objective=fisher_logits")
    assert fisher.method.target_kind == "state"
    assert not resolve("method.layer_objective=mse").method.normalised_targets


def test_store_rule_by_hand():
    per_rank = resolve().store_bytes_per_rank  # 100 samples on one rank (one window)
    # auto: memory when the node's student ranks' packets fit in store_memory_fraction (0.25) of its RAM
    assert resolve(ram=4 * per_rank).store == "memory"
    assert resolve(ram=4 * per_rank - 4).store == "disk"
    # 4 ranks on one node share its RAM: each keeps a quarter of the samples, so the same RAM still fits
    assert resolve(world=4, ram=4 * per_rank).store == "memory"
    four = resolve(world=4, per_node=4, ram=per_rank / 2)
    assert four.store_bytes_per_rank == 25 * (16 * four.packets.bytes_per_token + 8) and four.store == "disk"
    # disaggregated: only the student ranks of a node keep packets
    split = resolve("runtime.topology=disaggregated", "transport.teacher_ranks=3", world=4, per_node=4,
                    ram=4 * per_rank)
    assert split.roles.per_node(split.roles.student_ranks) == 1 and split.store == "memory"
    assert resolve("transport.store=disk").store == "disk" and resolve("runtime.topology=spool").store == "spool"


def test_roles_place_ranks_on_nodes():
    roles = specmod.Roles.build("disaggregated", 16, 12, 8)
    assert roles.nodes == 2 and roles.per_node(roles.teacher_ranks) == 8 and roles.per_node(roles.student_ranks) == 4
    with pytest.raises(ValueError, match="transport.teacher_ranks"):
        specmod.Roles.build("disaggregated", 4, None)
    with pytest.raises(ValueError, match="only applies to runtime.topology=disaggregated"):
        specmod.Roles.build("colocated", 4, 2)


def test_a_method_without_teacher_output_cannot_stream_or_spool():
    for topology in ("disaggregated", "spool"):
        with pytest.raises(ValueError, match="needs no teacher output"):
            cfgmod.config_from_dict({}, ["method.preset=sft", f"runtime.topology={topology}"])


def test_sft_runs_without_a_teacher(tmp_path, tiny_pair):
    """A method that needs no teacher output loads no teacher, runs no attribution and keeps no packets."""
    from test_pipeline import semalign, write_config
    from test_transport_pipeline import mlflow_run

    cfg = write_config(tmp_path, tiny_pair, method={"preset": "sft"}, schedule={"mode": "full"})
    proc = semalign("run", "--config", cfg)
    run = tmp_path / "run"
    assert "no teacher: the method needs no teacher output" in proc.stdout
    assert not (run / "pairing.json").exists() and not (run / "packets").exists()
    _, mlrun = mlflow_run(run)
    params, metrics = mlrun.data.params, mlrun.data.metrics
    assert params["plan.needs_teacher"] == "False" and params["plan.store"] == "none"
    assert params["method.preset"] == "sft" and params["method.overrides"] == "method.top_k=8"  # write_config's
    assert metrics["teacher_passes_per_sample"] == 0.0 and "teacher_attribution_passes_per_sample" not in metrics
    assert metrics["label_loss"] > 0 or metrics.get("out_loss", 0) > 0
    assert "teacher" not in json.loads((run / "eval.json").read_text())["perplexity"]["heldout"]
