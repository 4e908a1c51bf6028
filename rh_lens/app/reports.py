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
    heldout_bars,
    mlp_effects,
    niah_heatmaps,
    patching_heatmaps,
    recall_vs_factor,
    recall_vs_k,
    recall_vs_k_panels,
    recall_vs_kv,
    resid_heatmap,
    save_figure,
    save_figures,
    score_heatmap,
    score_scatter,
    threshold_sensitivity,
    training_losses,
)
from rh_lens.detection.records import DetectionResult, save_results
from rh_lens.execution.files import write_json
from rh_lens.heads import Head
from rh_lens.interventions.compression import CompressionResult, export_duo_attention
from rh_lens.interventions.head_tuning import FinetuneExperimentResult
from rh_lens.interventions.masking import AblationResult
from rh_lens.interventions.patching import PatchingResult
from rh_lens.interventions.steering import SteeringResult
from rh_lens.uncertainty import PairedTest

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


def save_steering(result: SteeringResult, out: str | Path) -> list[Path]:
    """steering.json and recall_vs_factor.png."""
    out = Path(out)
    paths = [out / "steering.json", out / "recall_vs_factor.png"]
    write_json(paths[0], result.to_json())
    save_figure(recall_vs_factor(result), paths[1])
    return paths


def save_finetune(result: FinetuneExperimentResult, out: str | Path) -> list[Path]:
    """finetune.json, training_losses.png and heldout_recall.png (each arm's held-out recall
    with its 95% interval)."""
    out = Path(out)
    paths = [out / "finetune.json", out / "training_losses.png", out / "heldout_recall.png"]
    write_json(paths[0], result.to_json())
    save_figure(training_losses(result), paths[1])
    save_figure(
        heldout_bars({"held out": result.summary()}, title=f"{result.model}: held-out recall after fine-tuning"), paths[2]
    )
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


def save_run_comparison(tests: list[PairedTest], runs: dict[str, AblationResult], out: str | Path) -> list[Path]:
    """run_comparison.json (the two runs' paired cost tests) and recall_vs_k.png (one panel per run)."""
    out = Path(out)
    write_json(out / "run_comparison.json", {"runs": list(runs), "tests": [t.to_json() for t in tests]})
    save_figure(recall_vs_k_panels(runs), out / "recall_vs_k.png")
    return [out / "run_comparison.json", out / "recall_vs_k.png"]


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
    """Mean recall per masking condition with its 95% interval over trials and the spread
    over random seeds, then the paired tests (top-K against random-K and no masking)."""
    lines = [
        f"{result.model}: {_measured(result.settings)} under {result.method} masking "
        f"({'decode steps only' if result.decode_only else 'all positions'}){_split(result.settings)}",
        f"{'condition':<14} {'K':>4} {'trials':>6}  {'mean recall [95%]':>21}  {'seed spread':>11}  {'retrieved [95%]':>17}"
        f"  {'kept':>5}  {'no answer word':>14}  {'distractor':>10}  {'invented':>8}",
    ]
    rows = result.summary()
    for row in rows:
        spread = f"+/- {row['std_over_seeds']:.3f}" if (row["n_seeds"] or 1) > 1 else ""
        lines.append(
            f"{row['condition']:<14} {row['k']:>4} {row['n_trials']:>6}  {_with_interval(row['mean_recall'], row['recall_interval']):>21}"
            f"  {spread:>11}  {_rate_with_interval(row['success_rate'], row['success_interval']):>17}  {_kept(row):>5}"
            f"  {100 * row['absent_rate']:>13.0f}%  {100 * row['classes']['distractor']:>9.0f}%  {100 * row['classes']['invented']:>7.0f}%"
        )
    if rows and rows[0]["n_baseline_right"]:
        lines.append(f"kept: of the {rows[0]['n_baseline_right']} trials answered right unmasked, the share still right")
    for row in result.threshold_rows():
        random = f"{row['random_recall']:.3f}" if row["random_recall"] is not None else "-"
        top = f"{row['top_recall']:.3f}" if row["top_recall"] is not None else "-"
        lines.append(
            f"threshold {row['threshold']:g}: {row['n_heads']} heads; recall with them masked {top}, with as many random heads {random}"
        )
    return "\n".join(lines + format_paired_tests([t.to_json() for t in result.comparisons()]))


def format_steering(result: SteeringResult) -> str:
    """Mean recall per steering condition with its 95% interval over trials and the spread
    over random seeds, then the paired tests (top-K against random-K at each factor, and each
    against no intervention)."""
    settings = result.settings
    where = "decode steps only" if settings.get("decode_only") else "all positions"
    lines = [
        f"{result.model}: NIAH recall with heads boosted ({settings.get('method', 'sharpen')}, {where}){_split(settings)}",
        f"{'condition':<20} {'K':>4} {'factor':>6} {'trials':>6}  {'mean recall [95%]':>21}  {'seed spread':>11}  {'retrieved [95%]':>17}",
    ]
    for row in result.summary():
        spread = f"+/- {row['std_over_seeds']:.3f}" if (row["n_seeds"] or 1) > 1 else ""
        lines.append(
            f"{row['condition']:<20} {row['k']:>4} {row['factor']:>6g} {row['n_trials']:>6}  "
            f"{_with_interval(row['mean_recall'], row['recall_interval']):>21}  {spread:>11}  "
            f"{_rate_with_interval(row['success_rate'], row['success_interval']):>17}"
        )
    scored = [r for r in result.factor_rows() if r["top_score"] is not None]
    if scored:
        lines += ["", "How much the top-K heads copy (their mean copy score per trial, over every trial [95%]):"]
        lines.append(f"{'K':>4} {'factor':>6}  {'top-K boosted':>21}  {'random-K boosted':>21}  {'no intervention':>21}")
        for r in scored:
            cells = [_with_interval(r[f"{name}_score"], r[f"{name}_score_interval"]) for name in ("top", "random", "none")]
            lines.append(f"{r['k']:>4} {r['factor']:>6g}  " + "  ".join(f"{cell:>21}" for cell in cells))
    return "\n".join(lines + format_paired_tests([t.to_json() for t in result.comparisons()]))


def format_finetune(result: FinetuneExperimentResult) -> str:
    """Per arm: the entries it trained, held-out recall with its 95% interval, the held-out
    answer loss, the loss on general text (forgetting) and the training time; then the paired
    tests (the retrieval heads' arm against every other, every arm against no training)."""
    training = result.settings.get("training", {})
    lines = [
        f"{result.model}: held-out NIAH after fine-tuning ({training.get('steps')} steps of {training.get('batch_size')}, "
        f"lr {training.get('lr')}){_split(result.settings)}",
        f"{'arm':<16} {'params':>10} {'trials':>6}  {'mean recall [95%]':>21}  {'retrieved [95%]':>17}  "
        f"{'answer loss':>11}  {'text loss':>9}  {'seconds':>8}",
    ]
    metadata = {c.group: c.metadata for c in result.conditions}
    for row in result.summary():
        meta = metadata[row["condition"]]
        trained = meta.get("training") or {}
        lines.append(
            f"{row['condition']:<16} {trained.get('n_parameters', 0):>10,} {row['n_trials']:>6}  "
            f"{_with_interval(row['mean_recall'], row['recall_interval']):>21}  "
            f"{_rate_with_interval(row['success_rate'], row['success_interval']):>17}  "
            f"{meta.get('heldout_answer_loss', float('nan')):>11.3f}  {meta.get('general_text_loss', float('nan')):>9.3f}  "
            f"{trained.get('seconds', 0.0):>8.0f}"
        )
    lines.append(
        "answer loss: on the held-out answers; text loss: on general text (forgetting); random arms: the first seed's losses"
    )
    return "\n".join(lines + format_paired_tests([t.to_json() for t in result.comparisons()]))


def format_compression(result: CompressionResult) -> str:
    """KV kept, compression ratio, recall (95% interval) and retrieval rate per method and
    budget, then the paired tests (the retrieval policy against every other method)."""
    mode = "decode steps only" if result.decode_only else "prefill and decode"
    lines = [
        f"{result.model}: NIAH under KV-cache compression, streaming heads keep {result.sink} sink + {result.window} recent tokens "
        f"({mode}){_split(result.settings)}",
        f"{'method':<10} {'full':>5}  {'KV kept':>7}  {'ratio':>5} {'trials':>6}  {'mean recall [95%]':>21}  {'seed spread':>11}"
        f"  {'retrieved [95%]':>17}",
    ]
    for row in result.summary():
        spread = f"+/- {row['std_over_seeds']:.3f}" if (row["n_seeds"] or 1) > 1 else ""
        fraction = f"{row['full_fraction']:g}" if row["method"] != "full" else "all"
        lines.append(
            f"{row['method']:<10} {fraction:>5}  {100 * row['kv_kept']:>6.1f}%  {row['compression_ratio']:>5.2f} {row['n_trials']:>6}  "
            f"{_with_interval(row['mean_recall'], row['recall_interval']):>21}  {spread:>11}"
            f"  {_rate_with_interval(row['success_rate'], row['success_interval']):>17}"
        )
    return "\n".join(lines + format_paired_tests([t.to_json() for t in result.comparisons()]))


def format_run_comparison(tests: list[PairedTest], a: str, b: str) -> str:
    """`compare_runs`'s tests: per masked condition, its drop in a minus its drop in b."""
    lines = format_paired_tests([t.to_json() for t in tests])[1:]
    header = (
        f"per problem, the recall each masked condition loses from no masking in a ({a}) minus what it loses in b ({b}); "
        f"{tests[0].confidence:.0%} paired-bootstrap interval, sign-flip p; 'a > b': a loses more:"
    )
    return "\n".join([header, *lines])


def format_paired_tests(tests: list[dict[str, Any]]) -> list[str]:
    """One line per paired test (`rh_lens.uncertainty.PairedTest` as JSON): the difference
    of mean recall with its interval, the permutation p-value, McNemar's, and the verdict."""
    if not tests:
        return []
    lines = [
        f"paired tests on the same trials (difference of mean recall a - b, {tests[0]['confidence']:.0%} paired-bootstrap "
        f"interval, sign-flip p; McNemar on retrieved; 'tie' unless the interval excludes 0 and p < {1 - tests[0]['confidence']:.2g}):"
    ]
    for t in tests:
        a = "/".join(t["a_methods"]) if "a_methods" in t else t["a"]
        b = "/".join(t["b_methods"]) if "b_methods" in t else t["b"]
        where = f"top-{t['k']} " if t.get("k") is not None else ("KV " if t.get("kind") == "kv" else "")
        mcnemar = "" if t["mcnemar_p"] is None else f"; McNemar {t['a_only']}:{t['b_only']} p {_p(t['mcnemar_p'])}"
        verdict = "tie" if t["verdict"] == "tie" else ("a > b" if t["difference"] > 0 else "a < b")
        lines.append(
            f"  {where}{a} vs {b}: {t['difference']:+.3f} [{t['interval'][0]:+.3f}, {t['interval'][1]:+.3f}], "
            f"p {_p(t['p_value'])}, n {t['n']}{mcnemar} -> {verdict}"
        )
    return lines


def _p(p: float) -> str:
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


def _with_interval(x: float | None, interval) -> str:
    if x is None:
        return "-"
    return f"{x:.3f}" + (f" [{interval[0]:.3f}, {interval[1]:.3f}]" if interval else "")


def _rate_with_interval(x: float, interval) -> str:
    return f"{100 * x:.0f}%" + (f" [{100 * interval[0]:.0f}, {100 * interval[1]:.0f}]" if interval else "")


def _measured(settings: dict[str, Any]) -> str:
    """What a table's recall is: exact accuracy for arithmetic (recall 1 or 0), else ROUGE-1 recall."""
    if settings.get("task") == "arithmetic":
        return f"arithmetic accuracy ({settings.get('mode')}, exact final number)"
    return "NIAH recall"


def _split(settings: dict[str, Any]) -> str:
    """Where the trials stand against the ranking's (`rh_lens.tasks.splits.check_split`)."""
    check = settings.get("split_check")
    if settings.get("heldout"):
        return "; held out from the ranking's trials (checked by content)"
    if check is not None and check.get("violations"):
        return f"; NOT held out: shares with the ranking's trials ({', '.join(check['violations'])})"
    if check is not None and check.get("passed"):
        return "; shares no content with the ranking's trials (held out, though not asked with --heldout)"
    if settings.get("ranked_on") is not None:
        return "; not checked as held out (run with --heldout)"
    return ""


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
    reference) and under its KV policy, each with its 95% interval over the evaluation
    trials; then each method's Spearman with every other method, and the paired tests."""
    ks = atlas.ks
    random = {r["k"]: r for r in atlas.masking if r["method"] == "random"}
    kv = {r["method"]: r for r in atlas.kv}
    none = next(r for r in atlas.masking if r["method"] == "none")
    trials = f"; {none['n_trials']} trials" if "n_trials" in none else ""
    lines = [
        f"{atlas.model}: recall on the evaluation trials{_split(atlas.settings)}{trials}; no masking "
        f"{_with_interval(none['mean_recall'], none.get('recall_interval'))}",
        f"{'method':<15}" + "".join(f"{f'top-{k} [95%]':>23}" for k in ks) + f"{'KV [95%]':>23}{'kept':>6}",
    ]

    def cells(masked: dict, policy: dict) -> str:  # masking at each K, the KV policy and its share of the cache
        return (
            "".join(
                f"{_with_interval(masked.get(k, {}).get('mean_recall'), masked.get(k, {}).get('recall_interval')):>23}"
                for k in ks
            )
            + f"{_with_interval(policy.get('mean_recall'), policy.get('recall_interval')):>23}{_number(policy.get('kv_kept'), '.0%'):>6}"
        )

    for m in atlas.methods:
        masked = {r["k"]: r for r in atlas.masking if r["method"] == m}
        lines.append(f"{m:<15}{cells(masked, kv.get(m, {}))}")
    lines.append(f"{'random':<15}{cells(random, kv.get('random', {}))}")
    lines.append(f"{'streaming':<15}{cells({}, kv.get('streaming', {}))}")
    fraction = atlas.settings.get("options", {}).get("full_fraction", atlas.kv[-1]["full_fraction"])
    lines.append(f"KV: {fraction:.0%} of KV heads full; kept: the fraction of the cache each policy keeps")
    short = {m: m[:6] for m in atlas.methods}
    lines.append(f"{'Spearman':<15}" + " ".join(f"{short[m]:>6}" for m in atlas.methods))
    for row in atlas.table():
        m = row["method"]
        lines.append(
            f"{m:<15}" + " ".join(f"{'-' if o == m else _number(row['spearman'].get(o), '.2f'):>6}" for o in atlas.methods)
        )
    return "\n".join(lines + format_paired_tests(atlas.tests))


def _number(x, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)
