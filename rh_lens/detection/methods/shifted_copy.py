"""The retrieval rule at each head's own copy offset. A head that reads the answer token
from a later position's residual (where an earlier layer moved it) looks a fixed number of
positions after the token it copies, and the retrieval score, crediting offset 0 only, gives
it 0. `copy_offsets` finds each head's most frequent offset over the steps that emit the
answer in order; the score is the retrieval rule with each head's argmax read that many
positions earlier (offset 0: the retrieval score itself). Offsets are never negative: a
position's residual holds only tokens up to it, so a head looking before a token cannot be
reading that token (a head on the token just fed, one before the one emitted, is not copying)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer

from rh_lens.detection.methods import retrieval
from rh_lens.detection.trace import TracedTrial


def copy_offsets(
    traced: Sequence[TracedTrial], n_layers: int, n_heads: int
) -> tuple[Int[Tensor, "layer head"], Float[Tensor, "layer head"]]:
    """Each head's most frequent offset >= 0 of (argmax key - position of the answer token
    being emitted), over every decode step that emits the next answer token of a trial (a
    trial's steps stop at its first token off the answer), and the share of those steps at
    that offset (0 and 0.0 for a head that never looks at or after the token)."""
    counts = [Counter() for _ in range(n_layers * n_heads)]
    steps = 0
    for t in traced:
        start, end = t.trial.answer_span
        for i, token in enumerate(t.generation.tokens[: end - start]):
            if token != t.trial.prompt_ids[start + i]:
                break
            steps += 1
            for flat, key in enumerate(t.generation.argmax_keys[i].flatten().tolist()):
                if key >= start + i:
                    counts[flat][key - (start + i)] += 1
    offsets, shares = torch.zeros(n_layers * n_heads, dtype=torch.long), torch.zeros(n_layers * n_heads)
    for flat, c in enumerate(counts):
        if c:
            offsets[flat], n = c.most_common(1)[0]
            shares[flat] = n / steps
    return offsets.view(n_layers, n_heads), shares.view(n_layers, n_heads)


def trial_scores(model: HookedTransformer, traced: Sequence[TracedTrial]) -> Float[Tensor, "trial layer head"]:
    offsets, _ = copy_offsets(traced, model.cfg.n_layers, model.cfg.n_heads)
    return torch.stack([retrieval.trial_score(t, shift=offsets) for t in traced])
