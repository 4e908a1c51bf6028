"""Does the answer's length make heads look like retrieval heads? And do grouped-query heads
score alike?

With a 3-token answer one copy event is a third of the span, so a single lucky argmax
crosses the 0.1 threshold; with 13 tokens it takes two. For each model: the fraction of
heads >= 0.1 with the built-in short-answer needles (3-9 tokens), the built-in long-answer
needles (13-15 tokens) and the reference's needles; and, per key-value head, how alike the
retrieval scores of the query heads that share it are (mean within-group spread vs random
groups of as many heads, and how often a head >= 0.1 has all its group-mates >= 0.1 too).

Reads `rh-lens detect` results: `--runs NAME=short.json,long.json,reference.json ...`.
Writes `<results>/answer_length.md` and `.json`.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import numpy as np

from rh_lens.detection.records import load_results
from rh_lens.execution.files import write_json
from rh_lens.model.loading import load_model_spec


def group_sharing(scores: np.ndarray, n_kv_heads: int, threshold: float = 0.1, seed: int = 0) -> dict:
    """How alike the query heads sharing a KV head score, against random groups."""
    n_layers, n_heads = scores.shape
    size = n_heads // n_kv_heads
    groups = scores.reshape(n_layers, n_kv_heads, size)
    within = float(np.mean(groups.max(axis=-1) - groups.min(axis=-1)))
    flat, rng = scores.ravel(), random.Random(seed)
    shuffled = [flat[rng.sample(range(len(flat)), size)] for _ in range(2000)]
    across = float(np.mean([g.max() - g.min() for g in shuffled]))
    above = groups >= threshold
    mates = [
        bool(above[layer, kv].all())
        for layer in range(n_layers)
        for kv in range(n_kv_heads)
        for h in range(size)
        if above[layer, kv, h]
    ]
    return {
        "group_size": size,
        "within_spread": within,
        "random_spread": across,
        "all_mates_above": float(np.mean(mates)) if mates else None,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", required=True, help="MODEL=short.json,long.json,reference.json")
    parser.add_argument("--results-dir", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument(
        "--lengths",
        nargs="+",
        type=int,
        default=None,
        help="only the trials of these context lengths (to compare runs of different grids)",
    )
    args = parser.parse_args(argv)
    rows, lines = (
        [],
        [
            "| model | query heads per KV head | heads >= 0.1: short answers | long answers | reference needles | "
            "within-group score spread (random groups) | heads >= 0.1 whose group-mates all are |",
            "|---|---|---|---|---|---|---|",
        ],
    )
    for run in args.runs:
        model, paths = run.split("=", 1)
        results = [load_results(p) for p in paths.split(",")]
        if args.lengths:
            for result in results:
                result.trials = [t for t in result.trials if t.context_length in args.lengths]
        spec = load_model_spec(model, device="cpu")
        n_kv = spec.cfg.n_key_value_heads or spec.cfg.n_heads
        fractions = [r.fraction_above(0.1) for r in results]
        sharing = group_sharing(results[0].scores().numpy(), n_kv)
        rows.append({"model": model, "fractions": fractions, "trials": [len(r.successful) for r in results], "sharing": sharing})
        cells = " | ".join(f"{100 * f:.1f}% ({len(r.successful)} trials)" for f, r in zip(fractions, results))
        mates = "-" if sharing["all_mates_above"] is None else f"{100 * sharing['all_mates_above']:.0f}%"
        lines.append(
            f"| {model} | {sharing['group_size']} | {cells} | {sharing['within_spread']:.3f} ({sharing['random_spread']:.3f}) | {mates} |"
        )
    write_json(args.results_dir / "answer_length.json", rows)
    (args.results_dir / "answer_length.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()
