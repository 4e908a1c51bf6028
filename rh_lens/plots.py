"""Figures from results (plain data in, matplotlib figure out; nothing is computed here)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # figures are written to files; no display needed
import matplotlib.pyplot as plt
from matplotlib.patches import Rectangle

from .results import DetectionResult


def score_heatmap(result: DetectionResult, threshold: float | None = None, ax=None):
    """Layer x head map of retrieval scores; heads at or above the threshold are outlined."""
    threshold = result.threshold if threshold is None else threshold
    scores = result.scores().numpy()
    if ax is None:
        width = min(16, 2.5 + 0.32 * result.n_heads)
        height = min(14, 1.5 + 0.22 * result.n_layers)
        _, ax = plt.subplots(figsize=(width, height), constrained_layout=True)
    image = ax.imshow(scores, aspect="auto", cmap="viridis", vmin=0, vmax=max(1e-9, float(scores.max())), origin="lower")
    for layer, head, _ in result.retrieval_heads(threshold):
        ax.add_patch(Rectangle((head - 0.5, layer - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=1.5))
    colorbar = ax.figure.colorbar(image, ax=ax, label="retrieval score")
    colorbar.ax.axhline(threshold, color="red", linewidth=2)
    n_good, n_all = len(result.successful), len(result.trials)
    ax.set_title(
        f"{result.model}: {len(result.retrieval_heads(threshold))} of {result.n_layers * result.n_heads} heads "
        f"score >= {threshold:g} (red)  [{n_good}/{n_all} trials retrieved]",
        fontsize=9,
    )
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(0, result.n_heads, max(1, result.n_heads // 16)))
    ax.set_yticks(range(0, result.n_layers, max(1, result.n_layers // 16)))
    return ax.figure


def save_figure(figure, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=150)
    plt.close(figure)
