"""The throughput benchmarks run and write well-formed figures: the GPU benchmark in --dry mode (the same code paths
on the CPU, tiny shapes) and the CPU benchmark in --quick mode. Checks shape and sign, never timings."""
from __future__ import annotations

import pytest

import json
import math
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench" / "throughput"


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                              "MASTER_PORT")}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               PYTHONPATH=str(REPO))
    return env


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *args], env=_env(), capture_output=True, text=True, timeout=timeout,
                          cwd=REPO)
    assert proc.returncode == 0, f"{args} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-4000:]}"
    return proc


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_gpu_bench_dry_run_writes_every_ratio(tmp_path):
    proc = _run([str(BENCH / "gpu_bench.py"), "--dry", "--out", str(tmp_path), "--repeats", "2"], timeout=400)
    res = json.loads((tmp_path / "gpu_bench.json").read_text())
    assert res["dry"] and not res["errors"] and not res["skipped"]
    assert _positive(res["floors"]["matmul_tflops"]) and _positive(res["floors"]["h2d_gbps"])
    rows = res["8b"]["summary"]
    assert sorted(int(b) for b in rows) == [2, 4]
    for row in rows.values():
        for key in ("ds_bare_s", "emit_s", "capture_s", "resident_s", "compute_floor_s", "pcie_floor_s",
                    "emission_vs_bare", "emission_vs_roofline", "teacher_tokens_per_s", "plan_vs_measured_bare"):
            assert _positive(row[key]), key
    assert _positive(rows["2"]["accelerate_vs_emission"]) and "accelerate_s" not in rows["4"]
    assert _positive(res["8b"]["deepspeed_tuned"]["median_s"])
    assert all(_positive(r["packet_bytes"]) for b, r in res["8b"]["deepspeed"].items() if b.isdigit())
    (extra,) = res["70b_slice"]["extrapolated"].values()
    assert _positive(extra["tokens_per_s"]) and _positive(extra["roofline_tokens_per_s"]) and extra["flops_factor"] > 1
    assert "| 8b | 64 |" in proc.stdout and "70B extrapolated" in proc.stdout


@pytest.mark.slow  # ~50 s of benchmark processes: `pytest -m slow` runs it
def test_cpu_bench_quick_writes_student_and_teacher_ratios(tmp_path):
    out = tmp_path / "cpu.json"
    proc = _run([str(BENCH / "cpu_bench.py"), "--quick", "--repeats", "1", "--objectives", "default",
                 "--json", str(out)], timeout=600)
    res = json.loads(out.read_text())
    student = res["student"]["default"]
    assert [r["k"] for r in student["stages"]] == [1, 2]
    for r in student["stages"]:
        assert _positive(r["time_ratio"]) and _positive(r["memory_ratio"]) and r["peak_mib"] > 0
        assert r["trainable_params"] < r["full_trainable_params"]  # one layer against the whole model
    assert all(m["peak_reset"] for m in student["memory"].values())
    teacher = res["teacher"]
    assert _positive(teacher["emission_ratio"]) and _positive(teacher["packet_bytes"])
    assert _positive(teacher["calibration"]["matmul_gflops"]) and _positive(res["forward_efficiency"])
    assert all(_positive(p["predicted"]) and _positive(p["measured"]) for p in res["predictions"].values())
    assert "Teacher emission vs bare ZeRO-3 offload forward" in proc.stdout
