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


def loss_curve(losses: list[float], eval_curve: list[tuple[int, float]], final_eval: float | None, path: Path,
               title: str) -> Path:
    """Training loss per step, with held-out loss where it was measured (periodic and final)."""
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    steps = list(range(1, len(losses) + 1))
    ax.plot(steps, losses, color="#4c72b0", alpha=0.35, linewidth=1, label="train loss (per step)")
    if len(losses) >= 5:  # a moving average: single-batch losses are noisy
        k = max(2, len(losses) // 20)
        smooth = [sum(losses[max(0, i - k + 1): i + 1]) / len(losses[max(0, i - k + 1): i + 1]) for i in range(len(losses))]
        ax.plot(steps, smooth, color="#4c72b0", linewidth=2, label=f"train loss (mean of {k})")
    if eval_curve:
        ax.plot([s for s, _ in eval_curve], [v for _, v in eval_curve], "o-", color="#dd8452", label="held-out loss")
    if final_eval is not None:
        ax.plot([len(losses)], [final_eval], "D", color="#c44e52", label=f"final held-out loss {final_eval:.3f}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (completion tokens)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
