"""Benchmarks for the method math (METHOD.md §2 and §4).

(1) The folded alignment map M x / ||x|| against the naive V-wide path (decompose into V cosine
    coefficients, recompose): time per application, measured ratio and the flop ratio
    V (D_T + D_S) / (D_T D_S). Bases are random unit columns (pinv is not what is timed here).
(2) The relation-geometry loss through the D x D cross-covariance (``cov``) against the T x T
    Gram form (``gram``, vectorised) and the per-sequence reference (``naive``): time of forward
    and forward+backward, and peak extra memory. On CPU each form runs in a fresh subprocess and
    the peak is the growth of the peak RSS (VmHWM, else ru_maxrss) over the footprint after building
    its inputs;
    on CUDA it is torch.cuda.max_memory_allocated above the inputs.

Usage: python bench/method_bench.py [--quick] [--device cpu|cuda] [--threads N] [--repeats R]
Prints markdown tables.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from semalign_ds import throughput  # noqa: E402
from semalign_ds.method import basis, objectives  # noqa: E402

FULL = {"D_T": 4096, "D_S": 2048, "V": 32000, "N": 2048, "T": 4096, "D": 2048}
QUICK = {"D_T": 512, "D_S": 256, "V": 4000, "N": 256, "T": 512, "D": 256}
GEOMETRY_FORMS = {
    "cov": lambda rs, rt: objectives.relation_geometry(rs, rt, form="cov"),
    "gram": lambda rs, rt: objectives.relation_geometry(rs, rt, form="gram"),
    "naive": lambda rs, rt: objectives.relation_geometry_naive(rs, rt),
}


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _best_time(fn, device: str, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def _unit_basis(D: int, V: int, device: str, gen: torch.Generator) -> torch.Tensor:
    S = torch.randn(D, V, generator=gen).to(device)
    return S / S.norm(dim=0, keepdim=True)


def _naive_apply(x_ND: torch.Tensor, S_T: torch.Tensor, S_S: torch.Tensor) -> torch.Tensor:
    """The V-wide path at its best: no id gather (all ids shared), coefficients N x V materialised."""
    coeff_NV = (x_ND / x_ND.norm(dim=-1, keepdim=True)) @ S_T
    return coeff_NV @ S_S.T


def bench_alignment(sz: dict, device: str, repeats: int) -> list[str]:
    gen = torch.Generator().manual_seed(0)
    D_T, D_S, V, N = sz["D_T"], sz["D_S"], sz["V"], sz["N"]
    S_T, S_S = _unit_basis(D_T, V, device, gen), _unit_basis(D_S, V, device, gen)
    ids = torch.arange(V)
    x = torch.randn(1, N, D_T, generator=gen).to(device)
    _sync(device)
    t0 = time.perf_counter()
    M = basis.alignment_map(S_T, S_S, ids, ids)
    _sync(device)
    t_build = time.perf_counter() - t0
    folded = lambda: basis.align(M, x)  # noqa: E731
    naive = lambda: _naive_apply(x[0], S_T, S_S)  # noqa: E731
    err = (folded()[0] - naive()).abs().max().item()
    t_fold, t_naive = _best_time(folded, device, repeats), _best_time(naive, device, repeats)
    expected = V * (D_T + D_S) / (D_T * D_S)
    return [
        f"### Alignment map: D_T {D_T}, D_S {D_S}, V {V}, {N} tokens, fp32, {device}",
        "| path | time per application (s) |",
        "|---|---|",
        f"| folded M x / norm(x) | {t_fold:.4f} |",
        f"| naive V-wide coefficients | {t_naive:.4f} |",
        f"| build M once (D_S x V x D_T) | {t_build:.4f} |",
        "",
        f"measured ratio naive/folded: {t_naive / t_fold:.1f}x; flop ratio V(D_T+D_S)/(D_T D_S) = "
        f"{expected:.1f}x; max abs difference {err:.2e}; coefficient tensor avoided: "
        f"{N * V * 4 / 2**20:.0f} MiB",
    ]


def _geometry_inputs(T: int, D: int, device: str):
    gen = torch.Generator().manual_seed(1)
    rs = torch.randn(1, T, D, generator=gen).to(device).requires_grad_()
    rt = torch.randn(1, T, D, generator=gen).to(device)
    return rs, rt


def _maxrss_mib() -> float:
    return throughput.peak_rss_bytes() / 2**20


def _peak_mib(fn, device: str, base_cpu: float) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - start) / 2**20
    fn()
    return _maxrss_mib() - base_cpu


def geometry_worker(form: str, T: int, D: int, device: str, repeats: int) -> dict:
    """Runs in a fresh process on CPU: peaks first (forward, then forward+backward), then timings."""
    rs, rt = _geometry_inputs(T, D, device)
    loss_fn = GEOMETRY_FORMS[form]

    def fwd():
        with torch.no_grad():
            loss_fn(rs, rt)

    def train():
        rs.grad = None
        loss_fn(rs, rt).backward()

    base = _maxrss_mib()
    peak_fwd = _peak_mib(fwd, device, base)
    peak_train = _peak_mib(train, device, base)
    return {"form": form, "peak_fwd": peak_fwd, "peak_train": peak_train,
            "t_fwd": _best_time(fwd, device, repeats), "t_train": _best_time(train, device, repeats)}


def _run_worker(form: str, T: int, D: int, device: str, repeats: int, threads: int | None) -> dict:
    if device == "cuda":
        return geometry_worker(form, T, D, device, repeats)
    cmd = [sys.executable, __file__, "--_worker", form, "--T", str(T), "--D", str(D),
           "--device", device, "--repeats", str(repeats)]
    if threads:
        cmd += ["--threads", str(threads)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def bench_geometry(sz: dict, device: str, repeats: int, threads: int | None) -> list[str]:
    T, D = sz["T"], sz["D"]
    lines = [f"### Relation geometry: 1 sequence, T {T}, D {D}, fp32, {device}",
             "| form | largest intermediates | fwd (s) | fwd+bwd (s) | peak extra fwd (MiB) | peak extra fwd+bwd (MiB) |",
             "|---|---|---|---|---|---|"]
    sizes = {"cov": f"3 x D x D = {3 * D * D * 4 / 2**20:.0f} MiB",
             "gram": f"2 x T x T = {2 * T * T * 4 / 2**20:.0f} MiB",
             "naive": f"3 x T x T = {3 * T * T * 4 / 2**20:.0f} MiB"}
    for form in GEOMETRY_FORMS:
        r = _run_worker(form, T, D, device, repeats, threads)
        lines.append(f"| {form} | {sizes[form]} | {r['t_fwd']:.3f} | {r['t_train']:.3f} | "
                     f"{r['peak_fwd']:.1f} | {r['peak_train']:.1f} |")
    lines.append("")
    lines.append(f"flops: cov ~ 3 T D^2 = {3 * T * D * D * 2 / 1e9:.1f} GFLOP, gram ~ 2 T^2 D = "
                 f"{2 * T * T * D * 2 / 1e9:.1f} GFLOP (forward); `auto` picks cov when T > D.")
    return lines


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes (seconds)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--repeats", type=int, default=2, help="timed repeats; the best is reported")
    ap.add_argument("--only", choices=["align", "geometry"], default=None)
    ap.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--T", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--D", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args._worker:
        print(json.dumps(geometry_worker(args._worker, args.T, args.D, args.device, args.repeats)))
        return
    sz = QUICK if args.quick else FULL
    print(f"torch {torch.__version__}, device {args.device}, threads {torch.get_num_threads()}, "
          f"repeats {args.repeats} (best reported)\n")
    if args.only in (None, "align"):
        print("\n".join(bench_alignment(sz, args.device, args.repeats)) + "\n")
    if args.only in (None, "geometry"):
        print("\n".join(bench_geometry(sz, args.device, args.repeats, args.threads)))


if __name__ == "__main__":
    main()
