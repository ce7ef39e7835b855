"""Quality of the packet codecs on the real main pair: the compact codec against lossless, and the curve of bytes per
token against gap closed and reconstruction error.

    python bench/quality/codec.py [--out runs/quality-codec] [--seeds 3] [--workers 2] [--probe] [--dry]
The pair is real.py's `code` (SmolLM2-135M teaching a 3 x 192 code student with its tokenizer); the method is the
`best` preset's row (`r_geo_full_labels`: geometry + KL + CE, every layer at once) at the learning rate real.py
chose for it on validation (results/real/results.json), with real.py's budget (methods.REAL_BASE). Each codec
variant is its own spool, written by `semalign teach` with that codec (the production path: the bases fitted on the
first window, the packets encoded on the teacher side); every run reads its variant's spool and decodes on the
student side. lossless and the default codec run `--seeds` seeds; the other points of the curve one. The probe
(`--probe`): the same method with the output and label terms off (geometry only), so that the layer targets are the
student's only signal, for lossless, the default and rank 8 (1 seed each, their own spools). Resumable: a
finished run's result.json is reused. Writes results/codec/{table.md,results.json,curve.png} under --out and prints
the table.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path[:0] = [str(HERE), str(REPO)]

import real  # noqa: E402
import report  # noqa: E402
import run as runmod  # noqa: E402
from methods import METHODS, REAL_BASE  # noqa: E402

METHOD = "r_geo_full_labels"  # the best preset's configuration (tests/test_method_options.py ties them)
DEFAULT = "r32b8"  # config.py's transport defaults: rank 32, 8-bit targets, 8-bit logits


def compact(rank: int, bits: int) -> tuple[str, ...]:
    return ("transport.codec=compact", f"transport.target_rank={rank}", f"transport.target_bits={bits}")


VARIANTS: dict[str, tuple[str, ...]] = {
    "lossless": ("transport.codec=lossless",),
    **{f"r{r}b8": compact(r, 8) for r in (192, 128, 64, 32, 16, 8)},  # 192: the student width, full rank
    **{f"r{r}b16": compact(r, 16) for r in (64, 16)},
}


PROBE = ("method.w_out=0.0", "method.w_label=0.0")  # geometry only: the layer targets are the only teacher signal
PROBE_VARIANTS = ("lossless", DEFAULT, "r8b8")


def spool_dir(out: Path, variant: str, probe: bool = False) -> Path:
    return out / "spools" / ("code-geo" if probe else "code") / variant


def _overrides(out: Path, variant: str, probe: bool) -> list[str]:
    return [*METHODS[METHOD].overrides, *(PROBE if probe else ()), *VARIANTS[variant], "runtime.topology=spool",
            f"transport.spool_dir={spool_dir(out, variant, probe)}"]


def teach_spec(out: Path, variant: str, probe: bool = False) -> dict:
    tag = ".geo" if probe else ""
    return {"id": f"code.teach.{variant}{tag}", "kind": "teach", "pair": "code", "method": METHOD, "lr": 1e-3,
            "seed": 0, "overrides": _overrides(out, variant, probe),
            "out_dir": str(out / ("teach-geo" if probe else "teach") / variant)}


def run_spec(out: Path, variant: str, lr: float, seed: int, probe: bool = False) -> dict:
    tag = ".geo" if probe else ""
    return {"id": f"code.{variant}{tag}.s{seed}", "pair": "code", "method": METHOD, "lr": lr, "seed": seed,
            "overrides": _overrides(out, variant, probe),
            "out_dir": str(out / ("runs-geo" if probe else "runs") / variant / f"s{seed}")}


def spool_figures(directory: Path) -> dict:
    """Bytes per token position of a spool (its manifest) and its codec's description."""
    manifest = json.loads((directory / "manifest.json").read_text())
    positions = manifest["num_samples"] * manifest["seq_len"]
    return {"bytes_per_token": manifest["bytes"] / positions, "codec": manifest.get("codec", {"name": "lossless"})}


def reconstruction(out: Path, variant: str, probe: bool = False) -> dict[str, float]:
    """The variant's targets against the lossless spool's on 64 samples (relative error and cosine, mean over
    layers), decoded exactly as a student does."""
    import torch

    from semalign_ds.transport.spool import SpoolReader

    ref_dir, got_dir = spool_dir(out, "lossless", probe), spool_dir(out, variant, probe)
    ref = SpoolReader(ref_dir, json.loads((ref_dir / "manifest.json").read_text())["binding"])
    got = SpoolReader(got_dir, json.loads((got_dir / "manifest.json").read_text())["binding"])
    ids = torch.arange(min(64, ref.num_samples))
    a, b = ref.packet(ids, ref.stages), got.packet(ids, got.stages)
    errs, coss = [], []
    for k in a.targets:
        m = a.mask_BT
        x, y = a.targets[k][m].float(), b.targets[k][m].float()
        errs.append(float((y - x).norm() / x.norm()))
        coss.append(float(torch.nn.functional.cosine_similarity(x, y, dim=-1).mean()))
    return {"rel_error": statistics.mean(errs), "cosine": statistics.mean(coss), "min_cosine": min(coss)}


def rows(out: Path, lr: float, seeds: int, gate: dict, probe: bool = False) -> list[dict]:
    out_rows = []
    for variant in PROBE_VARIANTS if probe else VARIANTS:
        n = seeds if variant in ("lossless", DEFAULT) and not probe else 1
        runs = [runmod.load_result(run_spec(out, variant, lr, s, probe)) for s in range(n)]
        row = report.method_row("code", METHOD, runs, gate, lr)
        row.update(variant=variant, **spool_figures(spool_dir(out, variant, probe)))
        row.update(reconstruction(out, variant, probe) if variant != "lossless" else
                   {"rel_error": 0.0, "cosine": 1.0, "min_cosine": 1.0})
        out_rows.append(row)
    return out_rows


def table(rows_: list[dict]) -> str:
    lines = ["| codec | bytes/token | vs lossless | target cosine (min layer) | rel. error | seeds | target gap closed "
             "| general ppl change |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    lossless = next(r for r in rows_ if r["variant"] == "lossless")["bytes_per_token"]
    for r in rows_:
        sd = f" ± {100 * r['target_test_gap_sd']:.1f}" if r["seeds"] > 1 else ""
        lines.append(f"| {r['variant']}{' (default)' if r['variant'] == DEFAULT else ''} | "
                     f"{r['bytes_per_token']:,.0f} | {lossless / r['bytes_per_token']:.1f}x | {r['cosine']:.3f} "
                     f"({r['min_cosine']:.3f}) | {r['rel_error']:.3f} | {r['seeds']} | "
                     f"{100 * r['target_test_gap']:.1f}%{sd} | {100 * r['general_test_change']:+.0f}% |")
    return "\n".join(lines)


def verdict(rows_: list[dict]) -> str:
    by = {r["variant"]: r for r in rows_}
    a, b = by["lossless"], by[DEFAULT]
    spread = max(a["target_test_gap_sd"], b["target_test_gap_sd"])
    diff = b["target_test_gap"] - a["target_test_gap"]
    within = abs(diff) <= spread
    return (f"Default codec `{DEFAULT}` vs lossless: {100 * b['target_test_gap']:.1f}% vs {100 * a['target_test_gap']:.1f}% "
            f"of the target gap ({100 * diff:+.1f} points; largest seed spread {100 * spread:.1f}): "
            f"{'within' if within else 'OUTSIDE'} the seed spread, at {a['bytes_per_token'] / b['bytes_per_token']:.0f}x "
            f"fewer bytes per token.")


def plot(rows_: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for bits, marker in ((8, "o"), (16, "s")):
        pts = [r for r in rows_ if r["variant"].endswith(f"b{bits}")]
        left.plot([r["bytes_per_token"] for r in pts], [100 * r["target_test_gap"] for r in pts], marker,
                  label=f"compact, {bits}-bit")
        right.plot([r["bytes_per_token"] for r in pts], [r["rel_error"] for r in pts], marker,
                   label=f"compact, {bits}-bit")
        for r in pts:
            left.annotate(r["variant"].split("b")[0], (r["bytes_per_token"], 100 * r["target_test_gap"]))
    lossless = next(r for r in rows_ if r["variant"] == "lossless")
    left.axhline(100 * lossless["target_test_gap"], color="k", ls="--",
                 label=f"lossless ({lossless['bytes_per_token']:,.0f} B/token)")
    left.set(xscale="log", xlabel="bytes per token", ylabel="target gap closed (%)",
             title="gap closed vs packet size")
    right.set(xscale="log", xlabel="bytes per token", ylabel="target relative error", title="reconstruction error")
    for ax in (left, right):
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--probe", action="store_true", help="also the geometry-only probe (see above)")
    p.add_argument("--dry", action="store_true", help="the plumbing on the tiny demo world (numbers meaningless)")
    p.add_argument("--cache-dir", default=None)
    args = p.parse_args(argv)
    out = Path(args.out or REPO / "runs" / f"quality-codec{'-dry' if args.dry else ''}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    paths = real._assets(args.dry, ["code"], args.cache_dir)
    seq_len = 32 if args.dry else 128
    gate, _ = real.gate_pairs(paths, seq_len, 8 if args.dry else 64, 0.2)
    chosen = json.loads((HERE / "results" / "real" / "results.json").read_text())["chosen"]
    lr = chosen.get(METHOD, 3e-3)
    job = {"pairs": paths, "base_overrides": list(REAL_BASE + (real.DRY if args.dry else ())), "device": "cpu",
           "eval_sequences": 8 if args.dry else 64, "experiment": "quality-codec", "keep_models": False,
           "mlflow_root": None}
    teach = [teach_spec(out, v) for v in VARIANTS] + [teach_spec(out, v, True) for v in PROBE_VARIANTS if args.probe]
    runmod.run_batch(teach, job, args.workers, out, "cpu", "codec-spools")
    specs = [run_spec(out, v, lr, s) for v in VARIANTS for s in range(args.seeds if v in ("lossless", DEFAULT)
                                                                       else 1)]
    specs += [run_spec(out, v, lr, 0, True) for v in PROBE_VARIANTS if args.probe]
    runmod.run_batch(specs, job, args.workers, out, "cpu", "codec-runs")
    result_rows = rows(out, lr, args.seeds, gate["code"])
    probe_rows = rows(out, lr, 1, gate["code"], probe=True) if args.probe else []
    results = out / "results" / "codec"
    results.mkdir(parents=True, exist_ok=True)
    md = (f"# Packet codecs on the real main pair{' (DRY: numbers meaningless)' if args.dry else ''}\n\n"
          f"{time.strftime('%Y-%m-%d')}; method `{METHOD}` (the best preset) at lr {lr:g}; budget: "
          f"{' '.join(REAL_BASE)}; {time.perf_counter() - start:.0f} s wall in this invocation\n\n"
          f"{verdict(result_rows)}\n\n{table(result_rows)}\n")
    if probe_rows:
        md += (f"\n## Probe: geometry only ({' '.join(PROBE)}), the layer targets the only teacher signal, 1 seed\n\n"
               f"{table(probe_rows)}\n")
    (results / "table.md").write_text(md)
    report.dump(results / "results.json", {"rows": result_rows, "probe_rows": probe_rows, "lr": lr,
                                           "default": DEFAULT, "dry": args.dry})
    plot(result_rows, results / "curve.png")
    print(md)
    return 1 if any(r["failed"] for r in result_rows) else 0


if __name__ == "__main__":
    sys.exit(main())
