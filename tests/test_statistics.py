"""How sure is a head map: bootstrap intervals against a known distribution, top-K
stability, and the stopping rule of adaptive detection."""

from __future__ import annotations

import numpy as np
import pytest
from planted import NEEDLE, PLANTED, build_planted_model, haystack_text

from rh_lens.analysis.statistics import bootstrap
from rh_lens.detection.adaptive import stable_after
from rh_lens.detection.records import DetectionResult, TrialRecord
from rh_lens.detection.run import detect
from rh_lens.execution.options import RunOptions
from rh_lens.tasks.niah import build_trial, tokenize_haystack


def result_of(scores: np.ndarray) -> DetectionResult:
    """Successful trials with the given [trial, layer, head] scores."""
    trials = [
        TrialRecord(
            key=f"t{i}",
            context_length=None,
            depth=None,
            needle_id=None,
            haystack=None,
            answer=None,
            generated_ids=[],
            response=None,
            rouge_recall=1.0,
            success=True,
            answer_span=None,
            head_scores=s.tolist(),
        )
        for i, s in enumerate(scores)
    ]
    return DetectionResult("synthetic", scores.shape[1], scores.shape[2], trials)


def test_interval_of_a_known_distribution():
    rng = np.random.default_rng(0)
    scores = np.zeros((400, 1, 2))
    scores[:, 0, 0] = rng.random(400) < 0.3  # a head that copies in 30% of trials, all or nothing
    scores[:, 0, 1] = 0.5  # a head that always copies half the answer
    b = bootstrap(result_of(scores), n_resamples=2000, top_k=1, seed=1)
    mean = scores[:, 0, 0].mean()
    low, high = b.interval("0-0")
    assert low < mean < high
    normal = 2 * 1.96 * np.sqrt(mean * (1 - mean) / 400)  # the normal approximation's width
    assert high - low == pytest.approx(normal, rel=0.15)
    assert b.interval("0-1") == (0.5, 0.5)  # no spread, no interval
    assert b.top_k_heads == ["0-1"] and b.top_k_frequency == {"0-1": 1.0} and b.top_k_jaccard == 1.0


def test_intervals_cover_the_true_mean_about_as_often_as_they_claim():
    rng = np.random.default_rng(2)
    covered = 0
    for run in range(200):
        scores = (rng.random((100, 1, 1)) < 0.3).astype(float)
        low, high = bootstrap(result_of(scores), n_resamples=400, top_k=1, seed=run).interval("0-0")
        covered += low <= 0.3 <= high
    assert 0.88 <= covered / 200 <= 0.99  # nominal 0.95


def test_top_k_stability_sees_a_close_race():
    rng = np.random.default_rng(3)
    scores = np.zeros((60, 1, 3))
    scores[:, 0, 0] = 0.9  # always first
    scores[:, 0, 1] = rng.random(60) < 0.5  # two heads racing for second place
    scores[:, 0, 2] = rng.random(60) < 0.5
    b = bootstrap(result_of(scores), n_resamples=1000, top_k=2, seed=0)
    assert b.top_k_frequency["0-0"] == 1.0
    assert 0.2 < b.top_k_frequency["0-1"] < 0.8 and 0.2 < b.top_k_frequency["0-2"] < 0.8
    assert 1 / 3 < b.top_k_jaccard < 1


def test_stopping_rule_on_a_hand_made_sequence():
    a, b, c = frozenset({1}), frozenset({2}), frozenset({3})
    sequence = [a, b, b, b, c, c, c, c]
    assert stable_after(sequence, patience=2) == 4  # b, then b twice more
    assert stable_after(sequence, patience=3) == 8
    assert stable_after(sequence, patience=4) is None
    assert stable_after([frozenset()] * 6, patience=2) is None  # no head scored yet: not stable


def test_adaptive_detection_stops_early_and_resumes(tmp_path):
    model = build_planted_model()
    haystack = tokenize_haystack(model.tokenizer, haystack_text(), 300)
    trials = [build_trial(model.tokenizer, haystack, NEEDLE, n, d) for n in (260, 280, 300) for d in (0, 50, 100)]
    result = detect(
        model, trials, tmp_path / "a", until_stable=1, patience=2, options=RunOptions(max_new_tokens=8, progress=False)
    )
    assert len(result.trials) == 3  # the planted head leads from the first trial on
    assert result.ranking(1)[0][:2] == PLANTED
    assert result.settings["until_stable"] == 1 and result.settings["patience"] == 2
    again = detect(
        model,
        trials,
        tmp_path / "a",
        until_stable=1,
        patience=2,
        options=RunOptions(resume=True, max_new_tokens=8, progress=False),
    )
    assert [t.key for t in again.trials] == [t.key for t in result.trials]
    assert bootstrap(result).interval("1-2") == (1.0, 1.0)


def test_comparison_intervals_separate_a_shared_map_from_an_unrelated_one():
    """Two detections of one head map (independent trial noise) vs a detection of another map:
    the Spearman interval sits high for the first pair and straddles 0 for the second."""
    from rh_lens.analysis.analyses import compare

    rng = np.random.default_rng(0)
    truth, other = rng.uniform(0, 0.5, (6, 5)), rng.uniform(0, 0.5, (6, 5))
    noisy = lambda mean: result_of(np.clip(mean + rng.normal(0, 0.1, (40, 6, 5)), 0, 1))  # noqa: E731
    same = compare(noisy(truth), noisy(truth), top_k=5, resamples=300)
    unrelated = compare(noisy(truth), noisy(other), top_k=5, resamples=300)
    low, high = same.intervals["spearman"]
    assert 0.7 < low <= same.spearman <= high
    low, high = unrelated.intervals["spearman"]
    assert low < 0.35 and low <= unrelated.spearman <= high
    assert same.intervals["top_k_overlap"][1] >= 0.6 and unrelated.intervals["top_k_overlap"][0] <= 0.4
    fraction = (np.asarray(same.scores_a) >= 0.1).mean()
    low, high = same.intervals["fraction_above_a"]
    assert low <= fraction <= high
    assert compare(noisy(truth), noisy(truth), resamples=0).intervals is None
