"""How sure is a recall, and is one condition really better than another?

Every table of an intervention experiment reports a mean over trials; these are the
intervals and the paired tests behind each cell and each "A beats B":

- `wilson`: the Wilson score interval of a success rate (a count of n independent trials);
- `bootstrap_interval`: a percentile bootstrap interval of a mean over trials;
- `paired_test`: two conditions judged on the same trials, paired by trial key. The
  difference of mean recall gets a paired-bootstrap interval and a sign-flip permutation
  p-value; the success rates get McNemar's exact test (a binomial test on the trials the
  two conditions disagree on). A difference is a tie unless its interval excludes 0 and its
  p-value is below 1 - confidence.

The trial is the unit: a group of several random seeds is first averaged per trial, so a
random draw repeated on the same trials never counts as more trials.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import stats

from rh_lens.errors import InputError

CONFIDENCE = 0.95
RESAMPLES = 2000


def _z(confidence: float) -> float:
    if not 0 < confidence < 1:
        raise InputError(f"confidence must be in (0, 1), not {confidence}")
    return float(stats.norm.ppf(1 - (1 - confidence) / 2))


def wilson(successes: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float] | None:
    """Wilson score interval of `successes` out of `n` (None when n is 0). Unlike the
    normal approximation it stays inside [0, 1] and has width at 0/n and n/n."""
    if n == 0:
        return None
    if not 0 <= successes <= n:
        raise InputError(f"{successes} successes out of {n} trials")
    z = _z(confidence)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def _resample_means(values: np.ndarray, resamples: int, seed: int) -> np.ndarray:
    picks = np.random.default_rng(seed).integers(len(values), size=(resamples, len(values)))
    return values[picks].mean(axis=1)


def bootstrap_interval(
    values: Sequence[float], confidence: float = CONFIDENCE, resamples: int = RESAMPLES, seed: int = 0
) -> tuple[float, float] | None:
    """Percentile bootstrap interval of the mean of `values` (one per trial), seeded; None
    when there are none."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return None
    tail = (1 - _check(confidence)) / 2
    means = _resample_means(values, resamples, seed)
    return float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail))


def _check(confidence: float) -> float:
    _z(confidence)
    return confidence


@dataclass
class PairedTest:
    """Condition `a` against condition `b` on the `n` trials both ran (paired by key).
    `difference`: mean recall of a minus b, with its paired-bootstrap `interval` and the
    sign-flip permutation `p_value`; `a_only` / `b_only`: trials only a (only b) answered
    right, and `mcnemar_p`: McNemar's exact p-value on them (None for averaged seeds, whose
    per-trial success is a fraction). `verdict`: "<a> > <b>" or "<a> < <b>" when the interval
    excludes 0 and p < 1 - confidence, else "tie"."""

    a: str
    b: str
    n: int
    mean_a: float
    mean_b: float
    difference: float
    interval: tuple[float, float]
    p_value: float
    a_only: int | None
    b_only: int | None
    mcnemar_p: float | None
    confidence: float
    verdict: str

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "interval": list(self.interval)}


def paired_test(
    a: Mapping[str, float],
    b: Mapping[str, float],
    *,
    names: tuple[str, str] = ("a", "b"),
    success_a: Mapping[str, float] | None = None,
    success_b: Mapping[str, float] | None = None,
    confidence: float = CONFIDENCE,
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> PairedTest:
    """Per-trial recall of two conditions (trial key -> value), compared on the keys both
    have. `success_a` / `success_b`: per-trial success (1/0, or a fraction over seeds) for
    McNemar's test, run only when both are whole numbers."""
    keys = sorted(set(a) & set(b))
    if not keys:
        raise InputError(f"{names[0]} and {names[1]} share no trial: a paired test needs the same trials")
    x = np.array([a[k] for k in keys], dtype=np.float64)
    y = np.array([b[k] for k in keys], dtype=np.float64)
    d = x - y
    tail = (1 - _check(confidence)) / 2
    means = _resample_means(d, resamples, seed)
    interval = (float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail)))
    # sign-flip permutation: under "no difference" each trial's difference is as likely negated
    signs = np.random.default_rng(seed + 1).choice((-1.0, 1.0), size=(resamples, len(d)))
    flipped = np.abs((signs * d).mean(axis=1))
    p_value = float((1 + np.sum(flipped >= abs(d.mean()) - 1e-12)) / (resamples + 1))
    a_only = b_only = mcnemar = None
    if success_a is not None and success_b is not None:
        sa = np.array([success_a[k] for k in keys], dtype=np.float64)
        sb = np.array([success_b[k] for k in keys], dtype=np.float64)
        if np.all(np.isin(sa, (0.0, 1.0))) and np.all(np.isin(sb, (0.0, 1.0))):
            a_only, b_only = int(np.sum((sa == 1) & (sb == 0))), int(np.sum((sa == 0) & (sb == 1)))
            discordant = a_only + b_only
            mcnemar = float(stats.binomtest(a_only, discordant, 0.5).pvalue) if discordant else 1.0
    # both must agree: with a handful of trials a bootstrap interval can be narrow by chance
    separated = not interval[0] <= 0 <= interval[1] and p_value < 1 - confidence
    verdict = f"{names[0]} {'>' if d.mean() > 0 else '<'} {names[1]}" if separated else "tie"
    return PairedTest(
        a=names[0],
        b=names[1],
        n=len(keys),
        mean_a=float(x.mean()),
        mean_b=float(y.mean()),
        difference=float(d.mean()),
        interval=interval,
        p_value=p_value,
        a_only=a_only,
        b_only=b_only,
        mcnemar_p=mcnemar,
        confidence=confidence,
        verdict=verdict,
    )
