"""What every experiment script shares: the grid arguments and where results live.

Default: the CPU catalogue models on rh-lens's default grid (pydoc haystack, the three
built-in needles, lengths 500/1000/2000, depths 0/25/50/75/100 = 45 trials per model).
On a GPU pass a bigger model and grid, e.g.
`--models path/to/Llama-3-8B --lengths 1000 4000 8000 16000 --device cuda`.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # the scripts write figures to files

from rh_lens.app.options import add_grid_arguments as add_niah_arguments
from rh_lens.app.options import add_model_arguments, add_parallel_arguments
from rh_lens.detection.records import load_results

CPU_MODELS = ["smollm2-135m", "qwen2.5-coder-0.5b", "gemma-3-270m"]
RESULTS_DIR = Path(__file__).resolve().parent / "results"
DOCS_DIR = Path(__file__).resolve().parent.parent / "docs"


def add_grid_arguments(parser: argparse.ArgumentParser) -> None:
    """rh-lens's model, grid and worker options (--models for several), and --results-dir."""
    add_model_arguments(parser, multiple=True, default_models=CPU_MODELS)
    add_niah_arguments(parser)
    add_parallel_arguments(parser)
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR, help="where results and figures go")


def model_dir(results_dir: Path, model: str) -> Path:
    """One folder per model, named after the catalogue name or the path's last part."""
    return Path(results_dir) / re.sub(r"[^A-Za-z0-9._-]+", "_", Path(model).name.removesuffix(".gguf"))


def results_file(results_dir: Path, model: str) -> Path:
    return model_dir(results_dir, model) / "results.json"


def load_model_results(args) -> list:
    """The detection result of each model in `args.models`, in order (run detect_catalogue.py first)."""
    results = []
    for model in args.models:
        path = results_file(args.results_dir, model)
        if not path.exists():
            raise SystemExit(f"{path} is missing: run experiments/detect_catalogue.py for {model} first")
        result = load_results(path)
        result.model = model_dir(args.results_dir, model).name  # short names in tables and figures
        results.append(result)
    return results
