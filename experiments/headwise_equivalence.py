"""The head-wise cache against the masking simulation on real models: every logit at every
decode step, and the generated tokens.

For each model, both modes (streaming heads windowed from the first prompt token, or only at
decode steps) and each fraction of KV heads kept full (a seeded random draw: equivalence does
not depend on which heads), every trial of a NIAH grid is decoded greedily under the
simulation (-inf scores over the full cache); the head-wise cache is then fed the same tokens,
and its logits at every step are compared with the simulation's. Tokens are identical when the
head-wise cache's argmax is the simulation's token at every step. In the windowed mode (the one
`rh_lens.kv.HeadwiseCache` implements), the `transformers` model of the same weights is fed the
same tokens through `HeadwiseCache` as well, and compared with the same simulation.

    python experiments/headwise_equivalence.py --model smollm2-135m qwen2.5-coder-0.5b gemma-3-270m

Writes `<results>/headwise_equivalence.md` and `.json`; rows of an earlier run for other
(model, mode, fraction) are kept, so models can be run one at a time.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from rh_lens import BUILTIN_NEEDLES, Grid
from rh_lens.execution.files import write_json
from rh_lens.interventions.compression import compression_hooks, random_policy
from rh_lens.kv import ATTENTION, HeadwiseCache
from rh_lens.model.generation import MAX_NEW_TOKENS, _ends_answer, _eos_ids, _extend, forward, prefill
from rh_lens.model.loading import hf_directory, load_model
from rh_lens.model.tl_internals import compress_kv_cache, fused_attention, headwise_kv_cache

MODES = {"windowed": False, "decode-only": True}


@torch.inference_mode()
def compare(model, prompt: list[int], policy, decode_only: bool, hf=None) -> dict:
    """Greedy decoding under the simulation, then the head-wise cache fed the same tokens (and
    `transformers`' `hf` with `HeadwiseCache`, when given)."""
    ids = torch.tensor(prompt, device=model.cfg.device)
    hooks, eos = compression_hooks(policy), _eos_ids(model)
    capacity = len(prompt) + MAX_NEW_TOKENS
    with model.hooks(fwd_hooks=[] if decode_only else hooks):
        masked_cache = prefill(model, ids[:-1])
    # decode-only: one prefill for both, compressed before the simulation's steps extend it
    cache = compress_kv_cache(model, masked_cache, policy, capacity) if decode_only else None
    fed, masked_logits = [prompt[-1]], []
    with model.hooks(fwd_hooks=hooks), fused_attention(model):
        while len(masked_logits) < MAX_NEW_TOKENS:
            logits = forward(model, torch.tensor([[fed[-1]]]), masked_cache)[0, -1]
            masked_logits.append(logits)
            token = int(logits.argmax())
            if _ends_answer(model, token, eos):
                break
            fed.append(token)
    del masked_cache
    if not decode_only:
        cache = headwise_kv_cache(model, policy, capacity)
        _extend(model, cache, ids[:-1], 0, None)
    real_logits = []
    with fused_attention(model):
        for token in fed[: len(masked_logits)]:  # the last token emitted is not fed back
            real_logits.append(forward(model, torch.tensor([[token]]), cache)[0, -1])
    masked, real = torch.stack(masked_logits), torch.stack(real_logits)
    result = {
        "steps": len(masked_logits),
        "max_abs_diff": float((real - masked).abs().max()),
        "logit_scale": float(masked.abs().max()),
        "same_tokens": bool(torch.equal(real.argmax(-1), masked.argmax(-1))),
    }
    if hf is not None:
        hf_logits = hf_step_logits(hf, policy, ids[:-1], fed[: len(masked_logits)])
        result["hf_max_abs_diff"] = float((hf_logits - masked).abs().max())
        result["hf_same_tokens"] = bool(torch.equal(hf_logits.argmax(-1), masked.argmax(-1)))
    return result


def hf_step_logits(hf, policy, prefix: torch.Tensor, fed: list[int]) -> torch.Tensor:
    """[step, vocab]: the transformers model with a `HeadwiseCache`, prefilled with `prefix`
    and then fed `fed` one token at a time."""
    cache = HeadwiseCache(policy, hf.config)
    hf(prefix[None], cache=cache, use_cache=True, logits_to_keep=1)
    steps = [hf(torch.tensor([[token]]), cache=cache, use_cache=True).logits[0, -1] for token in fed]
    return torch.stack(steps).float()


def run(model_name: str, args: argparse.Namespace) -> list[dict]:
    model = load_model(model_name, device="cpu")
    grid = Grid(needles=BUILTIN_NEEDLES[: args.needles], lengths=tuple(args.lengths), depths=tuple(args.depths))
    trials = grid.trials(model.tokenizer, model.cfg.n_ctx)
    hf = None
    if "windowed" in args.modes and not args.no_transformers:
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(hf_directory(model_name), dtype=torch.float32).eval()
        hf.set_attn_implementation(ATTENTION)
    rows = []
    for mode in args.modes:
        decode_only = MODES[mode]
        for fraction in args.fractions:
            policy = random_policy(model, fraction, seed=0, sink=args.sink, window=args.window)
            started = time.perf_counter()
            with_hf = hf if not decode_only else None
            results = [compare(model, t.prompt_ids, policy, decode_only, with_hf) for t in trials]
            hf_columns = {}
            if with_hf is not None:
                hf_columns = {
                    "hf_same_tokens": sum(r["hf_same_tokens"] for r in results),
                    "hf_max_abs_diff": max(r["hf_max_abs_diff"] for r in results),
                }
            rows.append(
                {
                    "model": model_name,
                    "mode": mode,
                    "full_fraction": fraction,
                    "trials": len(results),
                    "steps": sum(r["steps"] for r in results),
                    "same_tokens": sum(r["same_tokens"] for r in results),
                    "max_abs_diff": max(r["max_abs_diff"] for r in results),
                    "logit_scale": max(r["logit_scale"] for r in results),
                    **hf_columns,
                    "seconds": time.perf_counter() - started,
                }
            )
            print(format_row(rows[-1]), flush=True)
    return rows


HEADER = (
    "| model | mode | full | trials | decode steps | same tokens | max abs logit diff | max abs logit "
    "| transformers: same tokens | transformers: max abs logit diff |\n|---|---|---|---|---|---|---|---|---|---|"
)


def format_row(r: dict) -> str:
    hf = f"{r['hf_same_tokens']}/{r['trials']} | {r['hf_max_abs_diff']:.2e}" if "hf_same_tokens" in r else "- | -"
    return (
        f"| {r['model']} | {r['mode']} | {r['full_fraction']:g} | {r['trials']} | {r['steps']} | "
        f"{r['same_tokens']}/{r['trials']} | {r['max_abs_diff']:.2e} | {r['logit_scale']:.1f} | {hf} |"
    )


def merged_rows(path: Path, settings: dict, rows: list[dict]) -> list[dict]:
    """Earlier rows of `path` run on the same grid, with this run's replacing theirs."""
    earlier = json.loads(path.read_text()) if path.exists() else {"settings": settings, "rows": []}
    if earlier["settings"] != settings:
        return rows  # another grid: not comparable
    new = {(r["model"], r["mode"], r["full_fraction"]) for r in rows}
    return [r for r in earlier["rows"] if (r["model"], r["mode"], r["full_fraction"]) not in new] + rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", nargs="+", default=["smollm2-135m", "qwen2.5-coder-0.5b", "gemma-3-270m"])
    parser.add_argument("--lengths", nargs="+", type=int, default=[500, 1000, 1500])
    parser.add_argument("--depths", nargs="+", type=int, default=[10, 50, 90])
    parser.add_argument("--needles", type=int, default=3)
    parser.add_argument("--fractions", nargs="+", type=float, default=[0.25, 0.5])
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    parser.add_argument("--sink", type=int, default=4)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--no-transformers", action="store_true", help="skip the transformers comparison")
    parser.add_argument("--results", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    print(HEADER)
    settings = {k: v for k, v in vars(args).items() if k not in ("results", "model", "modes", "fractions", "no_transformers")}
    for name in args.model:  # written after each model: a run that dies keeps the models done
        save(args.results, settings, run(name, args))


def save(results: Path, settings: dict, rows: list[dict]) -> None:
    rows = merged_rows(results / "headwise_equivalence.json", settings, rows)
    write_json(results / "headwise_equivalence.json", {"settings": settings, "rows": rows})
    table = "\n".join([HEADER] + [format_row(r) for r in rows])
    (results / "headwise_equivalence.md").write_text(
        f"# Head-wise cache vs masking simulation\n\nSettings: {settings}\n\n{table}\n"
    )


if __name__ == "__main__":
    main()
