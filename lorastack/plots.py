"""PNG plots of results a person would rather see than read (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def heatmap(matrix: list[list[float]], rows: list[str], cols: list[str], path: Path, title: str) -> Path:
    """Accuracy matrix as a heatmap with the values printed in each cell."""
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(cols), 1.2 + 0.55 * len(rows)))
    im = ax.imshow(matrix, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(cols)), cols, rotation=30, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xlabel("task (test split)")
    ax.set_ylabel("model")
    for i, row in enumerate(matrix):
        for j, v in enumerate(row):
            ax.text(j, i, f"{v:.0%}", ha="center", va="center", color="white" if v < 0.6 else "black", fontsize=9)
    ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="exact match")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
