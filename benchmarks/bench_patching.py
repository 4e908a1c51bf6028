"""Time of activation patching with rh_lens's batched engine vs TransformerLens's own
`patching` functions (one full forward pass per patch), on the same pair and patches.

Per context length: each head's output (hook_z) at the answer position, and the residual
stream (hook_resid_pre) at the last `--tail` positions of every layer. Both sides patch
clean activations into the corrupted run and read the same logit difference; the table
also gives the largest difference between their results.

    python benchmarks/bench_patching.py --model smollm2-135m --lengths 500 1000 --heads 60
"""

from __future__ import annotations

import argparse
import time

import pandas as pd
import torch
from transformer_lens import patching

from rh_lens import BUILTIN_NEEDLES, load_model
from rh_lens.execution.files import write_json
from rh_lens.interventions.patching import cache_run, head_patches, patching_pair, resid_patches, run_patches
from rh_lens.tasks.data import load_haystack
from rh_lens.tasks.niah import tokenize_haystack


def timed(function):
    started = time.perf_counter()
    value = function()
    return value, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--lengths", nargs="+", type=int, default=[500, 1000])
    parser.add_argument("--heads", type=int, default=60, help="first N heads in (layer, head) order")
    parser.add_argument("--tail", type=int, default=8, help="last positions patched in the residual stream")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--json", help="write the table's rows as plain data to this JSON file (e.g. experiments/results/...)")
    args = parser.parse_args()

    torch.set_grad_enabled(False)
    model = load_model(args.model, device="cpu")
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    heads = [(l, h) for l in range(n_layers) for h in range(n_heads)][: args.heads]
    rows = []
    for length in args.lengths:
        haystack = tokenize_haystack(model.tokenizer, load_haystack("pydoc"), length)
        pair = patching_pair(model, BUILTIN_NEEDLES[0], haystack, length, 50, haystack="pydoc")
        n = len(pair.clean_ids)

        def metric(logits):
            return logits[0, -1, pair.clean_token] - logits[0, -1, pair.corrupted_token]

        (clean, corrupted), cache_s = timed(lambda: (cache_run(model, pair.clean_ids), cache_run(model, pair.corrupted_ids)))
        _, clean_cache = model.run_with_cache(pair.clean_ids[None])
        columns = [{"label": str(p), "positions": [p]} for p in range(n - args.tail, n)]
        jobs = {
            "head output, answer position": (
                head_patches(heads, "head_out", "final"),
                patching.get_act_patch_attn_head_out_by_pos,
                pd.DataFrame([(l, n - 1, h) for l, h in heads], columns=["layer", "pos", "head_index"]),
            ),
            f"residual stream, last {args.tail} positions": (
                resid_patches(n_layers, columns),
                patching.get_act_patch_resid_pre,
                pd.DataFrame([(l, c["positions"][0]) for l in range(n_layers) for c in columns], columns=["layer", "pos"]),
            ),
        }
        for name, (groups, tl_function, index_df) in jobs.items():
            ours, ours_s = timed(lambda: run_patches(model, pair, corrupted, clean, groups, args.batch_size, progress=False))
            theirs, theirs_s = timed(
                lambda: tl_function(
                    model, pair.corrupted_ids[None], clean_cache, metric, index_axis_names=None, index_df=index_df
                )
            )
            rows.append((length, n, name, len(groups), ours_s, theirs_s, float((ours - theirs.cpu()).abs().max())))
        print(f"context {length}: caching both runs took {cache_s:.1f} s (rh_lens, once per pair)", flush=True)

    print(f"\n{args.model}, {torch.get_num_threads()} threads, batch size {args.batch_size}\n")
    print("| context | prompt tokens | patches | runs | rh_lens s | TransformerLens patching s | speed-up | max abs diff |")
    print("|---|---|---|---|---|---|---|---|")
    for length, n, name, runs, ours_s, theirs_s, diff in rows:
        print(f"| {length} | {n} | {name} | {runs} | {ours_s:.1f} | {theirs_s:.1f} | {theirs_s / ours_s:.0f}x | {diff:.1e} |")
    if args.json:
        keys = ["context", "prompt_tokens", "patches", "runs", "rh_lens_s", "transformer_lens_s", "max_abs_diff"]
        table = [dict(zip(keys, row)) | {"speed_up": row[5] / row[4]} for row in rows]
        settings = {"model": args.model, "heads": args.heads, "tail": args.tail, "batch_size": args.batch_size}
        settings |= {"dtype": "float32", "torch_threads": torch.get_num_threads()}
        write_json(args.json, {"benchmark": "bench_patching", "settings": settings, "rows": table})


if __name__ == "__main__":
    main()
