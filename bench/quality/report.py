"""The benchmark's outputs: per-pair tables (mean and spread over seeds), plots, and an MLflow summary.

Gap closed (per seed, on a held-out set) = (ln ppl_student - ln ppl_after) / (ln ppl_student - ln ppl_teacher):
the share of the teacher-student gap in nats per token that the transfer closed (1 = as good as the teacher,
negative = worse than before). Forgetting: general perplexity after / before - 1. Spread = sample standard
deviation over seeds.
"""
from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from methods import METHODS, PAIRS

GROUP_COLORS = {"reference": "tab:gray", "baseline": "tab:blue", "semalign": "tab:red", "ablation": "tab:orange"}


def gap_closed(before: float, after: float, teacher: float) -> float:
    gap = math.log(before) - math.log(teacher)
    return (math.log(before) - math.log(after)) / gap if gap > 0 else float("nan")


def _mean_sd(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def method_row(pair: str, method: str, runs: list[dict], gate_ppl: dict, lr) -> dict:
    """One table row from the final runs (all seeds) of a method on a pair."""
    m = METHODS[method]
    ok = [r for r in runs if r.get("status") == "ok"]
    row = {"pair": pair, "method": method, "label": m.label, "group": m.group, "lr": lr, "seeds": len(ok),
           "failed": len(runs) - len(ok)}
    for name in ("target_test", "general_test", "target_val"):
        before, teacher = gate_ppl[name]["student"], gate_ppl[name]["teacher"]
        ppls = [r["ppl"][name] for r in ok] if m.train else [before]
        row[f"{name}_ppl"], row[f"{name}_ppl_sd"] = _mean_sd(ppls)
        row[f"{name}_gap"], row[f"{name}_gap_sd"] = _mean_sd([gap_closed(before, p, teacher) for p in ppls])
        row[f"{name}_change"], row[f"{name}_change_sd"] = _mean_sd([p / before - 1.0 for p in ppls])
    row["wall_s"] = _mean_sd([r["wall_s"] for r in ok])[0] if ok else 0.0
    row["steps"] = ok[0]["steps"] if ok else 0
    row["tokens"] = ok[0]["tokens"] if ok else 0
    row["equal_budget"] = len({(r["steps"], r["tokens"]) for r in ok}) <= 1
    return row


def _pm(mean: float, sd: float, fmt: str) -> str:
    if not math.isfinite(mean):
        return "n/a"
    return f"{mean:{fmt}} ± {sd:{fmt.lstrip('+')}}" if sd else f"{mean:{fmt}}"


def pair_table(rows: list[dict], gate_ppl: dict) -> str:
    head = ("| method | lr | target ppl | general ppl | target gap closed | general ppl vs student | seeds | "
            "steps / tokens | wall s |")
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    t = gate_ppl
    general_t = t["general_test"]["teacher"] / t["general_test"]["student"] - 1.0
    lines.append(f"| teacher | | {t['target_test']['teacher']:.1f} | {t['general_test']['teacher']:.1f} | 100% | "
                 f"{100 * general_t:+.1f}% | | | |")
    for r in rows:
        lr = f"{r['lr']:g}" if r["lr"] else ""
        seeds = (f"{r['seeds']}" + (f" ({r['failed']} failed)" if r["failed"] else "")) if r["lr"] else ""
        budget = f"{r['steps']} / {r['tokens']}" if r["steps"] else ""
        lines.append(
            f"| {r['label']} | {lr} | {_pm(r['target_test_ppl'], r['target_test_ppl_sd'], '.1f')} | "
            f"{_pm(r['general_test_ppl'], r['general_test_ppl_sd'], '.1f')} | "
            f"{_pm(100 * r['target_test_gap'], 100 * r['target_test_gap_sd'], '.1f')}% | "
            f"{_pm(100 * r['general_test_change'], 100 * r['general_test_change_sd'], '+.1f')}% | {seeds} | "
            f"{budget} | {r['wall_s']:.0f} |" if r["lr"] else
            f"| {r['label']} | | {r['target_test_ppl']:.1f} | {r['general_test_ppl']:.1f} | 0% | 0% | | | |")
    return "\n".join(lines)


def search_table(search: dict[str, dict[float, float]], chosen: dict[str, float]) -> str:
    grid = sorted({lr for by_lr in search.values() for lr in by_lr})
    lines = ["| method | " + " | ".join(f"lr {lr:g}" for lr in grid) + " | chosen |",
             "|---|" + "---:|" * (len(grid) + 1)]
    for method, by_lr in search.items():
        cells = [f"{by_lr[lr]:.1f}" if lr in by_lr and math.isfinite(by_lr[lr]) else "failed" if lr in by_lr else ""
                 for lr in grid]
        lines.append(f"| {METHODS[method].label} | " + " | ".join(cells) + f" | {chosen.get(method, float('nan')):g} |")
    return "\n".join(lines)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_pair(rows: list[dict], title: str, path: Path) -> Path:
    """Two panels per method (mean ± sd over seeds): target gap closed, general perplexity change vs the student."""
    plt = _pyplot()
    labels = [r["label"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(12, 0.45 * len(rows) + 1.5), sharey=True)
    panels = (("target_test_gap", "target (held out): % of teacher-student gap closed", 100),
              ("general_test_change", "general (held out): % perplexity change vs student", None))
    for ax, (key, heading, ref) in zip(axes, panels):
        means = [100 * r[key] for r in rows]
        sds = [100 * r[f"{key}_sd"] for r in rows]
        ax.barh(range(len(rows)), means, xerr=sds, color=[GROUP_COLORS[r["group"]] for r in rows])
        ax.axvline(0, color="black", lw=0.8)
        if ref is not None:
            ax.axvline(ref, color="gray", lw=0.8, ls="--")
        ax.set_title(heading, fontsize=9)
    axes[0].set_yticks(range(len(rows)), labels)
    axes[0].invert_yaxis()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_losses(histories: dict[str, dict], path: Path) -> Path:
    """Per-stage training losses of one run per method (seed 0 at the chosen rate): one panel per method."""
    plt = _pyplot()
    items = [(m, h) for m, h in histories.items() if h]
    cols = 4
    rows = max(1, -(-len(items) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.8 * rows), squeeze=False)
    for ax, (method, hist) in zip(axes.flat, items):
        for stage, metrics in sorted(hist.items()):
            for key, style in (("layer_loss", "-"), ("out_loss", "--"), ("label_loss", ":")):
                points = metrics.get(key) or []
                if any(v for _, v in points):
                    ax.plot([s for s, _ in points], [v for _, v in points], style, label=f"L{stage} {key}")
        ax.set_title(METHODS[method].label, fontsize=8)
        ax.set_xlabel("step in stage", fontsize=7)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(items):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def log_summary(uri: str, experiment: str, rows: list[dict], artifacts: list[Path], params: dict) -> None:
    """One MLflow run per (pair, method) with the table's numbers, and one run holding the artifacts."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(experiment)
    for r in rows:
        run = client.create_run(exp_id, run_name=f"{r['pair']}.{r['method']}")
        for key in ("pair", "method", "group", "lr", "seeds", "steps", "tokens"):
            client.log_param(run.info.run_id, key, str(r[key]))
        for key, value in r.items():
            if isinstance(value, float) and math.isfinite(value):
                client.log_metric(run.info.run_id, key, value)
        client.set_terminated(run.info.run_id)
    run = client.create_run(exp_id, run_name="benchmark")
    for key, value in params.items():
        client.log_param(run.info.run_id, key, str(value)[:6000])
    for path in artifacts:
        client.log_artifact(run.info.run_id, str(path))
    client.set_terminated(run.info.run_id)


def plot_all(out: Path, rows: list[dict], tables: dict[str, str], histories: dict[str, dict], main: str) -> list[Path]:
    """Every pair's gap chart and the main pair's stage losses, under out/plots."""
    plots = out / "plots"
    plots.mkdir(exist_ok=True)
    artifacts = [plot_pair([r for r in rows if r["pair"] == p], PAIRS[p].label, plots / f"{p}_gap.png")
                 for p in tables if any(r["pair"] == p for r in rows)]
    if histories:
        artifacts.append(plot_losses(histories, plots / f"{main}_stage_losses.png"))
    return artifacts


def write_outputs(out: Path, tables: dict[str, str], search_md: str, gate_md: str, header: str) -> Path:
    parts = [header, "## Teacher-margin gate", gate_md, "## Learning-rate search (target validation ppl, seed 0)",
             search_md]
    for pair, table in tables.items():
        parts += [f"## {PAIRS[pair].label} (`{pair}`)", table]
    path = out / "table.md"
    path.write_text("\n\n".join(parts) + "\n")
    return path


def dump(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=1, default=str))
