"""Summarise one finished `rh-lens` run into a small results file under experiments/results/.

A run directory (`runs/...`) holds every trial and is not committed; a docs table is read from
the summary this writes (plain data: the numbers the table prints, unrounded), which
`tests/test_docs_numbers.py` checks the page against.

    python experiments/summarize_run.py runs/ablate/ablation.json experiments/results/masking_smollm2-135m.json

- `ablation.json`, `compression.json`, `steering.json` or `finetune.json`: the run's settings,
  one row per condition group as `InterventionResult.summary()` gives it (mean recall with its
  95% interval, spread over seeds, retrieved, no-answer-word and response-class rates, kept
  right; KV kept and compression ratio for a compression run) and the paired tests of its
  table (`comparisons()`); for a steering run also `factor_rows()` (the top heads' copy score);
- a `patching.json`: the clean and corrupted metric, and per head kind and direction the top
  20 heads by effect and the sum over every patched head; the MLP effects per layer;
- a detection `results.json`: trials and trials retrieved, how many responses of each class
  (correct, distractor, ...), the trials' decoding seconds, the heads at or above the threshold,
  the ranking's top 20 (layer, head, score) and their bootstrap intervals (`rh-lens show --ci`:
  1,000 resamples, 95%, how often each is in the resampled top 10, the top-10 Jaccard).
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

from rh_lens.analysis.statistics import bootstrap
from rh_lens.detection.records import load_results
from rh_lens.execution.files import read_json, write_json
from rh_lens.interventions.compression import CompressionResult
from rh_lens.interventions.head_tuning import FinetuneExperimentResult
from rh_lens.interventions.masking import AblationResult
from rh_lens.interventions.patching import PatchingResult
from rh_lens.interventions.steering import SteeringResult

TOP = 20
RESULT_TYPES = {
    "ablation": AblationResult,
    "compression": CompressionResult,
    "steering": SteeringResult,
    "finetune": FinetuneExperimentResult,
}


def summarize(path: Path) -> dict:
    """The summary of one run's results file (an ablation, compression or detection file)."""
    data = read_json(path, "results file")
    experiment = data.get("experiment") if isinstance(data, dict) else None
    if experiment in RESULT_TYPES:
        result = RESULT_TYPES[experiment].load(path)
        summary = {
            "run": str(path),
            "experiment": experiment,
            "model": result.model,
            "settings": result.settings,
            "rows": result.summary(),
            "tests": [t.to_json() for t in result.comparisons()],
        }
        if isinstance(result, SteeringResult):  # recall and the top heads' copy score per K and factor
            summary["factor_rows"] = result.factor_rows()
        return summary
    if isinstance(data, dict) and str(data.get("format", "")).startswith("rh_lens.patching/"):
        return summarize_patching(path, PatchingResult.from_json(data))
    result = load_results(path)
    above = result.retrieval_heads()
    intervals = bootstrap(result).to_json() if result.successful else None
    if intervals:  # the top heads only: a file of a few KB
        for key in ("heads", "score", "low", "high"):
            intervals[key] = intervals[key][:TOP]
    return {
        "run": str(path),
        "experiment": "detection",
        "model": result.model,
        "settings": result.settings,
        "n_heads": result.n_layers * result.n_heads,
        "n_trials": len(result.trials),
        "n_successful": len(result.successful),
        "response_classes": dict(Counter(t.response_class for t in result.trials if t.response_class)),
        "seconds": sum(t.seconds or 0.0 for t in result.trials),
        "threshold": result.threshold,
        "n_above_threshold": len(above),
        "fraction_above_threshold": result.fraction_above(),
        "top": [[layer, head, score] for layer, head, score in result.ranking(TOP)],
        "bootstrap": intervals,
    }


def summarize_patching(path: Path, result: PatchingResult) -> dict:
    summary = {"run": str(path), "experiment": "patching", "model": result.model, "settings": result.settings}
    summary |= {"metric": result.metric, "clean_metric": result.clean_metric, "corrupted_metric": result.corrupted_metric}
    for kind in ("head_out", "pattern"):
        for direction in result.effects.get(kind, {}):
            ranking = result.ranking(kind, direction)
            summary[f"{kind}_{direction}"] = {
                "top": [[layer, head, effect] for layer, head, effect in ranking[:TOP]],
                "sum": sum(effect for _, _, effect in ranking),
            }
    for direction, grid in result.effects.get("mlp_out", {}).items():
        summary[f"mlp_out_{direction}"] = {"by_layer": [row[0] for row in grid], "sum": sum(row[0] for row in grid)}
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a run's ablation.json, compression.json, patching.json or results.json")
    parser.add_argument("out", type=Path, help="the summary to write, e.g. experiments/results/<name>.json")
    args = parser.parse_args(argv)
    write_json(args.out, summarize(args.run))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
