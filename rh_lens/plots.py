"""Figures from results (plain data in, matplotlib figure out; nothing is computed here)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # figures are written to files; no display needed
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.patches import Rectangle

from .ablation import AblationResult
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


def _panels(result: AblationResult) -> list[tuple[str, str, int]]:
    """(title, kind, k) per panel: no masking, then top-K and random-K side by side per K."""
    panels, seen = [], set()
    for c in result.conditions:
        if (c.kind, c.k) in seen:
            continue
        seen.add((c.kind, c.k))
        n_seeds = sum(1 for d in result.conditions if (d.kind, d.k) == (c.kind, c.k))
        title = {"none": "no masking", "top": f"top-{c.k} retrieval heads", "random": f"{c.k} random heads ({n_seeds} seeds)"}[c.kind]
        panels.append((title, c.kind, c.k))
    return panels


def niah_heatmaps(result: AblationResult):
    """The paper's NIAH maps, one per condition, on one colour scale: x context length,
    y needle depth, colour ROUGE-1 recall (mean over needles and seeds)."""
    panels = _panels(result)
    columns = min(len(panels), 4)
    rows = -(-len(panels) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(3.2 * columns + 1, 2.8 * rows), squeeze=False, constrained_layout=True)
    image = None
    for ax, (title, kind, k) in zip(axes.flat, panels):
        lengths, depths, grid = result.recall_grid(kind, k)
        image = ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto", origin="lower")
        ax.set_title(f"{title}\nmean recall {grid[~np.isnan(grid)].mean():.2f}", fontsize=9)
        ax.set_xticks(range(len(lengths)), [str(x) for x in lengths], fontsize=7, rotation=45)
        ax.set_yticks(range(len(depths)), [str(d) for d in depths], fontsize=7)
        ax.set_xlabel("context length (tokens)", fontsize=8)
        ax.set_ylabel("needle depth (%)", fontsize=8)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    figure.colorbar(image, ax=axes, label="ROUGE-1 recall", shrink=0.8)
    mode = "decode steps only" if result.decode_only else "all positions"
    figure.suptitle(f"{result.model}: NIAH under {result.method} masking ({mode})", fontsize=10)
    return figure


def recall_vs_k(result: AblationResult):
    """Mean recall against the number of masked heads: top-K vs random-K (spread over seeds)."""
    rows = result.summary()
    figure, ax = plt.subplots(figsize=(5, 3.5), constrained_layout=True)
    for kind, label, style in (("top", "top-K retrieval heads", "o-"), ("random", "K random other heads", "s--")):
        points = [r for r in rows if r["kind"] == kind]
        ax.errorbar([r["k"] for r in points], [r["mean_recall"] for r in points], yerr=[r["std_over_seeds"] for r in points], fmt=style, capsize=3, label=label)
    for r in rows:
        if r["kind"] == "none":
            ax.axhline(r["mean_recall"], color="grey", linestyle=":", label="no masking")
    ax.set_xlabel("masked heads K")
    ax.set_ylabel("mean ROUGE-1 recall")
    ax.set_ylim(-0.03, 1.05)
    ax.set_xticks(sorted({r["k"] for r in rows if r["kind"] != "none"}))
    ax.set_title(f"{result.model}: {result.method} masking", fontsize=10)
    ax.legend(fontsize=8)
    return figure


def save_figure(figure, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=150)
    plt.close(figure)
