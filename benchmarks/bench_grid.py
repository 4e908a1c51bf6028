"""Throughput of a whole detection grid: one trial at a time vs prefix sharing, batching and both,
with a plain transformers `generate` per trial as the baseline, side by side in one run.

Each variant runs in a fresh worker process on the same trials: it loads the model, warms up
on a short trial, resets the kernel's peak-RSS counter, then runs `rh_lens.detect` on the grid
(every head's argmax recorded at every decode step, every trial scored):

- sequential: `--batch-size 1 --no-share-prefix`, rh_lens's path before grid throughput work;
- prefix: one trial at a time, each prefilled from the cache of the prompt prefix it shares
  with the trial before (trials in prefix order);
- batch: `--batch-size N`, every trial prefilled from an empty cache;
- both: `--batch-size N` with prefix sharing (the default);
- transformers: AutoModelForCausalLM (SDPA attention), one greedy `generate` per trial with
  as many new tokens as an rh_lens variant run before it emitted, recording nothing.

Identity: each rh_lens variant's generated ids and per-head scores are compared with the
sequential run's, trial by trial (when the sequential variant is run).

    python benchmarks/bench_grid.py --model smollm2-135m                     # the demo grid (45 trials)
    python benchmarks/bench_grid.py --model smollm2-135m --lengths 4000 8000 --depths 10 50 90 --needles 1
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_detection import reset_peak, rss_mb  # noqa: E402

VARIANTS = {  # name -> (batch size, share prefix); None: rh_lens's default for the device
    "sequential": (1, False),
    "prefix": (1, True),
    "batch": (None, False),
    "both": (None, True),
}


def grid_trials(tokenizer, n_ctx: int, args: argparse.Namespace):
    from rh_lens import BUILTIN_NEEDLES, Grid

    grid = Grid(needles=BUILTIN_NEEDLES[: args.needles], lengths=tuple(args.lengths), depths=tuple(args.depths))
    return grid.trials(tokenizer, n_ctx)


def worker(variant: str, args: argparse.Namespace) -> dict:
    import torch

    from rh_lens import BUILTIN_NEEDLES, RunOptions, detect, load_model, trial_grid
    from rh_lens.model.generation import default_batch_size

    model = load_model(args.model, device="cpu")
    trials = grid_trials(model.tokenizer, model.cfg.n_ctx, args)
    warmup = trial_grid(model.tokenizer, BUILTIN_NEEDLES[1:2], [400, 300], [50])
    if variant in VARIANTS:
        batch_size, share_prefix = VARIANTS[variant]
        options = RunOptions(batch_size=batch_size or args.batch_size, share_prefix=share_prefix, progress=False)
        detect(model, warmup, options=options)
        loaded = rss_mb("VmRSS")
        reset_peak()
        started = time.perf_counter()
        result = detect(model, trials, options=options)
        seconds = time.perf_counter() - started
        records = [{"key": r.key, "ids": r.generated_ids, "scores": r.head_scores} for r in result.trials]
        batch_size = options.batch_size or default_batch_size(model, max(len(t.prompt_ids) for t in trials))
    else:
        from transformers import AutoModelForCausalLM

        from rh_lens.model.loading import hf_directory

        new_tokens = json.loads(Path(args.new_tokens).read_text())
        del model
        hf = AutoModelForCausalLM.from_pretrained(hf_directory(args.model), attn_implementation="sdpa", dtype=torch.float32)
        hf.eval()

        def generate(ids: list[int], n: int) -> None:
            with torch.inference_mode():
                hf.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False)

        for trial in warmup:
            generate(trial.prompt_ids, 8)
        loaded = rss_mb("VmRSS")
        reset_peak()
        started = time.perf_counter()
        for trial in trials:
            generate(trial.prompt_ids, new_tokens[trial.key])
        seconds = time.perf_counter() - started
        records, batch_size = [], 1
    return {
        "batch_size": batch_size,
        "variant": variant,
        "trials": len(trials),
        "prompt_tokens": sum(len(t.prompt_ids) for t in trials),
        "seconds": seconds,
        "peak_mb": rss_mb("VmHWM"),
        "added_mb": rss_mb("VmHWM") - loaded,
        "torch_threads": torch.get_num_threads(),
        "records": records,
    }


def run_worker(variant: str, argv: list[str], extra: list[str] = ()) -> dict:
    command = [sys.executable, __file__, *argv, "--worker", variant, *extra]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def identity(records: list[dict], reference: list[dict]) -> tuple[int, int, float]:
    """(trials with the same generated ids, trials with the same scores, largest score difference)."""
    by_key = {r["key"]: r for r in reference}
    same_ids = sum(r["ids"] == by_key[r["key"]]["ids"] for r in records)
    same_scores = sum(r["scores"] == by_key[r["key"]]["scores"] for r in records)
    gap = max(
        (abs(a - b) for r in records for row, ref in zip(r["scores"], by_key[r["key"]]["scores"]) for a, b in zip(row, ref)),
        default=0.0,
    )
    return same_ids, same_scores, gap


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--lengths", nargs="+", type=int, default=[500, 1000, 2000])
    parser.add_argument("--depths", nargs="+", type=int, default=[0, 25, 50, 75, 100])
    parser.add_argument("--needles", type=int, default=3, help="the first N built-in needles")
    parser.add_argument("--batch-size", type=int, default=None, help="batch size of the batch/both variants (default: rh_lens's)")
    parser.add_argument("--variants", nargs="+", default=[*VARIANTS, "transformers"])
    parser.add_argument("--save", help="also write every worker's output (records included) to this JSON file")
    parser.add_argument("--json", help="write the table's rows as plain data to this JSON file (e.g. experiments/results/...)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--new-tokens", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args)))
        return

    argv = ["--model", args.model, "--lengths", *map(str, args.lengths), "--depths", *map(str, args.depths)]
    argv += ["--needles", str(args.needles)] + (["--batch-size", str(args.batch_size)] if args.batch_size else [])
    runs = {}
    for variant in args.variants:
        extra = []
        if variant == "transformers":  # as many new tokens per trial as rh_lens emitted (every variant: the same ids)
            reference = next((r for r in runs.values() if r["records"]), None) or run_worker("sequential", argv)
            path = Path(args.save).with_suffix(".new_tokens.json") if args.save else Path(tempfile.mkdtemp()) / "new_tokens.json"
            path.write_text(json.dumps({r["key"]: len(r["ids"]) for r in reference["records"]}))
            extra = ["--new-tokens", str(path)]
        runs[variant] = run_worker(variant, argv, extra)
        print(f"done {variant}: {runs[variant]['seconds']:.1f} s", file=sys.stderr)
    if args.save:
        Path(args.save).write_text(json.dumps(runs))

    first = next(iter(runs.values()))
    sequential, transformers = runs.get("sequential"), runs.get("transformers")
    print(
        f"model {args.model}, fp32, CPU, {first['torch_threads']} torch threads; {first['trials']} trials "
        f"(lengths {' '.join(map(str, args.lengths))}, depths {' '.join(map(str, args.depths))}, {args.needles} needles), "
        f"{first['prompt_tokens']} prompt tokens"
    )
    print(
        "| variant | batch | wall s | trials/min | vs sequential | vs transformers | peak RSS MB (added) | same ids | same scores |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    rows = []
    for variant, run in runs.items():
        row = {"variant": variant, "batch_size": run["batch_size"], "trials": run["trials"], "seconds": run["seconds"]}
        row["trials_per_min"] = 60 * run["trials"] / run["seconds"]
        row["vs_sequential"] = run["seconds"] / sequential["seconds"] if sequential else None
        row["vs_transformers"] = run["seconds"] / transformers["seconds"] if transformers else None
        row |= {"peak_mb": run["peak_mb"], "added_mb": run["added_mb"], "same_ids": None, "same_scores": None}
        ratio = f"{row['vs_sequential']:.2f}x" if sequential else "-"
        versus = f"{row['vs_transformers']:.2f}x" if transformers else "-"
        same = "-", "-"
        if sequential and run["records"]:
            ids, scores, gap = identity(run["records"], sequential["records"])
            row |= {"same_ids": ids, "same_scores": scores, "max_score_diff": gap}
            same = f"{ids}/{run['trials']}", f"{scores}/{run['trials']}" + (f" (max diff {gap:.3f})" if gap else "")
        rows.append(row)
        print(
            f"| {variant} | {run['batch_size']} | {run['seconds']:.1f} | {row['trials_per_min']:.1f} | {ratio} | {versus} "
            f"| {run['peak_mb']:.0f} ({run['added_mb']:.0f}) | {same[0]} | {same[1]} |"
        )
    if args.json:
        from rh_lens.execution.files import write_json

        settings = {"model": args.model, "lengths": args.lengths, "depths": args.depths, "needles": args.needles}
        settings |= {"dtype": "float32", "torch_threads": first["torch_threads"], "prompt_tokens": first["prompt_tokens"]}
        write_json(args.json, {"benchmark": "bench_grid", "settings": settings, "rows": rows})


if __name__ == "__main__":
    main()
