"""How sure are the head maps: bootstrap intervals and adaptive detection, per model.

For each model's detection result (`detect_catalogue.py` first): the bootstrap's top-K
stability and the intervals of its best heads; and what adaptive detection
(`rh-lens detect --until-stable K`) would have done on the same grid: the grid's trials in
the seeded random order it uses, stopped by the same rule (`rh_lens.detection.adaptive.stable_after`),
so the number of trials it needs and how its top K agrees with the full run's. Trials are
deterministic, so this replays the stored trials instead of decoding them again.
Writes `<results>/stability.json` and `stability.md`.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
from common import add_grid_arguments, load_model_results

from rh_lens.analysis.statistics import bootstrap
from rh_lens.detection.adaptive import shuffled, stable_after, top_k_set
from rh_lens.execution.files import write_json


def adaptive(result, k: int, seed: int, patience: int | None = None) -> dict:
    """Replay adaptive detection on a finished run's trials."""
    order = shuffled(result.trials, seed)
    patience = patience or max(5, math.ceil(0.2 * len(order)))
    stop = stable_after([top_k_set(order[: i + 1], k) for i in range(len(order))], patience) or len(order)
    early, full = top_k_set(order[:stop], k), top_k_set(result.trials, k)
    return {
        "seed": seed,
        "trials": stop,
        "of": len(order),
        "jaccard": len(early & full) / len(early | full) if early | full else 1.0,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    add_grid_arguments(parser)
    parser.add_argument("--top-k", nargs="+", type=int, default=[5, 10])
    parser.add_argument("--seeds", type=int, default=5, help="trial orders per K (seeds 0..N-1)")
    args = parser.parse_args(argv)
    rows, lines = (
        [],
        [
            "| model | top-K | bootstrap: mean Jaccard of top K | adaptive: trials needed (mean, range) of the grid | adaptive: top-K Jaccard with the full run (mean, min) |",
            "|---|---|---|---|---|",
        ],
    )
    for result in load_model_results(args):
        for k in args.top_k:
            b = bootstrap(result, top_k=k)
            runs = [adaptive(result, k, seed) for seed in range(args.seeds)]
            needed = [r["trials"] for r in runs]
            agree = [r["jaccard"] for r in runs]
            rows.append({"model": result.model, "top_k": k, "bootstrap": b.to_json(), "adaptive": runs})
            lines.append(
                f"| {result.model} | {k} | {b.top_k_jaccard:.2f} | {np.mean(needed):.1f} ({min(needed)}-{max(needed)}) of {len(result.trials)} "
                f"| {np.mean(agree):.2f} ({min(agree):.2f}) |"
            )
    write_json(Path(args.results_dir) / "stability.json", rows)
    (Path(args.results_dir) / "stability.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()
