"""Shared helpers of the engine tests and their torchrun workers: tiny models, the environment, launching.

Workers (tests/workers/*_worker.py) run under `torchrun --nproc_per_node N`; each writes its results as JSON
to <out>/rank{r}.json, and the test reads them back. Every worker arms faulthandler so a collective hang dumps
its stacks and exits instead of blocking the test (the subprocess also has a timeout).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

WORKERS = Path(__file__).resolve().parent
REPO = WORKERS.parents[1]
DS_CONFIGS = REPO / "ds_configs"
_WARM = {"done": False}

TEST_ENV = {
    "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def tiny_llama(seed: int = 0, layers: int = 4, hidden: int = 32, vocab: int = 128):
    """A tiny LlamaForCausalLM (fp32, eval mode) with seeded random weights; no download."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def batch(seed: int, B: int = 2, T: int = 12, vocab: int = 128):
    """(ids_BT, mask_BT) with the last tokens of row 1 masked as padding."""
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[-1, T - 3:] = False
    return ids, mask


def child_env() -> dict:
    """This environment for a worker: the test variables, and DeepSpeed's ops in this environment's own folder
    (TORCH_EXTENSIONS_DIR as the user set it, else extensions.default_dir: never another user's home)."""
    from semalign_ds.cluster.extensions import default_dir

    env = dict(os.environ)
    env.update(TEST_ENV)
    env.setdefault("TORCH_EXTENSIONS_DIR", str(default_dir("cpu")))
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(WORKERS)] + [p for p in [env.get("PYTHONPATH")] if p])
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    return env


def warm_deepspeed() -> None:
    """JIT-compile DeepSpeed's shm comm op once, in a single process, before any multi-rank run (the setup
    script's own build step: stale build locks cleared, no rendezvous, so no port)."""
    if _WARM["done"]:
        return
    cmd = [sys.executable, "-m", "semalign_ds.cluster.extensions"]
    proc = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"DeepSpeed warm-up failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    _WARM["done"] = True


def run_workers(script: str, nproc: int, out_dir: Path, args: list[str], timeout: float = 120.0) -> list[dict]:
    """torchrun `script` on nproc CPU ranks; return each rank's JSON result (rank order)."""
    warm_deepspeed()
    out_dir.mkdir(parents=True, exist_ok=True)
    torchrun = Path(sys.executable).with_name("torchrun")
    # --standalone: torchrun binds a port the OS picks (no fixed port, and no race for a port picked beforehand)
    cmd = [str(torchrun), "--standalone", "--nproc_per_node", str(nproc),
           str(WORKERS / script), "--out", str(out_dir), *args]
    proc = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{script} x{nproc} failed (rc {proc.returncode}):\n"
                             f"{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(nproc)]


# ---- worker side ----

def worker_start(hang_timeout: float = 90.0):
    """In a worker: arm the hang dump, parse --out and the rest; return (out_dir, remaining args)."""
    import argparse
    import faulthandler

    faulthandler.dump_traceback_later(hang_timeout, exit=True)
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    known, rest = parser.parse_known_args()
    Path(known.out).mkdir(parents=True, exist_ok=True)
    return Path(known.out), rest


def worker_finish(out_dir: Path, result: dict) -> None:
    """Write this rank's result atomically (rank from the launch environment)."""
    rank = int(os.environ.get("RANK", "0"))
    tmp = out_dir / f".rank{rank}.json.tmp"
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, out_dir / f"rank{rank}.json")
