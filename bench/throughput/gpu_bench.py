"""One prepared GPU run for issue 6 (one H200, under 8 minutes); `--dry` runs the same code paths on the CPU.

Random-initialised Llama-shaped teachers in bf16, 1024-token sequences, every figure measured in this run:
- floors: bf16 matmul peak (8192^3 products) and pinned host->device GB/s (1 GiB copies); per shape and token
  count the compute floor = forward FLOPs / matmul peak, the PCIe floor = weight bytes / H2D, roofline = the max;
- the 8B shape (Llama-3.1-8B) at 16k and 65k tokens per pass: GPU-resident forward, accelerate's cpu_offload
  (16k only), the bare DeepSpeed ZeRO-3 CPU-offload forward (the project's teacher template), the project's
  emission path on the same engine and tokens (TeacherEngine.emit: paired residuals of a Llama-3.2-1B-shaped
  student mapped through M, top-64 + tail, the packet copied to host) and the capture-only forward, interleaved;
  optionally the bare forward with a larger prefetch bucket;
- a 70B-shaped slice (10 of 80 layers, full vocabulary) at 16k tokens, extrapolated to 80 layers by FLOPs.
Ratios printed and written to <out>/gpu_bench.json after every phase (a timeout keeps what was done): emission /
bare forward (goal >= 0.95), roofline / emission (goal >= 0.8), accelerate / emission (goal >= 6), and the
planner's prediction (semalign_ds.planning.throughput, h200 profile) / measured. Phases that would overrun --budget-s are
skipped and listed. `--dry`: tiny shapes, CPU, fp32, the same functions (a check of the script, not a benchmark).

Usage: bash bench/throughput/run_gpu.sh WHEEL_DIR OUT_DIR      (installs DeepSpeed from wheels, then this)
       python bench/throughput/gpu_bench.py --dry --out /tmp/gb  (CPU check, ~1 min)
Legend: B sequences per pass, T tokens per sequence, D hidden, V vocabulary.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from common import REPO, build_llama, interleaved, llama_config, time_calls, token_batch, write_json  # noqa: E402

REAL = {"8b": dict(layers=32, hidden=4096, inter=14336, heads=32, kv_heads=8, vocab=128256, tied=False),
        "70b_slice": dict(layers=10, hidden=8192, inter=28672, heads=64, kv_heads=8, vocab=128256, tied=False),
        "70b_layers": 80, "student": dict(layers=16, hidden=2048), "T": 1024, "batches": [16, 64], "top_k": 64}
DRY = {"8b": dict(layers=4, hidden=64, inter=128, heads=4, kv_heads=2, vocab=256, tied=False),
       "70b_slice": dict(layers=2, hidden=128, inter=256, heads=4, kv_heads=2, vocab=256, tied=False),
       "70b_layers": 8, "student": dict(layers=2, hidden=32), "T": 32, "batches": [2, 4], "top_k": 8}


class Run:
    """Shared state: device, dtype, shapes, the results dict (saved after each phase), the time budget."""

    def __init__(self, args):
        self.dry, self.out, self.t0 = args.dry, Path(args.out), time.time()
        self.device = torch.device("cpu" if args.dry else "cuda")
        self.dtype = torch.float32 if args.dry else torch.bfloat16
        self.sz, self.repeats, self.budget = (DRY if args.dry else REAL), args.repeats, args.budget_s
        self.res = {"dry": self.dry, "device": self._device_name(), "versions": _versions(), "skipped": [],
                    "errors": {}}

    def _device_name(self) -> str:
        return "cpu (dry run)" if self.dry else torch.cuda.get_device_name()

    def left(self) -> float:
        return self.budget - (time.time() - self.t0)

    def phase(self, name: str, need_s: float, fn, *args):
        """Run fn if about need_s seconds are left; record errors and keep going; save results either way."""
        if self.left() < need_s:
            self.res["skipped"].append(f"{name} (needs ~{need_s:.0f} s, {self.left():.0f} s left)")
            log(f"skip {name}: {self.left():.0f} s left")
            return None
        log(f"phase {name} ({self.left():.0f} s left)")
        try:
            return fn(*args)
        except Exception as err:  # one failed phase must not lose the others' figures
            self.res["errors"][name] = f"{type(err).__name__}: {err}\n{traceback.format_exc()[-2000:]}"
            log(f"phase {name} failed: {err}")
            return None
        finally:
            release(self.device)
            self.save()

    def save(self) -> None:
        self.res["elapsed_s"] = time.time() - self.t0
        write_json(self.out / "gpu_bench.json", self.res)


def log(msg: str) -> None:
    print(f"[gpu_bench] {msg}", flush=True)


def _versions() -> dict:
    out = {"torch": torch.__version__}
    for name in ("transformers", "accelerate", "deepspeed"):
        try:
            out[name] = __import__(name).__version__
        except Exception as err:  # reported, not fatal: the phases needing it record their own error
            out[name] = f"missing ({type(err).__name__})"
    return out


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---- floors ----

def floors(run: Run) -> dict:
    n = 256 if run.dry else 8192
    a = torch.randn(n, n, device=run.device, dtype=run.dtype)
    b = torch.randn(n, n, device=run.device, dtype=run.dtype)
    mm = time_calls(lambda: a @ b, run.device, 10, warmup=3).median
    numel = (16 if run.dry else 1024) * 2**20 // 2
    host = torch.empty(numel, dtype=torch.bfloat16, pin_memory=not run.dry)
    dev = torch.empty(numel, dtype=torch.bfloat16, device=run.device)
    cp = time_calls(lambda: dev.copy_(host, non_blocking=True), run.device, 10, warmup=2).median
    out = {"matmul_tflops": 2 * n**3 / mm / 1e12, "h2d_gbps": numel * 2 / cp / 1e9, "matmul_n": n,
           "copy_bytes": numel * 2}
    run.res["floors"] = out
    log(f"floors: matmul {out['matmul_tflops']:.1f} TFLOP/s, host->device {out['h2d_gbps']:.1f} GB/s")
    return out


def roofline(run: Run, shape_kw: dict, B: int, extra_layers: int | None = None) -> dict:
    from semalign_ds.planning.throughput import ModelShape, forward_flops

    shape = ModelShape.from_config(llama_config(**shape_kw))
    f, T = run.res["floors"], run.sz["T"]
    compute = forward_flops(shape, B, T) / (f["matmul_tflops"] * 1e12)
    pcie = shape.total_params * (4 if run.dry else 2) / (f["h2d_gbps"] * 1e9)
    return {"compute_floor_s": compute, "pcie_floor_s": pcie, "roofline_s": max(compute, pcie)}


# ---- one shape ----

def resident(run: Run, shape_kw: dict, batches: list[int]) -> dict:
    model = build_llama(llama_config(**shape_kw), run.dtype, run.device, seed=1)
    out = {}
    for B in batches:
        ids, mask = token_batch(B, run.sz["T"], shape_kw["vocab"], run.device)
        with torch.no_grad():
            tm = time_calls(lambda: model(input_ids=ids, attention_mask=mask.long(), use_cache=False), run.device,
                            run.repeats)
        out[B] = tm.as_dict()
        log(f"  resident B={B}: {tm.median:.3f} s")
    del model
    return out


def accelerate_offload(run: Run, shape_kw: dict, B: int) -> dict:
    from accelerate import cpu_offload
    from accelerate.hooks import remove_hook_from_module

    model = build_llama(llama_config(**shape_kw), run.dtype, run.device, seed=1)
    cpu_offload(model, execution_device=run.device)
    ids, mask = token_batch(B, run.sz["T"], shape_kw["vocab"], run.device)
    with torch.no_grad():
        tm = time_calls(lambda: model(input_ids=ids, attention_mask=mask.long(), use_cache=False), run.device,
                        max(2, run.repeats - 1))
    remove_hook_from_module(model, recurse=True)
    del model
    log(f"  accelerate cpu_offload B={B}: {tm.median:.3f} s")
    return tm.as_dict()


def teacher_engine(run: Run, shape_kw: dict, prefetch: int | None = None):
    from semalign_ds.engines.ds_config import load_template, teacher_ds_config
    from semalign_ds.engines.teacher import TeacherEngine

    template = load_template(REPO / "ds_configs" / "teacher_zero3_offload_cpu.json")
    ds = teacher_ds_config(template, offload="cpu", bf16=not run.dry, micro_batch=max(run.sz["batches"]),
                           world_size=1, device=run.device.type, hidden_size=shape_kw["hidden"])
    if prefetch:
        ds["zero_optimization"]["stage3_prefetch_bucket_size"] = int(prefetch)
    model = build_llama(llama_config(**shape_kw), run.dtype, run.device, seed=1)
    return TeacherEngine.wrap(model, ds), ds


def emission_inputs(run: Run, shape_kw: dict, B: int, student_layers: int):
    from semalign_ds.method.pairing import default_pairing
    from semalign_ds.method.targets import target_recipes

    ids, mask = token_batch(B, run.sz["T"], shape_kw["vocab"], run.device)
    recipes = target_recipes(default_pairing(shape_kw["layers"], student_layers), "layer")
    g = torch.Generator().manual_seed(4)
    M = (torch.randn(run.sz["student"]["hidden"], shape_kw["hidden"], generator=g) / math.sqrt(shape_kw["hidden"]))
    return ids, mask, recipes, M.to(run.device)


def deepspeed_paths(run: Run, shape_kw: dict, batches: list[int], student_layers: int) -> dict:
    """Bare ZeRO-3 offload forward, emission and capture-only forward on one engine, interleaved per B."""
    teacher, ds = teacher_engine(run, shape_kw)
    out = {"ds_config_zero": ds["zero_optimization"]}
    for B in batches:
        ids, mask, recipes, M = emission_inputs(run, shape_kw, B, student_layers)
        layers = set().union(*(r.teacher_layers for r in recipes.values()))
        target_dtype = run.dtype

        def bare():
            with torch.no_grad():
                teacher.engine(input_ids=ids, attention_mask=mask.long(), use_cache=False)

        def emission():
            packet = teacher.emit(ids, mask, torch.arange(B), recipes, M, top_k=run.sz["top_k"], tau=1.0,
                                  need_logits=True, target_dtype=target_dtype)
            return packet.to("cpu")  # the copy off the device into the transport

        def capture():
            teacher.forward_states(ids, mask, layers, need_logits=True)

        tms = interleaved({"bare": bare, "emit": emission, "capture": capture}, run.device, run.repeats)
        out[B] = {name: tm.as_dict() for name, tm in tms.items()}
        out[B]["packet_bytes"] = emission().nbytes()
        log(f"  deepspeed B={B}: bare {tms['bare'].median:.3f} s, emit {tms['emit'].median:.3f} s, "
            f"capture {tms['capture'].median:.3f} s")
    teacher.engine.destroy()
    del teacher
    return out


def deepspeed_tuned(run: Run, shape_kw: dict, B: int, prefetch: int) -> dict:
    teacher, _ = teacher_engine(run, shape_kw, prefetch=prefetch)
    ids, mask = token_batch(B, run.sz["T"], shape_kw["vocab"], run.device)
    with torch.no_grad():
        tm = time_calls(lambda: teacher.engine(input_ids=ids, attention_mask=mask.long(), use_cache=False),
                        run.device, run.repeats)
    teacher.engine.destroy()
    del teacher
    log(f"  deepspeed prefetch {prefetch:.0e} B={B}: {tm.median:.3f} s")
    return {"prefetch_bucket_size": prefetch, "B": B, **tm.as_dict()}


# ---- ratios ----

def _planned_pass(run: Run, shape_kw: dict, B: int) -> float:
    from semalign_ds.planning import throughput as tp

    shape = tp.ModelShape.from_config(llama_config(**shape_kw))
    prof = tp.get_profile("cpu" if run.dry else "h200")
    dtype = "float32" if run.dry else "bfloat16"
    return tp.teacher_pass_seconds(shape, B, run.sz["T"], 4 if run.dry else 2, prof, world=1, nodes=1,
                                   offload="cpu", dtype=dtype)["pass_s"]


def summarise(run: Run, shape_kw: dict, r: dict) -> dict:
    rows = {}
    for B, ds in ((B, v) for B, v in r.get("deepspeed", {}).items() if isinstance(B, int)):
        emit, bare = ds["emit"]["median_s"], ds["bare"]["median_s"]
        row = {"tokens": B * run.sz["T"], "ds_bare_s": bare, "emit_s": emit, "capture_s": ds["capture"]["median_s"],
               **roofline(run, shape_kw, B), "emission_vs_bare": bare / emit,
               "teacher_tokens_per_s": B * run.sz["T"] / emit, "plan_pass_s": _planned_pass(run, shape_kw, B)}
        row["emission_vs_roofline"] = row["roofline_s"] / emit
        row["plan_vs_measured_bare"] = row["plan_pass_s"] / bare
        if B in r.get("resident", {}):
            row["resident_s"] = r["resident"][B]["median_s"]
        if r.get("accelerate") and r["accelerate"]["B"] == B:
            row["accelerate_s"] = r["accelerate"]["median_s"]
            row["accelerate_vs_emission"] = row["accelerate_s"] / emit
        rows[B] = row
    return rows


def extrapolate(run: Run, shape_kw: dict, rows: dict) -> dict:
    """A slice of n layers -> the whole model (70b_layers) by forward FLOPs; roofline from the measured floors."""
    from semalign_ds.planning.throughput import ModelShape, forward_flops

    full_kw = {**shape_kw, "layers": run.sz["70b_layers"]}
    full = ModelShape.from_config(llama_config(**full_kw))
    out = {}
    for B, row in rows.items():
        factor = forward_flops(full, B, run.sz["T"]) / forward_flops(
            ModelShape.from_config(llama_config(**shape_kw)), B, run.sz["T"])
        roof = roofline(run, full_kw, B)
        out[B] = {"flops_factor": factor, "tokens_per_s": row["tokens"] / (row["emit_s"] * factor),
                  "roofline_tokens_per_s": row["tokens"] / roof["roofline_s"], **roof}
    return out


def measure_shape(run: Run, name: str, batches: list[int], student_layers: int, accelerate: bool,
                  tuned_prefetch: int | None) -> None:
    shape_kw = run.sz[name]
    r = run.res.setdefault(name, {"shape": shape_kw, "batches": batches})
    big = 1.0 if run.dry else (60.0 if name == "8b" else 80.0)
    r["resident"] = run.phase(f"{name}: GPU-resident forward", big, resident, run, shape_kw, batches) or {}
    if accelerate:
        acc = run.phase(f"{name}: accelerate cpu_offload", 1.5 * big, accelerate_offload, run, shape_kw, batches[0])
        r["accelerate"] = {"B": batches[0], **acc} if acc else None
    r["deepspeed"] = run.phase(f"{name}: DeepSpeed bare / emission / capture", 2 * big, deepspeed_paths, run,
                               shape_kw, batches, student_layers) or {}
    if tuned_prefetch:
        r["deepspeed_tuned"] = run.phase(f"{name}: DeepSpeed larger prefetch", big, deepspeed_tuned, run, shape_kw,
                                         batches[0], tuned_prefetch)
    r["summary"] = summarise(run, shape_kw, r)
    if name == "70b_slice":
        r["extrapolated"] = extrapolate(run, shape_kw, r["summary"])
    run.save()


def report(run: Run) -> str:
    lines = [f"device: {run.res['device']}; versions: {run.res['versions']}", f"floors: {run.res.get('floors')}", "",
             "| shape | tokens/pass | resident s | accelerate s | DS bare s | emission s | compute floor s | "
             "PCIe floor s | emit/bare | roofline/emit | accel/emit | plan/meas |", "|" + "---|" * 12]
    for name in ("8b", "70b_slice"):
        for B, row in run.res.get(name, {}).get("summary", {}).items():
            cells = [row.get("resident_s"), row.get("accelerate_s"), row["ds_bare_s"], row["emit_s"],
                     row["compute_floor_s"], row["pcie_floor_s"], row["emission_vs_bare"],
                     row["emission_vs_roofline"], row.get("accelerate_vs_emission"), row["plan_vs_measured_bare"]]
            lines.append(f"| {name} | {row['tokens']:,} | " + " | ".join("-" if c is None else f"{c:.3f}"
                                                                           for c in cells) + " |")
    for B, ex in run.res.get("70b_slice", {}).get("extrapolated", {}).items():
        lines.append(f"\n70B extrapolated (x{ex['flops_factor']:.1f} FLOPs), {B * run.sz['T']:,} tokens/pass: "
                     f"{ex['tokens_per_s']:,.0f} tokens/s against a roofline of {ex['roofline_tokens_per_s']:,.0f}")
    if run.res["skipped"] or run.res["errors"]:
        lines.append(f"\nskipped: {run.res['skipped']}; errors in: {list(run.res['errors'])}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry", action="store_true", help="tiny shapes on the CPU: checks the script, measures nothing")
    p.add_argument("--out", default=os.environ.get("OUT", "gpu_bench_out"), help="folder for gpu_bench.json")
    p.add_argument("--budget-s", type=float, default=None, help="skip phases past this (default 420; dry 600)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-slice", action="store_true", help="skip the 70B-shaped slice")
    p.add_argument("--no-accelerate", action="store_true", help="skip accelerate's cpu_offload baseline")
    p.add_argument("--tuned-prefetch", type=float, default=5e8, help="prefetch bucket for the tuned DS run (0: off)")
    args = p.parse_args(argv)
    args.budget_s = args.budget_s or (600.0 if args.dry else 420.0)
    if not args.dry and not torch.cuda.is_available():
        raise SystemExit("gpu_bench: no CUDA device; run with --dry to check the script on the CPU")
    from semalign_ds.cluster.distributed import setup_env

    setup_env(("cpu" if args.dry else "cuda"))
    run = Run(args)
    if run.phase("floors", 5, floors, run) is None:
        print(report(run))
        return 1
    small = run.sz["batches"][:1]
    measure_shape(run, "8b", run.sz["batches"], run.sz["student"]["layers"], not args.no_accelerate,
                  int(args.tuned_prefetch) or None)
    if not args.no_slice:
        slice_students = max(1, round(run.sz["student"]["layers"] * run.sz["70b_slice"]["layers"]
                                      / run.sz["70b_layers"]))
        measure_shape(run, "70b_slice", small, slice_students, not args.no_accelerate, None)
    print(report(run))
    return 0 if not run.res["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
