"""Intrinsic retrieval heads: related models share them.

Published pairs (`../shared/niah/official_head_scores`): a base model against its chat
and MoE-upcycled descendants, and an unrelated pair of the same shape as a control.
Our models: no two catalogue models share an architecture, so each is compared with
itself across contexts (scores from its shortest vs its longest context length).
Writes `<results>/intrinsic.json`, `intrinsic.md` and one scatter per pair.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from common import add_grid_arguments, load_model_results

from rh_lens.analysis.analyses import TOP_K, compare
from rh_lens.app.plots import save_figures, score_scatter
from rh_lens.detection.records import load_results
from rh_lens.execution.files import write_json

PUBLISHED = Path(__file__).resolve().parents[2] / "shared" / "niah" / "official_head_scores"
PUBLISHED_PAIRS = [
    ("Qwen1.5-14B", "Qwen1.5-14B-Chat"),  # base vs chat
    ("Mistral-7B-v0.2-hf", "Mixtral-8x7B-v0.1"),  # dense vs MoE-upcycled
    ("llama-2-7b-80k", "Mistral-7B-v0.2-hf"),  # control: unrelated, same 32 x 32 shape
]


def at_length(result, length: int):
    trials = [t for t in result.trials if t.context_length == length]
    return dataclasses.replace(result, model=f"{result.model} @{length}", trials=trials)


def markdown_table(comparisons) -> str:
    lines = [f"| A | B | Pearson | Spearman | top-{TOP_K} overlap | shared top heads |", "|---|---|---|---|---|---|"]
    for c in comparisons:
        pearson = "n/a" if c.pearson is None else f"{c.pearson:.3f}"
        spearman = "n/a" if c.spearman is None else f"{c.spearman:.3f}"
        shared = ", ".join(s["head"] for s in c.shared_top[:8]) + (" ..." if len(c.shared_top) > 8 else "")
        lines.append(f"| {c.model_a} | {c.model_b} | {pearson} | {spearman} | {len(c.shared_top)}/{c.top_k} | {shared} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    add_grid_arguments(parser)
    parser.add_argument("--published-dir", type=Path, default=PUBLISHED, help="the reference's published head scores")
    parser.add_argument("--top-k", type=int, default=TOP_K)
    args = parser.parse_args(argv)
    pairs = []
    if args.published_dir.exists():
        pairs += [
            (load_results(args.published_dir / f"{a}.json"), load_results(args.published_dir / f"{b}.json"))
            for a, b in PUBLISHED_PAIRS
        ]
    else:
        print(f"{args.published_dir} not found: published pairs skipped", flush=True)
    for result in load_model_results(args):
        lengths = sorted({t.context_length for t in result.trials})
        pairs.append((at_length(result, lengths[0]), at_length(result, lengths[-1])))
    comparisons = [compare(a, b, args.top_k) for a, b in pairs]
    write_json(Path(args.results_dir) / "intrinsic.json", [c.to_json() for c in comparisons])
    table = markdown_table(comparisons)
    (Path(args.results_dir) / "intrinsic.md").write_text(table)
    figures = {
        f"scatter_{c.model_a}_vs_{c.model_b}".replace(" @", "_at").replace(" ", "_"): score_scatter(c) for c in comparisons
    }
    save_figures(figures, Path(args.results_dir) / "intrinsic")
    print(table, flush=True)


if __name__ == "__main__":
    main()
