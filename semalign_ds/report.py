"""Human-facing outputs of a run: the attribution bar chart, loss curves (PNG) and the evaluation table."""
from __future__ import annotations

from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def attribution_chart(scores: list[float], sources: list, path: Path) -> Path:
    """Bar per teacher layer (1..L_T), paired source layers highlighted."""
    plt = _pyplot()
    paired = {s if isinstance(s, int) else s[0] for s in sources}
    colors = ["tab:orange" if l in paired else "tab:blue" for l in range(1, len(scores) + 1)]
    fig, ax = plt.subplots(figsize=(max(4, len(scores) * 0.35), 3))
    ax.bar(range(1, len(scores) + 1), scores, color=colors)
    ax.set_xlabel("teacher layer")
    ax.set_ylabel("|grad x activation|")
    ax.set_title("Layer attribution (orange: paired source layers)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def loss_curves(history: dict[int, list[dict]], path: Path) -> Path:
    """One panel per loss term; one line per stage (student layer)."""
    plt = _pyplot()
    keys = [k for k in ("loss", "layer_loss", "out_loss", "label_loss")
            if any(row.get(k) is not None for rows in history.values() for row in rows)]
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for stage, rows in sorted(history.items()):
            ax.plot([r["step"] for r in rows], [r.get(key) for r in rows], label=f"layer {stage}")
        ax.set_title(key)
        ax.set_xlabel("step in stage")
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path

