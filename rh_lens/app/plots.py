"""Figures from results (plain data in, matplotlib figure out; nothing is computed here).

No backend is chosen here: figures go to whatever backend the caller has (inline in a
notebook, a window, or files from the command line, which picks Agg)."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.patches import Patch, Rectangle

from rh_lens.detection.records import DetectionResult
from rh_lens.execution.files import write_atomic
from rh_lens.heads import Head
from rh_lens.interventions.masking import AblationResult
from rh_lens.tasks.splits import held_out


def score_heatmap(result: DetectionResult, threshold: float | None = None, ax=None):
    """Layer x head map of retrieval scores; heads at or above the threshold are outlined."""
    threshold = result.threshold if threshold is None else threshold
    scores = result.scores().numpy()
    if ax is None:
        width = min(16, 2.5 + 0.32 * result.n_heads)
        height = min(14, 1.5 + 0.22 * result.n_layers)
        _, ax = plt.subplots(figsize=(width, height), constrained_layout=True)
    image = head_map(ax, scores, threshold, vmax=max(1e-9, float(scores.max())))
    colorbar = ax.figure.colorbar(image, ax=ax, label="retrieval score")
    colorbar.ax.axhline(threshold, color="red", linewidth=2)
    n_good, n_all = len(result.successful), len(result.trials)
    ax.set_title(
        f"{result.model}: {len(result.retrieval_heads(threshold))} of {result.n_layers * result.n_heads} heads "
        f"score >= {threshold:g} (red)  [{n_good}/{n_all} trials retrieved]",
        fontsize=9,
    )
    _layer_head_axes(ax, result.n_layers, result.n_heads)
    return ax.figure


def head_map(ax, scores, threshold: float, vmax: float = 1.0):
    """Draw a layer x head score map on `ax` (layer 0 at the bottom), heads at or above the
    threshold outlined in red; returns the image (for a colour bar)."""
    image = ax.imshow(scores, aspect="auto", cmap="viridis", vmin=0, vmax=vmax, origin="lower")
    for layer, head in zip(*np.nonzero(np.asarray(scores) >= threshold)):
        ax.add_patch(Rectangle((head - 0.5, layer - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=1.5))
    return image


def _layer_head_axes(ax, n_layers: int, n_heads: int) -> None:
    """Labels and ticks (at most ~16 per axis) of a layer x head map."""
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(0, n_heads, max(1, n_heads // 16)))
    ax.set_yticks(range(0, n_layers, max(1, n_layers // 16)))


def _panel_title(row: dict) -> str:
    """A masking condition's panel title (a summary row): no masking, top-K, K random heads."""
    k = row["k"]
    return {"none": "no masking", "top": f"top-{k} retrieval heads", "random": f"{k} random heads ({row['n_seeds']} seeds)"}[
        row["kind"]
    ]


def niah_panels(panels: list[tuple[str, tuple]], title: str):
    """NIAH maps on one colour scale, one panel per (panel title, `recall_grid(records)`):
    x context length, y needle depth, colour ROUGE-1 recall."""
    columns = min(len(panels), 4)
    rows = -(-len(panels) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(3.2 * columns + 1, 2.8 * rows), squeeze=False, constrained_layout=True)
    image = None
    for ax, (panel, (lengths, depths, grid)) in zip(axes.flat, panels):
        image = ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto", origin="lower")
        ax.set_title(f"{panel}\nmean recall {grid[~np.isnan(grid)].mean():.2f}", fontsize=9)
        ax.set_xticks(range(len(lengths)), [str(x) for x in lengths], fontsize=7, rotation=45)
        ax.set_yticks(range(len(depths)), [str(d) for d in depths], fontsize=7)
        ax.set_xlabel("context length (tokens)", fontsize=8)
        ax.set_ylabel("needle depth (%)", fontsize=8)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    figure.colorbar(image, ax=axes, label="ROUGE-1 recall", shrink=0.8)
    figure.suptitle(title, fontsize=10)
    return figure


def niah_heatmaps(result: AblationResult):
    """The paper's NIAH maps, one per masking condition (mean over needles and seeds)."""
    mode = "decode steps only" if result.decode_only else "all positions"
    panels = [(_panel_title(row), result.recall_grid(row["condition"])) for row in result.summary()]
    return niah_panels(panels, f"{result.model}: NIAH under {result.method} masking ({mode})")


METHOD_TITLES = {
    "full": "full cache",
    "retrieval": "retrieval heads full",
    "random": "random KV heads full",
    "streaming": "StreamingLLM (same bytes)",
    "razor": "RazorAttention heads full",
}


def compression_heatmaps(result):
    """NIAH maps per compression condition (random heads: mean over seeds)."""
    panels = [
        (
            f"{METHOD_TITLES[row['method']]}"
            + (f", {row['full_fraction']:g} full" if row["method"] != "full" else "")
            + f"\n{100 * row['kv_kept']:.0f}% of the KV cache",
            result.recall_grid(row["condition"]),
        )
        for row in result.summary()
    ]
    mode = "decode steps only" if result.decode_only else "prefill and decode"
    return niah_panels(panels, f"{result.model}: NIAH under KV compression, sink {result.sink} + window {result.window} ({mode})")


def recall_vs_kv(result):
    """Mean recall against the fraction of the KV cache kept, one line per method (error bars:
    95% intervals over trials)."""
    rows = result.summary()
    figure, ax = plt.subplots(figsize=(5.5, 3.8), constrained_layout=True)
    for method, style in (("retrieval", "o-"), ("random", "s--"), ("streaming", "^-."), ("razor", "d:")):
        points = sorted((r for r in rows if r["method"] == method), key=lambda r: r["kv_kept"])
        if points:
            ax.errorbar(
                [100 * r["kv_kept"] for r in points],
                [r["mean_recall"] for r in points],
                yerr=interval_errors(points),
                fmt=style,
                capsize=3,
                label=METHOD_TITLES[method],
            )
    for r in rows:
        if r["method"] == "full":
            ax.axhline(r["mean_recall"], color="grey", linestyle=":", label="full cache")
    ax.set_xlabel("KV cache kept (%)")
    ax.set_ylabel("mean ROUGE-1 recall")
    ax.set_ylim(-0.03, 1.05)
    ax.set_title(f"{result.model}: sink {result.sink} + window {result.window}", fontsize=10)
    ax.legend(fontsize=7)
    return figure


INTERVALS = {"mean_recall": "recall_interval", "success_rate": "success_interval", "retained": "retained_interval"}


def interval_errors(rows: list[dict | None], measure: str = "mean_recall") -> np.ndarray:
    """Error bars (2 x rows: below, above) from each summary row's 95% interval of `measure`
    over trials (`InterventionResult.summary`); none where a row has no interval."""
    below, above = [], []
    for row in rows:
        interval = None if row is None or row.get(measure) is None else row.get(INTERVALS[measure])
        below.append(0.0 if interval is None else max(0.0, row[measure] - interval[0]))
        above.append(0.0 if interval is None else max(0.0, interval[1] - row[measure]))
    return np.array([below, above])


def recall_vs_factor(result):
    """Mean recall against the boost factor: top-K retrieval heads vs K random heads boosted
    by the same factor, one panel per K, no intervention as a line (error bars: 95% intervals
    over trials, seeds averaged per trial); where the records have head scores, a second row:
    how much the top-K heads copy (their mean copy score per trial) under the same conditions."""
    rows = result.factor_rows()
    ks = sorted({r["k"] for r in rows})
    measures = [("recall", "mean ROUGE-1 recall")]
    if any(r["top_score"] is not None for r in rows):
        measures.append(("score", "top-K heads' copy score"))
    figure, axes = plt.subplots(
        len(measures), len(ks), figsize=(4.5 * len(ks), 3.5 * len(measures)), constrained_layout=True, squeeze=False
    )
    for (measure, ylabel), panels in zip(measures, axes):
        for ax, k in zip(panels, ks):
            points = [r for r in rows if r["k"] == k]
            suffix = "_interval" if measure == "recall" else "_score_interval"
            for name, label, style in (
                ("top", f"top-{k} retrieval heads boosted", "o-"),
                ("random", f"{k} random other heads boosted", "s--"),
            ):
                found = [{"mean_recall": r[f"{name}_{measure}"], "recall_interval": r[f"{name}{suffix}"]} for r in points]
                kept = [(r["factor"], f) for r, f in zip(points, found) if f["mean_recall"] is not None]
                if kept:
                    ax.errorbar(
                        [x for x, _ in kept],
                        [f["mean_recall"] for _, f in kept],
                        yerr=interval_errors([f for _, f in kept]),
                        fmt=style,
                        capsize=3,
                        label=label,
                    )
            if points and points[0][f"none_{measure}"] is not None:
                ax.axhline(points[0][f"none_{measure}"], color="grey", linestyle=":", label="no intervention")
            ax.set_xscale("log", base=2)
            ax.set_xlabel(f"boost factor ({result.settings.get('method', 'sharpen')})")
            ax.set_ylabel(ylabel.replace("K", str(k)))
            if measure == "recall":
                ax.set_ylim(-0.03, 1.05)
            ax.legend(fontsize=7)
    figure.suptitle(f"{result.model}: steering retrieval heads", fontsize=10)
    return figure


def training_losses(result):
    """Each fine-tuning arm's loss on the training answers at every step."""
    figure, ax = plt.subplots(figsize=(5, 3.5), constrained_layout=True)
    for condition in result.conditions:
        training = condition.metadata.get("training")
        if training:
            ax.plot(
                range(1, len(training["losses"]) + 1),
                training["losses"],
                label=f"{condition.name} ({training['n_parameters']:,} params)",
            )
    ax.set_xlabel("step")
    ax.set_ylabel("loss on the training answers")
    ax.set_title(f"{result.model}: fine-tuning arms", fontsize=10)
    ax.legend(fontsize=7)
    return figure


def recall_vs_k(result: AblationResult, ax=None):
    """Mean recall against the number of masked heads: top-K vs random-K (error bars: 95%
    intervals over trials, seeds averaged per trial); on `ax`, or a figure of its own."""
    figure, ax = (None, ax) if ax is not None else plt.subplots(figsize=(5, 3.5), constrained_layout=True)
    rows = result.summary()
    for kind, label, style in (("top", "top-K retrieval heads", "o-"), ("random", "K random other heads", "s--")):
        points = [r for r in rows if r["kind"] == kind]
        ax.errorbar(
            [r["k"] for r in points],
            [r["mean_recall"] for r in points],
            yerr=interval_errors(points),
            fmt=style,
            capsize=3,
            label=label,
        )
    for r in rows:
        if r["kind"] == "none":
            ax.axhline(r["mean_recall"], color="grey", linestyle=":", label="no masking")
    ax.set_xlabel("masked heads K")
    # an exactly graded task (arithmetic) scores 1 or 0 per trial: its mean is accuracy
    exact = result.settings.get("task") == "arithmetic"
    ax.set_ylabel("accuracy" if exact else "mean ROUGE-1 recall")
    ax.set_ylim(-0.03, 1.05)
    ax.set_xticks(sorted({r["k"] for r in rows if r["kind"] != "none"}))
    ax.set_title(f"{result.model}: {result.method} masking", fontsize=10)
    ax.legend(fontsize=8)
    return figure


def recall_vs_k_panels(results: dict[str, AblationResult], title: str = ""):
    """`recall_vs_k` for several runs side by side, one panel per run (titled by its key): the
    same problems asked several ways (answer-only, with a chain of thought, ...)."""
    figure, axes = plt.subplots(1, len(results), figsize=(4.2 * len(results), 3.5), constrained_layout=True, squeeze=False)
    for ax, (name, result) in zip(axes[0], results.items()):
        recall_vs_k(result, ax)
        ax.set_title(name, fontsize=10)
    figure.suptitle(title, fontsize=10)
    return figure


def heldout_bars(sets: dict[str, list[dict]], measure: str = "mean_recall", title: str = ""):
    """Grouped bars, one group per evaluation set: `measure` ("mean_recall", "success_rate"
    or "retained") of each condition, from `InterventionResult.summary()` rows (random-K: mean
    over seeds), with its 95% interval over trials as error bars."""
    conditions = list(dict.fromkeys(r["condition"] for rows in sets.values() for r in rows))
    width = 0.8 / len(conditions)
    many = len(conditions) > 6  # the legend goes beside the bars, not over them
    colors = plt.get_cmap("tab20" if len(conditions) > 10 else "tab10").colors  # no colour used twice
    size = (max(4.5, 1.2 + 1.6 * len(sets)) + (2.6 if many else 0), 3.5)
    figure, ax = plt.subplots(figsize=size, constrained_layout=True)
    for i, condition in enumerate(conditions):
        found = [next((r for r in rows if r["condition"] == condition), None) for rows in sets.values()]
        values = [float("nan") if row is None or row[measure] is None else row[measure] for row in found]
        x = np.arange(len(sets)) + (i - (len(conditions) - 1) / 2) * width
        color = colors[i % len(colors)]
        ax.bar(x, values, width, yerr=interval_errors(found, measure), capsize=2, label=condition, color=color)
    ax.set_xticks(np.arange(len(sets)), list(sets))
    ax.set_ylabel(
        {"mean_recall": "mean ROUGE-1 recall", "success_rate": "retrieved", "retained": "kept right"}.get(measure, measure)
    )
    ax.set_ylim(0, 1.05)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, ncol=1 if many else 2, **({"loc": "upper left", "bbox_to_anchor": (1.01, 1)} if many else {}))
    return figure


def threshold_sensitivity(result: AblationResult):
    """What the threshold changes: how many heads are retrieval heads, and NIAH recall with
    exactly those masked against as many random heads."""
    rows = result.threshold_rows()
    t = [r["threshold"] for r in rows]
    figure, (left, right) = plt.subplots(1, 2, figsize=(8, 3.2), constrained_layout=True)
    left.plot(t, [r["n_heads"] for r in rows], "o-", color="#2e86c1")
    left.set_xlabel("retrieval-head threshold")
    left.set_ylabel("heads at or above it")
    right.plot(t, [r["top_recall"] for r in rows], "o-", label="those heads masked")
    right.errorbar(
        t,
        [r["random_recall"] for r in rows],
        yerr=[r["random_std"] or 0 for r in rows],
        fmt="s--",
        capsize=3,
        label="as many random heads",
    )
    right.axhline(rows[0]["none_recall"], color="grey", linestyle=":", label="no masking")
    right.set_xlabel("retrieval-head threshold")
    right.set_ylabel("mean ROUGE-1 recall")
    right.set_ylim(-0.03, 1.05)
    right.legend(fontsize=7)
    figure.suptitle(f"{result.model}: the threshold, {result.method} masking", fontsize=10)
    return figure


def save_figure(figure, path: str | Path, also: tuple[str, ...] = ()) -> None:
    """Write the figure to `path`, and beside it in each format of `also` (e.g. ("pdf",)),
    atomically and never through a symlink (see `write_atomic`); then close it."""
    path = Path(path)
    for target in [path] + [path.with_suffix(f".{suffix}") for suffix in also]:
        fmt = target.suffix.lstrip(".") or "png"
        write_atomic(target, lambda f, fmt=fmt: figure.savefig(f, format=fmt, dpi=150), mode="wb")
    plt.close(figure)


# --- analysis figures ---
# One style for every analysis figure: small serif-free fonts that stay readable at column
# width, no top/right spines, one colour per role.

PAPER_STYLE = {
    "font.size": 8,
    "axes.titlesize": 9,
    "axes.labelsize": 8,
    "xtick.labelsize": 7,
    "ytick.labelsize": 7,
    "legend.fontsize": 7,
    "axes.spines.top": False,
    "axes.spines.right": False,
}
ALWAYS_ON_COLOUR = "#c0392b"
CONTEXT_COLOUR = "#2e86c1"
NEUTRAL_COLOUR = "#7f8c8d"


@contextmanager
def _paper_figure(width: float, height: float, ncols: int = 1):
    """`with _paper_figure(w, h) as (figure, axes):` a row of axes drawn in PAPER_STYLE.

    The figure itself is created outside the style context: when a session's first
    figure is created inside `rc_context`, Jupyter's inline backend stops showing the
    figures of later cells."""
    figure = plt.figure(figsize=(width, height), layout="constrained")
    with plt.rc_context(PAPER_STYLE):
        yield figure, figure.subplots(1, ncols, squeeze=False)[0]


def activation_frequency_chart(activation, top: int | None = 60):
    """Each head's activation frequency, sorted; always-on heads in red, the rest in blue."""
    heads = activation.heads[:top]
    with _paper_figure(max(3.5, 0.14 * len(heads) + 1), 2.6) as (figure, (ax,)):
        colours = [ALWAYS_ON_COLOUR if h in activation.always_on else CONTEXT_COLOUR for h in heads]
        ax.bar(range(len(heads)), [activation.frequency[h] for h in heads], color=colours)
        ax.axhline(activation.always_on_fraction, color="black", linewidth=0.7, linestyle=":")
        ax.set_xticks(range(len(heads)), heads, rotation=90, fontsize=6)
        ax.set_ylim(0, 1.2)  # room above the bars for the legend
        ax.set_yticks([0, 0.25, 0.5, 0.75, 1])
        ax.set_xlabel("head (layer-head)")
        ax.set_ylabel("fraction of trials active")
        legend = [
            Patch(color=ALWAYS_ON_COLOUR, label=f"always on (active in >= {activation.always_on_fraction:g} of trials)"),
            Patch(color=CONTEXT_COLOUR, label="context-dependent"),
        ]
        ax.legend(handles=legend, loc="upper right", ncols=2, frameon=False)
        shown = f"top {len(heads)} of " if len(heads) < len(activation.heads) else ""
        ax.set_title(
            f"{activation.model}: {shown}{len(activation.heads)} heads ever active "
            f"(trial score > {activation.threshold:g}), {len(activation.trials)} trials"
        )
    return figure


def activation_matrix_heatmap(activation, top: int | None = 60):
    """Heads x trials (active or not), trials grouped by context length."""
    heads = activation.heads[:top]
    matrix = np.array(activation.active[: len(heads)])
    lengths = [t["context_length"] for t in activation.trials]
    with _paper_figure(min(12, max(4, 0.09 * len(lengths) + 1.5)), max(2.5, 0.12 * len(heads) + 1)) as (figure, (ax,)):
        ax.imshow(matrix, aspect="auto", cmap="Greys", vmin=0, vmax=1, interpolation="nearest")
        blocks = [i for i in range(1, len(lengths)) if lengths[i] != lengths[i - 1]]
        for boundary in blocks:
            ax.axvline(boundary - 0.5, color=ALWAYS_ON_COLOUR, linewidth=1)
        starts = [0] + blocks
        ends = blocks + [len(lengths)]
        ax.set_xticks(
            [(s + e - 1) / 2 for s, e in zip(starts, ends)], [f"{lengths[s]} tok" if lengths[s] else "all" for s in starts]
        )
        ax.set_yticks(range(len(heads)), heads, fontsize=6)
        ax.set_xlabel("trials, grouped by context length" if any(lengths) else "trials (context lengths not recorded)")
        ax.set_ylabel("head (most often active first)")
        ax.set_title(f"{activation.model}: active heads per trial (black = trial score > {activation.threshold:g})")
    return figure


def score_histograms(universalities):
    """Distribution of retrieval scores per model (log count), threshold marked."""
    with _paper_figure(2.6 * len(universalities) + 0.4, 2.4, ncols=len(universalities)) as (figure, axes):
        for ax, u in zip(axes, universalities):
            edges = np.array(u.histogram_edges)
            ax.bar(
                edges[:-1],
                u.histogram_counts,
                width=np.diff(edges),
                align="edge",
                color=NEUTRAL_COLOUR,
                edgecolor="white",
                linewidth=0.4,
            )
            ax.axvline(u.threshold, color=ALWAYS_ON_COLOUR, linewidth=1, label=f"threshold {u.threshold:g}")
            ax.set_yscale("log")
            ax.set_xlabel("retrieval score")
            ax.set_title(
                f"{u.model}\n{u.n_above}/{u.n_layers * u.n_heads} heads = {100 * u.fraction_above:.1f}% >= {u.threshold:g}"
            )
            ax.legend(frameon=False)
        axes[0].set_ylabel("heads")
    return figure


def layer_profiles(universalities):
    """Retrieval heads per layer, one panel per model."""
    with _paper_figure(2.6 * len(universalities) + 0.4, 2.4, ncols=len(universalities)) as (figure, axes):
        for ax, u in zip(axes, universalities):
            ax.bar(range(u.n_layers), u.layer_count_above, color=CONTEXT_COLOUR)
            ax.set_xlabel(f"layer (of {u.n_layers})")
            ax.set_title(f"{u.model}")
            ax.set_xlim(-0.6, u.n_layers - 0.4)
            ax.yaxis.get_major_locator().set_params(integer=True)
        axes[0].set_ylabel(f"heads with score >= {universalities[0].threshold:g}")
    return figure


def score_scatter(comparison, labels: int = 10):
    """Model A's score against model B's, head by head; shared top-K heads in red, the best
    `labels` of them named (more would overlap)."""
    with _paper_figure(3.4, 3.2) as (figure, (ax,)):
        ax.scatter(comparison.scores_a, comparison.scores_b, s=6, color=NEUTRAL_COLOUR, alpha=0.6, linewidths=0)
        for rank, shared in enumerate(comparison.shared_top):
            ax.scatter(shared["score_a"], shared["score_b"], s=12, color=ALWAYS_ON_COLOUR)
            if rank < labels:
                ax.annotate(
                    shared["head"], (shared["score_a"], shared["score_b"]), fontsize=5, xytext=(2, 2), textcoords="offset points"
                )
        upper = max(comparison.scores_a + comparison.scores_b + [1e-9])
        ax.plot([0, upper], [0, upper], color="black", linewidth=0.5, linestyle=":")
        ax.set_xlabel(f"{comparison.model_a} retrieval score")
        ax.set_ylabel(f"{comparison.model_b} retrieval score")
        pearson = "n/a" if comparison.pearson is None else f"{comparison.pearson:.2f}"
        spearman = "n/a" if comparison.spearman is None else f"{comparison.spearman:.2f}"
        ax.set_title(
            f"Pearson {pearson}, Spearman {spearman}\n"
            f"top-{comparison.top_k} overlap {comparison.top_k_overlap:.2f} (red: shared top heads)"
        )
    return figure


def coverage_curves(coverages):
    """Mean fraction of copied answer tokens explained by the top-n heads, per model."""
    with _paper_figure(3.4, 2.6) as (figure, (ax,)):
        for c in coverages:
            n = range(1, len(c.mean_coverage) + 1)
            ax.plot(n, c.mean_coverage, marker="o", markersize=2.5, linewidth=1, label=f"{c.model} ({len(c.trials)} trials)")
        ax.set_xlabel("top-n heads (by retrieval score)")
        ax.set_ylabel("copied answer tokens explained")
        ax.set_ylim(0, 1.03)
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x:g}"))  # 1, 10, not 10^0
        ax.legend(frameon=False)
        ax.set_title("How many heads a trial needs")
    return figure


def score_intervals(b, top: int = 20):
    """The top heads' retrieval scores with their bootstrap intervals; the bar colour says how
    often the head is in a resample's top K."""
    heads = b.heads[:top]
    with _paper_figure(3.6, max(2.2, 0.16 * len(heads) + 1)) as (figure, (ax,)):
        y = np.arange(len(heads))[::-1]
        frequency = np.array([b.top_k_frequency.get(h, 0.0) for h in heads])
        colours = [ALWAYS_ON_COLOUR if f >= 0.9 else CONTEXT_COLOUR if f > 0.1 else NEUTRAL_COLOUR for f in frequency]
        score, low, high = (np.array(v[: len(heads)]) for v in (b.score, b.low, b.high))
        ax.errorbar(score, y, xerr=[score - low, high - score], fmt="none", ecolor="black", elinewidth=0.7, capsize=2)
        ax.scatter(score, y, color=colours, s=14, zorder=3)
        ax.set_yticks(y, heads, fontsize=6)
        ax.set_xlabel("retrieval score")
        ax.set_xlim(0, max(1.0, float(high.max()) if len(high) else 1.0))
        legend = [
            Patch(color=ALWAYS_ON_COLOUR, label=f"in >= 90% of resampled top {b.top_k}"),
            Patch(color=CONTEXT_COLOUR, label="in 10-90%"),
            Patch(color=NEUTRAL_COLOUR, label="in <= 10%"),
        ]
        ax.legend(handles=legend, loc="lower right", frameon=False)
        ax.set_title(f"{b.model}: {100 * b.confidence:g}% bootstrap intervals\n({b.n_trials} trials, {b.n_resamples} resamples)")
    return figure


def analysis_figures(analysis) -> dict:
    """The figures of one results file's `Analysis`, by file stem."""
    figures = {
        "activation_frequency": activation_frequency_chart(analysis.dynamic_activation),
        "activation_matrix": activation_matrix_heatmap(analysis.dynamic_activation),
        "score_histogram": score_histograms([analysis.universality]),
        "layer_profile": layer_profiles([analysis.universality]),
    }
    if analysis.coverage is not None:
        figures["coverage"] = coverage_curves([analysis.coverage])
    if analysis.bootstrap is not None:
        figures["score_intervals"] = score_intervals(analysis.bootstrap)
    return figures


def save_figures(figures: dict, out_dir: str | Path) -> list[Path]:
    """Each figure as `<out_dir>/<stem>.png` and `.pdf`; returns the PNG paths."""
    paths = [Path(out_dir) / f"{stem}.png" for stem in figures]
    for path, figure in zip(paths, figures.values()):
        save_figure(figure, path, also=("pdf",))
    return paths


# --- patching figures ---

PATCHING_TITLES = {
    "head_out": "head output (hook_z)",
    "pattern": "attention pattern (hook_pattern)",
    "resid": "residual stream (hook_resid_pre)",
    "mlp_out": "MLP output (hook_mlp_out)",
}
DIRECTION_TITLES = {"denoise": "denoising: clean into corrupted (restored)", "noise": "noising: corrupted into clean (destroyed)"}


def _effect_limit(grids) -> float:
    values = np.concatenate([np.asarray(g, dtype=float).ravel() for g in grids])
    values = values[~np.isnan(values)]
    return max(1e-6, float(np.abs(values).max())) if len(values) else 1.0


def patching_heatmaps(result, kind: str = "head_out"):
    """Layer x head maps of patching effect, one panel per direction, one colour scale
    (1 = the head alone carries the clean answer; grey = not patched)."""
    directions = list(result.effects[kind])
    grids = [result.effect(kind, d).numpy() for d in directions]
    limit = _effect_limit(grids)
    width = min(16, 2.0 + 0.3 * result.n_heads)
    height = min(14, 1.5 + 0.2 * result.n_layers)
    figure, axes = plt.subplots(1, len(grids), figsize=(width * len(grids) + 1, height), squeeze=False, constrained_layout=True)
    cmap = plt.get_cmap("RdBu_r").with_extremes(bad="#dddddd")
    for ax, direction, grid in zip(axes.flat, directions, grids):
        image = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=-limit, vmax=limit, aspect="auto", origin="lower")
        for layer, head, effect in result.ranking(kind, direction)[:5]:
            ax.text(head, layer, f"{effect:.2f}", ha="center", va="center", fontsize=6)
        ax.set_title(DIRECTION_TITLES[direction], fontsize=9)
        _layer_head_axes(ax, result.n_layers, result.n_heads)
    figure.colorbar(image, ax=axes, label="patching effect")
    settings = result.settings
    figure.suptitle(
        f"{result.model}: {PATCHING_TITLES[kind]} patching, {settings.get('positions', '')} position(s), "
        f"{settings.get('prompt_tokens', '?')} tokens, '{result.clean_token.strip()}' vs '{result.corrupted_token.strip()}'",
        fontsize=10,
    )
    return figure


def resid_heatmap(result, direction: str = "denoise"):
    """Position x layer map of residual-stream patching: where the answer lives, layer by
    layer, from the needle's answer tokens to the answer position."""
    grid = result.effect("resid", direction).numpy()
    labels = [c["label"] for c in result.resid_columns]
    limit = _effect_limit([grid])
    figure, ax = plt.subplots(
        figsize=(min(18, 2.5 + 0.28 * len(labels)), min(12, 1.8 + 0.2 * result.n_layers)), constrained_layout=True
    )
    image = ax.imshow(grid, cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto", origin="lower")
    ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=7)
    ax.set_yticks(range(0, result.n_layers, max(1, result.n_layers // 16)))
    ax.set_xlabel("position (answer tokens clean/corrupted, context, prompt end)")
    ax.set_ylabel("layer (residual stream entering it)")
    figure.colorbar(image, ax=ax, label="patching effect")
    ax.set_title(f"{result.model}: residual stream, {DIRECTION_TITLES[direction]}", fontsize=10)
    return figure


def mlp_effects(result):
    """Each layer's MLP-output patching effect, per direction, beside the layer's largest
    head-output effect when heads were patched too: heads or MLPs?"""
    directions = list(result.effects["mlp_out"])
    figure, axes = plt.subplots(1, len(directions), figsize=(4.2 * len(directions), 3.2), squeeze=False, constrained_layout=True)
    layers = np.arange(result.n_layers)
    for ax, direction in zip(axes.flat, directions):
        mlp = result.effect("mlp_out", direction).numpy()[:, 0]
        width = 0.4 if "head_out" in result.effects else 0.8
        ax.bar(layers - (width / 2 if width < 0.8 else 0), mlp, width=width, color="#c0392b", label="MLP output (hook_mlp_out)")
        if direction in result.effects.get("head_out", {}):
            heads = np.nan_to_num(result.effect("head_out", direction).numpy(), nan=-np.inf).max(axis=1)
            ax.bar(
                layers + width / 2,
                np.where(np.isfinite(heads), heads, 0),
                width=width,
                color="#2e86c1",
                label="best head output (hook_z)",
            )
        ax.axhline(0, color="grey", linewidth=0.5)
        ax.set_xlabel("layer")
        ax.set_ylabel("patching effect")
        ax.set_title(DIRECTION_TITLES[direction], fontsize=9)
        ax.legend(fontsize=7)
    figure.suptitle(f"{result.model}: MLPs vs heads, {result.settings.get('positions', '')} position(s)", fontsize=10)
    return figure


def effect_vs_score_scatter(correlation: dict, model: str = "", labels: int = 8):
    """Each head's patching effect against its retrieval score, Spearman rho in the title;
    the heads with the largest effect or score are labelled."""
    effect, score = np.array(correlation["effect"]), np.array(correlation["score"])
    heads = correlation["heads"]
    figure, ax = plt.subplots(figsize=(5.5, 4.2), constrained_layout=True)
    ax.scatter(score, effect, s=14, alpha=0.7, color="#2e86c1", edgecolor="none")
    picked = set(np.argsort(-effect)[:labels]) | set(np.argsort(-score)[:labels])
    for i in sorted(picked):
        ax.annotate(str(Head.coerce(heads[i])), (score[i], effect[i]), fontsize=7, xytext=(3, 2), textcoords="offset points")
    ax.axhline(0, color="grey", linewidth=0.5)
    ax.set_xlabel("retrieval score")
    ax.set_ylabel(f"patching effect ({correlation['kind']}, {correlation['direction']})")
    ax.set_title(
        f"{model}: Spearman rho {correlation['spearman']:.2f} over {correlation['n_heads']} heads, "
        f"{correlation['spearman_scored']:.2f} over the {correlation['n_scored']} scoring > 0",
        fontsize=9,
    )
    return figure


# --- the head atlas ---


def atlas_recall_vs_k(atlas):
    """Mean recall with each method's top-K heads masked, one line per method; K random heads
    (mean over seeds) dashed, no masking dotted. Error bars: 95% intervals over the trials (an
    atlas written before them: the spread over seeds)."""
    figure, ax = plt.subplots(figsize=(5.5, 3.6), constrained_layout=True)
    for method in [*atlas.methods, "random"]:
        rows = sorted((r for r in atlas.masking if r["method"] == method), key=lambda r: r["k"])
        style = dict(fmt="s--", color="grey") if method == "random" else dict(fmt="o-")
        spread = interval_errors(rows) if all("recall_interval" in r for r in rows) else [r["std_over_seeds"] for r in rows]
        ax.errorbar([r["k"] for r in rows], [r["mean_recall"] for r in rows], yerr=spread, capsize=3, label=method, **style)
    ax.axhline(atlas.recall("none", 0), color="black", linestyle=":", label="no masking")
    ax.set_xticks(atlas.ks)
    ax.set_xlabel("masked heads K (each method's top K)")
    ax.set_ylabel("mean ROUGE-1 recall")
    ax.set_ylim(-0.03, 1.05)
    where = "held-out" if held_out(atlas.settings) else "in-grid"
    ax.set_title(f"{atlas.model}: {where} recall under each method's top-K heads masked", fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    return figure


def atlas_kv_bars(atlas):
    """Recall at the same KV bytes: each method's ranking as the policy, random KV heads and
    StreamingLLM; the full cache as a line. Error bars as in `atlas_recall_vs_k`."""
    rows = [r for r in atlas.kv if r["method"] != "full"]
    spread = interval_errors(rows) if all("recall_interval" in r for r in rows) else [r["std_over_seeds"] for r in rows]
    full = next(r for r in atlas.kv if r["method"] == "full")
    figure, ax = plt.subplots(figsize=(1.5 + 0.7 * len(rows), 3.4), constrained_layout=True)
    colours = ["grey" if r["method"] in ("random", "streaming") else "tab:blue" for r in rows]
    ax.bar(range(len(rows)), [r["mean_recall"] for r in rows], yerr=spread, color=colours, capsize=3)
    ax.axhline(full["mean_recall"], color="black", linestyle=":", label="full cache")
    ax.set_xticks(range(len(rows)), [r["method"] for r in rows], rotation=30, ha="right")
    ax.set_ylabel("mean ROUGE-1 recall")
    ax.set_ylim(0, 1.05)
    kept = np.mean([r["kv_kept"] for r in rows])
    ax.set_title(f"{atlas.model}: {rows[0]['full_fraction']:.0%} of KV heads full ({kept:.0%} of the cache)", fontsize=9)
    ax.legend(fontsize=7)
    return figure


def agreement_matrix(atlas):
    """Spearman between every two methods' maps; each cell also gives the top-K overlap."""
    n = len(atlas.methods)
    rho, overlap = np.eye(n), np.eye(n)
    index = {m: i for i, m in enumerate(atlas.methods)}
    for r in atlas.agreement:
        i, j = index[r["a"]], index[r["b"]]
        rho[i, j] = rho[j, i] = np.nan if r["spearman"] is None else r["spearman"]
        overlap[i, j] = overlap[j, i] = r["top_k_overlap"]
    figure, ax = plt.subplots(figsize=(1.5 + 0.8 * n, 1 + 0.7 * n), constrained_layout=True)
    image = ax.imshow(rho, cmap="RdBu_r", vmin=-1, vmax=1)
    for i in range(n):
        for j in range(n):
            if i != j:
                ax.text(j, i, f"{rho[i, j]:.2f}\n{overlap[i, j]:.0%}", ha="center", va="center", fontsize=6)
    ax.set_xticks(range(n), atlas.methods, rotation=35, ha="right", fontsize=7)
    ax.set_yticks(range(n), atlas.methods, fontsize=7)
    top_k = atlas.agreement[0]["top_k"] if atlas.agreement else 0
    figure.colorbar(image, ax=ax, label="Spearman")
    ax.set_title(f"{atlas.model}: Spearman (top-{top_k} overlap)", fontsize=9)
    return figure


def atlas_maps(atlas):
    """Every method's layer x head map side by side, each scaled to its own largest score
    (methods have different units); the method's top K (the largest K masked) outlined."""
    n = len(atlas.methods)
    figure, axes = plt.subplots(1, n, figsize=(1.2 + 2.2 * n, 3.2), constrained_layout=True, squeeze=False)
    k = max(atlas.ks)
    for ax, method in zip(axes[0], atlas.methods):
        scores = np.asarray(atlas.maps[method], dtype=float)
        cut = max(np.sort(scores.ravel())[-k], np.nextafter(0, 1))  # a head scoring 0 is in no top K
        head_map(ax, scores, threshold=cut, vmax=max(1e-9, float(scores.max())))
        ax.set_title(method, fontsize=8)
        _layer_head_axes(ax, atlas.n_layers, atlas.n_heads)
    figure.suptitle(f"{atlas.model}: each method's map (its top {k} outlined)", fontsize=9)
    return figure


def atlas_overview(atlases: dict):
    """Several atlases (name -> Atlas) side by side: left, recall with each method's top K
    masked at each atlas's smallest K, next to K random heads (mean over seeds); right, recall
    under each method's KV policy, next to random KV heads and StreamingLLM at the same bytes
    (as sized for uniform layers).
    A black tick marks each atlas's recall with nothing masked / the full cache."""
    methods = list(dict.fromkeys(m for a in atlases.values() for m in a.methods))
    figure, (left, right) = plt.subplots(1, 2, figsize=(3 + 2.4 * len(atlases), 3.8), constrained_layout=True)
    colours = dict(zip(methods, plt.cm.tab10.colors))

    def bars(ax, values: dict[str, list[float]], baselines: list[float]):
        width = 0.85 / len(values)
        for i, (name, ys) in enumerate(values.items()):
            x = np.arange(len(atlases)) + (i - (len(values) - 1) / 2) * width
            ax.bar(x, ys, width, label=name, color=colours.get(name, "lightgrey" if name == "random" else "dimgrey"))
        ax.scatter(np.arange(len(atlases)), baselines, marker="_", s=2000, color="black", zorder=3)
        ax.set_xticks(np.arange(len(atlases)), list(atlases), fontsize=7)
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("mean ROUGE-1 recall")

    def masked(a, method):
        row = next((r for r in a.masking if r["method"] == method and r["k"] == a.ks[0]), None)
        return float("nan") if row is None else row["mean_recall"]

    def kv(a, method):
        row = next((r for r in a.kv if r["method"] == method), None)
        return float("nan") if row is None else row["mean_recall"]

    bars(
        left,
        {m: [masked(a, m) for a in atlases.values()] for m in [*methods, "random"]},
        [a.recall("none", 0) for a in atlases.values()],
    )
    left.set_title("each method's top K masked (K: the atlas's smallest)\ntick: nothing masked", fontsize=8)
    bars(
        right,
        {m: [kv(a, m) for a in atlases.values()] for m in [*methods, "random", "streaming"]},
        [kv(a, "full") for a in atlases.values()],
    )
    # "same full KV heads", not "same bytes": where layers differ (Gemma-3's sliding-window
    # layers) the bytes kept depend on which layers' heads are full; the table says how many
    right.set_title("each ranking as the KV policy, same number of full KV heads\ntick: the full cache", fontsize=8)
    handles, labels = right.get_legend_handles_labels()
    figure.legend(handles, labels, loc="outside lower center", ncol=min(len(labels), 5), fontsize=7)
    return figure
