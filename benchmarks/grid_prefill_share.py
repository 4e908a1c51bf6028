"""How much of a grid's prefill exact prefix sharing can skip, counted without running a model.

In prefix order (`prefix_order`) a `PrefixCache` computes each node of the prompts' prefix tree
once: for each trial, the tokens after what it shares with the trial before. This script counts
those tokens against the grid's prompt tokens, and weighs each computed token by its forward
cost (the linear layers, plus attention over every key before it), which is what per-trial
prefill pays for every token. The shared tokens are a haystack's opening, where attention is
cheapest, so the cost share is above the token share. Either is a floor on the time of a grid
run by prefix sharing against one run trial by trial, before decoding: no exact method that
computes each needed key once does less.

    python benchmarks/grid_prefill_share.py --model smollm2-135m --json experiments/results/grid_prefill_share_smollm2-135m.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_grid import grid_trials  # noqa: E402

GRIDS = [((500, 1000, 2000), 3), ((4000, 6000, 8000), 1), ((4000, 6000, 8000), 3)]  # bench_grid's tables
DEPTHS = (0, 25, 50, 75, 100)


def forward_flops(config) -> tuple[float, float]:
    """(FLOPs per token in the linear layers, FLOPs per token per key in attention) of a
    decoder with a gated MLP, from its transformers config; the unembedding is left out
    (a prefill needs the last position's logits only)."""
    d, layers = config.hidden_size, config.num_hidden_layers
    d_head = getattr(config, "head_dim", None) or d // config.num_attention_heads
    q, kv = config.num_attention_heads * d_head, config.num_key_value_heads * d_head
    linear = 2 * layers * (2 * d * q + 2 * d * kv + 3 * d * config.intermediate_size)
    return linear, 2 * layers * 2 * q  # QK^T and the attention-weighted sum of V


def share(prompts: list[list[int]], linear: float, per_key: float) -> dict:
    from rh_lens.model.generation import _common_prefix, prefix_order

    def cost(start: int, end: int) -> float:  # positions start..end-1, each attending to itself and all before
        return (end - start) * linear + per_key * (end * (end + 1) - start * (start + 1)) / 2

    computed_tokens = computed_flops = 0.0
    previous: list[int] = []
    for i in prefix_order(prompts):
        shared = _common_prefix(previous, prompts[i])
        computed_tokens += len(prompts[i]) - shared
        computed_flops += cost(shared, len(prompts[i]))
        previous = prompts[i]
    total_tokens = sum(map(len, prompts))
    return {
        "trials": len(prompts),
        "prompt_tokens": total_tokens,
        "computed_tokens": int(computed_tokens),
        "token_share": computed_tokens / total_tokens,
        "flop_share": computed_flops / sum(cost(0, len(p)) for p in prompts),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--json", help="write the rows as plain data to this JSON file")
    args = parser.parse_args()

    from transformers import AutoConfig, AutoTokenizer

    from rh_lens.model.loading import hf_directory

    directory = hf_directory(args.model)
    config, tokenizer = AutoConfig.from_pretrained(directory), AutoTokenizer.from_pretrained(directory)
    linear, per_key = forward_flops(config)
    print(f"model {args.model}: {linear / 1e6:.0f} MFLOPs per token in linear layers, {per_key / 1e3:.0f} kFLOPs per key")
    print("| lengths | needles | trials | prompt tokens | computed tokens | token share | FLOP share |")
    print("|---|---|---|---|---|---|---|")
    rows = []
    for lengths, needles in GRIDS:
        grid = argparse.Namespace(lengths=lengths, depths=DEPTHS, needles=needles)
        trials = grid_trials(tokenizer, config.max_position_embeddings, grid)
        row = {"lengths": list(lengths), "needles": needles, **share([t.prompt_ids for t in trials], linear, per_key)}
        rows.append(row)
        print(
            f"| {'/'.join(map(str, lengths))} | {needles} | {row['trials']} | {row['prompt_tokens']} "
            f"| {row['computed_tokens']} | {row['token_share']:.3f} | {row['flop_share']:.3f} |"
        )
    if args.json:
        from rh_lens.execution.files import write_json

        settings = {"model": args.model, "depths": list(DEPTHS), "linear_flops": linear, "flops_per_key": per_key}
        write_json(args.json, {"benchmark": "grid_prefill_share", "settings": settings, "rows": rows})


if __name__ == "__main__":
    main()
