"""Helpers of the transport tests: deterministic packets, and launching ranks as plain processes.

Ranks are started directly (RANK / WORLD_SIZE / MASTER_* in the environment), not by torchrun, so that when one
is killed the others are not torn down by the launcher: the test sees how each survivor fails on its own.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from engines_common import WORKERS, child_env


def stream_packet(stage: int, index: int, student: int, rows: int = 2, T: int = 6, D: int = 8, K: int = 3):
    """A packet whose every tensor is a function of (stage, micro-batch index, student): bf16 target for the
    stage's layer, float32 top-k values, int64 ids (int32 on the wire)."""
    import torch

    from semalign_ds.transport.packet import SupervisionPacket

    g = torch.Generator().manual_seed(10_000 * stage + 100 * index + student)
    mask = torch.ones(rows, T, dtype=torch.bool)
    mask[-1, -1] = False
    return SupervisionPacket(
        ids_BT=torch.randint(0, 500, (rows, T), generator=g), mask_BT=mask,
        sample_ids_B=torch.arange(rows) + 1000 * index + student,
        targets={stage: torch.randn(rows, T, D + stage, generator=g).to(torch.bfloat16)},
        top_values_BTK=torch.randn(rows, T, K, generator=g),
        top_idx_BTK=torch.randint(0, 500, (rows, T, K), generator=g),
        tail_BT=torch.rand(rows, T, generator=g))


def packet_digest(packet) -> str:
    from semalign_ds.transport import schema

    flat = schema.packet_to_flat(packet)
    return schema.tensor_digest(*(flat[name] for name in sorted(flat)))


def launch(script: str, world: int, out_dir: Path, args: list[str]) -> list[subprocess.Popen]:
    """Start `world` ranks of tests/workers/<script> as separate processes of one gloo world."""
    from semalign_ds.cluster.launch import free_port

    out_dir.mkdir(parents=True, exist_ok=True)
    port = str(free_port())
    procs = []
    for rank in range(world):
        env = child_env()
        env.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=port)
        log = open(out_dir / f"rank{rank}.log", "w")
        procs.append(subprocess.Popen([sys.executable, str(WORKERS / script), "--out", str(out_dir), *args],
                                      env=env, stdout=log, stderr=subprocess.STDOUT))
    return procs


def wait_all(procs: list[subprocess.Popen], timeout: float) -> tuple[list[int], float]:
    """(return codes, seconds until the last exited); kills stragglers after `timeout`."""
    t0 = time.monotonic()
    codes = []
    for proc in procs:
        try:
            codes.append(proc.wait(timeout=max(1.0, timeout - (time.monotonic() - t0))))
        except subprocess.TimeoutExpired:
            proc.kill()
            codes.append(proc.wait())
    return codes, time.monotonic() - t0


def results(out_dir: Path, world: int) -> list[dict | None]:
    files = [out_dir / f"rank{r}.json" for r in range(world)]
    return [json.loads(f.read_text()) if f.is_file() else None for f in files]


def log_of(out_dir: Path, rank: int) -> str:
    path = out_dir / f"rank{rank}.log"
    return path.read_text()[-4000:] if path.is_file() else ""


def kill_self() -> None:
    os.kill(os.getpid(), 9)
