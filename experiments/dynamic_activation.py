"""Dynamic activation and coverage per model: which heads fire in which context.

Writes `<results>/<model>/dynamic_activation.json` (activation matrix, frequencies,
always-on vs context-dependent heads, grouped summaries, Jaccard overlaps), `coverage.json`,
figures under `<results>/<model>/figures/`, and `<results>/coverage.png` for all models.
"""

from __future__ import annotations

import argparse

from common import add_grid_arguments, load_model_results, model_dir

from rh_lens.analysis.analyses import ACTIVATION_THRESHOLD, coverage, dynamic_activation
from rh_lens.app.plots import activation_frequency_chart, activation_matrix_heatmap, coverage_curves, save_figures
from rh_lens.execution.files import write_json


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    add_grid_arguments(parser)
    parser.add_argument("--activation-threshold", type=float, default=ACTIVATION_THRESHOLD)
    args = parser.parse_args(argv)
    curves = []
    for model_name, result in zip(args.models, load_model_results(args)):
        out = model_dir(args.results_dir, model_name)
        activation = dynamic_activation(result, args.activation_threshold)
        heads_needed = coverage(result)
        curves.append(heads_needed)
        write_json(out / "dynamic_activation.json", activation.to_json())
        write_json(out / "coverage.json", heads_needed.to_json())
        save_figures(
            {
                "activation_frequency": activation_frequency_chart(activation),
                "activation_matrix": activation_matrix_heatmap(activation),
            },
            out / "figures",
        )
        needed = sorted(heads_needed.heads_needed.values())
        print(
            f"{result.model}: {len(activation.heads)}/{activation.n_heads_total} heads ever active, "
            f"always on {activation.always_on}, {len(activation.context_dependent)} context-dependent; "
            f"mean Jaccard {activation.mean_pairwise_jaccard:.2f}; "
            f"top-1 head explains {heads_needed.mean_coverage[0]:.2f} of copied tokens, "
            f"median {needed[len(needed) // 2]} heads for all",
            flush=True,
        )
    save_figures({"coverage": coverage_curves(curves)}, args.results_dir)


if __name__ == "__main__":
    main()
