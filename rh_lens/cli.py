"""Command line: `rh-lens detect` and `rh-lens show`. Thin: every step is a library call."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import __version__
from .detection import detect
from .generation import MAX_NEW_TOKENS
from .models import CATALOGUE, ModelLoadError, load_model
from .niah import BUILTIN_NEEDLES, TrialError, load_needles, trial_grid
from .plots import save_figure, score_heatmap
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


def run_detect(args: argparse.Namespace) -> None:
    model = load_model(args.model, device=args.device)
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rh-lens", description="Find and test retrieval heads.")
    parser.add_argument("--version", action="version", version=f"rh-lens {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    d = commands.add_parser("detect", help="detect retrieval heads with needle-in-a-haystack trials")
    d.add_argument("--model", required=True, help=f"catalogue name ({', '.join(CATALOGUE)}), HF directory, .gguf file or TransformerLens name")
    d.add_argument("--haystack", nargs="+", default=["pydoc"], help="directory of .txt files, 'pydoc' (default) or 'synthetic'; one, or one per needle")
    d.add_argument("--needles", help="JSONL file of {needle, question, real_needle} (default: built-in needles)")
    d.add_argument("--lengths", nargs="+", type=int, default=[500, 1000, 2000], help="context lengths in tokens")
    d.add_argument("--depths", nargs="+", type=int, default=[0, 25, 50, 75, 100], help="needle depths in percent")
    d.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD, help="retrieval-head threshold (default 0.1)")
    d.add_argument("--prompt", choices=["auto", "chat", "plain"], default="auto", help="chat template if the tokenizer has one (auto)")
    d.add_argument("--max-new-tokens", type=int, default=MAX_NEW_TOKENS)
    d.add_argument("--chunk-size", type=int, default=None, help="prefill chunk in tokens (bounds memory; default 512, or 4096 with fused attention)")
    d.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    d.add_argument("--top", type=int, default=20, help="heads to print")
    d.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    d.add_argument("--out", required=True, help="output directory")
    d.set_defaults(run=run_detect)

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
