"""Throughput of an experiment with several conditions (`rh-lens ablate`, `rh-lens compress`):
each condition run on its own vs the conditions that read the prompt unchanged run together,
side by side in one run.

Each variant runs in a fresh worker process on the same trials and conditions: it loads the
model, warms up on a short trial, then answers every trial under every condition:

- separate: one `evaluate` per condition, as an experiment ran before conditions were shared
  (within a condition: prefix sharing and batched decoding, rh_lens's defaults);
- per-condition: `run_conditions` with `merge_conditions=False`: the conditions that read the
  prompt unchanged (none, decode-only masks, KV policies applied after prefill) decode each
  trial from one prefill, one condition's batch after another; the others run as in `separate`;
- together: `run_conditions` (the default): as per-condition, but the conditions without a
  KV policy decode in one batch, each row under its own condition's hooks.

Identity: every condition's generated ids are compared with the separate run's, trial by trial.

    python benchmarks/bench_conditions.py --experiment compress            # full + 4 decode-only KV policies
    python benchmarks/bench_conditions.py --experiment ablate --decode-only  # none, top-K, random-K at decode
    python benchmarks/bench_conditions.py --experiment ablate              # the paper's masking: nothing to share
    python benchmarks/bench_conditions.py --experiment ablate --decode-only --task cot --model qwen2.5-coder-0.5b \
        --detection runs/rigor/qwen2.5-coder-0.5b/niah/results.json --k 5 --lengths 1000 --depths 25 75 --problems 3
        # chain-of-thought answers (up to 256 tokens): decode steps dominate
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_detection import reset_peak, rss_mb  # noqa: E402
from bench_grid import grid_trials  # noqa: E402

DETECTION = Path(__file__).parents[1] / "tests" / "data" / "smollm2-135m-small.json"


def conditions_for(model, trials, args: argparse.Namespace):
    from rh_lens.detection.records import load_results
    from rh_lens.interventions.compression import CompressionOptions, compression_conditions
    from rh_lens.interventions.masking import ablation_conditions

    detection = load_results(args.detection)
    if args.experiment == "compress":
        compression = CompressionOptions(fractions=(0.25,), seeds=(0, 1), decode_only=True)
        return compression_conditions(model, detection, trials, compression)
    return ablation_conditions(detection, args.k, [0, 1], decode_only=args.decode_only)


def task_trials(model, args: argparse.Namespace):
    """NIAH trials (bench_grid's), or arithmetic problems asked with a chain of thought
    (problems 200 on: outside every experiment's problems)."""
    if args.task == "niah":
        return grid_trials(model.tokenizer, model.cfg.n_ctx, args)
    from rh_lens.tasks.arithmetic import ArithmeticGrid

    grid = ArithmeticGrid(problems=(200, 200 + args.problems), lengths=tuple(args.lengths), depths=tuple(args.depths))
    return grid.trials(model.tokenizer, model.cfg.n_ctx)


def worker(variant: str, args: argparse.Namespace) -> dict:
    import torch

    from rh_lens import BUILTIN_NEEDLES, RunOptions, load_model, trial_grid
    from rh_lens.interventions.base import evaluate, run_conditions
    from rh_lens.model.generation import MAX_NEW_TOKENS
    from rh_lens.tasks.arithmetic import CHAIN_OF_THOUGHT_TOKENS

    model = load_model(args.model, device="cpu")
    trials = task_trials(model, args)
    conditions = conditions_for(model, trials, args)
    budget = {"niah": MAX_NEW_TOKENS, "cot": CHAIN_OF_THOUGHT_TOKENS}[args.task]
    options = RunOptions(progress=False, merge_conditions=variant != "per-condition", max_new_tokens=budget)
    warmup = trial_grid(model.tokenizer, BUILTIN_NEEDLES[1:2], [400], [50])
    run_conditions(
        model, warmup, conditions_for(model, warmup, args)[:2], experiment="warmup", options=replace(options, max_new_tokens=16)
    )
    loaded = rss_mb("VmRSS")
    reset_peak()
    started = time.perf_counter()
    if variant == "separate":
        records = {c.name: evaluate(model, trials, c.intervention, options=options, desc=c.name) for c in conditions}
    else:
        result = run_conditions(model, trials, conditions, experiment=args.experiment, options=options)
        records = {c.name: c.records for c in result.conditions}
    seconds = time.perf_counter() - started
    return {
        "variant": variant,
        "conditions": [c.name for c in conditions],
        "trials": len(trials),
        "prompt_tokens": sum(len(t.prompt_ids) for t in trials),
        "seconds": seconds,
        "peak_mb": rss_mb("VmHWM"),
        "added_mb": rss_mb("VmHWM") - loaded,
        "torch_threads": torch.get_num_threads(),
        "ids": {name: {r.key: r.generated_ids for r in rs} for name, rs in records.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--experiment", choices=["ablate", "compress"], default="compress")
    parser.add_argument("--decode-only", action="store_true", help="ablate: mask at decode steps only")
    parser.add_argument("--k", type=int, nargs="+", default=[5], help="ablate: heads masked, one K per condition")
    parser.add_argument("--task", choices=["niah", "cot"], default="niah", help="cot: arithmetic with a chain of thought")
    parser.add_argument("--problems", type=int, default=4, help="cot: how many problems")
    parser.add_argument("--detection", default=str(DETECTION), help="a detection results file ranking the model's heads")
    parser.add_argument("--lengths", nargs="+", type=int, default=[1000, 2000, 4000])
    parser.add_argument("--depths", nargs="+", type=int, default=[0, 50, 100])
    parser.add_argument("--needles", type=int, default=1, help="the first N built-in needles")
    parser.add_argument("--json", help="write the table's rows as plain data to this JSON file (e.g. experiments/results/...)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args)))
        return

    argv = [a for a in sys.argv[1:] if a != "--json" and a != args.json]
    runs = {}
    for variant in ("separate", "per-condition", "together"):
        command = [sys.executable, __file__, *argv, "--worker", variant]
        runs[variant] = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
        print(f"done {variant}: {runs[variant]['seconds']:.1f} s", file=sys.stderr)

    separate = runs["separate"]
    mode = f"{args.experiment}" + (" --decode-only" if args.decode_only and args.experiment == "ablate" else "")
    print(
        f"model {args.model}, fp32, CPU, {separate['torch_threads']} torch threads; {mode}: {len(separate['conditions'])} "
        f"conditions ({', '.join(separate['conditions'])}) x {separate['trials']} trials (lengths "
        f"{' '.join(map(str, args.lengths))}, depths {' '.join(map(str, args.depths))}, "
        f"{f'{args.needles} needles' if args.task == 'niah' else f'{args.problems} problems with a chain of thought'})"
    )
    print("| variant | wall s | answers/min | vs separate | peak RSS MB (added) | same ids |")
    print("|---|---|---|---|---|---|")
    rows = []
    for variant, run in runs.items():
        answers = run["trials"] * len(run["conditions"])
        same = sum(run["ids"][c][k] == ids for c, by_key in separate["ids"].items() for k, ids in by_key.items())
        row = {"variant": variant, "seconds": run["seconds"], "answers_per_min": 60 * answers / run["seconds"]}
        row |= {"vs_separate": run["seconds"] / separate["seconds"], "peak_mb": run["peak_mb"], "added_mb": run["added_mb"]}
        row |= {"same_ids": same, "answers": answers}
        rows.append(row)
        print(
            f"| {variant} | {run['seconds']:.1f} | {row['answers_per_min']:.1f} | {row['vs_separate']:.2f}x "
            f"| {run['peak_mb']:.0f} ({run['added_mb']:.0f}) | {same}/{answers} |"
        )
    if args.json:
        from rh_lens.execution.files import write_json

        settings = {"model": args.model, "experiment": args.experiment, "decode_only": args.decode_only, "k": args.k}
        settings |= {"task": args.task} | ({"problems": [200, 200 + args.problems]} if args.task == "cot" else {})
        settings |= {"lengths": args.lengths, "depths": args.depths, "needles": args.needles, "dtype": "float32"}
        settings |= {"torch_threads": separate["torch_threads"], "conditions": separate["conditions"]}
        settings |= {"trials": separate["trials"], "prompt_tokens": separate["prompt_tokens"]}
        write_json(args.json, {"benchmark": "bench_conditions", "settings": settings, "rows": rows})


if __name__ == "__main__":
    main()
