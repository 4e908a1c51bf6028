"""Command line: `rh-lens detect`, `show`, `ablate`, `patch`, `analyze` and `compare`. Thin: every step is a library call."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import __version__
from .ablation import METHODS, ablation_experiment
from .analysis import ACTIVATION_THRESHOLD, TOP_K, analyze, compare
from .detection import detect
from .generation import MAX_NEW_TOKENS
from .models import CATALOGUE, ModelLoadError, load_model
from .niah import BUILTIN_NEEDLES, TrialError, haystack_name, load_haystack, load_needles, tokenize_haystack, trial_grid
from .patching import DIRECTIONS, KINDS, POSITIONS, PatchingResult, activation_patching, effect_vs_score, patching_pair
from .plots import analysis_figures, effect_vs_score_scatter, niah_heatmaps, patching_heatmaps, resid_heatmap, recall_vs_k, save_figure, save_figures, score_heatmap, score_scatter
from .results import DetectionResult, load_results, save_results, write_json
from .scoring import DEFAULT_THRESHOLD


def format_ranking(result: DetectionResult, top: int, threshold: float) -> str:
    n_heads = result.n_layers * result.n_heads
    n_good = len(result.successful)
    lines = [
        f"{result.model}: {result.n_layers} layers x {result.n_heads} heads; "
        f"{n_good}/{len(result.trials)} trials retrieved the answer",
        f"retrieval heads (score >= {threshold:g}): {len(result.retrieval_heads(threshold))}/{n_heads} "
        f"= {100 * result.fraction_above(threshold):.1f}%",
        f"{'rank':>4}  {'layer':>5}  {'head':>4}  score",
    ]
    for rank, (layer, head, score) in enumerate(result.ranking(top), start=1):
        lines.append(f"{rank:>4}  {layer:>5}  {head:>4}  {score:.3f}")
    return "\n".join(lines)


MODEL_HELP = f"catalogue name ({', '.join(CATALOGUE)}), HF directory, .gguf file or TransformerLens name"
CHAT = {"auto": None, "chat": True, "plain": False}  # --prompt -> build_trial's `chat`


def needles_of(args: argparse.Namespace):
    return load_needles(args.needles) if args.needles else list(BUILTIN_NEEDLES)


def build_trials(args: argparse.Namespace, model):
    """The NIAH grid of the command line, and the settings that identify it."""
    needles = needles_of(args)
    trials = trial_grid(model.tokenizer, needles, args.lengths, args.depths, args.haystack, CHAT[args.prompt], model.cfg.n_ctx)
    settings = {
        "haystack": [str(h) for h in args.haystack],
        "needles": [n.id for n in needles],
        "lengths": args.lengths,
        "depths": args.depths,
        "prompt": args.prompt,
    }
    return trials, settings


def save_detection(result: DetectionResult, out: Path) -> None:
    """results.json, head_scores.json (the reference's format) and heatmap.png in `out`."""
    save_results(result, out / "results.json")
    write_json(out / "head_scores.json", result.to_published())
    save_figure(score_heatmap(result), out / "heatmap.png")


def run_detect(args: argparse.Namespace) -> None:
    model = load_model(args.model, device=args.device)
    trials, settings = build_trials(args, model)
    out = Path(args.out)
    result = detect(model, trials, out, args.resume, args.threshold, settings, args.max_new_tokens, args.chunk_size)
    save_detection(result, out)
    print(format_ranking(result, args.top, args.threshold))
    print(f"wrote {out / 'results.json'}, {out / 'head_scores.json'} (reference format), {out / 'heatmap.png'}")


def run_show(args: argparse.Namespace) -> None:
    result = load_results(args.results)
    print(format_ranking(result, args.top, args.threshold if args.threshold is not None else result.threshold))


def format_ablation(result) -> str:
    lines = [
        f"{result.model}: NIAH recall under {result.method} masking "
        f"({'decode steps only' if result.decode_only else 'all positions'})",
        f"{'condition':<14} {'K':>4}  {'mean recall':>11}  {'seed spread':>11}  {'retrieved':>9}  {'no answer word':>14}",
    ]
    for row in result.summary():
        spread = f"+/- {row['std_over_seeds']:.3f}" if row["n_seeds"] else ""
        lines.append(
            f"{row['condition']:<14} {row['k']:>4}  {row['mean_recall']:>11.3f}  {spread:>11}  "
            f"{100 * row['success_rate']:>8.0f}%  {100 * row['absent_rate']:>13.0f}%"
        )
    return "\n".join(lines)


def run_ablate(args: argparse.Namespace) -> None:
    detection = load_results(args.scores)
    model = load_model(args.model, device=args.device)
    trials, settings = build_trials(args, model)
    out = Path(args.out)
    result = ablation_experiment(
        model, trials, detection, args.top_k, list(range(args.random_seeds)), args.method, args.decode_only,
        out, args.resume, {**settings, "scores": str(args.scores)}, args.max_new_tokens,
    )  # fmt: skip
    save_figure(niah_heatmaps(result), out / "niah_heatmaps.png")
    save_figure(recall_vs_k(result), out / "recall_vs_k.png")
    print(format_ablation(result))
    print(f"wrote {out / 'ablation.json'}, {out / 'niah_heatmaps.png'}, {out / 'recall_vs_k.png'}")


def parse_head(text: str) -> tuple[int, int]:
    """'12.3' -> (12, 3)."""
    try:
        layer, head = text.split(".")
        return int(layer), int(head)
    except ValueError:
        raise argparse.ArgumentTypeError(f"heads are LAYER.HEAD, e.g. 12.3; got {text!r}") from None


def format_patching(result: PatchingResult, top: int, correlation: dict | None) -> str:
    lines = [
        f"{result.model}: {result.settings['prompt_tokens']} tokens, answer {result.settings['answer']!r} vs "
        f"{result.settings['corrupted_answer']!r}; logit difference '{result.clean_token.strip()}' - "
        f"'{result.corrupted_token.strip()}': clean {result.clean_logit_diff:.2f}, corrupted {result.corrupted_logit_diff:.2f}",
    ]
    for kind in ("head_out", "pattern"):
        for direction in result.effects.get(kind, {}):
            ranking = result.ranking(kind, direction)[:top]
            lines.append(f"{kind} {direction} ({result.settings['positions']} position), top {len(ranking)}: "
                         + ", ".join(f"{l}.{h} {e:.3f}" for l, h, e in ranking))  # fmt: skip
    if correlation is not None:
        lines.append(
            f"Spearman rho between {correlation['kind']} {correlation['direction']} effect and retrieval score: "
            f"{correlation['spearman']:.3f} (p = {correlation['p_value']:.2g}, {correlation['n_heads']} heads); over the "
            f"{correlation['n_scored']} heads scoring > 0: {correlation['spearman_scored']:.3f} (p = {correlation['p_value_scored']:.2g})"
        )
    return "\n".join(lines)


def run_patch(args: argparse.Namespace) -> None:
    detection = load_results(args.scores) if args.scores else None  # fail early on a bad file
    model = load_model(args.model, device=args.device)
    needles = needles_of(args)
    if not 0 <= args.needle < len(needles):
        raise ValueError(f"--needle {args.needle}: there are {len(needles)} needles")
    haystack_ids = tokenize_haystack(model.tokenizer, load_haystack(args.haystack), args.context_length)
    pair = patching_pair(
        model, needles[args.needle], haystack_ids, args.context_length, args.depth, args.corrupted_answer, CHAT[args.prompt],
        haystack_name(args.haystack), max_new_tokens=args.max_new_tokens,
    )  # fmt: skip
    result = activation_patching(
        model, pair, None if args.all_heads else args.heads, args.kinds, args.directions, args.positions,
        args.tail, args.batch_size, settings={"haystack": str(args.haystack)},
    )  # fmt: skip
    out = Path(args.out)
    write_json(out / "patching.json", result.to_json())
    written = [out / "patching.json"]
    for kind in ("head_out", "pattern"):
        if kind in result.effects:
            written.append(out / f"{kind}_heatmap.png")
            save_figure(patching_heatmaps(result, kind), written[-1])
    for direction in result.effects.get("resid", {}):
        written.append(out / f"resid_heatmap_{direction}.png")
        save_figure(resid_heatmap(result, direction), written[-1])
    correlation = None
    if detection is not None and "head_out" in result.effects:
        correlation = effect_vs_score(result, detection, "head_out", next(iter(result.effects["head_out"])))
        write_json(out / "effect_vs_score.json", correlation)
        written.append(out / "effect_vs_score.png")
        save_figure(effect_vs_score_scatter(correlation, result.model), written[-1])
    print(format_patching(result, args.top, correlation))
    print("wrote " + ", ".join(str(p) for p in written))


def format_analysis(analysis) -> str:
    activation, heads_needed = analysis.dynamic_activation, analysis.coverage
    lines = [
        f"dynamic activation (trial score > {activation.threshold:g}, {len(activation.trials)} successful trials): "
        f"{len(activation.heads)}/{activation.n_heads_total} heads ever active, "
        f"{len(activation.always_on)} always on (>= {activation.always_on_fraction:g} of trials), "
        f"{len(activation.context_dependent)} context-dependent",
        f"always on: {', '.join(activation.always_on) or '-'}",
        f"active heads per trial: mean {sum(activation.active_per_trial) / len(activation.active_per_trial):.1f}; "
        f"mean pairwise Jaccard of active sets: {activation.mean_pairwise_jaccard if activation.mean_pairwise_jaccard is not None else float('nan'):.2f}",
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
        curve = ", ".join(f"top-{n}: {c:.2f}" for n, c in enumerate(heads_needed.mean_coverage, start=1) if n in (1, 2, 3, 5, 10, 20))
        lines.append(f"coverage of copied answer tokens (mean over {len(needed)} trials): {curve}")
        lines.append(f"heads needed for full coverage: median {needed[len(needed) // 2]}, max {needed[-1]}")
    lines += analysis.notes
    return "\n".join(lines)


def run_analyze(args: argparse.Namespace) -> None:
    result = load_results(args.results)
    threshold = args.threshold if args.threshold is not None else result.threshold
    analysis = analyze(result, threshold, args.activation_threshold)
    out = Path(args.out)
    write_json(out / "analysis.json", analysis.to_json())
    paths = save_figures(analysis_figures(analysis), out)
    print(format_ranking(result, args.top, threshold))
    print(format_analysis(analysis))
    print(f"wrote {out / 'analysis.json'} and {len(paths)} figures (PNG and PDF) in {out}")


def format_comparison(comparison) -> str:
    def number(x):
        return "n/a (constant scores)" if x is None else f"{x:.3f}"

    lines = [
        f"{comparison.model_a} vs {comparison.model_b} ({comparison.n_layers} layers x {comparison.n_heads} heads)",
        f"Pearson {number(comparison.pearson)}   Spearman {number(comparison.spearman)}",
        f"top-{comparison.top_k} overlap: {len(comparison.shared_top)}/{comparison.top_k} = {comparison.top_k_overlap:.2f}",
        f"heads >= {comparison.threshold:g}: {comparison.n_above_a} in A, {comparison.n_above_b} in B, {comparison.n_above_both} in both",
        f"{'shared head':<12} {'rank A':>6} {'rank B':>6} {'score A':>8} {'score B':>8}",
    ]
    for row in comparison.shared_top:
        lines.append(f"{row['head']:<12} {row['rank_a']:>6} {row['rank_b']:>6} {row['score_a']:>8.3f} {row['score_b']:>8.3f}")
    return "\n".join(lines)


def run_compare(args: argparse.Namespace) -> None:
    a, b = load_results(args.a), load_results(args.b)
    comparison = compare(a, b, args.top_k, args.threshold)
    out = Path(args.out)
    write_json(out / "comparison.json", comparison.to_json())
    save_figures({"score_scatter": score_scatter(comparison)}, out)
    print(format_comparison(comparison))
    print(f"wrote {out / 'comparison.json'} and {out / 'score_scatter.png'} (and .pdf)")


def add_trial_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help=MODEL_HELP)
    parser.add_argument("--haystack", nargs="+", default=["pydoc"], help="directory of .txt files, 'pydoc' (default) or 'synthetic'; one, or one per needle")
    parser.add_argument("--needles", help="JSONL file of {needle, question, real_needle} (default: built-in needles)")
    parser.add_argument("--lengths", nargs="+", type=int, default=[500, 1000, 2000], help="context lengths in tokens")
    parser.add_argument("--depths", nargs="+", type=int, default=[0, 25, 50, 75, 100], help="needle depths in percent")
    parser.add_argument("--prompt", choices=list(CHAT), default="auto", help="chat template if the tokenizer has one (auto)")
    parser.add_argument("--max-new-tokens", type=int, default=MAX_NEW_TOKENS)
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    parser.add_argument("--out", required=True, help="output directory")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rh-lens", description="Find and test retrieval heads.")
    parser.add_argument("--version", action="version", version=f"rh-lens {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    d = commands.add_parser("detect", help="detect retrieval heads with needle-in-a-haystack trials")
    add_trial_arguments(d)
    d.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD, help="retrieval-head threshold (default 0.1)")
    d.add_argument("--chunk-size", type=int, default=None, help="prefill chunk in tokens (bounds memory; default 512, or 4096 with fused attention)")
    d.add_argument("--top", type=int, default=20, help="heads to print")
    d.set_defaults(run=run_detect)

    a = commands.add_parser("ablate", help="mask top-K retrieval heads vs K random heads and rerun NIAH")
    add_trial_arguments(a)
    a.add_argument("--scores", required=True, help="detection results (ours or the reference's format)")
    a.add_argument("--top-k", nargs="+", type=int, default=None, help="K values (default: ~2%%, 5%%, 10%% of all heads)")
    a.add_argument("--random-seeds", type=int, default=3, help="random-K draws per K (seeds 0..N-1)")
    a.add_argument("--method", choices=METHODS, default="uniform", help="uniform attention (the paper), zero or mean output")
    a.add_argument("--decode-only", action="store_true", help="mask at decode steps only, not over the prompt")
    a.set_defaults(run=run_ablate)

    p = commands.add_parser("patch", help="activation patching: which heads carry the needle's answer")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--heads", nargs="+", type=parse_head, help="heads to patch, LAYER.HEAD (e.g. 12.3 14.1)")
    which.add_argument("--all-heads", action="store_true", help="patch every head")
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--context-length", type=int, default=1000, help="prompt length in tokens (default 1000)")
    p.add_argument("--depth", type=int, default=50, help="needle depth in percent (default 50)")
    p.add_argument("--needles", help="JSONL file of {needle, question, real_needle} (default: built-in needles)")
    p.add_argument("--needle", type=int, default=0, help="which needle (index, default 0)")
    p.add_argument("--corrupted-answer", help="the corrupted prompt's answer, same token length (default: built-in alternatives)")
    p.add_argument("--haystack", default="pydoc", help="directory of .txt files, 'pydoc' (default) or 'synthetic'")
    p.add_argument("--prompt", choices=list(CHAT), default="auto", help="chat template if the tokenizer has one (auto)")
    p.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS), help="what to patch (default: all)")
    p.add_argument("--directions", nargs="+", choices=DIRECTIONS, default=list(DIRECTIONS), help="denoise (clean into corrupted), noise (reverse)")
    p.add_argument("--positions", choices=POSITIONS, default="final", help="patch heads at the answer position only, or at all positions")
    p.add_argument("--tail", type=int, default=24, help="prompt-end tokens shown one by one in the residual map")
    p.add_argument("--batch-size", type=int, default=8, help="patched runs per forward pass")
    p.add_argument("--scores", help="detection results: adds effect vs retrieval score (Spearman, scatter)")
    p.add_argument("--max-new-tokens", type=int, default=MAX_NEW_TOKENS, help="decoding budget for the lead-in")
    p.add_argument("--top", type=int, default=10, help="heads to print")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(run=run_patch)

    s = commands.add_parser("show", help="print the ranking of a results file (ours or the reference's format)")
    s.add_argument("results")
    s.add_argument("--top", type=int, default=20)
    s.add_argument("--threshold", type=float, default=None)
    s.set_defaults(run=run_show)

    n = commands.add_parser("analyze", help="dynamic activation, coverage and sparsity of a results file, with figures")
    n.add_argument("results", help="results file (ours; published files give no per-trial details nor coverage)")
    n.add_argument("--threshold", type=float, default=None, help="retrieval-head threshold (default: the file's)")
    n.add_argument("--activation-threshold", type=float, default=ACTIVATION_THRESHOLD, help="a head is active in a trial above this trial score (default 0.1)")
    n.add_argument("--top", type=int, default=10, help="heads to print")
    n.add_argument("--out", required=True, help="output directory")
    n.set_defaults(run=run_analyze)

    c = commands.add_parser("compare", help="compare two results files of one architecture (ours or published)")
    c.add_argument("a")
    c.add_argument("b")
    c.add_argument("--top-k", type=int, default=TOP_K, help="size of the top lists compared (default 20)")
    c.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD)
    c.add_argument("--out", required=True, help="output directory")
    c.set_defaults(run=run_compare)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (ModelLoadError, TrialError, FileExistsError, FileNotFoundError, ValueError) as err:
        print(f"rh-lens: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
