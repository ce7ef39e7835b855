"""`semalign demo`: build (or reuse) the stdlib teacher/student pair, run SemAlign on configs/demo.yaml, and print
held-out perplexity on the target domain (English documentation) and the general part (code) for the student
before, the student after, and the teacher, with the teacher's margin and the share of the gap closed.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import torch
import yaml

from semalign_ds import config as cfgmod

REPO_ROOT = Path(__file__).resolve().parent.parent
DEMO_CONFIG = REPO_ROOT / "configs" / "demo.yaml"
TINY_OVERRIDES = ["data.max_sequences=64", "data.seq_len=64", "data.micro_batch_size=8",
                  "schedule.steps_per_stage=4", "runtime.checkpoint_every=2", "eval.max_sequences=16",
                  "method.min_shared_tokens=100", "method.top_k=16", "pairing.attribution_batches=1"]


def demo_config(assets, scale: str, overrides: list[str]) -> cfgmod.RunConfig:
    raw = yaml.safe_load(DEMO_CONFIG.read_text())
    raw["teacher"]["path"] = str(assets.teacher_path)
    raw["student"]["path"] = str(assets.student_path)
    raw["data"]["path"] = str(assets.transfer_jsonl)
    raw.setdefault("eval", {})["sets"] = {"target": str(assets.target_test_jsonl),
                                          "general": str(assets.general_test_jsonl)}
    extra = TINY_OVERRIDES if scale == "tiny" else []
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


def main(scale: str = "default", cache_dir: str | None = None, overrides: list[str] = ()) -> int:
    from semalign_ds import guard, pipeline, versions
    from semalign_ds.demo import build_demo_assets

    versions.check()
    start = time.perf_counter()
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    assets = build_demo_assets(cache_dir=cache_dir, device="cpu", progress=True, scale=scale)
    built = time.perf_counter() - start
    cfg = demo_config(assets, scale, list(overrides))
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
