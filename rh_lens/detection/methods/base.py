"""What every head-finding method is: a function from a model and traced trials to one
score per head (higher: the head matters more). Decode-time methods read the one decoding
pass `rh_lens.detection.trace.trace_trials` records; prompt-only and data-free methods read
the trials or nothing."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens import HookedTransformer

from rh_lens.detection.scoring import retrieval_scores
from rh_lens.detection.trace import TracedTrial

Method = Callable[[HookedTransformer, Sequence[TracedTrial]], Float[Tensor, "layer head"]]


def mean_over_successful(
    per_trial: Sequence[Float[Tensor, "layer head"]], traced: Sequence[TracedTrial]
) -> Float[Tensor, "layer head"]:
    """The retrieval score's aggregation, for every decode-time method: the mean trial score
    over the trials whose answer was retrieved."""
    success = torch.tensor([t.answer.success for t in traced])
    return retrieval_scores(torch.stack(list(per_trial)), success)
