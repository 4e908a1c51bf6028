"""Time and memory of one detection trial vs a plain transformers `generate` (SDPA attention).

For each context length, two fresh worker processes run the same prompt and the same
number of new tokens: `rh_lens` (run_trial: chunked prefill through the TransformerLens
key-value cache, every head's attention argmax recorded at each decode step) and
`transformers` (AutoModelForCausalLM with attn_implementation="sdpa", greedy generate).
Each worker warms up on a short prompt first, then resets the kernel's peak-RSS counter:
"peak RSS MB" is the process's peak resident memory during the trial (model included),
"added MB" what the trial added over the loaded, warmed-up model.

    python benchmarks/bench_detection.py --model smollm2-135m --lengths 4000 8000
    python benchmarks/bench_detection.py --model gemma-3-270m --lengths 8000 16000 32000

Peak RSS growth per 1K tokens is the least-squares slope of peak RSS over prompt length.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (peak RSS) to the current RSS


def worker(impl: str, model_name: str, length: int, new_tokens: int | None) -> dict:
    import torch

    from rh_lens import BUILTIN_NEEDLES, load_model, run_trial, trial_grid
    from rh_lens.model.loading import hf_directory

    model = load_model(model_name, device="cpu")
    (trial,) = trial_grid(model.tokenizer, BUILTIN_NEEDLES[1:2], [length], [50], max_tokens=model.cfg.n_ctx)
    (warmup,) = trial_grid(model.tokenizer, BUILTIN_NEEDLES[1:2], [400], [50])
    if impl == "rh_lens":
        run_trial(model, warmup)
        loaded = rss_mb("VmRSS")
        reset_peak()
        started = time.perf_counter()
        record = run_trial(model, trial)
        seconds = time.perf_counter() - started
        new_tokens = len(record.generated_ids)
    else:
        from transformers import AutoModelForCausalLM

        del model
        hf = AutoModelForCausalLM.from_pretrained(hf_directory(model_name), attn_implementation="sdpa", dtype=torch.float32)
        hf.eval()

        def generate(ids: list[int], n: int) -> None:
            with torch.inference_mode():
                hf.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False)

        generate(warmup.prompt_ids, 8)
        loaded = rss_mb("VmRSS")
        reset_peak()
        started = time.perf_counter()
        generate(trial.prompt_ids, new_tokens)
        seconds = time.perf_counter() - started
    return {
        "impl": impl,
        "prompt_tokens": len(trial.prompt_ids),
        "new_tokens": new_tokens,
        "seconds": seconds,
        "peak_mb": rss_mb("VmHWM"),
        "added_mb": rss_mb("VmHWM") - loaded,
        "torch_threads": torch.get_num_threads(),
    }


def run_worker(impl: str, model: str, length: int, new_tokens: int | None) -> dict:
    command = [sys.executable, __file__, "--worker", impl, "--model", model, "--lengths", str(length)]
    if new_tokens is not None:
        command += ["--new-tokens", str(new_tokens)]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--lengths", nargs="+", type=int, default=[1000, 2000, 4000])
    parser.add_argument("--json", help="write the table's rows as plain data to this JSON file (e.g. experiments/results/...)")
    parser.add_argument("--worker", choices=["rh_lens", "transformers"], help=argparse.SUPPRESS)
    parser.add_argument("--new-tokens", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.model, args.lengths[0], args.new_tokens)))
        return

    rows = []
    for length in args.lengths:
        ours = run_worker("rh_lens", args.model, length, None)
        base = run_worker("transformers", args.model, length, ours["new_tokens"])
        rows.append((length, ours, base))
        print(f"done {length}", file=sys.stderr)

    print(f"model {args.model}, fp32, CPU, {rows[0][1]['torch_threads']} torch threads; one trial = prefill + greedy decode")
    print(
        "| context | prompt tokens | new tokens | rh_lens trial s | transformers SDPA generate s | time ratio "
        "| rh_lens peak RSS MB (added) | transformers peak RSS MB (added) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for length, ours, base in rows:
        print(
            f"| {length} | {ours['prompt_tokens']} | {ours['new_tokens']} | {ours['seconds']:.2f} | {base['seconds']:.2f} "
            f"| {ours['seconds'] / base['seconds']:.2f}x | {ours['peak_mb']:.0f} ({ours['added_mb']:.0f}) "
            f"| {base['peak_mb']:.0f} ({base['added_mb']:.0f}) |"
        )
    growth = {}
    if len(rows) > 1:
        tokens = [ours["prompt_tokens"] / 1000 for _, ours, _ in rows]
        for name, column in (("rh_lens", 1), ("transformers", 2)):
            peaks = [row[column]["peak_mb"] for row in rows]
            slope = sum((t - sum(tokens) / len(tokens)) * (p - sum(peaks) / len(peaks)) for t, p in zip(tokens, peaks)) / sum(
                (t - sum(tokens) / len(tokens)) ** 2 for t in tokens
            )  # least squares over the rows
            growth[name] = slope
            print(f"peak RSS growth per 1K prompt tokens, {name}: {slope:.1f} MB")
    if args.json:
        from rh_lens.execution.files import write_json

        table = [
            {
                "context": length,
                "prompt_tokens": ours["prompt_tokens"],
                "new_tokens": ours["new_tokens"],
                "rh_lens_s": ours["seconds"],
                "transformers_s": base["seconds"],
                "time_ratio": ours["seconds"] / base["seconds"],
                "rh_lens_peak_mb": ours["peak_mb"],
                "rh_lens_added_mb": ours["added_mb"],
                "transformers_peak_mb": base["peak_mb"],
                "transformers_added_mb": base["added_mb"],
            }
            for length, ours, base in rows
        ]
        settings = {"model": args.model, "dtype": "float32", "torch_threads": rows[0][1]["torch_threads"]}
        write_json(
            args.json, {"benchmark": "bench_detection", "settings": settings, "rows": table, "peak_mb_per_1k_tokens": growth}
        )


if __name__ == "__main__":
    main()
