"""Detect retrieval heads on each model of a grid: `results/<model>/results.json`.

Resumable: finished trials are kept under `results/<model>/trials/`, so a rerun (or an
interrupted one) only does what is missing. The grid options and the steps are `rh-lens detect`'s.
"""

from __future__ import annotations

import argparse
import time

from common import add_grid_arguments, model_dir

from rh_lens.app.options import grid_from_args
from rh_lens.app.reports import format_ranking
from rh_lens.app.workflows import detect_grid
from rh_lens.execution.options import RunOptions


def detect_model(args: argparse.Namespace, model_name: str) -> float:
    """Run (or resume) one model's detection; returns the seconds it took."""
    started = time.perf_counter()
    out = model_dir(args.results_dir, model_name)
    result, _ = detect_grid(
        model_name,
        grid_from_args(args),
        out,
        options=RunOptions(device=args.device, dtype=args.dtype, resume=True, workers=args.workers, ray_address=args.ray_address),
    )
    print(format_ranking(result, 10), flush=True)
    seconds = time.perf_counter() - started
    print(f"{model_name}: {len(result.trials)} trials, {seconds:.0f} s (model loading included)", flush=True)
    return seconds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    add_grid_arguments(parser)
    args = parser.parse_args(argv)
    for model_name in args.models:
        detect_model(args, model_name)


if __name__ == "__main__":
    main()
