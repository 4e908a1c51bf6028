"""Command line: `rh-lens detect`, `show` and `ablate`. Thin: every step is a library call."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import __version__
from .ablation import METHODS, ablation_experiment
from .detection import detect
from .generation import MAX_NEW_TOKENS
from .models import CATALOGUE, ModelLoadError, load_model
from .niah import BUILTIN_NEEDLES, TrialError, load_needles, trial_grid
from .plots import niah_heatmaps, recall_vs_k, save_figure, score_heatmap
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


def build_trials(args: argparse.Namespace, model):
    """The NIAH grid of the command line, and the settings that identify it."""
    needles = load_needles(args.needles) if args.needles else list(BUILTIN_NEEDLES)
    chat = {"auto": None, "chat": True, "plain": False}[args.prompt]
    trials = trial_grid(model.tokenizer, needles, args.lengths, args.depths, args.haystack, chat, model.cfg.n_ctx)
    settings = {
        "haystack": [str(h) for h in args.haystack],
        "needles": [n.id for n in needles],
        "lengths": args.lengths,
        "depths": args.depths,
        "prompt": args.prompt,
    }
    return trials, settings


def run_detect(args: argparse.Namespace) -> None:
    model = load_model(args.model, device=args.device)
    trials, settings = build_trials(args, model)
    out = Path(args.out)
    result = detect(model, trials, out, args.resume, args.threshold, settings, args.max_new_tokens, args.chunk_size)
    save_results(result, out / "results.json")
    write_json(out / "head_scores.json", result.to_published())
    save_figure(score_heatmap(result, args.threshold), out / "heatmap.png")
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


def add_trial_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help=f"catalogue name ({', '.join(CATALOGUE)}), HF directory, .gguf file or TransformerLens name")
    parser.add_argument("--haystack", nargs="+", default=["pydoc"], help="directory of .txt files, 'pydoc' (default) or 'synthetic'; one, or one per needle")
    parser.add_argument("--needles", help="JSONL file of {needle, question, real_needle} (default: built-in needles)")
    parser.add_argument("--lengths", nargs="+", type=int, default=[500, 1000, 2000], help="context lengths in tokens")
    parser.add_argument("--depths", nargs="+", type=int, default=[0, 25, 50, 75, 100], help="needle depths in percent")
    parser.add_argument("--prompt", choices=["auto", "chat", "plain"], default="auto", help="chat template if the tokenizer has one (auto)")
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

    s = commands.add_parser("show", help="print the ranking of a results file (ours or the reference's format)")
    s.add_argument("results")
    s.add_argument("--top", type=int, default=20)
    s.add_argument("--threshold", type=float, default=None)
    s.set_defaults(run=run_show)
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
