"""The paper's claims as analyses of results files: plain data in, plain data out.

- dynamic activation: which heads fire in which trial, how often, and on what it depends;
- coverage: how many of the best heads a trial needs to explain the answer tokens copied;
- universality and sparsity: fraction of heads above threshold, score distribution, layers;
- intrinsic: two results files of one architecture compared (correlations, top-K overlap).

Every function takes `DetectionResult`s (ours, or published files through
`DetectionResult.from_published`) and returns a dataclass whose `to_json()` is JSON-ready.
Only successful trials are analysed: retrieval scores are defined over them alone.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from jaxtyping import Bool, Float
from scipy import stats
from torch import Tensor

from rh_lens.analysis.statistics import Bootstrap, bootstrap, resampled_scores
from rh_lens.detection.records import DetectionResult, TrialRecord
from rh_lens.detection.scoring import DEFAULT_THRESHOLD
from rh_lens.errors import InputError, ResultsFileError
from rh_lens.heads import Head, all_heads

ACTIVATION_THRESHOLD = 0.1  # a head "fires" in a trial when its trial score exceeds this
ALWAYS_ON = 0.9  # heads firing in at least this fraction of trials count as always on
TOP_K = 20
GROUPS = ("context_length", "depth", "needle_id", "haystack")  # trial fields activation is grouped by


class _JSON:
    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def jaccard(a: set, b: set) -> float:
    """|a ∩ b| / |a ∪ b|; two empty sets are identical (1.0)."""
    union = a | b
    return len(a & b) / len(union) if union else 1.0


def trial_score_tensor(trials: Sequence[TrialRecord]) -> Float[Tensor, "trial layer head"]:
    return torch.tensor([t.head_scores for t in trials], dtype=torch.float64)


def active_heads(
    trial_scores: Float[Tensor, "trial layer head"], threshold: float = ACTIVATION_THRESHOLD
) -> Bool[Tensor, "trial layer head"]:
    """A head is active in a trial when its trial score exceeds the threshold."""
    return trial_scores > threshold


# --- dynamic activation -----------------------------------------------------------


@dataclass
class DynamicActivation(_JSON):
    """Activation of heads across trials. `active[i][j]`: head `heads[i]` fired in trial j.

    `heads` are the heads that fired at least once, most frequent first; all others never
    fired. Trials are ordered by (context length, depth, needle), so lengths form blocks.
    """

    model: str
    threshold: float
    always_on_fraction: float
    n_heads_total: int
    trials: list[dict[str, Any]]
    heads: list[str]
    active: list[list[int]]
    frequency: dict[str, float]
    always_on: list[str]
    context_dependent: list[str]
    active_per_trial: list[int]
    mean_pairwise_jaccard: float | None
    groups: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    jaccard_same_vs_different: dict[str, dict[str, float | None]] = field(default_factory=dict)


def _trial_order(trials: Sequence[TrialRecord]) -> list[TrialRecord]:
    def key(t: TrialRecord):
        return (t.context_length or 0, t.depth or 0, t.needle_id or "", t.haystack or "", t.key)

    return sorted(trials, key=key)


def _natural(value) -> tuple:
    """Sort key: numbers by value (500 before 1000), then strings, then unknown (None)."""
    return (value is None, isinstance(value, str), value if isinstance(value, (int, float)) else 0, str(value))


def _mean(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if len(values) else None


def dynamic_activation(
    result: DetectionResult, threshold: float = ACTIVATION_THRESHOLD, always_on_fraction: float = ALWAYS_ON
) -> DynamicActivation:
    """Which heads fire in which successful trial; always-on vs context-dependent heads;
    activation grouped by trial property; Jaccard overlap of the active sets between trials."""
    trials = _trial_order(result.successful)
    if not trials:
        raise InputError(f"{result.model}: no successful trial to analyse")
    fired = active_heads(trial_score_tensor(trials), threshold).flatten(1)  # trial x (layer*head)
    names = [str(head) for head in all_heads(result.n_layers, result.n_heads)]
    counts = fired.sum(dim=0).tolist()
    order = sorted((i for i, c in enumerate(counts) if c > 0), key=lambda i: (-counts[i], i))  # ties: (layer, head)
    frequency = {names[i]: counts[i] / len(trials) for i in order}
    sets = [{names[i] for i in row.nonzero().flatten().tolist()} for row in fired]
    pairs = [(i, j) for i in range(len(sets)) for j in range(i + 1, len(sets))]

    groups, same_vs_different = {}, {}
    for group in GROUPS:
        values = [getattr(t, group) for t in trials]
        if all(v is None for v in values):
            continue  # e.g. published files: nothing known about the trials
        rows = []
        for value in sorted(set(values), key=_natural):
            members = [s for s, v in zip(sets, values) if v == value]
            rows.append(
                {
                    "value": value,
                    "n_trials": len(members),
                    "mean_active_heads": float(np.mean([len(s) for s in members])),
                    "heads_active_in_any": len(set().union(*members)),
                    "heads_active_in_all": len(set.intersection(*members)),
                }
            )
        groups[group] = rows
        same_vs_different[group] = {
            "same": _mean([jaccard(sets[i], sets[j]) for i, j in pairs if values[i] == values[j]]),
            "different": _mean([jaccard(sets[i], sets[j]) for i, j in pairs if values[i] != values[j]]),
        }

    return DynamicActivation(
        model=result.model,
        threshold=threshold,
        always_on_fraction=always_on_fraction,
        n_heads_total=len(names),
        trials=[{"key": t.key, **{g: getattr(t, g) for g in GROUPS}} for t in trials],
        heads=[names[i] for i in order],
        active=[fired[:, i].int().tolist() for i in order],
        frequency=frequency,
        always_on=[h for h, f in frequency.items() if f >= always_on_fraction],
        context_dependent=[h for h, f in frequency.items() if f < always_on_fraction],
        active_per_trial=[len(s) for s in sets],
        mean_pairwise_jaccard=_mean([jaccard(sets[i], sets[j]) for i, j in pairs]),
        groups=groups,
        jaccard_same_vs_different=same_vs_different,
    )


# --- coverage ---------------------------------------------------------------------


class MissingCopiesError(ResultsFileError):
    """The results file has no per-trial `copied` offsets (published files, older runs)."""


@dataclass
class Coverage(_JSON):
    """`mean_coverage[n-1]`: mean over trials of the fraction of copied answer tokens (distinct
    span offsets copied by any head) that the top-n heads by retrieval score copied."""

    model: str
    ranked_heads: list[str]
    trials: list[str]
    per_trial: list[list[float]]
    mean_coverage: list[float]
    heads_needed: dict[str, int]
    trials_without_copies: list[str]


def coverage(result: DetectionResult, max_heads: int | None = None) -> Coverage:
    """How many of the best heads each successful trial needs to explain what was copied."""
    trials = _trial_order(result.successful)
    lacking = [t.key for t in trials if t.copied is None]
    if lacking:
        raise MissingCopiesError(
            f"{result.model}: {len(lacking)} trials have no per-head copied offsets ('copied'); "
            "published files and results written before rh_lens recorded them cannot give coverage: rerun detection"
        )
    ranked = [str(Head(layer, head)) for layer, head, _ in result.ranking()]
    with_copies = [t for t in trials if t.copied]
    curves, needed = [], {}
    for t in with_copies:
        copied = {head: set(offsets) for head, offsets in t.copied.items()}
        everything = set().union(*copied.values())
        covered, curve = set(), []
        for head in ranked:
            covered |= copied.get(head, set())
            curve.append(len(covered) / len(everything))
        curves.append(curve)
        needed[t.key] = curve.index(1.0) + 1
    length = max_heads or max(needed.values(), default=1)
    curves = [curve[:length] for curve in curves]
    mean = np.mean(curves, axis=0).tolist() if curves else []
    return Coverage(
        model=result.model,
        ranked_heads=ranked[:length],
        trials=[t.key for t in with_copies],
        per_trial=curves,
        mean_coverage=mean,
        heads_needed=needed,
        trials_without_copies=[t.key for t in trials if not t.copied],
    )


# --- universality and sparsity ----------------------------------------------------


@dataclass
class Universality(_JSON):
    """Sparsity of one model's retrieval heads: how many, how scores spread, in which layers."""

    model: str
    n_layers: int
    n_heads: int
    n_trials: int
    n_successful: int
    threshold: float
    n_above: int
    fraction_above: float
    top: list[tuple[int, int, float]]
    histogram_edges: list[float]
    histogram_counts: list[int]
    layer_count_above: list[int]
    layer_mean_score: list[float]


def universality(result: DetectionResult, threshold: float = DEFAULT_THRESHOLD, top: int = 10, bins: int = 20) -> Universality:
    scores = result.scores().numpy()
    upper = max(1.0, float(scores.max()))  # a head may copy more tokens than the span holds (repeats)
    counts, edges = np.histogram(scores, bins=bins, range=(0.0, upper))
    above = scores >= threshold
    return Universality(
        model=result.model,
        n_layers=result.n_layers,
        n_heads=result.n_heads,
        n_trials=len(result.trials),
        n_successful=len(result.successful),
        threshold=threshold,
        n_above=int(above.sum()),
        fraction_above=float(above.mean()),
        top=result.ranking(top),
        histogram_edges=edges.tolist(),
        histogram_counts=counts.tolist(),
        layer_count_above=above.sum(axis=1).tolist(),
        layer_mean_score=scores.mean(axis=1).tolist(),
    )


# --- intrinsic: two results of one architecture -----------------------------------


@dataclass
class Comparison(_JSON):
    """Two models' retrieval scores head by head. Correlations are None when a side is constant."""

    model_a: str
    model_b: str
    n_layers: int
    n_heads: int
    pearson: float | None
    spearman: float | None
    top_k: int
    top_a: list[str]
    top_b: list[str]
    top_k_overlap: float
    shared_top: list[dict[str, Any]]
    threshold: float
    n_above_a: int
    n_above_b: int
    n_above_both: int
    scores_a: list[float]
    scores_b: list[float]
    warnings: list[str] = field(default_factory=list)
    # With resamples: percentile intervals over bootstrap resamples of each side's trials,
    # {"spearman", "top_k_overlap", "fraction_above_a", "fraction_above_b": [low, high], ...}.
    intervals: dict[str, Any] | None = None


def _correlation(test, a: np.ndarray, b: np.ndarray) -> float | None:
    if a.std() == 0 or b.std() == 0:
        return None  # undefined; scipy would warn and return nan
    value = float(test(a, b).statistic)
    return None if math.isnan(value) else value


def top_heads(result: DetectionResult, k: int) -> list[str]:
    """The k best heads, leaving out heads that score 0 (their order would be arbitrary)."""
    return [str(Head(layer, head)) for layer, head, score in result.ranking(k) if score > 0]


def compare(
    a: DetectionResult,
    b: DetectionResult,
    top_k: int = TOP_K,
    threshold: float = DEFAULT_THRESHOLD,
    resamples: int = 0,
    confidence: float = 0.95,
    seed: int = 0,
    paired: bool = False,
) -> Comparison:
    """Pearson and Spearman (ties averaged) of the score vectors, top-K overlap |A ∩ B| / K,
    and the heads in both top-K lists with their ranks and scores. `resamples` > 0: bootstrap
    intervals of the Spearman, the overlap and each side's fraction of heads >= threshold, each
    side's successful trials resampled independently (seeds `seed`, `seed + 1`), or with
    `paired` (two maps of the same trials, e.g. two methods') the same resampled trials for both."""
    if (a.n_layers, a.n_heads) != (b.n_layers, b.n_heads):
        raise InputError(
            f"cannot compare {a.model} ({a.n_layers}x{a.n_heads}) with {b.model} ({b.n_layers}x{b.n_heads}): "
            "different architectures"
        )
    scores_a, scores_b = a.scores().numpy().ravel(), b.scores().numpy().ravel()
    top_a, top_b = top_heads(a, top_k), top_heads(b, top_k)
    index = {str(head): i for i, head in enumerate(all_heads(a.n_layers, a.n_heads))}
    shared = [
        {
            "head": h,
            "rank_a": top_a.index(h) + 1,
            "rank_b": top_b.index(h) + 1,
            "score_a": float(scores_a[index[h]]),
            "score_b": float(scores_b[index[h]]),
        }
        for h in top_a
        if h in top_b
    ]
    warnings = []
    if a.model != b.model:
        warnings.append(
            f"{a.model} and {b.model} are results of different models: comparing them head by head "
            f"assumes they share an architecture (the same layer-head ids)"
        )
    return Comparison(
        model_a=a.model,
        model_b=b.model,
        n_layers=a.n_layers,
        n_heads=a.n_heads,
        pearson=_correlation(stats.pearsonr, scores_a, scores_b),
        spearman=_correlation(stats.spearmanr, scores_a, scores_b),
        top_k=top_k,
        top_a=top_a,
        top_b=top_b,
        top_k_overlap=len(shared) / top_k,
        shared_top=shared,
        threshold=threshold,
        n_above_a=int((scores_a >= threshold).sum()),
        n_above_b=int((scores_b >= threshold).sum()),
        n_above_both=int(((scores_a >= threshold) & (scores_b >= threshold)).sum()),
        scores_a=scores_a.tolist(),
        scores_b=scores_b.tolist(),
        warnings=warnings,
        intervals=_comparison_intervals(a, b, top_k, threshold, resamples, confidence, seed, paired) if resamples else None,
    )


def _comparison_intervals(
    a, b, top_k: int, threshold: float, resamples: int, confidence: float, seed: int, paired: bool = False
) -> dict[str, Any]:
    if paired and [t.key for t in a.successful] != [t.key for t in b.successful]:
        raise InputError("a paired bootstrap needs both results to hold the same successful trials, in the same order")
    ra = resampled_scores(a, resamples, seed).numpy()
    rb = resampled_scores(b, resamples, seed if paired else seed + 1).numpy()
    spearman = [_correlation(stats.spearmanr, x, y) for x, y in zip(ra, rb)]
    spearman = [r for r in spearman if r is not None]

    def top(x) -> set[int]:  # as `top_heads`: heads scoring 0 are left out
        return {int(i) for i in np.argsort(-x, kind="stable")[:top_k] if x[i] > 0}

    overlap = [len(top(x) & top(y)) / top_k for x, y in zip(ra, rb)]
    tail = 100 * (1 - confidence) / 2

    def interval(values) -> list[float] | None:
        return [float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail))] if len(values) else None

    return {
        "n_resamples": resamples,
        "confidence": confidence,
        "seed": seed,
        "paired": paired,
        "spearman": interval(spearman),
        "top_k_overlap": interval(overlap),
        "fraction_above_a": interval((ra >= threshold).mean(axis=1)),
        "fraction_above_b": interval((rb >= threshold).mean(axis=1)),
    }


# --- distractors ---------------------------------------------------------------------


@dataclass
class Distractors(_JSON):
    """Detection with distractors in the prompt: which answer the model gave, and per head
    its copy score from the true answer's span and from the distractor's span, in the trials
    where the model gave the true answer and in those where it gave a distractor's."""

    model: str
    n_trials: int
    given: dict[str, int]  # response class -> trials
    heads: list[str]  # by mean distractor score in the trials answered with a distractor, best first
    distractor_score_when_wrong: list[float]
    true_score_when_wrong: list[float]
    true_score_when_right: list[float]


def distractors(result: DetectionResult, top: int = 20) -> Distractors:
    """Which heads copy the distractor when the model gets it wrong."""
    trials = [t for t in result.trials if t.distractor_scores]
    if not trials:
        raise InputError(f"{result.model}: no trial with distractors (detect with --distractor)")
    wrong = [t for t in trials if t.response_class == "distractor"]
    right = [t for t in trials if t.response_class == "correct"]

    def mean(rows) -> np.ndarray:
        return np.mean(rows, axis=0).ravel() if rows else np.zeros(result.n_layers * result.n_heads)

    # In a wrong trial, the distractor whose answer was given (the best recalled one).
    taken = [t.distractor_scores[int(np.argmax(t.distractor_recalls))] for t in wrong]
    from_distractor, true_wrong, true_right = (
        mean(taken),
        mean([t.head_scores for t in wrong]),
        mean([t.head_scores for t in right]),
    )
    names = [str(h) for h in all_heads(result.n_layers, result.n_heads)]
    order = sorted(range(len(names)), key=lambda i: (-from_distractor[i], -true_right[i], i))[:top]
    given = {k: sum(t.response_class == k for t in trials) for k in ("correct", "distractor", "other-context", "invented")}
    return Distractors(
        result.model,
        len(trials),
        given,
        [names[i] for i in order],
        [float(from_distractor[i]) for i in order],
        [float(true_wrong[i]) for i in order],
        [float(true_right[i]) for i in order],
    )


# --- everything about one results file ---------------------------------------------


@dataclass
class Analysis(_JSON):
    """All single-file analyses; `coverage` is None (and `notes` say why) when it cannot be had."""

    universality: Universality
    dynamic_activation: DynamicActivation
    coverage: Coverage | None
    bootstrap: Bootstrap | None = None
    distractors: Distractors | None = None
    notes: list[str] = field(default_factory=list)


def analyze(
    result: DetectionResult, threshold: float = DEFAULT_THRESHOLD, activation_threshold: float = ACTIVATION_THRESHOLD
) -> Analysis:
    try:
        heads_needed, notes = coverage(result), []
    except MissingCopiesError as err:
        heads_needed, notes = None, [f"coverage skipped: {err}"]
    intervals = bootstrap(result)
    with_distractors = distractors(result) if any(t.distractor_scores for t in result.trials) else None
    return Analysis(
        universality(result, threshold),
        dynamic_activation(result, activation_threshold),
        heads_needed,
        intervals,
        with_distractors,
        notes,
    )
