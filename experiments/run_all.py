"""Regenerate every result and figure: detection (resumable), universality, dynamic
activation and coverage, intrinsic comparisons, bootstrap stability and adaptive detection. Takes the grid arguments of each script,
e.g. on a GPU: `python experiments/run_all.py --models M --lengths 1000 8000 32000 --device cuda`.
Writes `<results>/timing.json` with the seconds of each step."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import detect_catalogue
import dynamic_activation
import intrinsic
import stability
import universality
from common import add_grid_arguments

from rh_lens.execution.files import write_json

STEPS = {
    "detect": detect_catalogue,
    "universality": universality,
    "dynamic_activation": dynamic_activation,
    "intrinsic": intrinsic,
    "stability": stability,
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    add_grid_arguments(parser)
    parser.parse_args(argv)  # checks the arguments (and answers --help) before the long run
    timing = {}
    for name, step in STEPS.items():
        started = time.perf_counter()
        print(f"== {name}", flush=True)
        step.main(argv)
        timing[name] = round(time.perf_counter() - started, 1)
    timing["total"] = round(sum(timing.values()), 1)
    args = parser.parse_args(argv)
    write_json(Path(args.results_dir) / "timing.json", timing)
    print(f"seconds per step: {timing}", flush=True)


if __name__ == "__main__":
    main()
