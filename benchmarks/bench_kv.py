"""Memory and speed of the head-wise KV cache against the full cache, in rh_lens's decoding and in
plain transformers, side by side in one run.

Each configuration runs in a fresh process: it loads the model, warms up on a short prompt,
resets the kernel's peak-RSS counter, then prefills one NIAH prompt of the given length (one
needle at 50% depth) and decodes `--steps` tokens greedily (no early stop):

- rh-full: rh_lens's decoding, every key kept (its rotated-key cache);
- rh-F: rh_lens's decoding through the head-wise cache, a fraction F of KV heads full and the
  rest sink + window, windowed from the first prompt token (prefill memory drops too);
- hf-dynamic: transformers (SDPA attention) with its default DynamicCache;
- hf-F: transformers with `rh_lens.kv.HeadwiseCache` at fraction F.

The full KV heads are a seeded random draw: bytes and speed do not depend on which heads they
are. Reported: cache bytes measured (storage sizes of the cache's tensors after decoding) and
predicted (`kv_bytes`, for the same number of tokens), peak RSS added over the loaded model,
prefill seconds and decode ms per token.

    python benchmarks/bench_kv.py --model qwen2.5-coder-0.5b --lengths 4000 8000 16000 32000
    python benchmarks/bench_kv.py --model smollm2-135m --lengths 4000 8000
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_detection import reset_peak, rss_mb  # noqa: E402


def variant_fraction(variant: str) -> float | None:
    tail = variant.split("-", 1)[1]
    return None if tail in ("full", "dynamic") else float(tail)


def prompt_ids(tokenizer, n_ctx: int, length: int) -> list[int]:
    from rh_lens import BUILTIN_NEEDLES, trial_grid

    (trial,) = trial_grid(tokenizer, BUILTIN_NEEDLES[:1], [length], [50])
    return trial.prompt_ids


def rh_worker(args, fraction: float | None) -> dict:
    import torch

    from rh_lens import load_model
    from rh_lens.interventions.compression import random_policy
    from rh_lens.model.generation import _extend, forward, prefill
    from rh_lens.model.headwise import kv_bytes
    from rh_lens.model.tl_internals import fused_attention, headwise_kv_cache, kv_cache_bytes

    model = load_model(args.model, device="cpu")
    ids = torch.tensor(prompt_ids(model.tokenizer, model.cfg.n_ctx, args.length))
    policy = random_policy(model, fraction, seed=0, sink=args.sink, window=args.window) if fraction is not None else None

    def fill(tokens):
        if policy is None:
            return prefill(model, tokens)
        cache = headwise_kv_cache(model, policy, len(tokens) + args.steps + 1)
        _extend(model, cache, tokens, 0, None)
        return cache

    def decode(cache, token: int, steps: int) -> None:
        with fused_attention(model):
            for _ in range(steps):
                token = int(forward(model, torch.tensor([[token]]), cache)[0, -1].argmax())

    with torch.inference_mode():
        decode(fill(ids[:200]), int(ids[200]), 4)  # warm-up
        loaded = rss_mb("VmRSS")
        reset_peak()
        started = time.perf_counter()
        cache = fill(ids[:-1])
        prefill_s = time.perf_counter() - started
        started = time.perf_counter()
        decode(cache, int(ids[-1]), args.steps)
        decode_s = time.perf_counter() - started
    cfg = model.cfg
    tokens = len(ids) + args.steps - 1
    predicted = kv_bytes(policy, tokens, cfg.d_head, cfg.dtype.itemsize)[0] if policy else None
    full = 2 * cfg.n_layers * (cfg.n_key_value_heads or cfg.n_heads) * cfg.d_head * cfg.dtype.itemsize * tokens
    return report(args, len(ids), kv_cache_bytes(cache), predicted or full, full, loaded, prefill_s, decode_s)


def hf_worker(args, fraction: float | None) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

    from rh_lens.kv import HeadwiseCache, kv_bytes
    from rh_lens.kv.hf_cache import model_shape
    from rh_lens.model.headwise import KVPolicy, storage_bytes
    from rh_lens.model.loading import hf_directory

    directory = hf_directory(args.model)
    hf = AutoModelForCausalLM.from_pretrained(directory, attn_implementation="sdpa", dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(directory)
    ids = torch.tensor(prompt_ids(tokenizer, hf.config.max_position_embeddings, args.length))
    n_layers, n_heads, n_kv = model_shape(hf.config)
    policy = None
    if fraction is not None:
        import random

        pool = [(layer, kv) for layer in range(n_layers) for kv in range(n_kv)]
        full = random.Random(0).sample(pool, round(fraction * len(pool)))
        policy = KVPolicy("random-seed0", n_layers, n_heads, n_kv, frozenset(full), args.sink, args.window)

    def new_cache():
        return HeadwiseCache.from_head_map(policy, hf) if policy is not None else DynamicCache()

    def run(tokens, steps: int):
        cache = new_cache()
        started = time.perf_counter()
        logits = hf(tokens[None], cache=cache, use_cache=True, logits_to_keep=1).logits[0, -1]  # as generate does
        prefill_s = time.perf_counter() - started
        started = time.perf_counter()
        for _ in range(steps):
            logits = hf(logits.argmax().view(1, 1), cache=cache, use_cache=True).logits[0, -1]
        return cache, prefill_s, time.perf_counter() - started

    with torch.inference_mode():
        run(ids[:200], 4)  # warm-up
        loaded = rss_mb("VmRSS")
        reset_peak()
        cache, prefill_s, decode_s = run(ids, args.steps)
    d_head = hf.config.head_dim if getattr(hf.config, "head_dim", None) else hf.config.hidden_size // n_heads
    tokens = len(ids) + args.steps
    full = 2 * n_layers * n_kv * d_head * 4 * tokens
    if policy is not None:
        measured, predicted = cache.nbytes(), kv_bytes(policy, tokens, d_head, 4)[0]
    else:
        measured, predicted = storage_bytes([t for layer in cache.layers for t in (layer.keys, layer.values)]), full
    return report(args, len(ids), measured, predicted, full, loaded, prefill_s, decode_s)


def report(args, prompt: int, measured: int, predicted: int, full: int, loaded: float, prefill_s: float, decode_s: float):
    import torch

    return {
        "prompt_tokens": prompt,
        "measured_bytes": measured,
        "predicted_bytes": predicted,
        "full_bytes": full,
        "peak_added_mb": rss_mb("VmHWM") - loaded,
        "prefill_s": prefill_s,
        "decode_ms": 1000 * decode_s / args.steps,
        "torch_threads": torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen2.5-coder-0.5b")
    parser.add_argument("--lengths", nargs="+", type=int, default=[4000, 8000, 16000, 32000])
    parser.add_argument("--fractions", nargs="+", type=float, default=[0.25, 0.5])
    parser.add_argument("--sink", type=int, default=4)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--steps", type=int, default=32, help="decode steps timed")
    parser.add_argument("--variants", nargs="+", help="default: rh-full, rh-F per fraction, hf-dynamic, hf-F per fraction")
    parser.add_argument("--save", help="also write every worker's output to this JSON file")
    parser.add_argument("--json", help="write the table's rows as plain data to this JSON file (e.g. experiments/results/...)")
    parser.add_argument(
        "--table",
        nargs="+",
        help="print the table of saved runs (--save files; a later run of a variant replaces an earlier one)",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--length", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.table:
        runs = {(r["length"], r["variant"]): r for path in args.table for r in json.loads(Path(path).read_text())}
        order = {v: i for i, v in enumerate(["rh-full", "rh-0.25", "rh-0.5", "hf-dynamic", "hf-0.25", "hf-0.5"])}
        print_table(sorted(runs.values(), key=lambda r: (r["length"], order.get(r["variant"], 99))), args)
        return
    if args.worker:
        fraction = variant_fraction(args.worker)
        print(json.dumps((rh_worker if args.worker.startswith("rh-") else hf_worker)(args, fraction)))
        return

    variants = args.variants or (
        ["rh-full"] + [f"rh-{f:g}" for f in args.fractions] + ["hf-dynamic"] + [f"hf-{f:g}" for f in args.fractions]
    )
    common = ["--model", args.model, "--sink", str(args.sink), "--window", str(args.window), "--steps", str(args.steps)]
    runs = []
    for length in args.lengths:
        for variant in variants:
            command = [sys.executable, __file__, *common, "--worker", variant, "--length", str(length)]
            out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            runs.append({"length": length, "variant": variant, **json.loads(out.strip().splitlines()[-1])})
            print(f"done {variant} at {length}: {runs[-1]['prefill_s']:.1f} s prefill", file=sys.stderr)
            if args.save:
                Path(args.save).write_text(json.dumps(runs))
    print_table(runs, args)


def table_rows(runs: list[dict]) -> list[dict]:
    """The table's rows as plain data: the numbers it prints, unrounded."""
    rows = []
    for run in runs:
        family = run["variant"].split("-")[0]
        base = next(
            r
            for r in runs
            if r["length"] == run["length"] and r["variant"] == family + ("-full" if family == "rh" else "-dynamic")
        )
        rows.append(
            {
                "length": run["length"],
                "prompt_tokens": run["prompt_tokens"],
                "variant": run["variant"],
                "cache_mb_measured": run["measured_bytes"] / 2**20,
                "cache_mb_predicted": run["predicted_bytes"] / 2**20,
                "vs_full_cache": run["measured_bytes"] / run["full_bytes"],
                "peak_rss_added_mb": run["peak_added_mb"],
                "prefill_s": run["prefill_s"],
                "decode_ms_per_token": run["decode_ms"],
                "decode_vs_its_full_cache": run["decode_ms"] / base["decode_ms"],
            }
        )
    return rows


def print_table(runs: list[dict], args) -> list[dict]:
    print(
        f"model {args.model}, fp32, CPU, {runs[0]['torch_threads']} torch threads; sink {args.sink}, window {args.window}, "
        f"{args.steps} decode steps; full KV heads: a seeded random draw"
    )
    print(
        "| tokens | variant | cache MB measured | predicted | vs full cache | peak RSS added MB | prefill s | decode ms/token | vs its full cache |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    rows = table_rows(runs)
    for row in rows:
        print(
            f"| {row['prompt_tokens']} | {row['variant']} | {row['cache_mb_measured']:.1f} | {row['cache_mb_predicted']:.1f} "
            f"| {row['vs_full_cache']:.2f}x | {row['peak_rss_added_mb']:.0f} | {row['prefill_s']:.1f} "
            f"| {row['decode_ms_per_token']:.1f} | {row['decode_vs_its_full_cache']:.2f}x |"
        )
    if args.json:
        from rh_lens.execution.files import write_json

        settings = {"model": args.model, "sink": args.sink, "window": args.window, "steps": args.steps}
        settings["torch_threads"] = runs[0]["torch_threads"]
        write_json(args.json, {"benchmark": "bench_kv", "settings": settings, "rows": rows})
    return rows


if __name__ == "__main__":
    main()
