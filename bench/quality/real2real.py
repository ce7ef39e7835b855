"""Quality on real-to-real pairs (issue 21): Gemma 3 270M teaches SmolLM2-135M and the demo's student; SemAlign
(best preset, paper v2) against SFT and logit KD at equal budget, with and without replay of the student's own
domain, and the ablations of why transfer across tokenizers loses to SFT; in bits per byte and task accuracy.

    python bench/quality/real2real.py --reduced|--medium [--pairs gemma_demo] [--rows sft,kd,best,best_replay] [--seeds 1]
    python bench/quality/real2real.py [--pairs gemma_demo,gemma_smollm2,smollm2_demo] [--seeds 3] [--ablations]
Data: the demo's world (semalign_ds.demo.assets): transfer = English documentation (the target domain), held-out
target_val / target_test from it, general_test = stdlib code (the demo student's own domain; for SmolLM2 a domain
it knows), replay = the demo student's own pretraining code (general_replay_jsonl).
Phases, each resumable (a finished run's result.json is reused):
 1. models (fetched once), the gate: both models' bits per byte on every held-out set (the teacher on its own
    tokens of the same text), the share of student positions with an aligned / exact teacher position, and both
    models' stdlib_keyword accuracy with its 95% interval; a pair whose teacher is not ahead on the target is
    refused (printed first, no table);
 2. one spool per (pair, teacher setting) (`semalign teach`: one teacher pass per sample), read by every row that
    shares it;
 3. the learning rate: --reduced and --medium use r2r_plan.LR; otherwise each main row searches LR_GRID on target_val (seed 0);
    replay rows take their base row's rate, ablations best's times their scale;
 4. the rows (seeds 0..S-1 for the main and replay rows, seed 0 for ablations), scored on the exported student:
    bits per byte and perplexity per held-out set, stdlib_keyword accuracy;
 5. tables (gap closed in bits per byte and in task accuracy, general-domain change = forgetting), results.json.
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import math
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path[:0] = [str(HERE), str(REPO)]

import r2r_gate  # noqa: E402
import real  # noqa: E402
import run as runmod  # noqa: E402
from r2r_plan import ABLATIONS, FULL, LR, LR_GRID, MAIN, MEDIUM, PAIRS, REDUCED, ROWS  # noqa: E402

SETS = ("target_val", "target_test", "general_test")


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None)
    p.add_argument("--pairs", default="gemma_demo,gemma_smollm2")
    p.add_argument("--rows", default=None, help="comma-separated rows (default: the main and replay rows)")
    p.add_argument("--ablations", action="store_true", help="also the item-6 ablations (on every pair run)")
    p.add_argument("--seeds", type=int, default=None, help="seeds of the main and replay rows (default 3; 1 with "
                   "--reduced)")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--medium", action="store_true", help="r2r_plan.MEDIUM: 512 sequences, 3 epochs per layer, "
                   "3 seeds unless --seeds, no lr search")
    p.add_argument("--reduced", action="store_true", help="the validation budget (r2r_plan.REDUCED), 1 seed unless --seeds, no lr "
                   "search")
    p.add_argument("--min-margin", type=float, default=0.1, help="teacher's required target lead in bits per byte")
    p.add_argument("--gate-only", action="store_true", help="print the pairs' gates and stop")
    p.add_argument("--no-mlflow", action="store_true")
    return p.parse_args(argv)


def _key(values: dict) -> str:
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:10]


def spool_dir(out: Path, pair: str, row: str) -> Path:
    return out / "spools" / pair / _key(ROWS[row].teacher)


def _pair_overrides(pair: str, paths: dict, row: str) -> list[str]:
    extra = [] if PAIRS[pair].stages is None else [f"schedule.stages=[{','.join(map(str, PAIRS[pair].stages))}]"]
    if ROWS[row].replay:
        extra.append(f"data.replay_path={paths['replay']}")
    return extra


def spec(out: Path, paths: dict, pair: str, row: str, lr: float, seed: int) -> dict:
    """A row's run: it reads its teacher setting's spool, or (a method without teacher output: SFT) runs colocated,
    where no teacher is loaded."""
    spool = ["runtime.topology=spool", f"transport.spool_dir={spool_dir(out, pair, row)}"] if \
        real.needs_teacher(ROWS[row].overrides) else []
    return {"id": f"{pair}.{row}.lr{lr:g}.s{seed}", "pair": pair, "method": row, "lr": lr, "seed": seed,
            "overrides": [*ROWS[row].overrides, *_pair_overrides(pair, paths[pair], row), *spool],
            "out_dir": str(out / "runs" / pair / row / f"lr{lr:g}-s{seed}")}


def teach_spec(out: Path, paths: dict, pair: str, row: str) -> dict:
    return {"id": f"{pair}.teach.{_key(ROWS[row].teacher)}", "kind": "teach", "pair": pair, "method": row,
            "lr": LR, "seed": 0, "overrides": [*ROWS[row].overrides, *_pair_overrides(pair, paths[pair], row),
                                                "runtime.topology=spool",
                                                f"transport.spool_dir={spool_dir(out, pair, row)}"],
            "out_dir": str(out / "teach" / pair / _key(ROWS[row].teacher))}


def run_all(specs: list[dict], job: dict, out: Path, paths: dict, workers: int, label: str) -> None:
    teach = {}
    for s in specs:
        if real.needs_teacher(ROWS[s["method"]].overrides):
            t = teach_spec(out, paths, s["pair"], s["method"])
            teach.setdefault(t["id"], t)
    runmod.run_batch(list(teach.values()), job, 1, out, "cpu", f"{label}-spools")  # one teacher in memory at a time
    runmod.run_batch(specs, job, workers, out, "cpu", label)


def result(out: Path, paths: dict, pair: str, row: str, lr: float, seed: int) -> dict:
    return runmod.load_result(spec(out, paths, pair, row, lr, seed))


def choose_lr(out, paths, job, pairs, rows, args) -> dict[tuple[str, str], float]:
    """(pair, row) -> learning rate: LR when reduced, else the main rows' best target_val bits per byte."""
    base = {"sft_replay": "sft", "best_replay": "best"}
    if args.reduced or args.medium:
        searched = {(p, r): LR for p in pairs for r in MAIN}
    else:
        specs = [spec(out, paths, p, r, lr, 0) for p in pairs for r in MAIN for lr in LR_GRID]
        run_all(specs, job, out, paths, args.workers, "search")
        searched = {}
        for p in pairs:
            for r in MAIN:
                val = {lr: result(out, paths, p, r, lr, 0).get("bpb", {}).get("target_val", math.inf) for lr in LR_GRID}
                searched[(p, r)] = min(val, key=val.get)
    lrs = {}
    for p in pairs:
        for r in rows:
            source = base.get(r) or ("best" if ROWS[r].group == "ablation" else r)
            lrs[(p, r)] = searched[(p, source)] * ROWS[r].lr_scale
    return lrs


def _mean_sd(values):
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def row_stats(runs: list[dict], gate: dict) -> dict:
    ok = [r for r in runs if r.get("status") == "ok"]
    out = {"seeds": len(ok), "failed": len(runs) - len(ok)}
    for s in SETS:
        before, teacher = gate["bpb"][s]["student"], gate["bpb"][s]["teacher"]
        out[f"{s}_bpb"] = _mean_sd([r["bpb"][s] for r in ok])
        out[f"{s}_gap"] = _mean_sd([(before - r["bpb"][s]) / (before - teacher) for r in ok])
        out[f"{s}_change"] = _mean_sd([r["bpb"][s] - before for r in ok])
    t_before, t_teacher = gate["task"]["student"]["acc"], gate["task"]["teacher"]["acc"]
    accs = [r["task"]["acc"] for r in ok if r.get("task")]
    out["task_acc"] = _mean_sd(accs)
    out["task_stderr"] = ok[0]["task"]["acc_stderr"] if ok and ok[0].get("task") else math.nan
    out["task_gap"] = _mean_sd([(a - t_before) / (t_teacher - t_before) for a in accs]) \
        if t_teacher > t_before else (math.nan, math.nan)
    out["steps"] = ok[0]["steps"] if ok else 0
    out["tokens"] = ok[0]["tokens"] if ok else 0
    out["equal_budget"] = len({(r["steps"], r["tokens"]) for r in ok}) <= 1
    out["wall_s"] = _mean_sd([r["wall_s"] for r in ok])[0]
    return out


def _pm(pair: tuple, fmt: str, scale: float = 1.0) -> str:
    mean, sd = pair
    if not math.isfinite(mean):
        return "n/a"
    return f"{scale * mean:{fmt}}" + (f" ± {scale * sd:{fmt.lstrip('+')}}" if sd else "")


def pair_table(pair: str, rows: dict, gate: dict, lrs: dict) -> str:
    g = gate["bpb"]
    head = ("| row | lr | target bits/byte | target gap closed | general bits/byte (change = forgetting) | "
            "stdlib_keyword acc (±95%) | task gap closed | seeds | steps / tokens |")
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    t, s = gate["task"]["teacher"], gate["task"]["student"]
    lines.append(f"| teacher | | {g['target_test']['teacher']:.3f} | 100% | {g['general_test']['teacher']:.3f} | "
                 f"{t['acc']:.3f} ± {t['ci95']:.3f} | 100% | | |")
    lines.append(f"| student before | | {g['target_test']['student']:.3f} | 0% | {g['general_test']['student']:.3f} | "
                 f"{s['acc']:.3f} ± {s['ci95']:.3f} | 0% | | |")
    for name, st in rows.items():
        lines.append(
            f"| {ROWS[name].label} | {lrs[(pair, name)]:.2g} | {_pm(st['target_test_bpb'], '.3f')} | "
            f"{_pm(st['target_test_gap'], '+.1f', 100)}% | {_pm(st['general_test_bpb'], '.3f')} "
            f"({_pm(st['general_test_change'], '+.3f')}) | {_pm(st['task_acc'], '.3f')} ± "
            f"{1.96 * st['task_stderr']:.3f} | {_pm(st['task_gap'], '+.0f', 100)}% | "
            f"{st['seeds']}{' (%d failed)' % st['failed'] if st['failed'] else ''} | "
            f"{st['steps']} / {st['tokens']}{'' if st['equal_budget'] else ' (unequal!)'} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse(argv)
    name = "reduced" if args.reduced else "medium" if args.medium else "full"
    budget = {"reduced": REDUCED, "medium": MEDIUM, "full": FULL}[name]
    seeds = args.seeds or (1 if args.reduced else 3)
    out = Path(args.out or REPO / "runs" / f"quality-r2r{'' if name == 'full' else '-' + name}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    pairs = args.pairs.split(",")
    rows = args.rows.split(",") if args.rows else [n for n, r in ROWS.items() if r.group != "ablation"]
    rows += list(ABLATIONS) if args.ablations else []
    unknown = [p for p in pairs if p not in PAIRS] + [r for r in rows if r not in ROWS]
    if unknown:
        raise SystemExit(f"[r2r] unknown pairs/rows {unknown}; pairs: {list(PAIRS)}; rows: {list(ROWS)}")
    paths = {p: r2r_gate.pair_paths(PAIRS[p]) for p in pairs}
    gates = {p: r2r_gate.gate(out, p, paths[p], budget) for p in pairs}
    passed = [p for p in pairs if gates[p]["bpb"]["target_test"]["student"] - gates[p]["bpb"]["target_test"]["teacher"]
              >= args.min_margin]
    for p in pairs:
        print(f"[r2r] gate {p}: {json.dumps(gates[p])}; {'PASS' if p in passed else 'REFUSED'}", flush=True)
    if args.gate_only:
        return 0
    job = {"pairs": paths, "base_overrides": list(budget.overrides()), "device": "cpu",
           "eval_sequences": budget.eval_sequences, "experiment": "quality-r2r", "keep_models": False, "task": True,
           "mlflow_root": None if args.no_mlflow else out / "mlflow"}
    if job["mlflow_root"] is not None:
        job["mlflow_root"].mkdir(exist_ok=True)
    lrs = choose_lr(out, paths, job, passed, rows, args)
    specs = [spec(out, paths, p, r, lrs[(p, r)], s) for p in passed for r in rows
             for s in range(seeds if ROWS[r].group != "ablation" else 1)]
    run_all(specs, job, out, paths, args.workers, "rows")
    tables, stats = {}, {}
    for p in pairs:
        if p not in passed:
            tables[p] = f"Refused by the gate (teacher lead under {args.min_margin} bits/byte on target_test)."
            continue
        stats[p] = {r: row_stats([result(out, paths, p, r, lrs[(p, r)], s)
                                  for s in range(seeds if ROWS[r].group != "ablation" else 1)], gates[p]) for r in rows}
        tables[p] = pair_table(p, stats[p], gates[p], lrs)
    seconds = time.perf_counter() - start
    md = [f"# Real-to-real quality{'' if name == 'full' else f' ({name.upper()} budget)'}",
          f"{datetime.date.today().isoformat()}; {seconds:.0f} s wall in this invocation (finished runs reused); "
          f"budget: {' '.join(budget.overrides())}; seeds {seeds}"]
    for p in pairs:
        g = gates[p]
        md += [f"## {PAIRS[p].label}", f"student positions with an aligned teacher state {g['aligned']:.1%}, exact "
               f"(both predict a token at the same character) {g['exact']:.1%}; shared vocabulary {g['shared']} "
               f"tokens", tables[p]]
    (out / "results.md").write_text("\n\n".join(md) + "\n")
    (out / "results.json").write_text(json.dumps({"gates": gates, "stats": stats, "lrs": {f"{p}.{r}": v for (p, r), v
                                                                                          in lrs.items()},
                                                  "seconds": seconds, "budget": name}, indent=1,
                                                 default=list))
    print((out / "results.md").read_text())
    failed = sum(st["failed"] for per in stats.values() for st in per.values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
