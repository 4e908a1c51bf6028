"""RazorAttention's data-free ranking (echo plus induction attention on a repeated random
sequence, `rh_lens.detection.probes`): it reads no trial."""

from __future__ import annotations

from collections.abc import Sequence

from jaxtyping import Float
from torch import Tensor
from transformer_lens import HookedTransformer

from rh_lens.detection.probes import razor_scores
from rh_lens.detection.trace import TracedTrial


def score(model: HookedTransformer, traced: Sequence[TracedTrial]) -> Float[Tensor, "layer head"]:
    return razor_scores(model)
