"""What a head writes, not where it looks (in the spirit of LOCOS, 2026): its direct logit
attribution to the answer tokens it helps emit. At each decode step that emits a token of
the answer span, the head's output projected on that token's unembedding direction through
the final norm (`rh_lens.detection.trace.HeadTrace`); a trial's score is the mean over those
steps, a head's the mean over the trials whose answer was retrieved."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens import HookedTransformer

from rh_lens.detection.trace import TracedTrial


def trial_score(traced: TracedTrial) -> Float[Tensor, "layer head"]:
    start, end = traced.trial.answer_span
    answer_tokens = set(traced.trial.prompt_ids[start:end])
    attribution = traced.generation.observed["logit_attribution"]  # [step, layer, head]
    steps = [i for i, token in enumerate(traced.generation.tokens) if token in answer_tokens]
    if not steps:
        return torch.zeros(attribution.shape[1:])
    return attribution[steps].mean(dim=0)


def trial_scores(model: HookedTransformer, traced: Sequence[TracedTrial]) -> Float[Tensor, "trial layer head"]:
    return torch.stack([trial_score(t) for t in traced])
