"""The retrieval score of Wu et al. (2024), from a traced decoding: the rule of
`rh_lens.detection.scoring` (argmax inside the answer span on the very token emitted), so
on the same trials it equals `detect`'s head scores."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens import HookedTransformer

from rh_lens.detection.scoring import copy_scores
from rh_lens.detection.trace import TracedTrial


def trial_score(traced: TracedTrial, shift: Tensor | int = 0) -> Float[Tensor, "layer head"]:
    """One trial's retrieval scores; with `shift` (per head, or one for all), each head's
    argmax is read `shift` positions earlier (see `shifted_copy`)."""
    g, trial = traced.generation, traced.trial
    emitted, prompt = torch.tensor(g.tokens), torch.tensor(trial.prompt_ids)
    return copy_scores(g.argmax_keys - shift, emitted, prompt, trial.answer_span)


def trial_scores(model: HookedTransformer, traced: Sequence[TracedTrial]) -> Float[Tensor, "trial layer head"]:
    return torch.stack([trial_score(t) for t in traced])
