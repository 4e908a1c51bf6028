"""RazorAttention's data-free ranking (echo plus induction attention on a repeated random
sequence, `rh_lens.detection.probes`): it reads no trial, every trial gets its map."""

from __future__ import annotations

from collections.abc import Sequence

from jaxtyping import Float
from torch import Tensor
from transformer_lens import HookedTransformer

from rh_lens.detection.probes import razor_scores
from rh_lens.detection.trace import TracedTrial


def trial_scores(model: HookedTransformer, traced: Sequence[TracedTrial]) -> Float[Tensor, "trial layer head"]:
    return razor_scores(model).expand(len(traced), -1, -1)  # the same map for every trial
