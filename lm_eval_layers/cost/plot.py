"""`--plot`: accuracy against measured generation and prompt speed, one labelled point per row,
the Pareto front joined by a line (matplotlib, Agg: no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def draw(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    for ax, speed, name in ((axes[0], "tg", "generation"), (axes[1], "pp", "prompt processing")):
        shown = [r for r in rows if r["acc"] is not None]
        key = f"{speed}_tokens_per_s"
        on = sorted((r for r in shown if r[f"pareto_{speed}"]), key=lambda r: r[key])
        ax.plot([r[key] for r in on], [r["acc"] for r in on], "-", color="tab:orange", label="Pareto front", zorder=1)
        for i, r in enumerate(sorted(shown, key=lambda r: r[key])):
            ax.errorbar(r[key], r["acc"], xerr=r[f"{key}_iqr"] / 2, fmt="o", zorder=2,
                        color="tab:orange" if r[f"pareto_{speed}"] else "tab:blue")
            ax.annotate(r["plan"] + (" (ckpt)" if r["kind"] == "checkpoint" else ""), (r[key], r["acc"]),
                        textcoords="offset points", xytext=(4, 5 if i % 2 else -12), fontsize=8)  # neighbours in speed apart
        ax.set_xlabel(f"{name}, tokens/s (median, bar: IQR)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy (mean over tasks)")
    axes[0].legend(loc="lower left")
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
