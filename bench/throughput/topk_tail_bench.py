"""Top-k + tail over a 262,144-token vocabulary on one CPU thread (engines/teacher.topk_tail), against the head
matmul that makes the logits: one teacher micro-batch of 8 x 150 positions, Gemma 3 270M's shapes (D 640).

    OMP_NUM_THREADS=1 python bench/throughput/topk_tail_bench.py
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from semalign_ds.engines.teacher import topk_tail  # noqa: E402


def main() -> int:
    torch.set_num_threads(1)
    V, N, D, shared = 262144, 8 * 150, 640, 46146
    g = torch.Generator().manual_seed(0)
    z = torch.randn(1, N, V, generator=g)
    ids = torch.randperm(V, generator=g)[:shared].sort().values
    for name, kw in (("whole vocabulary, k=64", {}), (f"{shared:,} shared ids, k=64", {"logit_ids_T": ids})):
        start = time.perf_counter()
        topk_tail(z, 64, 1.0, **kw)
        seconds = time.perf_counter() - start
        print(f"{name}: {seconds:.2f} s for {N} positions = {1e3 * seconds / N:.2f} ms a position")
    w, h = torch.randn(V, D, generator=g), torch.randn(N, D, generator=g)
    start = time.perf_counter()
    h @ w.T
    print(f"the head matmul (N x D by D x V): {time.perf_counter() - start:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
