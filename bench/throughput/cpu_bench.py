"""CPU throughput benchmarks (issue 6), each a ratio against a baseline measured in the same run.

(1) Student (student_workers.py): a frontier stage step (StudentStage, layer k trainable) against a full
    fine-tuning step (the same ZeRO-2 engine, loss and batch, every parameter trainable), at k = 1, L/2 and L, for
    the default objective (relation geometry + KL at the output) and a layer-only one. Time: the variants step in
    turn in one process (best and median of R after a warm-up step). Memory: one fresh process per variant, the
    resident high-water mark (VmHWM) reset after the warm-up step; "training memory" is that peak minus the RSS
    before the model was built (weights + optimizer state + gradients + activations).
(2) Teacher: TeacherEngine.emit (forward with state capture, the paired residuals mapped through M, top-k + tail
    of the logits, the packet copied to host) against the bare DeepSpeed ZeRO-3 (parameter offload to CPU) forward
    of the same engine on the same tokens, interleaved; ratio = bare / emission time.
(3) Calibration for `semalign plan --device-profile cpu`: fp32 matmul GFLOP/s and memcpy GB/s on this machine,
    and the forward's efficiency against that matmul peak; then plan's predictions next to the measured figures.

Usage: python bench/throughput/cpu_bench.py [--quick] [--repeats R] [--json PATH]
Run with OMP_NUM_THREADS=1 (the default here) on a quiet machine; prints markdown tables.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import student_workers as sw  # noqa: E402
from common import REPO, build_llama, interleaved, llama_config, time_calls, token_batch, write_json  # noqa: E402

SIZES = {
    # Llama-3.2-1B proportions scaled down 8x in width: tokens/D = 4 and V/D = 62 as for 8k tokens on the 1B
    "full": {"student": dict(layers=8, hidden=256, inter=1024, heads=4, kv_heads=2, vocab=16000, tied=True),
             "teacher": dict(layers=8, hidden=512, inter=1536, heads=8, kv_heads=4, vocab=16000, tied=False),
             "B": 4, "T": 256, "top_k": 64},
    "quick": {"student": dict(layers=2, hidden=32, inter=64, heads=4, kv_heads=2, vocab=128, tied=True),
              "teacher": dict(layers=4, hidden=64, inter=128, heads=4, kv_heads=2, vocab=128, tied=False),
              "B": 2, "T": 16, "top_k": 8},
}
ENV = {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "HF_HUB_OFFLINE": "1",
       "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


# ---- teacher worker (fresh process) ----

def _calibrate(tokens: int, D: int, inter: int) -> dict:
    """fp32 matmul GFLOP/s at the teacher's MLP shape and memcpy GB/s (this process's threads)."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(tokens, D, generator=g), torch.randn(D, inter, generator=g)
    mm = time_calls(lambda: a @ b, "cpu", 10, warmup=1).best  # best of 10: the VM's neighbours only slow it down
    buf = torch.empty(64 * 2**20 // 4)
    out = torch.empty_like(buf)
    cp = time_calls(lambda: out.copy_(buf), "cpu", 10, warmup=1).best
    return {"matmul_gflops": 2 * tokens * D * inter / mm / 1e9, "memcpy_gbps": 2 * buf.numel() * 4 / cp / 1e9}


def teacher_worker(size: dict, repeats: int) -> dict:
    from semalign_ds.engines.ds_config import load_template, teacher_ds_config
    from semalign_ds.engines.teacher import TeacherEngine, import_deepspeed
    from semalign_ds.method.pairing import default_pairing
    from semalign_ds.method.targets import target_recipes

    import_deepspeed("cpu")
    t, s, B, T = size["teacher"], size["student"], size["B"], size["T"]
    calib = _calibrate(B * T, t["hidden"], t["inter"])
    ds = teacher_ds_config(load_template(REPO / "ds_configs" / "teacher_zero3_offload_cpu.json"), offload="cpu",
                           bf16=False, micro_batch=B, world_size=1, device="cpu", hidden_size=t["hidden"])
    teacher = TeacherEngine.wrap(build_llama(llama_config(**t), torch.float32, "cpu", seed=1), ds)
    ids, mask = token_batch(B, T, t["vocab"], "cpu", seed=3)
    recipes = target_recipes(default_pairing(t["layers"], s["layers"]), "layer")
    layers = set().union(*(r.teacher_layers for r in recipes.values()))
    M = torch.randn(s["hidden"], t["hidden"], generator=torch.Generator().manual_seed(4)) / math.sqrt(t["hidden"])
    sample_ids = torch.arange(B)

    @torch.no_grad()
    def bare():
        teacher.engine(input_ids=ids, attention_mask=mask.long(), use_cache=False)

    def emission():
        return teacher.emit(ids, mask, sample_ids, recipes, M, top_k=size["top_k"], tau=1.0, need_logits=True,
                            target_dtype=torch.float32).to("cpu")

    def capture_only():
        teacher.forward_states(ids, mask, layers, need_logits=True)

    timings = interleaved({"bare": bare, "emit": emission, "capture": capture_only}, "cpu", repeats)
    packet = emission()
    after = _calibrate(B * T, t["hidden"], t["inter"])  # again after the timings; keep the better of the two
    calib = {key: max(calib[key], after[key]) for key in calib}
    return {"calibration": calib, "tokens": B * T, "packet_bytes": packet.nbytes(),
            **{name: tm.as_dict() for name, tm in timings.items()}}


# ---- orchestration ----

def _spawn(args: list[str], timeout: float = 1800, malloc_mmap: bool = False) -> dict:
    env = dict(os.environ)
    env.update(ENV)
    if malloc_mmap:  # blocks >= 64 KiB come from mmap and go back to the OS when freed: RSS follows live tensors
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    proc = subprocess.run([sys.executable, __file__, *args], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {args} failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n"
                           f"{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def paired_ratio(a: list[float], b: list[float]) -> float:
    """Median over the interleaved rounds of a_i / b_i: each round's two figures saw the same machine load."""
    return statistics.median(x / y for x, y in zip(a, b))


def run_student(size_name: str, repeats: int, objectives: list[str]) -> dict:
    """Time (interleaved, one process per objective) and memory (one process per variant), and their ratios."""
    out = {}
    for objective in objectives:
        times = _spawn(["--worker", "student-time", "--size", size_name, "--objective", objective,
                        "--repeats", str(repeats)])
        mems = {f"{mode}{k}": _spawn(["--worker", "student-memory", "--size", size_name, "--objective", objective,
                                      "--mode", mode, "--k", str(k)], malloc_mmap=True)
                for mode, k in sw.variants(SIZES[size_name], objective)}
        out[objective] = _student_ratios(objective, times, mems)
    return out


def _student_ratios(objective: str, times: dict, mems: dict) -> dict:
    rows = []
    for name in (n for n in times if n.startswith("stage")):
        k = int(name[5:])
        base = f"full{k}" if f"full{k}" in times else "full1"
        rows.append({"k": k, "baseline": base, **times[name], "full_best_s": times[base]["best_s"],
                     "time_ratio": paired_ratio(times[name]["all_s"], times[base]["all_s"]),
                     "time_ratio_best": times[name]["best_s"] / times[base]["best_s"],
                     "peak_mib": mems[name]["peak_mib"], "full_peak_mib": mems[base]["peak_mib"],
                     "memory_ratio": mems[name]["peak_mib"] / mems[base]["peak_mib"],
                     "trainable_params": mems[name]["trainable_params"],
                     "full_trainable_params": mems[base]["trainable_params"]})
    return {"objective": objective, "times": times, "memory": mems, "stages": rows,
            "mean_time_ratio": sum(r["time_ratio"] for r in rows) / len(rows),
            "max_memory_ratio": max(r["memory_ratio"] for r in rows)}


def run_teacher(size_name: str, repeats: int) -> dict:
    res = _spawn(["--worker", "teacher", "--size", size_name, "--repeats", str(repeats)])
    res["emission_ratio"] = paired_ratio(res["bare"]["all_s"], res["emit"]["all_s"])
    res["emission_ratio_best"] = res["bare"]["best_s"] / res["emit"]["best_s"]
    return res


def predictions(size_name: str, student: dict, teacher: dict) -> dict:
    """The cost model (throughput.py, cpu profile) for the benchmark's shapes next to the measured figures."""
    from semalign_ds.planning import throughput as tp

    size = SIZES[size_name]
    t_shape = tp.ModelShape.from_config(llama_config(**size["teacher"]))
    s_shape = tp.ModelShape.from_config(llama_config(**size["student"]))
    prof, B, T = tp.get_profile("cpu"), size["B"], size["T"]
    t_pass = tp.teacher_pass_seconds(t_shape, B, T, 4, prof, world=1, nodes=1, offload="cpu", dtype="float32")
    out = {"teacher tokens/s": (B * T / t_pass["pass_s"], B * T / teacher["bare"]["best_s"])}
    st = student.get("default")
    if st is None:  # the cost model's student side models the default objective (logits and KL)
        return {name: {"predicted": p, "measured": m, "ratio": p / m} for name, (p, m) in out.items()}
    full = tp.student_memory(s_shape, B, T, 1, 4, 1, size["top_k"], prof, full=True)["total"] / 2**20
    out["full fine-tuning step (s)"] = (tp.student_step_seconds(s_shape, B, T, 1, prof, "float32", full=True),
                                        st["times"]["full1"]["best_s"])
    out["full fine-tuning peak (MiB)"] = (full, st["memory"]["full1"]["peak_mib"])
    for r in st["stages"]:
        mem = tp.student_memory(s_shape, B, T, r["k"], 4, 1, size["top_k"], prof)["total"] / 2**20
        out[f"stage k={r['k']} step (s)"] = (tp.student_step_seconds(s_shape, B, T, r["k"], prof, "float32"),
                                            r["best_s"])
        out[f"stage k={r['k']} peak (MiB)"] = (mem, r["peak_mib"])
    return {name: {"predicted": p, "measured": m, "ratio": p / m} for name, (p, m) in out.items()}


def forward_efficiency(size_name: str, teacher: dict) -> float:
    from semalign_ds.planning import throughput as tp

    size = SIZES[size_name]
    shape = tp.ModelShape.from_config(llama_config(**size["teacher"]))
    flops = tp.forward_flops(shape, size["B"], size["T"])
    return flops / teacher["bare"]["best_s"] / (teacher["calibration"]["matmul_gflops"] * 1e9)


def _student_table(st: dict) -> list[str]:
    lines = [f"Objective `{st['objective']}`:", "",
             "| stage k | step (s) | full step (s) | time ratio (paired median / best) | peak (MiB) | "
             "full peak (MiB) | memory ratio |", "|---|---|---|---|---|---|---|"]
    for r in st["stages"]:
        lines.append(f"| {r['k']} | {r['best_s']:.3f} | {r['full_best_s']:.3f} | {r['time_ratio']:.2f} / "
                     f"{r['time_ratio_best']:.2f} | {r['peak_mib']:.0f} | {r['full_peak_mib']:.0f} | "
                     f"{r['memory_ratio']:.2f} |")
    lines += ["", f"mean time ratio over k {st['mean_time_ratio']:.2f} (goal <= 0.6); worst memory ratio "
              f"{st['max_memory_ratio']:.2f} (goal <= 0.5)", ""]
    return lines


def report(res: dict) -> str:
    lines = ["### Student stage step vs full fine-tuning step", ""]
    for st in res["student"].values():
        lines += _student_table(st)
    te, cal = res["teacher"], res["teacher"]["calibration"]
    lines += ["### Teacher emission vs bare ZeRO-3 offload forward", "", "| path | best (s) | median (s) |",
              "|---|---|---|"]
    for name, label in (("bare", "bare ZeRO-3 forward (baseline)"), ("capture", "forward + state capture"),
                        ("emit", "emission (capture, align through M, top-k, to host)")):
        lines.append(f"| {label} | {te[name]['best_s']:.4f} | {te[name]['median_s']:.4f} |")
    lines += ["", f"emission throughput / bare forward: {te['emission_ratio']:.3f} (median of paired rounds), "
              f"{te['emission_ratio_best']:.3f} (best / best); goal >= 0.95", "",
              f"calibration: fp32 matmul {cal['matmul_gflops']:.1f} GFLOP/s, memcpy {cal['memcpy_gbps']:.1f} GB/s, "
              f"forward efficiency {res['forward_efficiency']:.2f}", "",
              "### plan (cpu profile) against measured", "", "| figure | predicted | measured | predicted/measured |",
              "|---|---|---|---|"]
    for name, pm in res["predictions"].items():
        lines.append(f"| {name} | {pm['predicted']:.4g} | {pm['measured']:.4g} | {pm['ratio']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny shapes (seconds; for tests)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", default=None, help="write all figures here")
    p.add_argument("--objectives", default=",".join(sw.OBJECTIVES), help="student objectives to measure")
    p.add_argument("--worker", choices=["student-time", "student-memory", "teacher"], help=argparse.SUPPRESS)
    p.add_argument("--objective", default="default", help=argparse.SUPPRESS)
    p.add_argument("--size", default="full", help=argparse.SUPPRESS)
    p.add_argument("--mode", default="stage", help=argparse.SUPPRESS)
    p.add_argument("--k", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker == "student-time":
        print(json.dumps(sw.time_worker(SIZES[args.size], args.objective, args.repeats)))
        return 0
    if args.worker == "student-memory":
        print(json.dumps(sw.memory_worker(SIZES[args.size], args.objective, args.mode, args.k)))
        return 0
    if args.worker == "teacher":
        print(json.dumps(teacher_worker(SIZES[args.size], args.repeats)))
        return 0
    size = "quick" if args.quick else "full"
    t0 = time.time()
    res = {"size": size, "shapes": SIZES[size], "repeats": args.repeats, "threads": ENV["OMP_NUM_THREADS"],
           "student": run_student(size, args.repeats, args.objectives.split(",")),
           "teacher": run_teacher(size, args.repeats)}
    res["forward_efficiency"] = forward_efficiency(size, res["teacher"])
    res["predictions"] = predictions(size, res["student"], res["teacher"])
    res["wall_s"] = time.time() - t0
    write_json(args.json, res)
    print(report(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
