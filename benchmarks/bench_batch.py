"""Detection-shaped trials on a model of a real large shape: batch size x prefix sharing.

The model is `bench_scale.py`'s: a HookedTransformer of a real model's shape (Llama-3-8B by
default) with random weights, so it runs anywhere and a GPU measures the real thing's time and
memory. The trials are shaped like a NIAH grid at one context length: one random haystack, a
20-token needle inserted at `--trials` depths from 0% to 100%, a 20-token question at the end;
each trial is decoded for `--new-tokens` steps recording every head's attention argmax at
every step (`rh_lens.model.generation.decode_prompts`, what detection runs; a random model has
no tokenizer, so no row stops early). For each length, every (batch size, prefix sharing)
pair runs on the same trials in one process, the model loaded once; it prints wall seconds,
trials per minute, prompt tokens per second and peak memory (CUDA max_memory_allocated
on a GPU; peak RSS on a CPU, which includes the model).

On this machine: python benchmarks/bench_batch.py --layers 2 --lengths 512 1024 --device cpu
On a GPU:        python benchmarks/bench_batch.py --lengths 8192 32768 --device cuda
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_scale import SHAPES, random_model, rss_bytes, shape  # noqa: E402

NEEDLE, QUESTION = 20, 20  # tokens


def trial_prompts(vocab: int, length: int, trials: int) -> list[list[int]]:
    import torch

    generator = torch.Generator().manual_seed(length)
    haystack = torch.randint(0, vocab, (length,), generator=generator).tolist()
    needle = torch.randint(0, vocab, (NEEDLE,), generator=generator).tolist()
    question = torch.randint(0, vocab, (QUESTION,), generator=generator).tolist()
    body = length - NEEDLE - QUESTION
    depths = [round(100 * i / max(1, trials - 1)) for i in range(trials)]
    return [haystack[: body * d // 100] + needle + haystack[body * d // 100 : body] + question for d in depths]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=list(SHAPES), default="llama-3-8b")
    parser.add_argument("--layers", type=int, default=None, help="keep only this many layers (all: the real depth)")
    parser.add_argument("--lengths", nargs="+", type=int, default=[8192, 32768])
    parser.add_argument("--trials", type=int, default=8, help="trials per length (depths 0-100%%)")
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--new-tokens", type=int, default=50)
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    parser.add_argument("--device", default=None, help="cuda if available, else cpu")
    parser.add_argument("--json", help="write the table's rows as plain data to this JSON file (e.g. experiments/results/...)")
    args = parser.parse_args()

    import torch

    from rh_lens.model.generation import Decoding, decode_prompts, prefix_order

    torch.set_grad_enabled(False)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = args.device.startswith("cuda")
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[args.dtype]
    model = random_model(shape(args.shape, args.layers), max(args.lengths) + NEEDLE + args.new_tokens + 1, args.device, dtype)
    list(decode_prompts(model, trial_prompts(model.cfg.d_vocab, 128, 2), Decoding(max_new_tokens=2, batch_size=2)))  # warm-up
    name = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(
        f"{args.shape} shape, {model.cfg.n_layers} layers, random weights, {args.dtype}, {name}; {args.new_tokens} new tokens per trial"
    )
    print(
        "| context | trials | batch | prefix sharing | wall s | trials/min | prompt tokens/s | vs batch 1 alone | peak memory GiB |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    rows = []
    for length in args.lengths:
        prompts = trial_prompts(model.cfg.d_vocab, length, args.trials)
        ordered = [prompts[i] for i in prefix_order(prompts)]
        baseline = None
        for batch_size in args.batch_sizes:
            for share in (False, True):
                decoding = Decoding(max_new_tokens=args.new_tokens, batch_size=batch_size, share_prefix=share)
                if cuda:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                started = time.perf_counter()
                generations = dict(decode_prompts(model, ordered, decoding))
                if cuda:
                    torch.cuda.synchronize()
                seconds = time.perf_counter() - started
                assert len(generations) == len(prompts)
                baseline = baseline or seconds
                peak = torch.cuda.max_memory_allocated() if cuda else rss_bytes("VmHWM")
                rows.append(
                    {"context": length, "trials": len(prompts), "batch_size": batch_size, "share_prefix": share}
                    | {"seconds": seconds, "trials_per_min": 60 * len(prompts) / seconds}
                    | {"prompt_tokens_per_s": sum(map(len, prompts)) / seconds, "vs_batch_1_alone": seconds / baseline}
                    | {"peak_memory_gib": peak / (1 << 30)}
                )
                print(
                    f"| {length} | {len(prompts)} | {batch_size} | {'yes' if share else 'no'} | {seconds:.1f} "
                    f"| {60 * len(prompts) / seconds:.1f} | {sum(map(len, prompts)) / seconds:.0f} | {seconds / baseline:.2f}x "
                    f"| {peak / (1 << 30):.1f} |",
                    flush=True,
                )
    if args.json:
        from rh_lens.execution.files import write_json

        settings = {"shape": args.shape, "layers": model.cfg.n_layers, "dtype": args.dtype, "device": name}
        settings["new_tokens"] = args.new_tokens
        write_json(args.json, {"benchmark": "bench_batch", "settings": settings, "rows": rows})


if __name__ == "__main__":
    main()
