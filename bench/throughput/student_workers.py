"""Student-side workers of cpu_bench.py: a frontier stage step against a full fine-tuning step.

Both run the same ZeRO-2 engine, loss and batch; the baseline makes every parameter trainable (embeddings and
head included). Time: one process builds every variant on its own copy of the model and steps them in turn
(a, b, c, a, b, c, ...) so the shared machine's load hits each alike. Memory: one fresh process per variant,
glibc told to return large blocks to the OS at once (MALLOC_MMAP_THRESHOLD_, set by the parent) so the resident
high-water mark follows live tensors; the mark is reset after the warm-up step and read after the measured steps.
"Training memory" = that peak minus the RSS before the model was built.
Legend: B batch, T tokens, D hidden, V vocabulary, k the frontier layer.
"""
from __future__ import annotations

import gc

import torch

from common import (REPO, build_llama, interleaved, llama_config, mib, proc_status_kib, reset_peak_rss,
                    student_packet, time_calls)

OBJECTIVES = {
    "default": {},  # relation geometry on layer k + KL to the teacher's top-k at the output
    "layer_only": {"w_out": 0.0},  # relation geometry on layer k alone: the forward stops after layer k
}


def full_finetune_class():
    from semalign_ds.engines.student import StudentStage

    class FullFinetune(StudentStage):
        """Baseline: the same engine, loss and batch with every parameter trainable (a full fine-tuning step)."""

        def _make_trainable(self, *args):
            self.model.requires_grad_(True)
            return list(self.model.parameters())

    return FullFinetune


def _setup(size: dict):
    from semalign_ds.engines.ds_config import load_template, student_ds_config
    from semalign_ds.engines.teacher import import_deepspeed

    import_deepspeed("cpu")
    s = size["student"]
    return student_ds_config(load_template(REPO / "ds_configs" / "student_zero2.json"), bf16=False,
                             micro_batch=size["B"], grad_accum=1, world_size=1, grad_clip=1.0, hidden_size=s["hidden"])


def _stage(size: dict, ds: dict, objective: str, mode: str, k: int, seed: int = 0):
    from semalign_ds.engines.student import ObjectiveSpec, StudentStage

    cls = full_finetune_class() if mode == "full" else StudentStage
    model = build_llama(llama_config(**size["student"]), torch.float32, "cpu", seed=seed)
    return cls(model, k, ds_config=ds, lr=1e-4, warmup_steps=0, total_steps=1000, weight_decay=0.0,
               objective=ObjectiveSpec(**OBJECTIVES[objective]))


def _packet(size: dict, k: int):
    s = size["student"]
    return student_packet(size["B"], size["T"], s["hidden"], s["vocab"], size["top_k"], [k])


def _warm_engine(ds: dict) -> None:
    """Build, step and destroy a stage on a 1-layer model so the measured process is past DeepSpeed's imports."""
    tiny = {"student": dict(layers=1, hidden=8, inter=16, heads=2, kv_heads=1, vocab=32, tied=True), "B": 1, "T": 4,
            "top_k": 4}
    stage = _stage(tiny, {**ds, "train_micro_batch_size_per_gpu": 1, "train_batch_size": 1}, "default", "stage", 1)
    stage.step(_packet(tiny, 1))
    stage.finish()
    del stage
    gc.collect()


def memory_worker(size: dict, objective: str, mode: str, k: int, steps: int = 2) -> dict:
    """Peak training memory of one variant (fresh process)."""
    ds = _setup(size)
    packet = _packet(size, k)
    _warm_engine(ds)
    base = proc_status_kib("VmRSS")
    stage = _stage(size, ds, objective, mode, k)
    stage.step(packet)  # warm-up: creates the optimizer state
    steady = proc_status_kib("VmRSS")
    reset_ok = reset_peak_rss()
    time_calls(lambda: stage.step(packet), "cpu", steps, warmup=0)
    peak = proc_status_kib("VmHWM")
    trainable = sum(p.numel() for p in stage.trainable_parameters)
    stage.finish()
    return {"objective": objective, "mode": mode, "k": k, "trainable_params": trainable, "base_rss_mib": mib(base),
            "steady_mib": mib(steady - base), "peak_mib": mib(peak - base), "peak_reset": reset_ok}


def variants(size: dict, objective: str) -> list[tuple[str, int]]:
    """(mode, k) pairs measured: stages at k = 1, L/2, L; the full baseline once (default objective: the layer
    term's position changes nothing in a full step) or at each k (layer only: the full step also stops at k)."""
    L = size["student"]["layers"]
    ks = sorted({1, max(1, L // 2), L})
    fulls = [("full", 1)] if objective == "default" else [("full", k) for k in ks]
    return fulls + [("stage", k) for k in ks]


def time_worker(size: dict, objective: str, repeats: int) -> dict:
    """Seconds per step of every variant, interleaved in one process (best and median of `repeats`)."""
    ds = _setup(size)
    runs = {}
    for mode, k in variants(size, objective):
        stage, packet = _stage(size, ds, objective, mode, k), _packet(size, k)
        runs[f"{mode}{k}"] = (lambda st=stage, pk=packet: st.step(pk))
    timings = interleaved(runs, "cpu", repeats)
    return {name: tm.as_dict() for name, tm in timings.items()}
