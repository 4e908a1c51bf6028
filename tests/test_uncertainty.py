"""Intervals and paired tests (rh_lens.uncertainty) against known answers, and the intervals
and tests an intervention result reports: the trial is the unit, seeds are averaged per trial."""

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from rh_lens.errors import InputError
from rh_lens.interventions.base import Condition, InterventionResult, cost_difference
from rh_lens.interventions.masking import AblationResult
from rh_lens.tasks.grading import NiahRecord, outcome
from rh_lens.uncertainty import bootstrap_interval, paired_test, wilson


def test_wilson_matches_the_textbook_values():
    # Wilson score intervals at 95% (Newcombe 1998, Table I: 81/263 -> 0.2553-0.3662; 0/10 -> 0-0.2775)
    assert wilson(81, 263) == pytest.approx((0.2553, 0.3662), abs=1e-4)
    assert wilson(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson(10, 10) == pytest.approx((0.7225, 1.0), abs=1e-4)
    assert wilson(0, 0) is None
    with pytest.raises(InputError):
        wilson(11, 10)


def test_wilson_covers_the_true_rate_about_as_often_as_it_says():
    # exact coverage: the probability, over Binomial(n, p), that the interval holds p
    n = 50
    coverages = []
    for p in np.linspace(0.05, 0.95, 19):
        pmf = stats.binom.pmf(np.arange(n + 1), n, p)
        coverages.append(sum(q for k, q in enumerate(pmf) if wilson(k, n)[0] <= p <= wilson(k, n)[1]))
    assert 0.94 <= np.mean(coverages) <= 0.96 and min(coverages) > 0.90


def test_the_bootstrap_interval_has_the_width_of_the_normal_approximation():
    rng = np.random.default_rng(1)
    values = rng.normal(0.5, 0.2, size=400)
    low, high = bootstrap_interval(values)
    assert high - low == pytest.approx(2 * 1.96 * values.std() / np.sqrt(400), rel=0.1)
    assert low < values.mean() < high
    assert bootstrap_interval([0.7] * 20) == pytest.approx((0.7, 0.7))
    assert bootstrap_interval([]) is None


def test_a_paired_test_sees_a_small_consistent_difference_that_the_spread_of_trials_hides():
    rng = np.random.default_rng(2)
    base = rng.uniform(0, 0.9, size=100)  # trials differ a lot from each other ...
    a = {f"t{i}": float(v + 0.05) for i, v in enumerate(base)}  # ... but a beats b on every one
    b = {f"t{i}": float(v) for i, v in enumerate(base)}
    test = paired_test(a, b, names=("top", "random"))
    assert test.verdict == "top > random" and test.n == 100
    assert test.difference == pytest.approx(0.05) and test.interval == pytest.approx((0.05, 0.05))
    assert test.p_value < 0.001
    # unpaired, the two means' intervals overlap: only pairing separates them
    low_a, _ = bootstrap_interval(list(a.values()))
    _, high_b = bootstrap_interval(list(b.values()))
    assert low_a < high_b


def test_equal_conditions_tie_and_noise_around_zero_is_a_tie():
    same = {f"t{i}": i / 10 for i in range(10)}
    test = paired_test(same, same)
    assert test.verdict == "tie" and test.p_value == 1.0 and test.difference == 0
    rng = np.random.default_rng(3)
    a = {f"t{i}": float(v) for i, v in enumerate(rng.uniform(size=60))}
    b = {f"t{i}": float(v) for i, v in enumerate(rng.uniform(size=60))}
    noisy = paired_test(a, b)
    assert (noisy.verdict == "tie") == (noisy.interval[0] <= 0 <= noisy.interval[1])


def test_mcnemar_counts_only_the_trials_the_conditions_disagree_on():
    keys = [f"t{i}" for i in range(30)]
    success_a = {k: 1.0 for k in keys}
    success_b = {k: 0.0 if i < 10 else 1.0 for i, k in enumerate(keys)}  # 10 discordant, all for a
    test = paired_test(success_a, success_b, success_a=success_a, success_b=success_b)
    assert (test.a_only, test.b_only) == (10, 0)
    assert test.mcnemar_p == pytest.approx(2 * 0.5**10)
    # fractions (seeds averaged per trial) are no McNemar table
    fractional = paired_test(success_a, success_b, success_a={k: 0.5 for k in keys}, success_b=success_b)
    assert fractional.mcnemar_p is None


def test_only_shared_trials_are_paired_and_none_shared_is_refused():
    test = paired_test({"x": 1.0, "y": 0.0, "z": 1.0}, {"y": 0.0, "z": 0.0, "w": 1.0})
    assert test.n == 2 and test.difference == pytest.approx(0.5)
    with pytest.raises(InputError, match="share no trial"):
        paired_test({"x": 1.0}, {"y": 1.0})


def _record(key: str, recall: float) -> NiahRecord:
    return NiahRecord(
        key=key,
        context_length=1000,
        depth=50,
        needle_id="n",
        haystack="h",
        answer="a",
        generated_ids=[],
        response="r",
        rouge_recall=recall,
        success=recall > 0.5,
        outcome=outcome(recall),
    )


def _result(cls=InterventionResult, n: int = 20) -> InterventionResult:
    keys = [f"t{i}" for i in range(n)]
    conditions = [
        Condition("none", None, "none", {"kind": "none", "k": 0}, [_record(k, 1.0) for k in keys]),
        Condition(
            "top-1", None, "top-1", {"kind": "top", "k": 1}, [_record(k, 0.0 if i % 2 else 1.0) for i, k in enumerate(keys)]
        ),
        # two seeds: one gets every trial right, the other every trial wrong
        Condition("random-1-seed0", None, "random-1", {"kind": "random", "k": 1, "seed": 0}, [_record(k, 1.0) for k in keys]),
        Condition("random-1-seed1", None, "random-1", {"kind": "random", "k": 1, "seed": 1}, [_record(k, 0.0) for k in keys]),
    ]
    return cls("ablation", "m", conditions)


def test_a_summary_counts_trials_not_trials_times_seeds_and_carries_intervals():
    rows = {r["condition"]: r for r in _result().summary()}
    assert rows["random-1"]["n_trials"] == 20 and rows["random-1"]["n_seeds"] == 2
    # each trial's mean over the two seeds is 0.5: no spread between trials, so no width
    assert rows["random-1"]["recall_interval"] == pytest.approx((0.5, 0.5))
    assert rows["top-1"]["success_interval"] == pytest.approx(wilson(10, 20))
    assert rows["top-1"]["retained_interval"] == pytest.approx(wilson(10, 20))
    low, high = rows["top-1"]["recall_interval"]
    assert low < 0.5 < high and high - low > 0.2
    assert rows["none"]["success_interval"] == pytest.approx(wilson(20, 20))


def test_a_seeded_groups_retained_interval_is_the_same_in_every_interpreter():
    """Its bootstrap reads the baseline's right trials in one order, whatever the hash seed
    (a set iterated as it comes gave another interval in each process)."""
    code = (
        "import sys; sys.path.insert(0, 'tests'); from test_uncertainty import _varied; "
        "print(_varied().summary()[2]['retained_interval'])"
    )
    root = Path(__file__).resolve().parents[1]
    runs = {
        subprocess.run(
            [sys.executable, "-c", code],
            cwd=root,
            env={**os.environ, "PYTHONHASHSEED": seed},
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        for seed in ("1", "2", "3")
    }
    assert len(runs) == 1


def _varied() -> InterventionResult:
    """No masking right on 40 trials; two random seeds right on different trials (fractions per trial)."""
    keys = [f"trial-{i}" for i in range(40)]
    return InterventionResult(
        "ablation",
        "m",
        [
            Condition("none", None, "none", {"kind": "none", "k": 0}, [_record(k, 1.0) for k in keys]),
            Condition("top-1", None, "top-1", {"kind": "top", "k": 1}, [_record(k, 0.0) for k in keys]),
            Condition(
                "r0",
                None,
                "random-1",
                {"kind": "random", "k": 1, "seed": 0},
                [_record(k, float(i % 3 == 0)) for i, k in enumerate(keys)],
            ),
            Condition(
                "r1",
                None,
                "random-1",
                {"kind": "random", "k": 1, "seed": 1},
                [_record(k, float(i % 5 < 2)) for i, k in enumerate(keys)],
            ),
        ],
    )


def test_an_ablation_result_compares_top_k_with_random_k_and_each_with_no_masking():
    result = _result(AblationResult)
    assert result.comparison_pairs() == [("top-1", "random-1"), ("top-1", "none"), ("random-1", "none")]
    tests = {(t.a, t.b): t for t in result.comparisons()}
    assert tests[("top-1", "random-1")].verdict == "tie"  # 0.5 on average against 0.5 on every trial
    assert tests[("top-1", "none")].verdict == "top-1 < none"
    assert tests[("top-1", "none")].mcnemar_p == pytest.approx(2 * 0.5**10)
    assert tests[("random-1", "none")].mcnemar_p is None  # seeds averaged: fractions
    with pytest.raises(InputError, match="no condition group"):
        result.paired("top-9", "none")


def _asked(mode: str, top_right: list[bool], first: int = 0) -> InterventionResult:
    """Problems p0, p1, ... asked one way (`mode` in every key, as arithmetic trials are), all
    right unmasked; under top-1 right where `top_right` says."""

    def record(i: int, right: bool) -> NiahRecord:
        return replace(_record(f"{mode}-{i}", 1.0 if right else 0.0), needle_id=f"p{first + i}")

    conditions = [
        Condition("none", None, "none", {"kind": "none", "k": 0}, [record(i, True) for i in range(len(top_right))]),
        Condition("top-1", None, "top-1", {"kind": "top", "k": 1}, [record(i, r) for i, r in enumerate(top_right)]),
    ]
    return InterventionResult("ablation", "m", conditions)


def test_a_cost_difference_pairs_problems_across_runs_and_says_which_loses_more():
    cot = _asked("cot", [i % 4 == 0 for i in range(40)])  # masking loses 30 of 40
    answer_only = _asked("answer-only", [i % 4 != 1 for i in range(40)])  # loses 10, other problems
    assert cot.drops("top-1")[("p1", 1000, 50)] == 1.0 and answer_only.drops("top-1")[("p1", 1000, 50)] == 1.0
    test = cost_difference(cot, answer_only, "top-1", names=("cot", "answer-only"))
    assert test.n == 40 and test.difference == pytest.approx(0.5)
    assert test.verdict == "cot drop top-1 > answer-only drop top-1"
    # the same losses on the same problems: nothing between them
    same = cost_difference(cot, _asked("in-question", [i % 4 == 0 for i in range(40)]), "top-1")
    assert same.difference == 0.0 and same.verdict == "tie"
    # problems asked in only one run cannot be paired
    with pytest.raises(InputError, match="share no trial"):
        cost_difference(cot, _asked("answer-only", [True] * 40, first=40), "top-1")
