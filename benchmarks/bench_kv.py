"""Memory and speed of the head-wise KV cache against the full cache, in rh_lens's decoding and in
plain transformers, side by side in one run.

Each configuration runs in a fresh process: it loads the model, warms up on a short prompt,
resets the kernel's peak-RSS counter, then prefills one NIAH prompt of the given length (one
needle at 50% depth) and decodes `--steps` tokens greedily (no early stop):

- rh-full: rh_lens's decoding, every key kept (its rotated-key cache);
- rh-F: rh_lens's decoding through the head-wise cache, a fraction F of KV heads full and the
  rest sink + window, windowed from the first prompt token (prefill memory drops too);
- hf-dynamic: transformers (SDPA attention) with its default DynamicCache;
- hf-F: transformers with `rh_lens.kv.HeadwiseCache` at fraction F, windowed;
- a suffix "+chunked": the prompt prefilled `--prefill-chunk` tokens at a time (as
  `generate(..., prefill_chunk_size=N)` does); "+decode-only": the head-wise cache's
  decode-only mode (the prompt, whole, attends over every key; each layer trimmed as written).

The full KV heads are a seeded random draw: bytes and speed do not depend on which heads they
are. Reported: cache bytes measured (storage sizes of the cache's tensors after decoding) and
predicted (`cache_bytes`: keys, values and slot positions, for the same number of tokens), peak RSS added over the loaded model,
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


def parse_variant(variant: str) -> tuple[str, float | None, set[str]]:
    """(family, fraction or None for the full cache, suffixes) of e.g. "hf-0.25+chunked"."""
    name, *suffixes = variant.split("+")
    family, tail = name.split("-", 1)
    unknown = set(suffixes) - {"chunked", "decode-only"}
    if family not in ("rh", "hf") or unknown or (family == "rh" and suffixes):
        raise SystemExit(f"unknown variant {variant!r}")
    return family, None if tail in ("full", "dynamic") else float(tail), set(suffixes)


def prompt_ids(tokenizer, n_ctx: int, length: int) -> list[int]:
    from rh_lens import BUILTIN_NEEDLES, trial_grid

    (trial,) = trial_grid(tokenizer, BUILTIN_NEEDLES[:1], [length], [50])
    return trial.prompt_ids


def rh_worker(args, fraction: float | None) -> dict:
    import torch

    from rh_lens import load_model
    from rh_lens.interventions.compression import random_policy
    from rh_lens.model.generation import _extend, forward, prefill
    from rh_lens.model.headwise import cache_bytes
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
        memory = Memory("cpu")
        memory.mark()
        started = time.perf_counter()
        cache = fill(ids[:-1])
        prefill_s = time.perf_counter() - started
        started = time.perf_counter()
        decode(cache, int(ids[-1]), args.steps)
        decode_s = time.perf_counter() - started
    cfg = model.cfg
    tokens = len(ids) + args.steps - 1
    predicted = cache_bytes(policy, tokens, cfg.d_head, cfg.dtype.itemsize) if policy else None
    full = 2 * cfg.n_layers * (cfg.n_key_value_heads or cfg.n_heads) * cfg.d_head * cfg.dtype.itemsize * tokens
    return report(args, len(ids), kv_cache_bytes(cache), predicted or full, full, memory.peak_added(), prefill_s, decode_s)


def random_llama(args):
    """A transformers Llama of a bench_scale.py shape (`--shape`, `--layers`) with random weights."""
    import torch
    from bench_scale import shape
    from transformers import AutoModelForCausalLM, LlamaConfig

    s = shape(args.shape, args.layers)
    config = LlamaConfig(
        vocab_size=s["d_vocab"],
        hidden_size=s["d_model"],
        intermediate_size=s["d_mlp"],
        num_hidden_layers=s["n_layers"],
        num_attention_heads=s["n_heads"],
        num_key_value_heads=s["n_key_value_heads"] or s["n_heads"],
        head_dim=s["d_head"],
        rope_theta=float(s["rotary_base"]),
        max_position_embeddings=max(131072, args.length + args.steps + 1),
        tie_word_embeddings=False,
    )
    with torch.device(args.device):
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=getattr(torch, args.dtype))
    for param in model.parameters():  # small random weights: activations stay finite
        param.data.normal_(0, 0.02)
    return model.eval()


class Memory:
    """Peak memory added over a mark: RSS on a CPU, the allocator's peak on a GPU."""

    def __init__(self, device: str):
        self.device = device

    def mark(self) -> None:
        import torch

        if self.device == "cpu":
            self.start = rss_mb("VmRSS")
            reset_peak()
        else:
            torch.cuda.synchronize()
            self.start = torch.cuda.memory_allocated() / 2**20
            torch.cuda.reset_peak_memory_stats()

    def peak_added(self) -> float:
        import torch

        if self.device == "cpu":
            return rss_mb("VmHWM") - self.start
        return torch.cuda.max_memory_allocated() / 2**20 - self.start


def hf_worker(args, fraction: float | None, suffixes: set[str]) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

    from rh_lens.kv import HeadwiseCache, cache_bytes
    from rh_lens.kv.hf_cache import model_shape, native_windows
    from rh_lens.model.headwise import KVPolicy, kv_bytes, storage_bytes
    from rh_lens.model.loading import hf_directory

    if args.shape:
        hf = random_llama(args)
        ids = torch.randint(0, hf.config.vocab_size, (args.length,), generator=torch.Generator().manual_seed(0))
    else:
        directory = hf_directory(args.model)
        hf = AutoModelForCausalLM.from_pretrained(directory, attn_implementation="sdpa", dtype=getattr(torch, args.dtype))
        hf = hf.to(args.device).eval()
        ids = torch.tensor(prompt_ids(AutoTokenizer.from_pretrained(directory), hf.config.max_position_embeddings, args.length))
    ids = ids.to(args.device)
    n_layers, n_heads, n_kv = model_shape(hf.config)
    policy = None
    if fraction is not None:
        import random

        pool = [(layer, kv) for layer in range(n_layers) for kv in range(n_kv)]
        full = random.Random(0).sample(pool, round(fraction * len(pool)))
        policy = KVPolicy("random-seed0", n_layers, n_heads, n_kv, frozenset(full), args.sink, args.window)

    def new_cache():
        if policy is None:
            return DynamicCache(config=hf.config)  # as generate makes it: sliding layers keep their window only
        return HeadwiseCache.from_head_map(policy, hf, mode="decode-only" if "decode-only" in suffixes else "windowed")

    def run(tokens, steps: int):
        cache = new_cache()
        started = time.perf_counter()
        chunk = args.prefill_chunk if "chunked" in suffixes else len(tokens)
        for start in range(0, len(tokens), chunk):  # keeping only the last position's logits, as generate does
            logits = hf(tokens[None, start : start + chunk], cache=cache, use_cache=True, logits_to_keep=1).logits[0, -1]
        int(logits.argmax())  # waits for a GPU
        prefill_s = time.perf_counter() - started
        started = time.perf_counter()
        for _ in range(steps):
            logits = hf(logits.argmax().view(1, 1), cache=cache, use_cache=True).logits[0, -1]
        int(logits.argmax())
        return cache, prefill_s, time.perf_counter() - started

    memory = Memory(args.device)
    with torch.inference_mode():
        run(ids[:200], 4)  # warm-up
        memory.mark()
        cache, prefill_s, decode_s = run(ids, args.steps)
    d_head = hf.config.head_dim if getattr(hf.config, "head_dim", None) else hf.config.hidden_size // n_heads
    tokens, dtype_bytes, windows = len(ids) + args.steps, hf.dtype.itemsize, native_windows(hf.config)
    # the model's own full cache: a layer with a sliding window (Gemma-3's local layers) keeps only it
    full = kv_bytes(KVPolicy("full", n_layers, n_heads, n_kv, frozenset()), tokens, d_head, dtype_bytes, windows)[1]
    if policy is not None:
        measured, predicted = cache.nbytes(), cache_bytes(policy, tokens, d_head, dtype_bytes, windows)
    else:
        measured, predicted = storage_bytes([t for layer in cache.layers for t in (layer.keys, layer.values)]), full
    return report(args, len(ids), measured, predicted, full, memory.peak_added(), prefill_s, decode_s)


def report(args, prompt: int, measured: int, predicted: int, full: int, peak_added_mb: float, prefill_s: float, decode_s: float):
    import torch

    return {
        "prompt_tokens": prompt,
        "measured_bytes": measured,
        "predicted_bytes": predicted,
        "full_bytes": full,
        "peak_added_mb": peak_added_mb,
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
    parser.add_argument("--shape", help="transformers variants only: a random-weight Llama of this bench_scale.py shape")
    parser.add_argument("--layers", type=int, help="with --shape: only this many layers")
    parser.add_argument("--device", default="cpu", help="transformers variants: cpu or cuda (GPU memory: the allocator's peak)")
    parser.add_argument("--dtype", default="float32", help="transformers variants: float32 or bfloat16")
    parser.add_argument("--repeats", type=int, default=1, help="runs per configuration (median reported)")
    parser.add_argument("--prefill-chunk", type=int, default=1024, help="tokens per prefill call of a +chunked variant")
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
        names = ["rh-full", "rh-0.25", "rh-0.5", "hf-dynamic", "hf-dynamic+chunked", "hf-0.25", "hf-0.25+chunked"]
        order = {v: i for i, v in enumerate([*names, "hf-0.25+decode-only", "hf-0.5", "hf-0.5+chunked"])}
        print_table(sorted(runs.values(), key=lambda r: (r["length"], order.get(r["variant"], 99))), args)
        return
    if args.worker:
        family, fraction, suffixes = parse_variant(args.worker)
        print(json.dumps(rh_worker(args, fraction) if family == "rh" else hf_worker(args, fraction, suffixes)))
        return

    variants = args.variants or (
        ["rh-full"] + [f"rh-{f:g}" for f in args.fractions] + ["hf-dynamic"] + [f"hf-{f:g}" for f in args.fractions]
    )
    for variant in variants:
        if parse_variant(variant)[0] == "rh" and (args.shape or args.device != "cpu" or args.dtype != "float32"):
            raise SystemExit(f"{variant}: --shape, --device and --dtype are for the transformers (hf-) variants")
    common = ["--model", args.model, "--sink", str(args.sink), "--window", str(args.window), "--steps", str(args.steps)]
    common += ["--prefill-chunk", str(args.prefill_chunk), "--device", args.device, "--dtype", args.dtype]
    if args.shape:
        common += ["--shape", args.shape] + (["--layers", str(args.layers)] if args.layers else [])
    runs = []
    for length in args.lengths:
        for variant in variants:
            command = [sys.executable, __file__, *common, "--worker", variant, "--length", str(length)]
            repeats = []
            for _ in range(args.repeats):  # a fresh process each: the allocator's state differs
                out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
                repeats.append(json.loads(out.strip().splitlines()[-1]))
            runs.append({"length": length, "variant": variant, **median_run(repeats)})
            print(f"done {variant} at {length}: {runs[-1]['prefill_s']:.1f} s prefill", file=sys.stderr)
            if args.save:
                Path(args.save).write_text(json.dumps(runs))
    print_table(runs, args)


def median_run(repeats: list[dict]) -> dict:
    """Each number's median over repeated runs (peak RSS varies from process to process on
    a CPU, as the allocator keeps freed memory or not), with the peaks of every run."""
    import statistics

    run = {key: statistics.median(r[key] for r in repeats) for key in repeats[0]}
    return {**run, "peak_added_mb_runs": [r["peak_added_mb"] for r in repeats]}


def table_rows(runs: list[dict]) -> list[dict]:
    """The table's rows as plain data: the numbers it prints, unrounded."""
    rows = []
    for run in runs:
        family = run["variant"].split("-")[0]
        full = family + ("-full" if family == "rh" else "-dynamic")
        same_length = {r["variant"]: r for r in runs if r["length"] == run["length"]}
        # against the full cache prefilled the same way where it was run, else in one call
        base = same_length.get(full + ("+chunked" if "+chunked" in run["variant"] else ""), same_length.get(full, run))
        rows.append(
            {
                "length": run["length"],
                "prompt_tokens": run["prompt_tokens"],
                "variant": run["variant"],
                "cache_mb_measured": run["measured_bytes"] / 2**20,
                "cache_mb_predicted": run["predicted_bytes"] / 2**20,
                "vs_full_cache": run["measured_bytes"] / run["full_bytes"],
                "peak_rss_added_mb": run["peak_added_mb"],
                "peak_vs_its_full_cache": run["peak_added_mb"] / base["peak_added_mb"],
                "peak_rss_added_mb_runs": run.get("peak_added_mb_runs", [run["peak_added_mb"]]),
                "against": base["variant"],
                "prefill_s": run["prefill_s"],
                "decode_ms_per_token": run["decode_ms"],
                "decode_vs_its_full_cache": run["decode_ms"] / base["decode_ms"],
            }
        )
    return rows


def model_name(args) -> str:
    if not args.shape:
        return args.model
    return f"random-weight {args.shape} shape" + (f", first {args.layers} layers" if args.layers else "")


def print_table(runs: list[dict], args) -> list[dict]:
    print(
        f"model {model_name(args)}, {args.dtype}, {args.device}, {runs[0]['torch_threads']} torch threads; "
        f"sink {args.sink}, window {args.window}, prefill chunk {args.prefill_chunk}, median of {args.repeats} runs each, "
        f"{args.steps} decode steps; full KV heads: a seeded random draw"
    )
    print(
        "| tokens | variant | cache MB measured | predicted | vs full cache | peak RSS added MB | vs its full cache "
        "| prefill s | decode ms/token | vs its full cache | full cache |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    rows = table_rows(runs)
    for row in rows:
        print(
            f"| {row['prompt_tokens']} | {row['variant']} | {row['cache_mb_measured']:.1f} | {row['cache_mb_predicted']:.1f} "
            f"| {row['vs_full_cache']:.2f}x | {row['peak_rss_added_mb']:.0f} | {row['peak_vs_its_full_cache']:.2f}x "
            f"| {row['prefill_s']:.1f} | {row['decode_ms_per_token']:.1f} | {row['decode_vs_its_full_cache']:.2f}x "
            f"| {row['against']} |"
        )
    if args.json:
        from rh_lens.execution.files import write_json

        keys = ("sink", "window", "steps", "repeats", "prefill_chunk", "device", "dtype", "shape", "layers")
        settings = {"model": model_name(args), **{key: getattr(args, key) for key in keys}}
        settings["torch_threads"] = runs[0]["torch_threads"]
        write_json(args.json, {"benchmark": "bench_kv", "settings": settings, "rows": rows})
    return rows


if __name__ == "__main__":
    main()
