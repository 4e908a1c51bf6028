"""RazorAttention's data-free ranking (Tang et al., 2024, arXiv 2407.15891): echo and induction
attention on a repeated random sequence (`rh_lens.detection.probes.repeat_attention`: a
head's mean attention, over the second copy, to the previous occurrence of the current token,
echo, and to the token after it, induction). It reads no trial: every trial gets its map.

RazorAttention has no public code; its rule is the paper's (its section on the retrieval
heads of RoPE models): echo heads and induction heads are selected separately, the top
fraction of heads by each score, and the retrieval heads that keep a full cache are their
union (the paper protects the top 1% of heads by echo score and the top 14% by induction
score, 15% in all, as rh_lens reads it). `union_scores` implements that selection as a ranking: a head's rank is the
smallest budget, at the paper's 1:14 echo:induction proportion, whose union takes it, so the
top K heads of the map are that union at each K, and the heads scoring at least 0.85 are
exactly the paper's 1% + 14% set.

The atlas's `razor` map is NOT that rule: by default it is the sum echo + induction, one
score per head, ranked by the sum (`rule="sum"`). This is a deviation from the paper, kept
because the atlas's results and its planted-model tests were computed with it (on the planted
model the sum ranks the duplicate-token decoy first, 0.2670 to 0.2667; the paper's union
ranks the planted head, the top induction head, first); `trial_scores(..., rule="union")` gives
the paper's selection. The probe repeats the sequence twice at up to 256 tokens (bounded by
the model's context); the paper's probe sequence and its length are not public code either.
The paper runs on Qwen, Llama-2/3 and Baichuan models of 7B and more at long contexts
(LongBench, NIAH up to their context windows); the atlas runs it on small models."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens import HookedTransformer

from rh_lens.detection.probes import razor_scores, repeat_attention
from rh_lens.detection.trace import TracedTrial

ECHO_FRACTION = 0.01  # the paper's share of heads kept for their echo score (arXiv 2407.15891, as rh_lens reads it)
INDUCTION_FRACTION = 0.14  # and for their induction score: 15% of the heads in all
RULES = ("sum", "union")


def _ranks(scores: Tensor) -> Tensor:
    """1 for the highest score, 2 for the next, ... (ties by position, as a stable sort)."""
    order = torch.sort(scores.flatten(), descending=True, stable=True).indices
    ranks = torch.empty_like(order)
    ranks[order] = torch.arange(1, order.numel() + 1)
    return ranks.view(scores.shape)


def union_scores(
    echo: Float[Tensor, "layer head"],
    induction: Float[Tensor, "layer head"],
    echo_fraction: float = ECHO_FRACTION,
    induction_fraction: float = INDUCTION_FRACTION,
) -> Float[Tensor, "layer head"]:
    """RazorAttention's selection as a map: the union of the top `echo_fraction` of heads by
    echo score and the top `induction_fraction` by induction score ranks first. A head's score
    is 1 - f, f the smallest share of all heads at which the union, with its echo and induction
    parts in the paper's proportion, includes it: min(echo rank / echo_fraction, induction rank
    / induction_fraction) x (echo_fraction + induction_fraction) / heads. So a head is in the
    paper's set (echo_fraction + induction_fraction of the heads) exactly when its score is
    >= 1 - (echo_fraction + induction_fraction), and the top K of the map are the union at K."""
    if echo_fraction <= 0 or induction_fraction <= 0:
        raise ValueError("the echo and induction fractions must be positive")
    n = echo.numel()
    entry = torch.minimum(_ranks(echo) / echo_fraction, _ranks(induction) / induction_fraction)
    return 1 - entry.float() * (echo_fraction + induction_fraction) / n


def trial_scores(model: HookedTransformer, traced: Sequence[TracedTrial], rule: str = "sum") -> Float[Tensor, "trial layer head"]:
    """The same map for every trial: `rule="sum"`, echo + induction (the atlas's, a deviation
    from the paper); `rule="union"`, the paper's union of top echo and top induction heads."""
    if rule == "sum":
        scores = razor_scores(model)
    elif rule == "union":
        scores = union_scores(*repeat_attention(model))
    else:
        raise ValueError(f"unknown rule {rule!r}: one of {', '.join(RULES)}")
    return scores.expand(len(traced), -1, -1)
