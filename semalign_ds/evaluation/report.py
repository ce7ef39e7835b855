"""Human-facing outputs of a run: the attribution bar chart, the loss curves (PNG) and the per-stage table.

Loss history rows (what the training loop records, one per optimizer step): `step` (global optimizer step, 1-based
across the whole run), `stage` (int), and metric values (layer_loss, out_loss, label_loss, loss, lr, tokens_per_s,
...; a missing or None value is skipped).
"""
from __future__ import annotations

import math
from pathlib import Path

LOSS_KEYS = ("loss", "layer_loss", "out_loss", "label_loss")
PAIRED, OTHER = "tab:orange", "tab:blue"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    """Render in memory, then write atomically: a full disk is one error with the bytes, and no half a PNG."""
    import io

    from semalign_ds import files

    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=110, format=Path(path).suffix.lstrip(".") or "png")
    _pyplot().close(fig)
    return files.write_bytes(path, buffer.getvalue(), f"the plot {Path(path).name}")


def paired_layers(sources: list) -> dict[int, list[int]]:
    """Teacher layer -> the student layers it supervises (both layers of an interpolated (a, b, lam) source)."""
    paired: dict[int, list[int]] = {}
    for k, s in enumerate(sources, start=1):
        for layer in ([s] if isinstance(s, int) else list(s[:2])):
            paired.setdefault(int(layer), []).append(k)
    return paired


ATTRIBUTION_LABELS = {"grad_x_act": "|grad x activation|", "ablation": "LM loss rise when the layer is ablated"}


def attribution_figure(scores: list[float], sources: list, attribution: str = "grad_x_act"):
    """Bar per teacher layer (1..L_T); paired source layers orange, hatched and labelled with their student layers
    (S<k>); a paired layer whose bar is too small to see (score < 2% of the largest) gets a marker at its foot."""
    plt = _pyplot()
    L_T, paired = len(scores), paired_layers(sources)
    top = max(max(scores), 1e-12)
    fig, ax = plt.subplots(figsize=(min(14.0, max(6.0, 0.3 * L_T + 2.0)), 4.5), layout="constrained")
    layers = list(range(1, L_T + 1))
    bars = ax.bar(layers, scores, color=[PAIRED if l in paired else OTHER for l in layers], edgecolor="black",
                  linewidth=0.4)
    for layer, bar in zip(layers, bars):
        if layer not in paired:
            continue
        bar.set_hatch("//")
        small = scores[layer - 1] < 0.02 * top
        if small:
            ax.plot([layer], [0], marker="^", markersize=11, color=PAIRED, markeredgecolor="black", clip_on=False,
                    zorder=5, label="_paired_small")
        students = ",".join(f"S{k}" for k in paired[layer])
        ax.annotate(students + (" (~0)" if small else ""), (layer, scores[layer - 1]), xytext=(0, 4),
                    textcoords="offset points", ha="center", va="bottom", fontsize=8, rotation=90 if L_T > 24 else 0)
    ax.set_ylim(min(0.0, 1.25 * min(scores)), top * 1.25)  # ablation scores may be negative
    ax.set_xticks(layers if L_T <= 40 else layers[::max(1, L_T // 20)])
    ax.set_xlabel("teacher layer")
    ax.set_ylabel(ATTRIBUTION_LABELS[attribution])
    ax.set_title("Layer attribution\norange, hatched: source layer of student layer S<k>", fontsize=10)
    return fig


def attribution_chart(scores: list[float], sources: list, path: Path, attribution: str = "grad_x_act") -> Path:
    return _save(attribution_figure(scores, sources, attribution), path)


def _stage_starts(history: list[dict]) -> list[tuple[int, int]]:
    """(stage, its first global step) in order."""
    starts, last = [], None
    for row in history:
        if row["stage"] != last:
            starts.append((row["stage"], row["step"]))
            last = row["stage"]
    return starts


def loss_figure(history: list[dict]):
    """One panel per loss term on the global step; dashed lines at stage boundaries, each stage labelled."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    keys = [k for k in LOSS_KEYS if any(r.get(k) is not None for r in history)]
    if not history or not keys:
        raise ValueError("loss_curves: the history holds no loss values (rows need step, stage and a loss)")
    ncols = 1 if len(keys) == 1 else 2
    nrows = math.ceil(len(keys) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(6.0 * ncols, 3.4 * nrows + 0.4), layout="constrained",
                             squeeze=False, sharex=True)
    starts = _stage_starts(history)
    every = max(1, math.ceil(len(starts) / 12))  # at most ~12 stage labels per panel
    for ax, key in zip(axes.flat, keys):
        rows = [r for r in history if r.get(key) is not None]
        values = [r[key] for r in rows]
        ax.plot([r["step"] for r in rows], values, color="tab:blue", linewidth=1.2)
        low, high = min(values), max(values)
        pad = (high - low) or abs(high) or 1.0
        ax.set_ylim(low - 0.05 * pad, high + 0.18 * pad)  # a free band at the top for the stage labels
        for i, (stage, first) in enumerate(starts):
            if i:
                ax.axvline(first - 0.5, color="gray", linestyle="--", linewidth=0.8)
            if i % every == 0:
                ax.text(first - 0.5, 0.98, f" stage {stage}", transform=ax.get_xaxis_transform(), fontsize=8,
                        va="top", ha="left", color="dimgray")
        ax.set_xlim(history[0]["step"] - 0.5, history[-1]["step"] + 0.5)  # stage 1's label inside the panel
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(key)
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(keys):]:
        ax.set_visible(False)
    for ax in axes[-1]:
        ax.set_xlabel("global step")
    return fig


def loss_curves(history: list[dict], path: Path) -> Path:
    return _save(loss_figure(history), path)


def stage_table(history: list[dict]) -> str:
    """Markdown, a row per stage: its global steps, each loss term at the stage's first and last step, mean
    tokens/s (for eval.md)."""
    from semalign_ds.evaluation.evaluate import format_table

    keys = [k for k in LOSS_KEYS if any(r.get(k) is not None for r in history)]
    rows = []
    for stage, _ in _stage_starts(history):
        part = [r for r in history if r["stage"] == stage]
        row = {"stage": stage, "steps": f"{part[0]['step']}-{part[-1]['step']}"}
        for key in keys:
            values = [r[key] for r in part if r.get(key) is not None]
            row[f"{key} first"], row[f"{key} last"] = (values[0], values[-1]) if values else (None, None)
        speeds = [r["tokens_per_s"] for r in part if r.get("tokens_per_s") is not None]
        row["tokens/s"] = sum(speeds) / len(speeds) if speeds else None
        rows.append(row)
    columns = ["stage", "steps", *[f"{k} {w}" for k in keys for w in ("first", "last")], "tokens/s"]
    return format_table(rows, columns)
