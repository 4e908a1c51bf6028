"""How sure is a head map? Bootstrap intervals, top-K stability, and when to stop a detection.

A head's retrieval score is a mean over the successful trials of a grid, so it has sampling
error like any mean. `bootstrap` resamples the successful trials with replacement (seeded)
and reports, per head, a percentile confidence interval of its score, and for the top-K set:
how often each head is in a resample's top K and the mean Jaccard overlap of the resamples'
top-K sets with the full run's. `stable_after` is the stopping rule of adaptive detection
(`detect(..., until_stable=K)`): trials run in a seeded random order of the grid, and the
run stops once the top-K set has stayed the same for `patience` trials in a row.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from rh_lens.detection.adaptive import top_k_indices
from rh_lens.detection.records import DetectionResult
from rh_lens.errors import InputError
from rh_lens.heads import Head, all_heads


@dataclass
class Bootstrap:
    """Per head (best first by point score, only heads scoring > 0): the point score and
    the `confidence` percentile interval over `n_resamples` resamples of the successful
    trials; `top_k_frequency`: how often each head is in a resample's top K;
    `top_k_jaccard`: mean Jaccard overlap of the resamples' top-K sets with the point top K."""

    model: str
    n_trials: int
    n_resamples: int
    seed: int
    confidence: float
    top_k: int
    heads: list[str]
    score: list[float]
    low: list[float]
    high: list[float]
    top_k_heads: list[str]
    top_k_frequency: dict[str, float]
    top_k_jaccard: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def interval(self, head: Head | str) -> tuple[float, float]:
        i = self.heads.index(str(Head.coerce(head)))
        return self.low[i], self.high[i]


def resampled_scores(result: DetectionResult, n_resamples: int, seed: int = 0) -> Float[Tensor, "resample head"]:
    """Each head's score (flattened layer-major) in `n_resamples` resamples of the successful
    trials, drawn with replacement (seeded)."""
    trials = result.successful
    if not trials:
        raise InputError(f"{result.model}: no successful trial to resample")
    scores = torch.tensor([t.head_scores for t in trials], dtype=torch.float64).flatten(1)  # trial x (layer*head)
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randint(len(trials), (n_resamples, len(trials)), generator=generator)
    return scores[picks].mean(dim=1)


def bootstrap(
    result: DetectionResult, n_resamples: int = 1000, top_k: int = 10, confidence: float = 0.95, seed: int = 0
) -> Bootstrap:
    """Resample the successful trials with replacement: score intervals and top-K stability."""
    if not 0 < confidence < 1 or n_resamples < 1 or top_k < 1:
        raise InputError("bootstrap needs 0 < confidence < 1, n_resamples >= 1 and top_k >= 1")
    trials = result.successful
    resampled = resampled_scores(result, n_resamples, seed)
    point = torch.tensor([t.head_scores for t in trials], dtype=torch.float64).flatten(1).mean(dim=0)
    tail = (1 - confidence) / 2
    low = torch.quantile(resampled, tail, dim=0)
    high = torch.quantile(resampled, 1 - tail, dim=0)
    names = [str(h) for h in all_heads(result.n_layers, result.n_heads)]
    k = min(top_k, len(names))
    point_top = set(top_k_indices(point, k).tolist())
    resample_tops = top_k_indices(resampled, k)
    counts = torch.zeros(len(names))
    jaccards = []
    for row in resample_tops.tolist():
        counts[row] += 1
        jaccards.append(len(point_top & set(row)) / len(point_top | set(row)))
    order = [i for i in top_k_indices(point, len(names)).tolist() if point[i] > 0]
    return Bootstrap(
        model=result.model,
        n_trials=len(trials),
        n_resamples=n_resamples,
        seed=seed,
        confidence=confidence,
        top_k=k,
        heads=[names[i] for i in order],
        score=[float(point[i]) for i in order],
        low=[float(low[i]) for i in order],
        high=[float(high[i]) for i in order],
        top_k_heads=[names[i] for i in top_k_indices(point, k).tolist()],
        top_k_frequency={names[i]: float(counts[i]) / n_resamples for i in counts.nonzero().flatten().tolist()},
        top_k_jaccard=float(np.mean(jaccards)),
    )


# --- adaptive detection ---------------------------------------------------------------------
