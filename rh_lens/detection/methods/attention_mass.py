"""HeadKV's retrieval-reasoning score (Fu et al., 2024; `retrieval_head_detection_r2.py`):
at each decode step, the attention weight a head puts on those of its top-k keys (k = the
answer span's length) that lie inside the span, each divided by the span's length, summed
over steps. No check that the attended token is the one emitted, so a head reading the
answer while the model writes it counts even when it looks one token off.

Where rh_lens differs from HeadKV's code: HeadKV stops decoding at the answer's token count
and counts a trial when token F1 > 50; here decoding stops as for the retrieval score and a
trial counts when it retrieved the answer (ROUGE-1 recall > 0.5), the same trials for every
decode-time method."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens import HookedTransformer

from rh_lens.detection.trace import TracedTrial


def trial_score(traced: TracedTrial) -> Float[Tensor, "layer head"]:
    start, end = traced.trial.answer_span
    k = end - start
    observed = traced.generation.observed
    keys, weights = observed["top_keys"][..., :k], observed["top_weights"][..., :k]  # [step, layer, head, k]
    if keys.size(-1) < k:
        raise ValueError(f"the trace kept {keys.size(-1)} keys per head, the answer span has {k}: trace with top_k >= {k}")
    inside = (keys >= start) & (keys < end)
    return (weights * inside).sum(dim=(0, -1)) / k


def trial_scores(model: HookedTransformer, traced: Sequence[TracedTrial]) -> Float[Tensor, "trial layer head"]:
    return torch.stack([trial_score(t) for t in traced])
