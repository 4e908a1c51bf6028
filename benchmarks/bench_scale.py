"""A detection-shaped trial on a model of a real large shape, and the memory it should need.

The model is a HookedTransformer built from the shape of a real model (Llama-2-7B,
Llama-3-8B, ...) with random weights: no download, so it runs anywhere, and on a GPU the
same command measures the real thing's time and memory. One trial = chunked prefill of a
prompt of the given length + 50 greedy decode steps recording every head's attention argmax
(`rh_lens.model.generation.greedy_decode`, exactly what detection runs). Each length runs in a
fresh process. For each it prints seconds, tokens/s, peak memory (CUDA max_memory_allocated
on a GPU; peak RSS over the process's start on a CPU) and the memory model's prediction:

    weights + key-value cache + the largest transient
    weights    = parameters x bytes per parameter
    KV cache   = layers x KV heads x d_head x 2 (keys, values) x (tokens + 256 growth) x bytes
    transient  = one prefill chunk through one layer: chunk x (3 d_mlp + 6 d_model + 3 heads
                 x d_head) x bytes (a chunk is at most 256 MiB of these), the attention mask of
                 a later chunk (at most 256 MiB), the fp32 logits of one position, and
                 per token: the rotary tables (2 d_head) and a recorded decode step's
                 scores, softmax and pattern (3 heads), x bytes

    With --full-fraction F, the trial decodes through rh_lens's head-wise cache (a seeded
    random F of the KV heads keep every key, the others --sink + --window, windowed from the
    first prompt token), and the KV cache term is what that cache holds:
    KV cache   = (full KV heads x (tokens + 256 growth) + streaming KV heads x (sink + window))
                 x d_head x 2 x bytes, + 8 bytes per ring slot for its position

On this machine: python benchmarks/bench_scale.py --shape llama-2-7b --layers 2 --lengths 4096 16384 65536
On a GPU:        python benchmarks/bench_scale.py --shape llama-2-7b --lengths 32768 100000 --device cuda
`--predict-only` prints the prediction for the full model without running anything, and the
longest context that fits each GPU size, with the full cache and each --full-fraction.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

SHAPES = {  # from each model's config.json
    "llama-2-7b": dict(
        d_model=4096, n_layers=32, n_heads=32, n_key_value_heads=None, d_head=128, d_mlp=11008, d_vocab=32000, rotary_base=10000
    ),
    "llama-2-13b": dict(
        d_model=5120, n_layers=40, n_heads=40, n_key_value_heads=None, d_head=128, d_mlp=13824, d_vocab=32000, rotary_base=10000
    ),
    "llama-3-8b": dict(
        d_model=4096, n_layers=32, n_heads=32, n_key_value_heads=8, d_head=128, d_mlp=14336, d_vocab=128256, rotary_base=500000
    ),
    "qwen2.5-7b": dict(
        d_model=3584, n_layers=28, n_heads=28, n_key_value_heads=4, d_head=128, d_mlp=18944, d_vocab=152064, rotary_base=1000000
    ),
}
GIB = 1 << 30


def shape(name: str, layers: int | None) -> dict:
    settings = dict(SHAPES[name])
    if layers:
        settings["n_layers"] = layers
    return settings


def n_params(s: dict) -> int:
    kv = s["n_key_value_heads"] or s["n_heads"]
    attention = s["d_model"] * s["d_head"] * (2 * s["n_heads"] + 2 * kv)
    mlp = 3 * s["d_model"] * s["d_mlp"]
    return s["n_layers"] * (attention + mlp + 2 * s["d_model"]) + 2 * s["d_vocab"] * s["d_model"] + s["d_model"]


def predict(s: dict, tokens: int, dtype_bytes: int, full_fraction: float | None = None, sink: int = 4, window: int = 256) -> dict:
    """The memory model, with rh_lens's own chunk budgets (rh_lens.model.generation.fused_chunk)."""
    from rh_lens.model.generation import ACTIVATION_BUDGET, MASK_BUDGET
    from rh_lens.model.tl_internals import CACHE_GROWTH

    kv_heads = s["n_key_value_heads"] or s["n_heads"]
    weights = n_params(s) * dtype_bytes
    n_total = s["n_layers"] * kv_heads
    per_token = s["d_head"] * 2 * dtype_bytes
    if full_fraction is None:
        kv = n_total * (tokens + CACHE_GROWTH) * per_token
    else:
        n_full, ring = round(full_fraction * n_total), min(tokens, sink + window)
        kv = (n_full * (tokens + CACHE_GROWTH) + (n_total - n_full) * ring) * per_token + s["n_layers"] * ring * 8
    per_token = dtype_bytes * (3 * s["d_mlp"] + 6 * s["d_model"] + 3 * s["n_heads"] * s["d_head"])
    first_chunk = min(tokens, max(64, ACTIVATION_BUDGET // per_token))
    mask = MASK_BUDGET if tokens > first_chunk else 0  # later chunks attend through a mask
    # O(tokens) beyond the cache: TransformerLens's rotary sin/cos tables, and a recorded decode
    # step's scores, softmax and pattern over every key ([heads, 1, tokens], 3 copies)
    per_context = tokens * dtype_bytes * (2 * s["d_head"] + 3 * s["n_heads"])
    transient = first_chunk * per_token + mask + s["d_vocab"] * 4 + per_context
    return {"weights": weights, "kv": kv, "transient": transient, "total": weights + kv + transient}


def longest_context(s: dict, gib: float, dtype_bytes: int, full_fraction: float | None, sink: int, window: int) -> int:
    """The most prompt tokens whose predicted memory fits `gib` GiB (bisection)."""
    low, high = 0, 1 << 26
    while low < high:
        middle = (low + high + 1) // 2
        if predict(s, middle, dtype_bytes, full_fraction, sink, window)["total"] <= gib * GIB:
            low = middle
        else:
            high = middle - 1
    return low


def random_policy(s: dict, full_fraction: float, sink: int, window: int):
    import random

    from rh_lens.model.headwise import KVPolicy

    kv_heads = s["n_key_value_heads"] or s["n_heads"]
    pool = [(layer, kv) for layer in range(s["n_layers"]) for kv in range(kv_heads)]
    full = random.Random(0).sample(pool, round(full_fraction * len(pool)))
    return KVPolicy("random-seed0", s["n_layers"], s["n_heads"], kv_heads, frozenset(full), sink, window)


def rss_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def random_model(s: dict, n_ctx: int, device: str, dtype):
    """A HookedTransformer of shape `s` (Llama-style: rotary, RMSNorm, gated SiLU MLP) with random weights."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from rh_lens.model.tl_internals import use_linear_layout

    cfg = HookedTransformerConfig(
        **s,
        n_ctx=n_ctx,
        act_fn="silu",
        gated_mlp=True,
        normalization_type="RMS",
        positional_embedding_type="rotary",
        rotary_dim=s["d_head"],
        final_rms=True,
        init_weights=False,
        device=device,
        dtype=dtype,
    )
    model = HookedTransformer(cfg)
    for param in model.parameters():  # random weights, small enough that activations stay finite
        param.normal_(0, 0.02)
    return use_linear_layout(model.eval())


def worker(args) -> dict:
    import torch

    from rh_lens.model.generation import Decoding, decode_prompts

    torch.set_grad_enabled(False)
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[args.dtype]
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.startswith("cuda")
    before = 0 if cuda else rss_bytes("VmRSS")
    s = shape(args.shape, args.layers)
    length = args.lengths[0]
    model = random_model(s, length + args.new_tokens + 1, device, dtype)
    prompt = torch.randint(0, s["d_vocab"], (length,), generator=torch.Generator().manual_seed(0)).tolist()
    policy = random_policy(s, args.full_fraction, args.sink, args.window) if args.full_fraction is not None else None

    def decode(tokens: list[int], new_tokens: int):
        decoding = Decoding(max_new_tokens=new_tokens, batch_size=1, share_prefix=False, kv_policy=policy)
        ((_, generation),) = decode_prompts(model, [tokens], decoding)  # every head's argmax recorded, as detection does
        return generation

    decode(prompt[:64], 2)  # warm-up
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    generation = decode(prompt, args.new_tokens)  # a tokenizer-less model decodes all of them
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated() if cuda else rss_bytes("VmHWM") - before
    return {
        "length": length,
        "new_tokens": len(generation.tokens),
        "seconds": seconds,
        "peak": peak,
        "device": device,
        "layers": s["n_layers"],
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=list(SHAPES), default="llama-2-7b")
    parser.add_argument("--layers", type=int, default=None, help="keep only this many layers (all: the real depth)")
    parser.add_argument("--lengths", nargs="+", type=int, default=[4096, 16384])
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    parser.add_argument("--device", default=None, help="cuda if available, else cpu")
    parser.add_argument("--new-tokens", type=int, default=50)
    parser.add_argument("--predict-only", action="store_true", help="print the memory model for these lengths and stop")
    parser.add_argument(
        "--gpu-memory", nargs="*", type=float, default=[80, 141], help="GPU sizes (GiB) the prediction is set against"
    )
    parser.add_argument(
        "--full-fraction",
        nargs="*",
        type=float,
        default=None,
        help="decode through the head-wise cache, this share of KV heads full",
    )
    parser.add_argument("--sink", type=int, default=4)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--json", help="write the tables' rows as plain data to this JSON file (e.g. experiments/results/...)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.full_fraction = args.full_fraction[0] if args.full_fraction else None
        print(json.dumps(worker(args)))
        return
    dtype_bytes = {"bfloat16": 2, "float16": 2, "float32": 4}[args.dtype]
    s = shape(args.shape, args.layers)
    print(f"{args.shape} shape, {s['n_layers']} layers, {args.dtype}, {n_params(s) / 1e9:.2f}B parameters")
    caches = [None] + list(args.full_fraction or [])  # None: the full cache

    def cache_name(fraction: float | None) -> str:
        return "full cache" if fraction is None else f"head-wise, {fraction:g} full"

    settings = {"shape": args.shape, "layers": s["n_layers"], "dtype": args.dtype, "sink": args.sink, "window": args.window}

    def save(data: dict) -> None:
        if args.json:
            from rh_lens.execution.files import write_json

            write_json(args.json, {"benchmark": "bench_scale", "settings": settings, **data})

    if args.predict_only:
        print(f"sink {args.sink}, window {args.window}")
        print(
            "| cache | prompt tokens | weights GiB | KV cache GiB | transient GiB | predicted GiB | "
            + " | ".join(f"fits {g:g} GiB" for g in args.gpu_memory)
            + " |"
        )
        print("|---|---|---|---|---|---|" + "---|" * len(args.gpu_memory))
        predicted, longest_rows = [], []
        for fraction in caches:
            for length in args.lengths:
                p = predict(s, length, dtype_bytes, fraction, args.sink, args.window)
                predicted.append({"full_fraction": fraction, "prompt_tokens": length} | {k: p[k] / GIB for k in p})
                fits = " | ".join("yes" if p["total"] / GIB < g else "no" for g in args.gpu_memory)
                print(
                    f"| {cache_name(fraction)} | {length} | {p['weights'] / GIB:.1f} | {p['kv'] / GIB:.2f} | {p['transient'] / GIB:.2f} "
                    f"| {p['total'] / GIB:.1f} | {fits} |"
                )
        print()
        print("| cache | " + " | ".join(f"longest context on {g:g} GiB" for g in args.gpu_memory) + " |")
        print("|---|" + "---|" * len(args.gpu_memory))
        for fraction in caches:
            longest = [longest_context(s, g, dtype_bytes, fraction, args.sink, args.window) for g in args.gpu_memory]
            longest_rows.append({"full_fraction": fraction, "longest_context": dict(zip(map(str, args.gpu_memory), longest))})
            print(f"| {cache_name(fraction)} | " + " | ".join(f"{n:,}" for n in longest) + " |")
        save({"predicted_gib": predicted, "gpu_memory_gib": args.gpu_memory, "longest": longest_rows})
        return
    rows = []
    for fraction in caches:
        for length in args.lengths:
            command = [sys.executable, __file__, "--worker", "--shape", args.shape, "--lengths", str(length)]
            command += [
                "--dtype",
                args.dtype,
                "--new-tokens",
                str(args.new_tokens),
                "--sink",
                str(args.sink),
                "--window",
                str(args.window),
            ]
            command += (["--layers", str(args.layers)] if args.layers else []) + (
                ["--device", args.device] if args.device else []
            )
            command += ["--full-fraction", str(fraction)] if fraction is not None else []
            out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            rows.append({**json.loads(out.strip().splitlines()[-1]), "fraction": fraction})
            print(f"done {cache_name(fraction)} at {length}", file=sys.stderr, flush=True)
    device = rows[0]["device"]
    memory = "CUDA max_memory_allocated" if device.startswith("cuda") else "peak RSS added by the worker"
    print(
        f"device {device}, {rows[0]['threads']} torch threads; one trial = prefill + {args.new_tokens} decode steps "
        f"recording every head's argmax; measured = {memory}; sink {args.sink}, window {args.window}"
    )
    print(
        "| cache | prompt tokens | seconds | prompt tokens/s | measured GiB | predicted GiB (weights + KV + transient) | measured / predicted |"
    )
    print("|---|---|---|---|---|---|---|")
    measured = []
    for row in rows:
        p = predict(s, row["length"], dtype_bytes, row["fraction"], args.sink, args.window)
        measured.append(
            {"full_fraction": row["fraction"], "prompt_tokens": row["length"], "seconds": row["seconds"]}
            | {"tokens_per_s": row["length"] / row["seconds"], "measured_gib": row["peak"] / GIB}
            | {f"predicted_{k}_gib": p[k] / GIB for k in p}
            | {"measured_over_predicted": row["peak"] / p["total"], "device": row["device"], "threads": row["threads"]}
        )
        print(
            f"| {cache_name(row['fraction'])} | {row['length']} | {row['seconds']:.1f} | {row['length'] / row['seconds']:.0f} "
            f"| {row['peak'] / GIB:.2f} | {p['total'] / GIB:.2f} ({p['weights'] / GIB:.2f} + {p['kv'] / GIB:.2f} + {p['transient'] / GIB:.2f}) "
            f"| {row['peak'] / p['total']:.2f} |"
        )
    save({"new_tokens": args.new_tokens, "rows": measured})


if __name__ == "__main__":
    main()
