"""Helpers shared by the throughput benchmarks: timing, peak memory, Llama-shaped models, synthetic batches.

Peak host memory is read from /proc/self/status (VmHWM = the process's resident high-water mark) after resetting
it with /proc/self/clear_refs ("5"), so a figure covers exactly the code between reset and read; each benchmark
that reports memory runs in a fresh subprocess so nothing else shares its heap.
Legend: B batch, T tokens, D hidden, V vocabulary, K top-k; ids_BT int64, mask_BT bool (True = real token).
"""
from __future__ import annotations

import json
import re
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]


# ---- memory ----

def proc_status_kib(field: str) -> int:
    """A kB field of /proc/self/status (VmRSS, VmHWM, ...); 0 where /proc is not available."""
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return 0
    match = re.search(rf"^{field}:\s+(\d+) kB", text, re.M)
    return int(match.group(1)) if match else 0


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where the kernel refuses."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def mib(kib: int) -> float:
    return kib / 1024.0


# ---- timing ----

def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


@dataclass
class Timing:
    seconds: list[float]

    @property
    def best(self) -> float:
        return min(self.seconds)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    def as_dict(self) -> dict:
        return {"best_s": self.best, "median_s": self.median, "all_s": self.seconds}


def time_calls(fn, device, repeats: int, warmup: int = 1) -> Timing:
    """Wall time of `fn()` per call (device synchronised), after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - t0)
    return Timing(out)


def interleaved(fns: dict, device, repeats: int, warmup: int = 1) -> dict[str, Timing]:
    """Time several callables in turn (a, b, a, b, ...) so slow drifts of the machine hit each alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    out = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            out[name].append(time.perf_counter() - t0)
    return {name: Timing(v) for name, v in out.items()}


# ---- models and batches ----

def llama_config(layers: int, hidden: int, inter: int, heads: int, kv_heads: int, vocab: int, tied: bool,
                 max_positions: int = 4096):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=max_positions,
                       tie_word_embeddings=tied, eos_token_id=0, bos_token_id=0, pad_token_id=0)


def build_llama(config, dtype: torch.dtype, device: str | torch.device, seed: int = 0):
    """A random-initialised LlamaForCausalLM built directly on `device` in `dtype` (eval mode, frozen): no float32
    copy of the weights ever exists (an 8B model is 16 GB in bf16)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.requires_grad_(False)
    return model.eval()


def token_batch(B: int, T: int, vocab: int, device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids_BT, mask_BT): random ids, every position real (packed sequences)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (B, T), generator=g)
    return ids.to(device), torch.ones(B, T, dtype=torch.bool, device=device)


def student_packet(B: int, T: int, D: int, V: int, top_k: int, layers, seed: int = 0):
    """A SupervisionPacket with random targets for `layers` and teacher top-k from random logits (CPU)."""
    from semalign_ds.method.objectives import teacher_topk
    from semalign_ds.transport.packet import SupervisionPacket

    g = torch.Generator().manual_seed(seed)
    ids, mask = token_batch(B, T, V, "cpu", seed)
    targets = {k: torch.randn(B, T, D, generator=g) for k in layers}
    values, idx, tail = teacher_topk(3.0 * torch.randn(B, T, V, generator=g), top_k, 1.0)
    return SupervisionPacket(ids_BT=ids, mask_BT=mask, sample_ids_B=torch.arange(B), targets=targets,
                             top_values_BTK=values, top_idx_BTK=idx, tail_BT=tail)


def write_json(path: str | Path | None, data: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(data, indent=1, default=float))
