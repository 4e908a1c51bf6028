"""Universality and sparsity across models: fraction of heads above threshold, score
distribution, layer profile. Writes `<results>/universality.json`, `universality.md`
(the README table) and side-by-side figures `score_histogram.png`, `layer_profile.png`."""

from __future__ import annotations

import argparse
from pathlib import Path

from common import add_grid_arguments, load_model_results

from rh_lens.analysis.analyses import universality
from rh_lens.app.plots import layer_profiles, save_figures, score_histograms
from rh_lens.detection.scoring import DEFAULT_THRESHOLD
from rh_lens.execution.files import write_json
from rh_lens.heads import Head


def markdown_table(rows) -> str:
    lines = [
        f"| model | layers x heads | trials retrieved | heads >= {rows[0].threshold:g} | top 5 heads (layer-head score) |",
        "|---|---|---|---|---|",
    ]
    for u in rows:
        top = ", ".join(f"{Head(layer, head)} {score:.2f}" for layer, head, score in u.top[:5])
        lines.append(
            f"| {u.model} | {u.n_layers} x {u.n_heads} | {u.n_successful}/{u.n_trials} | "
            f"{u.n_above} = {100 * u.fraction_above:.1f}% | {top} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    add_grid_arguments(parser)
    parser.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD)
    args = parser.parse_args(argv)
    rows = [universality(result, args.threshold) for result in load_model_results(args)]
    write_json(Path(args.results_dir) / "universality.json", [u.to_json() for u in rows])
    table = markdown_table(rows)
    (Path(args.results_dir) / "universality.md").write_text(table)
    save_figures({"score_histogram": score_histograms(rows), "layer_profile": layer_profiles(rows)}, args.results_dir)
    print(table, flush=True)


if __name__ == "__main__":
    main()
