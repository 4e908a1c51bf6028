"""Greedy decoding through the TransformerLens key-value cache, recording where each head looks.

Memory stays linear in the context. The prompt is prefilled in chunks; layers that no
hook reads run through fused SDPA attention (no score matrix at all), the others through
TransformerLens's explicit attention, whose scores are [heads, chunk, context]. During
decoding every layer is explicit, and only the newest query's attention row is read,
reduced to its argmax on the spot. Any hooks a caller has put on the model (ablations,
patches) stay in force throughout.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from types import MethodType
from typing import Sequence

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer, TransformerLensKeyValueCache

MAX_NEW_TOKENS = 50
PREFILL_CHUNK = 512  # explicit attention: a chunk's scores are [heads, chunk, context]
FUSED_PREFILL_CHUNK = 4096  # fused attention keeps no scores; this bounds the MLP activations


@dataclass
class Generation:
    """Tokens emitted by greedy decoding, and per step the key each head attended to most."""

    tokens: list[int]
    argmax_keys: Int[Tensor, "step layer head"] | None


def _sdpa_supported(attn) -> bool:
    """Whether the fused-attention forward below computes exactly what TransformerLens would."""
    cfg = attn.cfg
    return (
        cfg.positional_embedding_type in ("rotary", "standard", "shortformer")
        and not (cfg.attn_scores_soft_cap is not None and cfg.attn_scores_soft_cap > 0)
        and not cfg.use_attention_sinks
        and not cfg.use_logn_attn
        and not cfg.use_attn_result
        and cfg.clip_qkv is None
        and not cfg.load_in_4bit
        and cfg.original_architecture not in ("OlmoeForCausalLM", "Olmo2ForCausalLM", "Olmo3ForCausalLM")
        and (getattr(attn, "_attention_dir_override", None) or cfg.attention_dir) == "causal"
    )


def _sdpa_forward(attn, query_input, key_input, value_input, past_kv_cache_entry=None, additive_attention_mask=None, attention_mask=None, position_bias=None):
    """TransformerLens's attention forward with scores, mask, softmax and pattern fused into
    torch's scaled_dot_product_attention. Same q, k, v, rotary, causal/local/padding mask,
    cache and output projection; hook_z still fires. Used only when nobody listens to
    hook_attn_scores or hook_pattern."""
    if additive_attention_mask is not None or position_bias is not None:
        return attn._tl_forward(query_input, key_input, value_input, past_kv_cache_entry, additive_attention_mask, attention_mask, position_bias)
    q, k, v = attn.calculate_qkv_matrices(query_input, key_input, value_input)
    offset = 0
    if past_kv_cache_entry is not None:
        offset = past_kv_cache_entry.past_keys.size(1)
        k, v = past_kv_cache_entry.append(k, v)
    if attn.cfg.positional_embedding_type == "rotary":
        q = attn.hook_rot_q(attn.apply_rotary(q, offset, attention_mask))
        k = attn.hook_rot_k(attn.apply_rotary(k, 0, attention_mask))
    padded = attention_mask is not None and not bool(attention_mask.all())
    if offset == 0 and not padded and attn.attn_type != "local":
        mask, causal = None, True  # plain causal attention: torch's fastest kernel
    else:
        mask, causal = attn._make_causal_mask(q.size(1), k.size(1), offset, q.device), False  # [1, 1, query, key]
        if padded:  # as TransformerLens's apply_causal_mask combines padding and causality
            mask = mask & attention_mask.bool()[:, None, None, :].to(q.device)
    z = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
        attn_mask=mask, is_causal=causal, scale=1.0 / attn.attn_scale, enable_gqa=q.size(2) != k.size(2),
    )  # [batch, head, query, d_head]
    z = attn.hook_z(z.transpose(1, 2))  # [batch, query, head, d_head]
    w_o = attn.W_O.permute(2, 0, 1).reshape(attn.cfg.d_model, -1)  # d_model (head d_head)
    return F.linear(z.reshape(z.shape[0], z.shape[1], -1).to(w_o.dtype), w_o, attn.b_O)


@contextmanager
def fused_attention(model: HookedTransformer):
    """Within this context, attention layers whose score and pattern hooks are unused run
    through fused SDPA: several times faster on long prompts, and no [heads, q, k] matrix
    is ever materialised. Layers with a hook on hook_attn_scores or hook_pattern (a head
    ablation, a capture) keep TransformerLens's explicit computation. Yields whether every
    layer was fused."""
    swapped = []
    for block in model.blocks:
        attn = block.attn
        if _sdpa_supported(attn) and not (attn.hook_attn_scores.has_hooks() or attn.hook_pattern.has_hooks()):
            attn._tl_forward = attn.forward
            attn.forward = MethodType(_sdpa_forward, attn)
            swapped.append(attn)
    try:
        yield len(swapped) == len(model.blocks)
    finally:
        for attn in swapped:
            del attn.forward, attn._tl_forward


def prefill(
    model: HookedTransformer, tokens: Int[Tensor, "pos"], chunk_size: int | None = None, fused: bool = True
) -> TransformerLensKeyValueCache:
    """Run `tokens` through the model in chunks, filling and returning a key-value cache.
    The prefill records nothing, so it runs with fused attention unless `fused=False`.
    chunk_size=None: PREFILL_CHUNK tokens if any layer computes attention explicitly,
    else FUSED_PREFILL_CHUNK."""
    cache = TransformerLensKeyValueCache.init_cache(model.cfg, model.cfg.device, batch_size=1)
    with fused_attention(model) if fused else nullcontext(False) as all_fused:
        chunk_size = chunk_size or (FUSED_PREFILL_CHUNK if all_fused else PREFILL_CHUNK)
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
    chunk_size: int | None = None,
    decode_hooks: Sequence[tuple] = (),
) -> Generation:
    """Greedy decoding as the reference does it: prefill the prompt minus its last token,
    then feed one token per step. At step t the model is fed token t-1 and emits w_t; if
    `record_attention`, the argmax over keys of every query head's attention row at that
    step is recorded alongside w_t. `decode_hooks` (TransformerLens (name, hook) pairs) are
    active during the decode steps only, e.g. a decode-time head ablation."""
    prompt = torch.as_tensor(prompt_ids, dtype=torch.long, device=model.cfg.device)
    cache = prefill(model, prompt[:-1], chunk_size)
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    step_argmax = torch.empty(n_layers, n_heads, dtype=torch.long)

    def record(pattern: Tensor, hook) -> None:  # pattern: [batch, head, query, key]
        step_argmax[hook.layer()] = newest_row_argmax(pattern).cpu()

    hooks = list(decode_hooks)
    if record_attention:  # after the caller's hooks, so it sees the pattern they leave
        hooks.append((lambda name: name.endswith("attn.hook_pattern"), record))
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
