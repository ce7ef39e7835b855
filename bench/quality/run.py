"""Quality benchmark driver: does SemAlign transfer knowledge? One table against the baselines (docs/RESULTS.md).

    python bench/quality/run.py --size small [--out runs/quality-small] [--workers 2]
    python bench/quality/run.py --size medium --dry      # the H200 plan, checked on CPU with tiny models
Phases: (1) models and data (demo world + extra pairs, cached); (2) the teacher-margin gate, printed first: a pair
whose teacher is not clearly better is refused, and without the main pair no table is written (exit 3);
(3) learning-rate search per method on the target validation split (seed 0, same grid for all); (4) final runs,
all seeds, equal budgets; (5) tables, plots, results.json and an MLflow summary under --out.
--dry: every config of the chosen size's plan is built and validated, then the plan runs end to end on the tiny
demo world on CPU (1 seed, 1 learning rate, 2 steps per stage); the numbers mean nothing, the plumbing is checked.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path[:0] = [str(HERE), str(REPO)]

import assets as assetsmod  # noqa: E402
import gate as gatemod  # noqa: E402
import report  # noqa: E402
from methods import METHODS, PAIRS, SIZES, lr_of_run  # noqa: E402
from worker import EvalSets, run_config  # noqa: E402

EXIT_REFUSED = 3


def parse(argv) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES), default="small")
    p.add_argument("--dry", action="store_true", help="validate the size's plan, then run it on tiny models (CPU)")
    p.add_argument("--out", default=None, help="output folder (default runs/quality-<size>[-dry])")
    p.add_argument("--cache-dir", default=None, help="model cache root (default: the demo's)")
    p.add_argument("--workers", type=int, default=None, help="parallel worker processes (default: the size's)")
    p.add_argument("--pairs", default=None, help="comma-separated subset of " + ",".join(PAIRS))
    p.add_argument("--methods", default=None, help="comma-separated subset of method names")
    p.add_argument("--seeds", type=int, default=None)
    p.add_argument("--min-margin", type=float, default=0.2, help="teacher's required target-perplexity margin")
    p.add_argument("--no-mlflow", action="store_true")
    p.add_argument("--keep-models", action="store_true", help="keep every run's exported student")
    return p.parse_args(argv)


def build_plan(args):
    """(size actually run, plan size, pairs to run, methods per pair)."""
    plan_size = SIZES[args.size]
    size = SIZES["tiny"] if args.dry else plan_size
    pairs = args.pairs.split(",") if args.pairs else [p for p in PAIRS if not PAIRS[p].real]
    wanted = set(args.methods.split(",")) if args.methods else set(METHODS)
    unknown = [p for p in pairs if p not in PAIRS] + [m for m in wanted if m not in METHODS]
    if unknown:
        raise SystemExit(f"unknown pair/method {unknown}; pairs: {list(PAIRS)}; methods: {list(METHODS)}")
    if "main" not in pairs:
        pairs.insert(0, "main")  # the gate anchor and the learning-rate search live on the main pair
    wanted |= {METHODS[m].lr_from for m in wanted if METHODS[m].lr_from} | {"no_transfer"}  # the reference row
    methods = {p: [m for m in PAIRS[p].methods if m in wanted] for p in pairs}
    return size, plan_size, pairs, methods


def spec(out: Path, pair: str, method: str, lr: float, seed: int) -> dict:
    run_id = f"{pair}.{method}.lr{lr:g}.s{seed}"
    return {"id": run_id, "pair": pair, "method": method, "lr": lr, "seed": seed,
            "overrides": list(METHODS[method].overrides), "out_dir": str(out / "runs" / pair / method / f"lr{lr:g}-s{seed}")}


def validate_plan(plan_size, pairs_paths, methods, out: Path) -> int:
    """Build (and so validate) the config of every run the plan size would make; returns how many."""
    n = 0
    for pair, names in methods.items():
        paths = pairs_paths.get(pair) or pairs_paths["main"]
        for method in names:
            for lr in plan_size.lr_grid:
                for seed in range(plan_size.seeds):
                    run_config(spec(out, pair, method, lr, seed), paths, list(plan_size.overrides), None, "x")
                    n += 1
    return n


def run_batch(specs: list[dict], job: dict, workers: int, out: Path, device: str, label: str) -> None:
    """Split `specs` over worker processes (slow Mamba runs first) and wait for all of them."""
    todo = [s for s in specs if not _done(s)]
    if not todo:
        return
    todo.sort(key=lambda s: s["pair"] != "mamba")
    workers = max(1, min(workers, len(todo)))
    procs, start = [], time.perf_counter()
    print(f"[bench] {label}: {len(todo)} runs on {workers} worker(s)", flush=True)
    for i in range(workers):
        job_path = out / "jobs" / f"{label}-{i}.json"
        job_path.parent.mkdir(parents=True, exist_ok=True)
        uri = None if job["mlflow_root"] is None else f"sqlite:///{job['mlflow_root'] / f'worker{i}.db'}"
        job_path.write_text(json.dumps(dict(job, specs=todo[i::workers], mlflow_uri=uri, mlflow_root=None)))
        log = open(out / "jobs" / f"{label}-{i}.log", "w")
        procs.append((subprocess.Popen([sys.executable, str(HERE / "worker.py"), str(job_path)], env=_env(device),
                                       stdout=log, stderr=subprocess.STDOUT), log))
    for proc, log in procs:
        proc.wait()
        log.close()
    print(f"[bench] {label}: done in {time.perf_counter() - start:.0f} s", flush=True)


def _done(s: dict) -> bool:
    path = Path(s["out_dir"]) / "result.json"
    return path.is_file() and json.loads(path.read_text()).get("status") == "ok"


def _env(device: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                           "MASTER_PORT", "MLFLOW_TRACKING_URI")}
    env.update(DS_ACCELERATOR="cpu" if device == "cpu" else "cuda", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false", PYTHONPATH=str(REPO))
    return env


def load_result(s: dict) -> dict:
    path = Path(s["out_dir"]) / "result.json"
    return json.loads(path.read_text()) if path.is_file() else dict(s, status="missing")


def choose_lrs(out: Path, methods: list[str], grid) -> tuple[dict, dict]:
    """Per searched method: {lr: target_val ppl} and the chosen (lowest validation perplexity) rate."""
    search, chosen = {}, {}
    for m in methods:
        by_lr = {}
        for lr in grid:
            r = load_result(spec(out, "main", m, lr, 0))
            by_lr[lr] = r["ppl"]["target_val"] if r.get("status") == "ok" else float("inf")
        search[m], chosen[m] = by_lr, min(by_lr, key=by_lr.get)
    return search, chosen


def prepare_assets(size, pairs: list[str], cache_dir, progress: bool) -> dict[str, dict]:
    device = size.device
    main = assetsmod.main_assets(size.demo_scale, cache_dir, device, progress)
    extra = None
    if any(p != "main" for p in pairs):
        extra = assetsmod.extra_assets(main, size.demo_scale, size.extra, device, progress)
    paths = assetsmod.pair_paths(main, extra)
    return {p: paths[p] for p in pairs}


def run_gate(paths: dict, size, seq_len: int, min_margin: float) -> tuple[dict, dict]:
    """Print both models' perplexities per pair; returns (ppl per pair, pass per pair)."""
    evals = EvalSets(size.eval_sequences)
    ppl, ok = {}, {}
    for pair, p in paths.items():
        ppl[pair] = gatemod.pair_perplexities(p, evals, seq_len, size.device)
        ok[pair] = gatemod.verdict(ppl[pair], min_margin)[0]
        for line in gatemod.gate_lines(pair, ppl[pair], min_margin):
            print(line, flush=True)
    return ppl, ok


def final_specs(out: Path, methods: dict, chosen: dict, seeds: int, passed: dict) -> list[dict]:
    specs = []
    for pair, names in methods.items():
        if not passed[pair]:
            continue
        for m in names:
            lr = lr_of_run(METHODS[m], chosen)
            if METHODS[m].train and lr is not None:
                specs += [spec(out, pair, m, lr, seed) for seed in range(seeds)]
    return specs


def aggregate(out: Path, methods: dict, chosen: dict, seeds: int, passed: dict, ppl: dict, min_margin: float):
    rows, tables, histories = [], {}, {}
    for pair, names in methods.items():
        if not passed[pair]:
            tables[pair] = f"Refused by the gate: {gatemod.verdict(ppl[pair], min_margin)[1]}"
            continue
        pair_rows = []
        for m in names:
            lr = lr_of_run(METHODS[m], chosen) if METHODS[m].train else None
            runs = [load_result(spec(out, pair, m, lr, s)) for s in range(seeds)] if lr is not None else []
            pair_rows.append(report.method_row(pair, m, runs, ppl[pair], lr))
            if pair == "main" and runs and runs[0].get("status") == "ok":
                histories[m] = runs[0].get("history", {})
        rows += pair_rows
        tables[pair] = report.pair_table(pair_rows, ppl[pair])
    return rows, tables, histories


def main(argv=None) -> int:
    args = parse(argv)
    size, plan_size, pairs, methods = build_plan(args)
    out = Path(args.out or REPO / "runs" / f"quality-{args.size}{'-dry' if args.dry else ''}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    seeds = args.seeds or size.seeds
    start = time.perf_counter()
    paths = prepare_assets(size, pairs, args.cache_dir, progress=True)
    print(f"[bench] models ready in {time.perf_counter() - start:.0f} s", flush=True)
    if args.dry:
        print(f"[bench] dry: {validate_plan(plan_size, paths, methods, out)} configs of size "
              f"'{plan_size.name}' validated", flush=True)
    from semalign_ds import config as cfgmod

    seq_len = cfgmod.config_from_dict({}, [o for o in size.overrides if o.startswith("data.seq_len")] or
                                      ["data.seq_len=128"]).data.seq_len
    ppl, passed = run_gate(paths, size, seq_len, args.min_margin)
    report.dump(out / "gate.json", {"ppl": ppl, "passed": passed, "min_margin": args.min_margin})
    if not passed["main"]:
        print("[bench] REFUSED: the main pair's teacher is not clearly better than its student; no transfer table "
              "is reported. Pretrain the teacher longer (see docs/RESULTS.md).", file=sys.stderr)
        return EXIT_REFUSED
    job = {"pairs": paths, "base_overrides": list(size.overrides), "eval_sequences": size.eval_sequences,
           "device": size.device,
           "experiment": f"quality-{args.size}{'-dry' if args.dry else ''}", "keep_models": args.keep_models,
           "mlflow_root": None if args.no_mlflow else out / "mlflow"}
    if job["mlflow_root"] is not None:
        job["mlflow_root"].mkdir(exist_ok=True)
    workers = args.workers or size.workers
    searched = [m for m in methods["main"] if METHODS[m].train and METHODS[m].lr_from is None]
    run_batch([spec(out, "main", m, lr, 0) for m in searched for lr in size.lr_grid], job, workers, out,
              size.device, "search")
    search, chosen = report_search(out, searched, size)
    run_batch(final_specs(out, methods, chosen, seeds, passed), job, workers, out, size.device, "final")
    rows, tables, histories = aggregate(out, methods, chosen, seeds, passed, ppl, args.min_margin)
    return finish(out, args, size, rows, tables, histories, search, chosen, ppl, time.perf_counter() - start)


def report_search(out: Path, searched: list[str], size):
    search, chosen = choose_lrs(out, searched, size.lr_grid)
    print(report.search_table(search, chosen), flush=True)
    return search, chosen


def finish(out, args, size, rows, tables, histories, search, chosen, ppl, seconds) -> int:
    artifacts = report.plot_all(out, rows, tables, histories, "main")
    gate_md = "\n".join(line for p in ppl for line in gatemod.gate_lines(p, ppl[p], args.min_margin))
    when = datetime.date.today().isoformat()
    header = (f"# Quality benchmark, size `{args.size}`{' (DRY: tiny models, numbers meaningless)' if args.dry else ''}"
              f"\n\n{when}; {seconds:.0f} s wall in this invocation (runs finished earlier are reused); budgets: "
              f"{' '.join(size.overrides)}")
    table_path = report.write_outputs(out, tables, report.search_table(search, chosen), gate_md, header)
    report.dump(out / "results.json", {"rows": rows, "search": search, "chosen": chosen, "gate": ppl,
                                       "size": args.size, "dry": args.dry, "seconds": seconds})
    if not args.no_mlflow:
        report.log_summary(f"sqlite:///{out / 'mlflow.db'}", f"quality-{args.size}{'-dry' if args.dry else ''}",
                           rows, [table_path, out / "results.json", *artifacts],
                           {"size": args.size, "dry": args.dry, "overrides": size.overrides})
    print(table_path.read_text())
    failed = sum(r["failed"] for r in rows)
    print(f"[bench] done in {seconds:.0f} s; {failed} failed runs; outputs in {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
