"""Greedy decoding through the TransformerLens key-value cache, recording where each head looks.

Memory stays linear in the context. The prompt is prefilled in chunks; layers that no
hook reads run through fused SDPA attention (no score matrix at all), the others through
explicit attention, whose scores are [heads, chunk, context]. The cache keeps keys
already rotated (see `rh_lens.model.tl_internals`), so a decode step does not rotate every cached
key again. While decoding, the layers whose pattern is recorded are explicit, and only the
newest query's attention row is read, reduced to its argmax on the spot, on the model's
device. Any hooks a caller has put on the model (ablations, patches) stay in force
throughout.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer, TransformerLensKeyValueCache

from rh_lens.errors import InputError
from rh_lens.model.tl_internals import Hook, fused_attention, new_kv_cache

MAX_NEW_TOKENS = 50
# Prefill chunks. Layers with explicit attention hold [heads, chunk, context] scores: at most
# PREFILL_CHUNK rows, fewer once they would pass SCORES_BUDGET. Fused layers hold no scores; a
# chunk is then bounded by its activations through one layer (ACTIVATION_BUDGET) and, in a
# model with sliding windows, by its [chunk, chunk + window] mask (MASK_BUDGET). Later chunks
# of full-attention layers need no mask (see tl_internals._sdpa).
PREFILL_CHUNK = 512
SCORES_BUDGET = 256 << 20
ACTIVATION_BUDGET = 256 << 20
MASK_BUDGET = 256 << 20
MIN_CHUNK = 64


def _bytes(model: HookedTransformer) -> int:
    return model.cfg.dtype.itemsize


def explicit_chunk(model: HookedTransformer, context: int) -> int:
    """Prefill chunk for layers with explicit attention: PREFILL_CHUNK query rows, fewer
    when [heads, chunk, context] scores would pass SCORES_BUDGET."""
    row_bytes = model.cfg.n_heads * max(context, 1) * _bytes(model)
    return max(16, min(PREFILL_CHUNK, SCORES_BUDGET // row_bytes))


def fused_chunk(model: HookedTransformer) -> int:
    """Rows of a fused prefill chunk: the activations of one layer (residual stream, q, k, v
    and their rotations, MLP hidden states) within ACTIVATION_BUDGET; with sliding windows,
    the [chunk, chunk + window] mask (and SDPA's float copy of it) within MASK_BUDGET."""
    cfg, size = model.cfg, _bytes(model)
    per_token = size * (6 * cfg.d_model + 5 * cfg.n_heads * cfg.d_head + 4 * (cfg.d_mlp or cfg.d_model))
    rows = ACTIVATION_BUDGET // per_token
    if cfg.use_local_attn:
        window, cells = cfg.window_size or 0, MASK_BUDGET // (1 + size)
        rows = min(rows, int((-window + (window * window + 4 * cells) ** 0.5) / 2))  # rows x (rows + window) <= cells
    return max(MIN_CHUNK, rows)


def chunks(model: HookedTransformer, context: int, all_fused: bool, chunk_size: int | None = None) -> list[tuple[int, int]]:
    """[start, end) of each prefill chunk of a `context`-token prompt."""
    size = chunk_size or (fused_chunk(model) if all_fused else explicit_chunk(model, context))
    return [(start, min(context, start + size)) for start in range(0, context, size)]


@dataclass
class Generation:
    """Tokens emitted by greedy decoding, and per step the key each head attended to most."""

    tokens: list[int]
    argmax_keys: Int[Tensor, "step layer head"] | None


def prefill(
    model: HookedTransformer, tokens: Int[Tensor, " pos"], chunk_size: int | None = None, fused: bool = True
) -> TransformerLensKeyValueCache:
    """Run `tokens` through the model in chunks, filling and returning a key-value cache.
    The prefill records nothing, so it runs with fused attention unless `fused=False`.
    chunk_size=None: chunks sized by `chunks` (bounded memory at any context length)."""
    if chunk_size is not None and chunk_size < 1:
        raise InputError(f"chunk size {chunk_size}: must be at least 1 token")
    cache = new_kv_cache(model, rotated=fused)  # continue it inside fused_attention (greedy_decode does)
    with fused_attention(model) if fused else nullcontext(False) as all_fused:
        for start, end in chunks(model, len(tokens), all_fused, chunk_size):
            # stop_at_layer=n_layers skips the unembedding: prefill needs no logits.
            forward(model, tokens[None, start:end], cache, stop_at_layer=model.cfg.n_layers)
    return cache


def forward(model: HookedTransformer, tokens: Int[Tensor, "1 pos"], cache, **kwargs):
    """One forward pass through a key-value cache, every token attended to. The attention
    mask is given: left to TransformerLens, it is derived from the tokenizer's pad token,
    and a chunk that happens to end in that token (SmolLM2's pad token is its chat
    template's <|im_end|>) would have it masked out as padding."""
    return model(tokens, past_kv_cache=cache, attention_mask=torch.ones_like(tokens), **kwargs)


def _eos_ids(model: HookedTransformer) -> set[int]:
    tokenizer = model.tokenizer
    if tokenizer is None:  # a model without a tokenizer (a benchmark's random weights) never stops early
        return set()
    ids = {tokenizer.eos_token_id}
    # Chat models end a turn with their own token (<|im_end|>, <end_of_turn>, ...).
    for name in ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|endoftext|>"):
        token_id = tokenizer.convert_tokens_to_ids(name)
        if isinstance(token_id, int) and token_id != tokenizer.unk_token_id:
            ids.add(token_id)
    return ids - {None}


def newest_row_argmax(pattern: Float[Tensor, "batch head query key"]) -> Int[Tensor, " head"]:
    """The key each head attends to most from the newest query position (top-1, first on ties)."""
    return pattern[0, :, -1].argmax(dim=-1)


@torch.inference_mode()
def greedy_decode(
    model: HookedTransformer,
    prompt_ids: list[int] | Int[Tensor, " pos"],
    max_new_tokens: int = MAX_NEW_TOKENS,
    record_attention: bool = True,
    chunk_size: int | None = None,
    decode_hooks: Sequence[Hook] = (),
) -> Generation:
    """Greedy decoding in the reference's order: prefill the prompt minus its last token,
    then feed one token per step (stopping rule: see the comment below). At step t the model is fed token t-1 and emits w_t; if
    `record_attention`, the argmax over keys of every query head's attention row at that
    step is recorded alongside w_t. `decode_hooks` (TransformerLens (name, hook) pairs) are
    active during the decode steps only, e.g. a decode-time head ablation."""
    if max_new_tokens < 1:
        raise InputError(f"max new tokens {max_new_tokens}: must be at least 1")
    prompt = torch.as_tensor(prompt_ids, dtype=torch.long, device=model.cfg.device)
    cache = prefill(model, prompt[:-1], chunk_size)
    # Where each head looks stays on the model's device: one transfer per trial, not per layer.
    step_argmax = torch.empty(model.cfg.n_layers, model.cfg.n_heads, dtype=torch.long, device=model.cfg.device)

    def record(pattern: Tensor, hook) -> None:  # pattern: [batch, head, query, key]
        step_argmax[hook.layer()] = newest_row_argmax(pattern)

    hooks = list(decode_hooks)
    if record_attention:  # after the caller's hooks, so it sees the pattern they leave
        hooks.append((lambda name: name.endswith("attn.hook_pattern"), record))
    eos_ids = _eos_ids(model)
    tokens: list[int] = []
    argmaxes: list[Tensor] = []
    fed = prompt[-1:]
    with model.hooks(fwd_hooks=hooks), fused_attention(model):
        for _ in range(max_new_tokens):
            logits = forward(model, fed[None], cache)
            token = int(logits[0, -1].argmax())  # the one host synchronisation of a step
            tokens.append(token)
            if record_attention:
                argmaxes.append(step_argmax.clone())
            # Answers are one line. The reference stops only at its newline token ('<0x0A>', or
            # id 144); we stop at any token whose text holds a newline, and at EOS/end of turn,
            # after which the reference would go on to 50 tokens (see rh_lens.detection.scoring).
            if token in eos_ids or (model.tokenizer is not None and "\n" in model.tokenizer.decode([token])):
                break
            fed = torch.tensor([token], device=model.cfg.device)
    return Generation(tokens, torch.stack(argmaxes).cpu() if record_attention else None)
