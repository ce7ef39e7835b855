"""The quality benchmark's plumbing (bench/quality): a dry run of the driver on the tiny demo world gives a
well-formed table (not meaningful numbers), the teacher-margin gate refuses a weak teacher, and the baselines the
benchmark adds to the project's code paths work: schedule.mode full trains every student layer in one stage, the
hidden_mse objective trains through a learned projection of the unaligned teacher residual, and a Mamba student
goes through the adapter table (with the faster, equal selective scan)."""
from __future__ import annotations

import json
import math
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parent.parent
DRIVER = REPO / "bench" / "quality" / "run.py"
sys.path.insert(0, str(REPO / "bench" / "quality"))

METHODS = ["sft", "hidden_mse_kd", "semalign_v2", "abl_random_basis"]


def _driver(tmp: Path, cache: Path, *extra: str, timeout: int = 600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(DRIVER), "--size", "small", "--dry", "--out", str(tmp), "--cache-dir", str(cache),
           "--workers", "1", *extra]
    from test_pipeline import env

    return subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("quality_cache")


@pytest.fixture(scope="module")
def dry(tmp_path_factory, cache):
    out = tmp_path_factory.mktemp("quality_dry")
    proc = _driver(out, cache, "--pairs", "main,mamba", "--methods", ",".join(METHODS))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return out, proc


@pytest.mark.slow  # the benchmark driver's dry run: ~1 min of subprocesses
def test_dry_run_writes_a_well_formed_table(dry):
    out, proc = dry
    assert "configs of size 'small' validated" in proc.stdout and "[gate] main: PASS" in proc.stdout
    results = json.loads((out / "results.json").read_text())
    rows = {(r["pair"], r["method"]): r for r in results["rows"]}
    assert set(rows) == {("main", m) for m in METHODS} | {("main", "no_transfer")} | {
        ("mamba", m) for m in ("no_transfer", "sft", "semalign_v2", "abl_random_basis")}
    for (pair, method), r in rows.items():
        trained = method != "no_transfer"
        assert r["failed"] == 0 and r["seeds"] == (1 if trained else 0)
        for key in ("target_test_ppl", "general_test_ppl", "target_test_gap", "general_test_change"):
            assert math.isfinite(r[key]), (pair, method, key)
        assert (r["steps"] > 0 and r["tokens"] > 0 and r["wall_s"] > 0) == trained
    for pair in ("main", "mamba"):  # equal budgets: one (steps, tokens) for every trained method of a pair
        assert len({(r["steps"], r["tokens"]) for (p, m), r in rows.items() if p == pair and m != "no_transfer"}) == 1
    assert results["chosen"]["semalign_v2"] == 3e-3 and set(results["gate"]) == {"main", "mamba"}
    table = (out / "table.md").read_text()
    main_table = table.split("(`main`)")[1].split("## ")[0]
    body = [line for line in main_table.splitlines() if line.startswith("| ")]
    assert body[0].startswith("| method | lr | target ppl") and len(body) == 2 + len(METHODS) + 1  # head, teacher
    assert all(line.count("|") == body[0].count("|") for line in body)


@pytest.mark.slow  # the benchmark driver's dry run: ~1 min of subprocesses
def test_dry_run_plots_and_mlflow(dry):
    out, _ = dry
    for name in ("main_gap.png", "mamba_gap.png", "main_stage_losses.png"):
        assert (out / "plots" / name).stat().st_size > 1000
    with sqlite3.connect(out / "mlflow.db") as db:
        names = {row[0] for row in db.execute("select name from runs")}
    assert {"main.semalign_v2", "mamba.abl_random_basis", "benchmark"} <= names
    per_run = list((out / "mlflow").glob("worker*.db"))
    with sqlite3.connect(per_run[0]) as db:
        assert db.execute("select count(*) from metrics where key = 'layer_loss'").fetchone()[0] > 0


@pytest.mark.slow  # the benchmark driver's dry run: ~1 min of subprocesses
def test_gate_refuses_a_weak_teacher(tmp_path, cache, dry):
    proc = _driver(tmp_path, cache, "--pairs", "main", "--methods", "sft", "--min-margin", "0.99")
    assert proc.returncode == 3 and "REFUSED" in proc.stderr
    assert "[gate] main: REFUSED" in proc.stdout and not (tmp_path / "table.md").exists()
    assert not (tmp_path / "runs").exists()


def test_full_mode_and_hidden_mse_through_the_pipeline(tmp_path, tiny_pair):
    """schedule.mode full: one stage, every student layer trained, steps = layers x steps per stage; hidden_mse
    alone trains (its loss falls) with D_T-wide targets into a D_S student through the learned projection."""
    from test_pipeline import semalign, student_weights, write_config

    cfg = write_config(tmp_path, tiny_pair)
    semalign("run", "--config", cfg, "schedule.mode=full", "method.layer_objective=hidden_mse",
             "method.output_objective=none", "method.w_label=0", "schedule.tokens_per_stage=768", "schedule.lr=1e-3")  # 3 steps
    run = tmp_path / "run"
    before = load_file(tiny_pair["student"] / "model.safetensors")
    after = student_weights(run)
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert any(k.startswith("model.layers.0.") for k in changed) and any(k.startswith("model.layers.1.") for k in changed)
    assert all(k.startswith("model.layers.") for k in changed) and set(after) == set(before)  # no projection saved
    with sqlite3.connect(run / "mlflow.db") as db:
        stages = {v for (v,) in db.execute("select value from metrics where key='stage'")}
        layer = [v for (v,) in db.execute("select value from metrics where key='layer_loss' order by step")]
    assert stages == {2.0}  # one stage, id = the last layer
    assert len(layer) == 6 and layer[-1] < layer[0]  # 2 layers x 3 steps; MSE alone: it falls


def test_mamba_adapter_and_fast_scan_match_transformers():
    import transformers as tr
    from transformers.models.mamba import modeling_mamba

    from mamba_scan import selective_scan
    from semalign_ds.models.adapters import get_adapter
    from semalign_ds.models.capture import capture_states

    torch.manual_seed(0)
    model = tr.MambaForCausalLM(tr.MambaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, state_size=4,
                                               tie_word_embeddings=False))
    adapter = get_adapter(model)
    ids_BT = torch.randint(0, 64, (2, 12))
    with capture_states(adapter, {0, 1, 2}) as states:
        logits = model(input_ids=ids_BT, use_cache=False).logits
    assert adapter.num_layers == 2 and states[2].shape == (2, 12, 16)
    assert torch.allclose(adapter.logits(states[2]), logits, atol=1e-5)
    args = [torch.randn(2, 8, 12), torch.randn(2, 8, 12), -torch.rand(8, 4), torch.randn(2, 4, 12),
            torch.randn(2, 4, 12)]
    kw = dict(D=torch.randn(8), z=torch.randn(2, 8, 12), delta_bias=torch.randn(8), delta_softplus=True)
    reference = modeling_mamba.mamba_selective_scan
    assert reference is not selective_scan  # transformers' own loop, not the swapped-in one
    assert torch.allclose(selective_scan(*args, **kw), reference(*args, **kw), atol=1e-5)


@pytest.mark.slow  # ~2 min: 12 spools and 14 runs on the tiny world
def test_codec_quality_dry_run_writes_its_table(tmp_path):
    from test_pipeline import env

    proc = subprocess.run([sys.executable, str(REPO / "bench" / "quality" / "codec.py"), "--dry", "--seeds", "2",
                           "--probe", "--workers", "1", "--out", str(tmp_path)], env=env(), capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = (tmp_path / "results" / "codec" / "table.md").read_text()
    assert "| lossless | " in table and "| r32b8 (default) | " in table
    assert "within the seed spread" in table or "OUTSIDE the seed spread" in table
    probe = table.split("## Probe: geometry only")[1]
    assert "| lossless | " in probe and "| r8b8 | " in probe
    assert (tmp_path / "results" / "codec" / "curve.png").stat().st_size > 1000
