"""Time and peak memory of the semantic bases and the alignment map for real heads (planning/throughput.map_build).

    python bench/throughput/map_build_bench.py --teacher gemma3-270m --student smollm2 [--device cpu]
    python bench/throughput/map_build_bench.py --teacher gemma3-270m --student /path/to/hf/folder

Each measurement runs in a fresh subprocess (its VmHWM starts at exec): the process loads the two heads
(float32), then builds (1) the teacher's output basis, (2) the student's, (3) the shared vocabulary by token
surface and M = S_S S_T^T over it, exactly as run/supervision.build_map does without the cache. Peak memory is
reported above the process's footprint after loading the heads (what the build adds). Prints one JSON line per
step and the cost model's figures for the same shapes.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


def _folder(name: str) -> str:
    from semalign_ds.demo import real_models

    return str(real_models.fetch(name)) if name in real_models.CATALOGUE else name


def _head(folder: str):
    """The LM head (V x D, float32): lm_head.weight, or the tied input embedding."""
    from safetensors import safe_open

    with safe_open(str(Path(folder) / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        tied = next(k for k in keys if k.endswith("embed_tokens.weight"))
        name = "lm_head.weight" if "lm_head.weight" in keys else tied
        return f.get_tensor(name).float()


def _child(args) -> None:
    import torch
    from transformers import AutoTokenizer

    from semalign_ds.method import basis
    from semalign_ds.planning.throughput import peak_rss_bytes

    torch.set_num_threads(args.threads)
    heads = {"teacher": _head(args.teacher), "student": _head(args.student)}
    tokenizers = {k: AutoTokenizer.from_pretrained(getattr(args, k)) for k in heads}
    base = peak_rss_bytes()
    start = time.perf_counter()
    if args.step in ("teacher", "student"):
        S = basis.output_basis(heads[args.step].to(args.device))
        shape = list(S.shape)
    else:
        S_T, S_S = (basis.output_basis(heads[k].to(args.device)) for k in ("teacher", "student"))
        base, start = peak_rss_bytes(), time.perf_counter()  # the map alone, after both bases exist
        ids_T, ids_S = basis.shared_vocabulary(tokenizers["teacher"], tokenizers["student"], 1)
        M = basis.alignment_map(S_T, S_S, ids_T, ids_S)
        shape = list(M.shape) + [int(ids_T.numel())]
    seconds = time.perf_counter() - start
    print(json.dumps({"step": args.step, "seconds": round(seconds, 2), "shape": shape,
                      "added_peak_gib": round((peak_rss_bytes() - base) / 2**30, 3),
                      "process_peak_gib": round(peak_rss_bytes() / 2**30, 3)}))


def _model_figures(teacher: str, student: str, shared: int) -> dict:
    from transformers import AutoConfig

    from semalign_ds.planning.throughput import PROFILES, ModelShape, map_build

    shapes = [ModelShape.from_config(AutoConfig.from_pretrained(f)) for f in (teacher, student)]
    got = map_build(shapes[0], shapes[1], shared, PROFILES["cpu"])
    return {"seconds": round(got["seconds"], 1), "peak_gib": round(got["peak_bytes"] / 2**30, 3)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="gemma3-270m")
    p.add_argument("--student", default="smollm2")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--step", choices=["teacher", "student", "map"], default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.teacher, args.student = _folder(args.teacher), _folder(args.student)
    if args.step:
        _child(args)
        return 0
    results = []
    for step in ("teacher", "student", "map"):
        out = subprocess.run([sys.executable, __file__, "--teacher", args.teacher, "--student", args.student,
                              "--device", args.device, "--threads", str(args.threads), "--step", step],
                             capture_output=True, text=True, check=True)
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(json.dumps(results[-1]), flush=True)
    print(json.dumps({"cost_model": _model_figures(args.teacher, args.student, results[-1]["shape"][-1])}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
