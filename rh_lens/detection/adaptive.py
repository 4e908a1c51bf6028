"""Adaptive detection: run the grid in a seeded random order and stop once the top-K heads
stop changing (`detect(..., until_stable=K)`).

`stable_after` is the stopping rule: the run stops once the top-K set (heads scoring > 0) has
stayed the same for `patience` trials in a row.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from rh_lens.detection.records import TrialRecord
from rh_lens.errors import InputError


def top_k_indices(scores: Float[Tensor, "... head"], k: int) -> Tensor:
    """Indices of the k best heads (ties: lower index first, as `DetectionResult.ranking`)."""
    order = torch.argsort(-scores, dim=-1, stable=True)
    return order[..., :k]


def shuffled(items: Sequence, seed: int) -> list:
    """A seeded random order (adaptive detection runs the grid in it)."""
    order = list(items)
    random.Random(seed).shuffle(order)
    return order


def stable_after(top_sets: Sequence[frozenset], patience: int) -> int | None:
    """The number of trials after which to stop: the first point where the last `patience`
    trials all left the same (non-empty) top-K set as the one before them; None if never.
    `top_sets[i]` is the top-K set after i + 1 trials."""
    if patience < 1:
        raise InputError(f"patience {patience}: must be at least 1")
    unchanged = 0
    for i in range(1, len(top_sets)):
        unchanged = unchanged + 1 if top_sets[i] == top_sets[i - 1] and top_sets[i] else 0
        if unchanged >= patience:
            return i + 1
    return None


def top_k_set(records: Sequence[TrialRecord], k: int) -> frozenset[int]:
    """The k best heads (flat indices) by retrieval score over these trials, among heads scoring > 0."""
    good = [r.head_scores for r in records if r.success]
    if not good:
        return frozenset()
    scores = torch.tensor(good, dtype=torch.float64).flatten(1).mean(dim=0)
    return frozenset(i for i in top_k_indices(scores, k).tolist() if scores[i] > 0)


def top_k_stable(k: int, patience: int, records: Sequence[TrialRecord]) -> bool:
    """The stop rule of adaptive detection. `run_trials` asks it of every prefix in order and
    stops at the first yes, so only the last `patience` + 1 prefixes need a top-K set: the
    rule holds when they all leave the same one (not every prefix's, which made each
    question cost O(trials^2))."""
    if len(records) <= patience:
        return False
    recent = [top_k_set(records[:n], k) for n in range(len(records) - patience, len(records) + 1)]
    return stable_after(recent, patience) == len(recent)
