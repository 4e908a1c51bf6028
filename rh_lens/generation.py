"""Greedy decoding through the TransformerLens key-value cache, recording where each head looks.

Memory stays linear in the context: the prompt is prefilled in chunks (attention scores
of one chunk are [heads, chunk, context]), and during decoding only the newest query's
attention row is read, reduced to its argmax on the spot. Any hooks a caller has put on
the model (ablations, patches) stay in force throughout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer
from transformer_lens import TransformerLensKeyValueCache

MAX_NEW_TOKENS = 50
PREFILL_CHUNK = 512


@dataclass
class Generation:
    """Tokens emitted by greedy decoding, and per step the key each head attended to most."""

    tokens: list[int]
    argmax_keys: Int[Tensor, "step layer head"] | None


def prefill(
    model: HookedTransformer, tokens: Int[Tensor, "pos"], chunk_size: int = PREFILL_CHUNK
) -> TransformerLensKeyValueCache:
    """Run `tokens` through the model in chunks, filling and returning a key-value cache."""
    cache = TransformerLensKeyValueCache.init_cache(model.cfg, model.cfg.device, batch_size=1)
    for start in range(0, len(tokens), chunk_size):
        # stop_at_layer=n_layers skips the unembedding: prefill needs no logits.
        model(tokens[None, start : start + chunk_size], past_kv_cache=cache, stop_at_layer=model.cfg.n_layers)
    return cache


def _eos_ids(model: HookedTransformer) -> set[int]:
    tokenizer = model.tokenizer
    ids = {tokenizer.eos_token_id}
    # Chat models end a turn with their own token (<|im_end|>, <end_of_turn>, ...).
    for name in ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|endoftext|>"):
        token_id = tokenizer.convert_tokens_to_ids(name)
        if isinstance(token_id, int) and token_id != tokenizer.unk_token_id:
            ids.add(token_id)
    return ids - {None}


def newest_row_argmax(pattern: Float[Tensor, "batch head query key"]) -> Int[Tensor, "head"]:
    """The key each head attends to most from the newest query position (top-1, first on ties)."""
    return pattern[0, :, -1].argmax(dim=-1)


@torch.inference_mode()
def greedy_decode(
    model: HookedTransformer,
    prompt_ids: list[int] | Int[Tensor, "pos"],
    max_new_tokens: int = MAX_NEW_TOKENS,
    record_attention: bool = True,
    chunk_size: int = PREFILL_CHUNK,
) -> Generation:
    """Greedy decoding as the reference does it: prefill the prompt minus its last token,
    then feed one token per step. At step t the model is fed token t-1 and emits w_t; if
    `record_attention`, the argmax over keys of every query head's attention row at that
    step is recorded alongside w_t."""
    prompt = torch.as_tensor(prompt_ids, dtype=torch.long, device=model.cfg.device)
    cache = prefill(model, prompt[:-1], chunk_size)
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    step_argmax = torch.empty(n_layers, n_heads, dtype=torch.long)

    def record(pattern: Tensor, hook) -> None:  # pattern: [batch, head, query, key]
        step_argmax[hook.layer()] = newest_row_argmax(pattern).cpu()

    hooks = [(lambda name: name.endswith("attn.hook_pattern"), record)] if record_attention else []
    eos_ids = _eos_ids(model)
    tokens: list[int] = []
    argmaxes: list[Tensor] = []
    fed = prompt[-1:]
    with model.hooks(fwd_hooks=hooks):
        for _ in range(max_new_tokens):
            logits = model(fed[None], past_kv_cache=cache)
            token = int(logits[0, -1].argmax())
            tokens.append(token)
            if record_attention:
                argmaxes.append(step_argmax.clone())
            # The reference stops at EOS or at a newline (its answers are one line).
            if token in eos_ids or "\n" in model.tokenizer.decode([token]):
                break
            fed = torch.tensor([token], device=model.cfg.device)
    return Generation(tokens, torch.stack(argmaxes) if record_attention else None)
