"""Analyses on hand-made results with known answers, the CLI, and the published pairs."""

import json
from pathlib import Path

import pytest

import rh_lens.app.cli as cli
from rh_lens.analysis.analyses import MissingCopiesError, analyze, compare, coverage, dynamic_activation, jaccard, universality
from rh_lens.detection.records import DetectionResult, TrialRecord, load_results, save_results

OFFICIAL = Path(__file__).resolve().parents[2] / "shared" / "niah" / "official_head_scores"


def record(key, scores, length=500, depth=0, success=True, copied=None):
    return TrialRecord(
        key=key,
        context_length=length,
        depth=depth,
        needle_id="n1",
        haystack="pydoc",
        answer_span=(10, 13),
        answer="a b c",
        generated_ids=[],
        response="a b c",
        rouge_recall=1.0,
        success=success,
        head_scores=scores,
        copied=copied,
    )


def four_trials() -> DetectionResult:
    """2 layers x 2 heads. 0-0 fires in 3 of 4 trials, 0-1 in all 4, 1-0 only at 0.1 (not above),
    1-1 in one trial; a failed fifth trial where everything fires must be ignored. Out of order
    on purpose: analyses sort trials by (length, depth)."""
    trials = [
        record("d", [[0.5, 0.8], [0.0, 0.9]], length=1000, depth=50),
        record("a", [[0.5, 1.0], [0.1, 0.0]], length=500, depth=0),
        record("c", [[0.05, 0.8], [0.1, 0.0]], length=1000, depth=0),
        record("b", [[0.5, 1.0], [0.0, 0.0]], length=500, depth=50),
        record("failed", [[1.0, 1.0], [1.0, 1.0]], length=1000, depth=50, success=False),
    ]
    return DetectionResult("toy", 2, 2, trials)


def test_activation_frequency_always_on_and_context_dependent():
    activation = dynamic_activation(four_trials(), threshold=0.1, always_on_fraction=0.9)
    assert activation.frequency == {"0-1": 1.0, "0-0": 0.75, "1-1": 0.25}  # 1-0 at exactly 0.1 never fires
    assert activation.heads == ["0-1", "0-0", "1-1"]
    assert activation.always_on == ["0-1"]
    assert activation.context_dependent == ["0-0", "1-1"]
    assert [t["key"] for t in activation.trials] == ["a", "b", "c", "d"]  # by length, then depth
    assert activation.active == [[1, 1, 1, 1], [1, 1, 0, 1], [0, 0, 0, 1]]
    assert activation.active_per_trial == [2, 2, 1, 3]


def test_activation_grouped_by_length_and_depth():
    activation = dynamic_activation(four_trials())
    assert [row["value"] for row in activation.groups["context_length"]] == [500, 1000]  # numeric order
    by_length = {row["value"]: row for row in activation.groups["context_length"]}
    assert by_length[500] == {
        "value": 500,
        "n_trials": 2,
        "mean_active_heads": 2.0,
        "heads_active_in_any": 2,
        "heads_active_in_all": 2,
    }
    assert by_length[1000] == {
        "value": 1000,
        "n_trials": 2,
        "mean_active_heads": 2.0,
        "heads_active_in_any": 3,
        "heads_active_in_all": 1,
    }
    assert [row["n_trials"] for row in activation.groups["depth"]] == [2, 2]
    assert activation.groups["needle_id"] == [
        {"value": "n1", "n_trials": 4, "mean_active_heads": 2.0, "heads_active_in_any": 3, "heads_active_in_all": 1}
    ]


def test_jaccard_between_active_sets():
    assert jaccard({1, 2}, {2, 3}) == pytest.approx(1 / 3)
    assert jaccard({1}, {2}) == 0.0
    assert jaccard(set(), set()) == 1.0
    # sets: a={01,00} b={01,00} c={01} d={01,00,11}
    activation = dynamic_activation(four_trials())
    pairs = {"ab": 1.0, "ac": 0.5, "ad": 2 / 3, "bc": 0.5, "bd": 2 / 3, "cd": 1 / 3}
    assert activation.mean_pairwise_jaccard == pytest.approx(sum(pairs.values()) / 6)
    same_length = activation.jaccard_same_vs_different["context_length"]
    assert same_length["same"] == pytest.approx((pairs["ab"] + pairs["cd"]) / 2)
    assert same_length["different"] == pytest.approx((pairs["ac"] + pairs["ad"] + pairs["bc"] + pairs["bd"]) / 4)


def with_copies() -> DetectionResult:
    """Retrieval scores rank 0-0 (0.6) > 0-1 (0.3) > 1-0 (0.1) > 1-1 (0)."""
    trials = [
        record("x", [[2 / 3, 1 / 3], [1 / 3, 0.0]], copied={"0-0": [0, 1], "0-1": [2], "1-0": [0]}),
        record("y", [[0.6, 0.3], [0.0, 0.0]], copied={"0-0": [0, 0]}),  # one token, copied twice
        record("z", [[0.5, 0.2], [0.0, 0.0]], copied={}),  # nothing copied: coverage undefined
    ]
    return DetectionResult("toy", 2, 2, trials)


def test_coverage_of_copied_answer_tokens_by_top_heads():
    result = with_copies()
    assert [h[:2] for h in result.ranking(3)] == [(0, 0), (0, 1), (1, 0)]
    curves = coverage(result)
    assert curves.trials == ["x", "y"] and curves.trials_without_copies == ["z"]
    assert curves.per_trial == [[2 / 3, 1.0], [1.0, 1.0]]
    assert curves.heads_needed == {"x": 2, "y": 1}
    assert curves.mean_coverage == pytest.approx([5 / 6, 1.0])
    assert curves.ranked_heads == ["0-0", "0-1"]


def test_coverage_says_when_copies_were_not_recorded():
    with pytest.raises(MissingCopiesError, match="no per-head copied offsets"):
        coverage(four_trials())
    analysis = analyze(four_trials())
    assert analysis.coverage is None and "coverage skipped" in analysis.notes[0]


def test_universality_fraction_histogram_and_layer_profile():
    result = four_trials()  # scores 0-0 0.3875, 0-1 0.9, 1-0 0.05, 1-1 0.225
    u = universality(result, threshold=0.2, bins=4)
    assert (u.n_above, u.fraction_above) == (3, 0.75)
    assert u.layer_count_above == [2, 1]
    assert u.layer_mean_score == pytest.approx([(0.3875 + 0.9) / 2, (0.05 + 0.225) / 2])
    assert u.histogram_edges == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert u.histogram_counts == [2, 1, 0, 1]
    assert [h[:2] for h in u.top[:2]] == [(0, 1), (0, 0)]
    assert (u.n_trials, u.n_successful) == (5, 4)


def scored(model, scores):
    return DetectionResult(model, len(scores), len(scores[0]), [record("t", scores)])


def test_identical_files_correlate_at_one():
    a = scored("a", [[0.9, 0.0, 0.0], [0.2, 0.5, 0.0]])
    c = compare(a, scored("b", [[0.9, 0.0, 0.0], [0.2, 0.5, 0.0]]), top_k=2)
    assert c.pearson == pytest.approx(1.0) and c.spearman == pytest.approx(1.0)
    assert c.top_a == c.top_b == ["0-0", "1-1"] and c.top_k_overlap == 1.0
    assert [s["head"] for s in c.shared_top] == ["0-0", "1-1"]
    assert (c.n_above_a, c.n_above_b, c.n_above_both) == (3, 3, 3)


def test_disjoint_top_sets_overlap_zero_and_reversed_ranks_correlate_minus_one():
    a = scored("a", [[0.9, 0.6, 0.3, 0.0]])
    b = scored("b", [[0.0, 0.3, 0.6, 0.9]])
    c = compare(a, b, top_k=2)
    assert c.top_a == ["0-0", "0-1"] and c.top_b == ["0-3", "0-2"]
    assert c.top_k_overlap == 0.0 and c.shared_top == []
    assert c.spearman == pytest.approx(-1.0) and c.pearson == pytest.approx(-1.0)


def test_ties_and_constant_scores():
    # Spearman with ties: ranks of [1, 0, 0, 0] vs [1, 1, 0, 0] -> Pearson of [4, 2, 2, 2] and [3.5, 3.5, 1.5, 1.5]
    c = compare(scored("a", [[1.0, 0.0, 0.0, 0.0]]), scored("b", [[1.0, 1.0, 0.0, 0.0]]), top_k=4)
    assert c.spearman == pytest.approx(1 / 3**0.5)
    assert c.top_a == ["0-0"] and c.top_b == ["0-0", "0-1"]  # heads scoring 0 are not in a top list
    assert c.top_k_overlap == 0.25  # |A ∩ B| / K, also when fewer than K heads score above 0
    assert compare(scored("a", [[0.0, 0.0]]), scored("b", [[0.5, 0.0]])).pearson is None
    with pytest.raises(ValueError, match="different architectures"):
        compare(scored("a", [[0.0, 0.0]]), scored("b", [[0.0, 0.0, 0.0]]))


def test_analysis_serialises_to_json():
    text = json.dumps(analyze(four_trials()).to_json(), allow_nan=False)
    assert json.loads(text)["dynamic_activation"]["frequency"]["0-0"] == 0.75


# --- command line -------------------------------------------------------------------


def test_cli_analyze_prints_summary_and_writes_json_and_figures(tmp_path, capsys):
    save_results(four_trials(), tmp_path / "results.json")
    assert cli.main(["analyze", str(tmp_path / "results.json"), "--out", str(tmp_path / "an")]) == 0
    printed = capsys.readouterr().out
    assert "3/4 heads ever active, 1 always on" in printed
    assert "always on: 0-1" in printed
    assert "coverage skipped" in printed
    saved = json.loads((tmp_path / "an" / "analysis.json").read_text())
    assert saved["dynamic_activation"]["frequency"]["0-0"] == 0.75
    for stem in ("activation_frequency", "activation_matrix", "score_histogram", "layer_profile"):
        assert (tmp_path / "an" / f"{stem}.png").read_bytes()[:4] == b"\x89PNG"
        assert (tmp_path / "an" / f"{stem}.pdf").read_bytes()[:4] == b"%PDF"
    assert not (tmp_path / "an" / "coverage.png").exists()

    save_results(with_copies(), tmp_path / "copies.json")
    assert cli.main(["analyze", str(tmp_path / "copies.json"), "--out", str(tmp_path / "an2")]) == 0
    assert "coverage of copied answer tokens (mean over 2 trials): top-1: 0.83, top-2: 1.00" in capsys.readouterr().out
    assert (tmp_path / "an2" / "coverage.pdf").stat().st_size > 0


def test_cli_compare_reads_ours_and_published(tmp_path, capsys):
    result = four_trials()
    save_results(result, tmp_path / "ours.json")
    (tmp_path / "published.json").write_text(json.dumps(result.to_published()))
    assert (
        cli.main(
            [
                "compare",
                str(tmp_path / "ours.json"),
                str(tmp_path / "published.json"),
                "--top-k",
                "2",
                "--out",
                str(tmp_path / "cmp"),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "Pearson 1.000   Spearman 1.000" in printed
    assert "top-2 overlap: 2/2 = 1.00" in printed
    assert json.loads((tmp_path / "cmp" / "comparison.json").read_text())["top_b"] == ["0-1", "0-0"]
    assert (tmp_path / "cmp" / "score_scatter.pdf").stat().st_size > 0
    other = DetectionResult("small", 1, 2, [record("t", [[0.5, 0.0]])])
    save_results(other, tmp_path / "small.json")
    assert cli.main(["compare", str(tmp_path / "ours.json"), str(tmp_path / "small.json"), "--out", str(tmp_path / "x")]) == 1
    assert "different architectures" in capsys.readouterr().err


# --- the published pairs (the paper's "intrinsic" claim) ------------------------------


@pytest.mark.skipif(not OFFICIAL.exists(), reason="published head scores (../shared/niah) not present")
def test_published_base_and_descendant_share_their_retrieval_heads():
    qwen = compare(load_results(OFFICIAL / "Qwen1.5-14B.json"), load_results(OFFICIAL / "Qwen1.5-14B-Chat.json"))
    assert qwen.top_k_overlap == 1.0
    assert (round(qwen.pearson, 3), round(qwen.spearman, 3)) == (0.893, 0.617)
    mistral = compare(load_results(OFFICIAL / "Mistral-7B-v0.2-hf.json"), load_results(OFFICIAL / "Mixtral-8x7B-v0.1.json"))
    assert mistral.top_k_overlap == 0.75
    assert (round(mistral.pearson, 3), round(mistral.spearman, 3)) == (0.964, 0.867)
    # Unrelated models of one shape share far less (Llama-2-7B-80K vs Mistral-7B: both 32 x 32).
    unrelated = compare(load_results(OFFICIAL / "llama-2-7b-80k.json"), load_results(OFFICIAL / "Mistral-7B-v0.2-hf.json"))
    assert unrelated.top_k_overlap < 0.3
