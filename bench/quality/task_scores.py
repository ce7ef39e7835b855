"""Scores of models on the shipped task stdlib_keyword, with 95% confidence intervals (acc +- 1.96 stderr).

    python bench/quality/task_scores.py gemma3-270m smollm2 demo-student demo-teacher [--limit N] [--out FILE]
A name is a real_models.CATALOGUE entry, `demo-student` / `demo-teacher` (the demo world's cached models), or a
Hugging Face folder. Uses keyword_task.score_items (equal to lm-eval's per choice: tests/test_keyword_task.py),
which asks a model for the continuation's logits only, so a 262k-vocabulary model scores in minutes on a CPU;
`semalign eval <checkpoint> --tasks stdlib_keyword --out DIR` gives the same numbers
through lm-eval.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


def resolve(name: str) -> str:
    from semalign_ds.demo import real_models
    from semalign_ds.demo.assets import build_demo_assets

    if name in real_models.CATALOGUE:
        return str(real_models.fetch(name))
    if name in ("demo-student", "demo-teacher"):
        assets = build_demo_assets(progress=False)
        return str(assets.student_path if name == "demo-student" else assets.teacher_path)
    return name


def score(folder: str, limit: int | None) -> dict:
    import torch

    from semalign_ds.evaluation import keyword_task as kt
    from semalign_ds.models.loading import load_causal_lm, load_tokenizer

    model = load_causal_lm(folder, torch.float32, "cpu", key="model")
    start = time.perf_counter()
    got = kt.score_items(model, load_tokenizer(folder, "model"), kt.build_items()[:limit])
    got["ci95"] = 1.96 * got["acc_stderr"]
    got["seconds"] = round(time.perf_counter() - start, 1)
    return got


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="+")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--out", default=None, help="append one JSON line per model to this file")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    for name in args.models:
        got = {"model": name, **score(resolve(name), args.limit)}
        line = json.dumps(got)
        print(line, flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
