"""Data-free probes of what a head does: echo and induction attention on a repeated random
sequence (the classic induction-head probe; RazorAttention's ranking of heads to keep).
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens import HookedTransformer


@torch.inference_mode()
def repeat_attention(
    model: HookedTransformer, length: int = 256, seed: int = 0
) -> tuple[Float[Tensor, "layer head"], Float[Tensor, "layer head"]]:
    """On a random token sequence repeated twice, each head's mean attention (second copy) to
    the previous occurrence of the current token (echo) and to the token after it
    (induction): the classic probe of induction heads."""
    length = min(length, (model.cfg.n_ctx - 1) // 2)
    low = min(100, model.cfg.d_vocab // 10)  # away from the special tokens at the start of most vocabularies
    generator = torch.Generator().manual_seed(seed)
    if length <= model.cfg.d_vocab - 2 * low:  # distinct tokens: each occurs once per copy
        sequence = torch.randperm(model.cfg.d_vocab - 2 * low, generator=generator)[:length] + low
    else:
        sequence = torch.randint(low, model.cfg.d_vocab - low, (length,), generator=generator)
    tokens = torch.cat([sequence, sequence])[None].to(model.cfg.device)
    echo, induction = torch.zeros(model.cfg.n_layers, model.cfg.n_heads), torch.zeros(model.cfg.n_layers, model.cfg.n_heads)
    positions = torch.arange(length + 1, 2 * length, device=model.cfg.device)  # second copy, from its second token

    def score(pattern: Tensor, hook) -> None:  # [batch, head, query, key]
        rows = pattern[0][:, positions]  # [head, query, key]
        for out, offset in ((echo, 0), (induction, 1)):
            at = (positions - length + offset)[None, :, None].expand(rows.shape[0], -1, 1)
            out[hook.layer()] = rows.gather(-1, at).squeeze(-1).mean(dim=-1).float().cpu()

    model.run_with_hooks(
        tokens, fwd_hooks=[(lambda name: name.endswith("attn.hook_pattern"), score)], stop_at_layer=model.cfg.n_layers
    )
    return echo, induction


def razor_scores(model: HookedTransformer, length: int = 256, seed: int = 0) -> Float[Tensor, "layer head"]:
    """RazorAttention's data-free ranking: echo plus induction attention (`repeat_attention`)."""
    echo, induction = repeat_attention(model, length, seed)
    return echo + induction
