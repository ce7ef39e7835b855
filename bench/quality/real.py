"""Quality on a real teacher (issue 11): SmolLM2-135M teaches three students; SemAlign's variants against the baselines.

    python bench/quality/real.py [--out runs/quality-real] [--workers 2] [--pairs code,pruned,demo] [--dry]
Pairs (real_assets.py): `code` (the main pair: a 3 x 192 code student with SmolLM2's tokenizer), `pruned` (SmolLM2
cut to 4 of its 30 layers), `demo` (the demo's 4096-token student: cross-tokenizer). Data: the demo's world
(target domain = English documentation the students never saw; general = stdlib code).
Phases, each resumable (a finished run's result.json is reused):
 1. models (cached), the teacher-margin gate (printed first; a refused pair gets no table);
 2. one spool per (pair, teacher setting) (`semalign teach`: one teacher pass per sample), shared by every method
    that reads those packets (methods.SETTINGS);
 3. the main pair: learning-rate search on the target validation split (seed 0, the same grid) for the baselines,
    SemAlign v2 and the Fisher-logits + logit-map variant; every other row at its `lr_from` rate, seed 0;
 4. `best` = the SemAlign configuration (a row with a layer term; frontier or full schedule) with the lowest target
    *validation* perplexity (never the test split); searched over the grid too if it was not; config.PRESETS["best"]
    is that row's configuration (tests/test_method_options.py checks it against results/real/results.json);
 5. seeds 1..S-1 for the main table (SFT, the best logit KD by validation, KD + CE, hidden-MSE KD, v2, best);
    ablation rows keep 1 seed (said in the table); the other pairs run SFT, KD, v2, ULD (cross-tokenizer), best;
 6. tables, plots, results.json, an MLflow summary; the verdict against issue 11's goal.
--dry: the same plan on the tiny demo world with a tiny teacher (the plumbing, not the numbers).
"""
from __future__ import annotations

import argparse
import datetime
import math
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path[:0] = [str(HERE), str(REPO)]

import gate as gatemod  # noqa: E402
import report  # noqa: E402
import run as runmod  # noqa: E402
from methods import METHODS, PAIRS, REAL_BASE as BASE, REAL_METHODS, REAL_PAIRS  # noqa: E402
from worker import EvalSets  # noqa: E402

LR_GRID = (3e-4, 1e-3, 3e-3, 1e-2)
SEEDS = 3
MAIN_TABLE = ("r_sft", "r_kd_ce", "r_hidden_mse", "r_geo_pinv")  # + the best KD and the best SemAlign
DRY = ("data.max_sequences=32", "data.micro_batch_size=4", "data.seq_len=32", "method.min_shared_tokens=100",
       "pairing.attribution_batches=1")
# Candidates for `best` (the preset): every SemAlign configuration, i.e. every row with a layer term on the teacher's
# residuals (not the KL-only kl64 rows), frontier or full schedule.
SEMALIGN_CANDIDATES = [m for m, meth in REAL_METHODS.items() if meth.group in ("semalign", "ablation")
                       and meth.setting not in ("kl64",)]


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--pairs", default=",".join(REAL_PAIRS))
    p.add_argument("--seeds", type=int, default=SEEDS)
    p.add_argument("--min-margin", type=float, default=0.2)
    p.add_argument("--skip", default="", help="comma-separated rows not to run (the table says which were left out)")
    p.add_argument("--dry", action="store_true")
    p.add_argument("--cache-dir", default=None, help="demo model cache (default: the demo's)")
    p.add_argument("--no-mlflow", action="store_true")
    return p.parse_args(argv)


def needs_teacher(overrides) -> bool:
    """Whether a row's method needs teacher output (the run spec's rule): rows that do read their setting's spool;
    the others (SFT) run colocated, where no teacher is loaded."""
    from semalign_ds.config import config_from_dict
    from semalign_ds.spec import MethodSpec

    method = [o for o in (*BASE, *overrides) if o.startswith("method.")]  # what decides it
    return MethodSpec.from_config(config_from_dict({}, method)).needs_teacher


def spec(out: Path, pair: str, method: str, lr: float, seed: int) -> dict:
    s = runmod.spec(out, pair, method, lr, seed)
    setting = METHODS[method].setting
    if needs_teacher(METHODS[method].overrides):
        s["overrides"] += ["runtime.topology=spool", f"transport.spool_dir={spool_dir(out, pair, setting)}"]
    return s


def spool_dir(out: Path, pair: str, setting: str) -> Path:
    return out / "spools" / pair / setting


def teach_spec(out: Path, pair: str, method: str) -> dict:
    """The spool of a method's setting, written with that method's config (its packets are the setting's)."""
    setting = METHODS[method].setting
    return {"id": f"{pair}.teach.{setting}", "kind": "teach", "pair": pair, "method": method, "lr": 1e-3, "seed": 0,
            "overrides": [*METHODS[method].overrides, "runtime.topology=spool",
                          f"transport.spool_dir={spool_dir(out, pair, setting)}"],
            "out_dir": str(out / "teach" / pair / setting)}


def run_all(specs: list[dict], job: dict, out: Path, workers: int, label: str) -> None:
    """Spools first (one per setting the specs read), then the runs."""
    teach = {}
    for s in specs:
        if needs_teacher(METHODS[s["method"]].overrides):
            t = teach_spec(out, s["pair"], s["method"])
            teach.setdefault(t["id"], t)
    runmod.run_batch(list(teach.values()), job, workers, out, "cpu", f"{label}-spools")
    runmod.run_batch(specs, job, workers, out, "cpu", label)


def val_ppl(out: Path, pair: str, method: str, lr: float) -> float:
    r = runmod.load_result(spec(out, pair, method, lr, 0))
    return r["ppl"]["target_val"] if r.get("status") == "ok" else float("inf")


def search(out: Path, job: dict, methods: list[str], workers: int, label: str) -> dict[str, dict[float, float]]:
    run_all([spec(out, "code", m, lr, 0) for m in methods for lr in LR_GRID], job, out, workers, label)
    return {m: {lr: val_ppl(out, "code", m, lr) for lr in LR_GRID} for m in methods}


def choose(by_lr: dict[float, float]) -> float:
    return min(by_lr, key=by_lr.get)


def lr_for(method: str, chosen: dict) -> float:
    m = METHODS[method]
    return chosen[method] if method in chosen else chosen[m.lr_from]


def gate_pairs(paths: dict, seq_len: int, eval_sequences: int, min_margin: float) -> tuple[dict, dict]:
    evals = EvalSets(eval_sequences)
    ppl, ok = {}, {}
    for pair, p in paths.items():
        ppl[pair] = cross_gate(p, evals, seq_len) if pair == "demo" else gatemod.pair_perplexities(
            p, evals, seq_len, "cpu")
        ok[pair] = gatemod.verdict(ppl[pair], min_margin)[0]
        for line in gatemod.gate_lines(pair, ppl[pair], min_margin):
            print(line, flush=True)
    return ppl, ok


def cross_gate(pair: dict, evals: EvalSets, seq_len: int) -> dict:
    """Across tokenizers: the student's perplexity on its tokens; the teacher's per student-token equivalent (its
    NLL on its own tokens of the same characters / the student's predicted tokens; evaluate.py's convention)."""
    import torch

    from semalign_ds import data as datamod
    from semalign_ds.evaluation.evaluate import next_token_loss_sum, perplexity
    from semalign_ds.models.loading import load_causal_lm, load_tokenizer

    tok_S, tok_T = load_tokenizer(pair["student"], "student"), load_tokenizer(pair["teacher"], "teacher")
    student = load_causal_lm(pair["student"], torch.float32, "cpu", key="student")
    teacher = load_causal_lm(pair["teacher"], torch.float32, "cpu", key="teacher")
    out = {}
    for name in ("target_val", "target_test", "general_test"):
        texts = datamod.load_texts({"path": pair[name], "format": "auto", "text_field": "text"}, name)
        blocks = datamod.pack_sequences(texts, tok_S, seq_len, evals.max_sequences, teacher_tokenizer=tok_T)
        nll, pairs = 0.0, 0
        with torch.no_grad():
            for i in range(0, len(blocks), 16):
                b = blocks.take(slice(i, i + 16))
                logits = teacher(input_ids=b.teacher_ids_BU, attention_mask=b.teacher_mask_BU.long()).logits
                nll += next_token_loss_sum(logits.float(), b.teacher_ids_BU, b.teacher_mask_BU)[0]
                pairs += int((b.mask_BT[:, :-1] & b.mask_BT[:, 1:]).sum())
        student_batches = [(blocks.ids_NT[i:i + 16], blocks.mask_NT[i:i + 16]) for i in range(0, len(blocks), 16)]
        out[name] = {"teacher": math.exp(nll / max(pairs, 1)), "student": perplexity(student, student_batches, "cpu")}
    return out


def main(argv=None) -> int:
    args = parse(argv)
    out = Path(args.out or REPO / "runs" / f"quality-real{'-dry' if args.dry else ''}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    pairs = args.pairs.split(",")
    paths = _assets(args.dry, pairs, args.cache_dir)
    pairs = [p for p in pairs if p in paths]
    seq_len = 32 if args.dry else 128
    ppl, passed = gate_pairs(paths, seq_len, 8 if args.dry else 64, args.min_margin)
    report.dump(out / "gate.json", {"ppl": ppl, "passed": passed, "min_margin": args.min_margin})
    if not passed.get("code"):
        print("[real] REFUSED: the main pair's teacher is not clearly better than its student", file=sys.stderr)
        return runmod.EXIT_REFUSED
    job = {"pairs": paths, "base_overrides": list(BASE + (DRY if args.dry else ())), "device": "cpu",
           "eval_sequences": 8 if args.dry else 64, "experiment": f"quality-real{'-dry' if args.dry else ''}",
           "keep_models": False, "mlflow_root": None if args.no_mlflow else out / "mlflow"}
    if job["mlflow_root"] is not None:
        job["mlflow_root"].mkdir(exist_ok=True)
    skip = set(filter(None, args.skip.split(",")))
    unknown = skip - set(REAL_METHODS)
    if unknown:
        raise SystemExit(f"[real] --skip names unknown rows {sorted(unknown)}; rows: {', '.join(REAL_METHODS)}")
    if args.dry:
        skip.add("r_kd4096")  # the tiny world's vocabulary has fewer than 4096 tokens
    searched = [m for m, meth in REAL_METHODS.items() if meth.train and meth.lr_from is None]
    grid = search(out, job, searched, args.workers, "search")
    chosen = {m: choose(by_lr) for m, by_lr in grid.items()}
    rest = [m for m, meth in REAL_METHODS.items() if meth.train and m not in searched and m not in skip]
    run_all([spec(out, "code", m, lr_for(m, chosen), 0) for m in rest], job, out, args.workers, "grid")
    def val(m: str) -> float:
        return val_ppl(out, "code", m, lr_for(m, chosen))

    best = min([m for m in SEMALIGN_CANDIDATES if m not in skip], key=val)
    if best not in chosen:  # the best configuration gets the same learning-rate search as the searched rows
        grid.update(search(out, job, [best], args.workers, "search-best"))
        chosen[best] = choose(grid[best])
    kd = min([m for m in ("r_kd64", "r_kd256", "r_kd4096") if m not in skip], key=val)
    table_methods = list(dict.fromkeys([*MAIN_TABLE, kd, best]))
    final = [spec(out, "code", m, lr_for(m, chosen), s) for m in table_methods for s in range(1, args.seeds)]
    for pair in pairs:
        if pair != "code" and passed.get(pair):
            names = [m for m in PAIRS[pair].methods if METHODS.get(m) and METHODS[m].train] + [best]
            final += [spec(out, pair, m, lr_for(m, chosen), s) for m in dict.fromkeys(names) for s in range(1)]
    run_all(final, job, out, args.workers, "final")
    return finish(out, args, paths, ppl, passed, grid, chosen, best, kd, table_methods, time.perf_counter() - start,
                  skip)


def _assets(dry: bool, pairs: list[str], cache_dir) -> dict:
    import real_assets

    made = real_assets.dry_assets(cache_dir) if dry else real_assets.real_assets(cache_dir)
    return {p: v for p, v in made.items() if p in pairs}


def finish(out, args, paths, ppl, passed, grid, chosen, best, kd, table_methods, seconds, skip) -> int:
    rows, tables, histories = [], {}, {}
    for pair in paths:
        if not passed.get(pair):
            tables[pair] = f"Refused by the gate: {gatemod.verdict(ppl[pair], args.min_margin)[1]}"
            continue
        names = [m for m in REAL_METHODS if m not in skip] if pair == "code" else list(
            dict.fromkeys([*PAIRS[pair].methods, best]))
        pair_rows = []
        for m in names:
            meth = REAL_METHODS.get(m) or METHODS[m]
            seeds = args.seeds if (pair == "code" and m in table_methods) else 1
            lr = lr_for(m, chosen) if meth.train else None
            runs = [runmod.load_result(spec(out, pair, m, lr, s)) for s in range(seeds)] if lr is not None else []
            row = report.method_row(pair, m, runs, ppl[pair], lr)
            row["best"] = m == best
            pair_rows.append(row)
            if pair == "code" and m in table_methods and runs and runs[0].get("status") == "ok":
                histories[m] = runs[0].get("history", {})
        rows += pair_rows
        tables[pair] = report.pair_table(pair_rows, ppl[pair])
    verdict = goal_verdict([r for r in rows if r["pair"] == "code"], best, kd)
    artifacts = report.plot_all(out, rows, tables, histories, "code")
    dry = " — DRY: tiny models, numbers meaningless" if args.dry else ""
    header = (f"# Quality on a real teacher (SmolLM2-135M){dry}"
              f"\n\n{datetime.date.today().isoformat()}; {seconds:.0f} s wall in this invocation (finished runs are "
              f"reused); budget: {' '.join(BASE)}; best SemAlign configuration by target validation ppl: `{best}`; "
              f"best logit KD by validation: `{kd}`"
              f"{'; rows left out of this run (--skip): ' + ', '.join(sorted(skip)) if skip else ''}\n\n{verdict}")
    gate_md = "\n".join(line for p in ppl for line in gatemod.gate_lines(p, ppl[p], args.min_margin))
    search_md = report.search_table(grid, chosen)
    table_path = report.write_outputs(out, tables, search_md, gate_md, header)
    report.dump(out / "results.json", {"rows": rows, "search": grid, "chosen": chosen, "gate": ppl, "best": best,
                                       "best_kd": kd, "verdict": verdict, "seconds": seconds, "dry": args.dry})
    if not args.no_mlflow:
        report.log_summary(f"sqlite:///{out / 'mlflow.db'}", f"quality-real{'-dry' if args.dry else ''}", rows,
                           [table_path, out / "results.json", *artifacts], {"base": BASE, "best": best})
    print(table_path.read_text())
    failed = sum(r["failed"] for r in rows)
    print(f"[real] done in {seconds:.0f} s; {failed} failed runs; outputs in {out}")
    return 1 if failed else 0


def goal_verdict(rows: list[dict], best: str, kd: str) -> str:
    """Issue 11's goal on the main pair: best SemAlign closes >= 50% of the target gap, beats SFT and the best logit
    KD by more than the seed spread, with general-domain forgetting no worse than KD's."""
    by = {r["method"]: r for r in rows}
    b, sft, k = by.get(best), by.get("r_sft"), by.get(kd)
    if not (b and sft and k) or not b["seeds"]:
        return "Goal: not evaluated (missing rows)."
    spread = max(b["target_test_gap_sd"], sft["target_test_gap_sd"], k["target_test_gap_sd"])
    checks = {
        "closes >= 50% of the target gap": b["target_test_gap"] >= 0.5,
        "beats SFT by more than the seed spread": b["target_test_gap"] - sft["target_test_gap"] > spread,
        f"beats the best logit KD ({kd}) by more than the seed spread": b["target_test_gap"] - k["target_test_gap"]
        > spread,
        "general-domain forgetting no worse than KD's": b["general_test_change"] <= k["general_test_change"],
    }
    met = all(checks.values())
    lines = [f"**Goal {'MET' if met else 'NOT MET'}** (best = `{best}`: {100 * b['target_test_gap']:.1f}% of the "
             f"target gap closed; SFT {100 * sft['target_test_gap']:.1f}%, {kd} {100 * k['target_test_gap']:.1f}%; "
             f"largest seed spread {100 * spread:.1f} points):"]
    lines += [f"- {'yes' if ok else 'no'}: {name}" for name, ok in checks.items()]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
