"""What a run leaves behind: files (JSON and figures) and text tables.

`save_*` write a result's JSON and figures into a directory and return the paths written;
`format_*` turn a result into the table `rh-lens` prints. The command line, experiments/ and
notebooks all use these, so every front end writes and prints the same thing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rh_lens.analysis.analyses import Analysis, Comparison
from rh_lens.analysis.atlas import Atlas
from rh_lens.analysis.statistics import Bootstrap
from rh_lens.app.plots import (
    agreement_matrix,
    analysis_figures,
    atlas_kv_bars,
    atlas_maps,
    atlas_recall_vs_k,
    compression_heatmaps,
    effect_vs_score_scatter,
    mlp_effects,
    niah_heatmaps,
    patching_heatmaps,
    recall_vs_k,
    recall_vs_kv,
    resid_heatmap,
    save_figure,
    save_figures,
    score_heatmap,
    score_scatter,
    threshold_sensitivity,
)
from rh_lens.detection.records import DetectionResult, save_results
from rh_lens.execution.files import write_json
from rh_lens.heads import Head
from rh_lens.interventions.compression import CompressionResult, export_duo_attention
from rh_lens.interventions.masking import AblationResult
from rh_lens.interventions.patching import PatchingResult

# --- files -----------------------------------------------------------------------------


def save_detection(result: DetectionResult, out: str | Path) -> list[Path]:
    """results.json, head_scores.json (the reference's published format) and heatmap.png."""
    out = Path(out)
    paths = [out / "results.json", out / "head_scores.json", out / "heatmap.png"]
    save_results(result, paths[0])
    write_json(paths[1], result.to_published())
    save_figure(score_heatmap(result), paths[2])
    return paths


def save_ablation(result: AblationResult, out: str | Path) -> list[Path]:
    """ablation.json, niah_heatmaps.png (one panel per condition) and recall_vs_k.png."""
    out = Path(out)
    paths = [out / "ablation.json", out / "niah_heatmaps.png", out / "recall_vs_k.png"]
    write_json(paths[0], result.to_json())
    save_figure(niah_heatmaps(result), paths[1])
    save_figure(recall_vs_k(result), paths[2])
    if result.threshold_rows():
        paths.append(out / "threshold_sensitivity.png")
        save_figure(threshold_sensitivity(result), paths[-1])
    return paths


def save_compression(result: CompressionResult, out: str | Path) -> list[Path]:
    """compression.json, recall_vs_kv.png, niah_heatmaps.png and, for each retrieval policy,
    its split in DuoAttention's format under duo_attention/<full fraction>/."""
    out = Path(out)
    paths = [out / "compression.json", out / "recall_vs_kv.png", out / "niah_heatmaps.png"]
    write_json(paths[0], result.to_json())
    save_figure(recall_vs_kv(result), paths[1])
    save_figure(compression_heatmaps(result), paths[2])
    for condition in result.conditions:
        if condition.metadata["method"] == "retrieval":
            paths += export_duo_attention(
                condition.intervention.policy, out / "duo_attention" / f"{condition.metadata['full_fraction']:g}"
            )
    return paths


def save_atlas(atlas: Atlas, out: str | Path) -> list[Path]:
    """atlas.json (rewritten), recall_vs_k.png (each method's top-K masked), recall_at_kv.png
    (each method's KV policy at the same bytes), agreement.png and maps.png."""
    out = Path(out)
    paths = [out / "atlas.json", out / "recall_vs_k.png", out / "recall_at_kv.png", out / "agreement.png", out / "maps.png"]
    write_json(paths[0], atlas.to_json())
    for path, figure in zip(paths[1:], (atlas_recall_vs_k, atlas_kv_bars, agreement_matrix, atlas_maps)):
        save_figure(figure(atlas), path)
    return paths


def save_patching(result: PatchingResult, out: str | Path, correlation: dict[str, Any] | None = None) -> list[Path]:
    """patching.json, a heatmap per head kind and per residual direction, and with a
    `correlation` (see `effect_vs_score`) effect_vs_score.json and its scatter."""
    out = Path(out)
    paths = [out / "patching.json"]
    write_json(paths[0], result.to_json())
    for kind in ("head_out", "pattern"):
        if kind in result.effects:
            paths.append(out / f"{kind}_heatmap.png")
            save_figure(patching_heatmaps(result, kind), paths[-1])
    for direction in result.effects.get("resid", {}):
        paths.append(out / f"resid_heatmap_{direction}.png")
        save_figure(resid_heatmap(result, direction), paths[-1])
    if "mlp_out" in result.effects:
        paths.append(out / "mlp_vs_heads.png")
        save_figure(mlp_effects(result), paths[-1])
    if correlation is not None:
        paths += [out / "effect_vs_score.json", out / "effect_vs_score.png"]
        write_json(paths[-2], correlation)
        save_figure(effect_vs_score_scatter(correlation, result.model), paths[-1])
    return paths


def save_analysis(analysis: Analysis, out: str | Path) -> list[Path]:
    """analysis.json and the analysis figures (PNG, with a PDF beside each)."""
    out = Path(out)
    write_json(out / "analysis.json", analysis.to_json())
    return [out / "analysis.json"] + save_figures(analysis_figures(analysis), out)


def save_comparison(comparison: Comparison, out: str | Path) -> list[Path]:
    """comparison.json and the score-vs-score scatter (PNG and PDF)."""
    out = Path(out)
    write_json(out / "comparison.json", comparison.to_json())
    return [out / "comparison.json"] + save_figures({"score_scatter": score_scatter(comparison)}, out)


def format_written(paths: list[Path]) -> str:
    return "wrote " + ", ".join(str(p) for p in paths)


# --- tables ----------------------------------------------------------------------------


def format_ranking(result: DetectionResult, top: int = 20, threshold: float | None = None) -> str:
    """The summary and the top heads of a detection result."""
    threshold = result.threshold if threshold is None else threshold
    n_heads = result.n_layers * result.n_heads
    lines = [
        f"{result.model}: {result.n_layers} layers x {result.n_heads} heads; "
        f"{len(result.successful)}/{len(result.trials)} trials retrieved the answer",
        f"retrieval heads (score >= {threshold:g}): {len(result.retrieval_heads(threshold))}/{n_heads} "
        f"= {100 * result.fraction_above(threshold):.1f}%",
        f"{'rank':>4}  {'head':>6}  score",
    ]
    for rank, (layer, head, score) in enumerate(result.ranking(top), start=1):
        lines.append(f"{rank:>4}  {str(Head(layer, head)):>6}  {score:.3f}")
    return "\n".join(lines)


def format_bootstrap(b: Bootstrap, top: int = 20) -> str:
    """Each top head's score with its interval and how often it is in a resample's top K."""
    lines = [
        f"{b.model}: {100 * b.confidence:g}% bootstrap intervals over {b.n_trials} successful trials "
        f"({b.n_resamples} resamples, seed {b.seed}); top-{b.top_k} set: mean Jaccard {b.top_k_jaccard:.2f} with the full run",
        f"{'rank':>4}  {'head':>6}  {'score':>5}  {'interval':>15}  {'in top ' + str(b.top_k):>9}",
    ]
    for rank, (head, score, low, high) in enumerate(zip(b.heads[:top], b.score, b.low, b.high), start=1):
        lines.append(f"{rank:>4}  {head:>6}  {score:.3f}  [{low:.3f}, {high:.3f}]  {100 * b.top_k_frequency.get(head, 0):>8.0f}%")
    return "\n".join(lines)


def _kept(row: dict) -> str:
    return "-" if row["retained"] is None else f"{100 * row['retained']:.0f}%"


def format_ablation(result: AblationResult) -> str:
    """Mean recall per masking condition, with the spread over random seeds."""
    lines = [
        f"{result.model}: NIAH recall under {result.method} masking "
        f"({'decode steps only' if result.decode_only else 'all positions'})",
        f"{'condition':<14} {'K':>4}  {'mean recall':>11}  {'seed spread':>11}  {'retrieved':>9}  {'kept':>5}  {'no answer word':>14}"
        f"  {'distractor':>10}  {'invented':>8}",
    ]
    rows = result.summary()
    for row in rows:
        spread = f"+/- {row['std_over_seeds']:.3f}" if row["n_seeds"] else ""
        lines.append(
            f"{row['condition']:<14} {row['k']:>4}  {row['mean_recall']:>11.3f}  {spread:>11}  "
            f"{100 * row['success_rate']:>8.0f}%  {_kept(row):>5}  {100 * row['absent_rate']:>13.0f}%"
            f"  {100 * row['classes']['distractor']:>9.0f}%  {100 * row['classes']['invented']:>7.0f}%"
        )
    if rows and rows[0]["n_baseline_right"]:
        lines.append(f"kept: of the {rows[0]['n_baseline_right']} trials answered right unmasked, the share still right")
    for row in result.threshold_rows():
        random = f"{row['random_recall']:.3f}" if row["random_recall"] is not None else "-"
        top = f"{row['top_recall']:.3f}" if row["top_recall"] is not None else "-"
        lines.append(
            f"threshold {row['threshold']:g}: {row['n_heads']} heads; recall with them masked {top}, with as many random heads {random}"
        )
    return "\n".join(lines)


def format_compression(result: CompressionResult) -> str:
    """KV kept, compression ratio, recall and retrieval rate per method and budget."""
    mode = "decode steps only" if result.decode_only else "prefill and decode"
    lines = [
        f"{result.model}: NIAH under KV-cache compression, streaming heads keep {result.sink} sink + {result.window} recent tokens ({mode})",
        f"{'method':<10} {'full':>5}  {'KV kept':>7}  {'ratio':>5}  {'mean recall':>11}  {'seed spread':>11}  {'retrieved':>9}",
    ]
    for row in result.summary():
        spread = f"+/- {row['std_over_seeds']:.3f}" if (row["n_seeds"] or 1) > 1 else ""
        fraction = f"{row['full_fraction']:g}" if row["method"] != "full" else "all"
        lines.append(
            f"{row['method']:<10} {fraction:>5}  {100 * row['kv_kept']:>6.1f}%  {row['compression_ratio']:>5.2f}  "
            f"{row['mean_recall']:>11.3f}  {spread:>11}  {100 * row['success_rate']:>8.0f}%"
        )
    return "\n".join(lines)


def format_patching(result: PatchingResult, top: int = 10, correlation: dict[str, Any] | None = None) -> str:
    """The pair, the metric, the top heads per kind and direction, and the correlation."""
    clean, corrupted = result.clean_token.strip(), result.corrupted_token.strip()
    metric = (
        f"logit difference '{clean}' - '{corrupted}'"
        if result.metric == "logit_diff"
        else f"{result.metric} ('{clean}' vs '{corrupted}')"
    )
    lines = [
        f"{result.model}: {result.settings['prompt_tokens']} tokens, answer {result.settings['answer']!r} vs "
        f"{result.settings['corrupted_answer']!r}; {metric}: clean {result.clean_metric:.2f}, corrupted {result.corrupted_metric:.2f}",
    ]
    for kind in ("head_out", "pattern"):
        for direction in result.effects.get(kind, {}):
            ranking = result.ranking(kind, direction)[:top]
            lines.append(
                f"{kind} {direction} ({result.settings['positions']} position), top {len(ranking)}: "
                + ", ".join(f"{Head(l, h)} {e:.3f}" for l, h, e in ranking)
            )
    for direction in result.effects.get("mlp_out", {}):
        grid = result.effect("mlp_out", direction)[:, 0].tolist()
        best = sorted(range(len(grid)), key=lambda layer: -grid[layer])[:top]
        lines.append(
            f"mlp_out {direction} ({result.settings['positions']} position), top {len(best)} layers: "
            + ", ".join(f"{layer} {grid[layer]:.3f}" for layer in best)
        )
    if correlation is not None:
        lines.append(
            f"Spearman rho between {correlation['kind']} {correlation['direction']} effect and retrieval score: "
            f"{correlation['spearman']:.3f} (p = {correlation['p_value']:.2g}, {correlation['n_heads']} heads); over the "
            f"{correlation['n_scored']} heads scoring > 0: {correlation['spearman_scored']:.3f} (p = {correlation['p_value_scored']:.2g})"
        )
    return "\n".join(lines)


def format_analysis(analysis: Analysis) -> str:
    """Dynamic activation, grouped summaries and coverage of one results file."""
    activation, heads_needed = analysis.dynamic_activation, analysis.coverage
    jaccard = activation.mean_pairwise_jaccard
    lines = [
        f"dynamic activation (trial score > {activation.threshold:g}, {len(activation.trials)} successful trials): "
        f"{len(activation.heads)}/{activation.n_heads_total} heads ever active, "
        f"{len(activation.always_on)} always on (>= {activation.always_on_fraction:g} of trials), "
        f"{len(activation.context_dependent)} context-dependent",
        f"always on: {', '.join(activation.always_on) or '-'}",
        f"active heads per trial: mean {sum(activation.active_per_trial) / len(activation.active_per_trial):.1f}; "
        f"mean pairwise Jaccard of active sets: {jaccard if jaccard is not None else float('nan'):.2f}",
    ]
    if activation.groups:
        lines.append(f"{'group':<15} {'value':<12} {'trials':>6}  {'mean active':>11}  {'in any':>6}  {'in all':>6}")
    for group, rows in activation.groups.items():
        for row in rows:
            lines.append(
                f"{group:<15} {str(row['value']):<12} {row['n_trials']:>6}  {row['mean_active_heads']:>11.1f}  "
                f"{row['heads_active_in_any']:>6}  {row['heads_active_in_all']:>6}"
            )
    if heads_needed is not None and heads_needed.heads_needed:
        needed = sorted(heads_needed.heads_needed.values())
        curve = ", ".join(
            f"top-{n}: {c:.2f}" for n, c in enumerate(heads_needed.mean_coverage, start=1) if n in (1, 2, 3, 5, 10, 20)
        )
        lines.append(f"coverage of copied answer tokens (mean over {len(needed)} trials): {curve}")
        lines.append(f"heads needed for full coverage: median {needed[len(needed) // 2]}, max {needed[-1]}")
    if analysis.bootstrap is not None:
        b = analysis.bootstrap
        lines.append(
            f"bootstrap ({b.n_resamples} resamples of {b.n_trials} trials): top-{b.top_k} set mean Jaccard {b.top_k_jaccard:.2f}; "
            + ", ".join(f"{h} {s:.2f} [{lo:.2f}, {hi:.2f}]" for h, s, lo, hi in list(zip(b.heads, b.score, b.low, b.high))[:5])
        )
    if analysis.distractors is not None:
        d = analysis.distractors
        lines.append(f"distractors ({d.n_trials} trials): answers " + ", ".join(f"{k} {v}" for k, v in d.given.items()))
        lines.append(
            "heads copying the distractor when the model gives it (distractor score, true score then, true score when right): "
            + ", ".join(
                f"{h} {a:.2f}/{b:.2f}/{c:.2f}"
                for h, a, b, c in list(
                    zip(d.heads, d.distractor_score_when_wrong, d.true_score_when_wrong, d.true_score_when_right)
                )[:8]
            )
        )
    lines += analysis.notes
    return "\n".join(lines)


def format_comparison(comparison: Comparison) -> str:
    """Correlations, top-K overlap and the shared top heads of two results."""

    def number(x):
        return "n/a (constant scores)" if x is None else f"{x:.3f}"

    lines = [
        f"{comparison.model_a} vs {comparison.model_b} ({comparison.n_layers} layers x {comparison.n_heads} heads)",
        f"Pearson {number(comparison.pearson)}   Spearman {number(comparison.spearman)}",
        f"top-{comparison.top_k} overlap: {len(comparison.shared_top)}/{comparison.top_k} = {comparison.top_k_overlap:.2f}",
        f"heads >= {comparison.threshold:g}: {comparison.n_above_a} in A, {comparison.n_above_b} in B, {comparison.n_above_both} in both",
    ]
    if comparison.intervals:
        ci = comparison.intervals

        def span(key: str) -> str:
            return "n/a" if ci[key] is None else f"[{ci[key][0]:.3f}, {ci[key][1]:.3f}]"

        lines.append(
            f"{ci['confidence']:.0%} bootstrap intervals ({ci['n_resamples']} resamples of each side's trials): Spearman "
            f"{span('spearman')}, top-{comparison.top_k} overlap {span('top_k_overlap')}, fraction >= {comparison.threshold:g} "
            f"A {span('fraction_above_a')}, B {span('fraction_above_b')}"
        )
    lines += [
        f"{'shared head':<12} {'rank A':>6} {'rank B':>6} {'score A':>8} {'score B':>8}",
    ]
    for row in comparison.shared_top:
        lines.append(f"{row['head']:<12} {row['rank_a']:>6} {row['rank_b']:>6} {row['score_a']:>8.3f} {row['score_b']:>8.3f}")
    return "\n".join(lines)


def format_atlas(atlas: Atlas) -> str:
    """Per method: recall with its top-K masked at each K (random-K and no masking for
    reference), recall under its KV policy, and its Spearman with every other method."""
    ks = atlas.ks
    random = {r["k"]: r for r in atlas.masking if r["method"] == "random"}
    kv = {r["method"]: r for r in atlas.kv}
    short = {m: m[:6] for m in atlas.methods}
    header = (
        f"{'method':<15}"
        + "".join(f"{f'top-{k}':>9}" for k in ks)
        + f"{'KV':>8}{'kept':>7}   Spearman with "
        + " ".join(f"{short[m]:>6}" for m in atlas.methods)
    )
    where = "held-out" if atlas.settings.get("heldout") else "in-grid (the evaluation shares trials with the detection)"
    lines = [f"{atlas.model}: recall on the evaluation trials, {where}; no masking {atlas.recall('none', 0):.3f}", header]

    def kv_cells(recall, kept) -> str:  # recall under the KV policy, and the share of the cache it keeps
        return f"{_number(recall):>8}{_number(kept, '.0%'):>7}"

    for row in atlas.table():
        m = row["method"]
        masked = "".join(f"{_number(row['recall_masked'][k]):>9}" for k in ks)
        rho = " ".join(f"{'-' if o == m else _number(row['spearman'].get(o), '.2f'):>6}" for o in atlas.methods)
        lines.append(f"{m:<15}{masked}{kv_cells(row['kv_recall'], row['kv_kept'])}   {' ' * 14}{rho}")
    random_masked = "".join(f"{_number(random[k]['mean_recall']) if k in random else '-':>9}" for k in ks)
    for name, masked in (("random", random_masked), ("streaming", " " * 9 * len(ks))):
        policy = kv.get(name, {})
        lines.append(f"{name:<15}{masked}{kv_cells(policy.get('mean_recall'), policy.get('kv_kept'))}")
    lines.append(f"KV: {atlas.kv[-1]['full_fraction']:.0%} of KV heads full; kept: the fraction of the cache each policy keeps")
    return "\n".join(lines)


def _number(x, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)
