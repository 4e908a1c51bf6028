"""Results files: our JSON, the reference's published format, rankings."""

import json
from pathlib import Path

import pytest

from rh_lens.detection.records import DetectionResult, TrialRecord, load_results, save_results

OFFICIAL = Path(__file__).resolve().parents[2] / "shared" / "niah" / "official_head_scores"


def record(key, scores, success=True):
    return TrialRecord(
        key=key,
        context_length=1000,
        depth=50,
        needle_id="n",
        haystack="h",
        prompt_sha256="sha",
        prompt_length=990,
        answer_span=(10, 14),
        answer="a b c d",
        generated_ids=[1, 2],
        response="a b",
        rouge_recall=0.5,
        success=success,
        head_scores=scores,
    )


def small_result():
    trials = [
        record("t0", [[1.0, 0.0, 0.25], [0.0, 0.5, 0.0]]),
        record("t1", [[0.5, 0.0, 0.25], [0.0, 0.0, 0.0]]),
        record("t2", [[0.0, 1.0, 1.00], [1.0, 1.0, 1.0]], success=False),
    ]
    return DetectionResult("toy", 2, 3, trials, threshold=0.2)


def test_scores_ranking_and_fraction():
    result = small_result()
    assert result.scores().tolist() == [[0.75, 0.0, 0.25], [0.0, 0.25, 0.0]]
    assert result.ranking(3) == [(0, 0, 0.75), (0, 2, 0.25), (1, 1, 0.25)]
    assert result.retrieval_heads() == [(0, 0, 0.75), (0, 2, 0.25), (1, 1, 0.25)]
    assert result.fraction_above(0.5) == pytest.approx(1 / 6)


def test_json_round_trip(tmp_path):
    result = small_result()
    save_results(result, tmp_path / "r.json")
    loaded = load_results(tmp_path / "r.json")
    assert loaded == result
    assert loaded.trials[0].answer_span == (10, 14)


def test_published_round_trip(tmp_path):
    result = small_result()
    published = result.to_published()
    assert published["0-0"] == [1.0, 0.5]  # successful trials only
    (tmp_path / "p.json").write_text(json.dumps(published))
    loaded = load_results(tmp_path / "p.json")
    assert (loaded.n_layers, loaded.n_heads) == (2, 3)
    assert loaded.scores().tolist() == result.scores().tolist()


def test_rejects_other_json(tmp_path):
    (tmp_path / "x.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(ValueError, match="neither"):
        load_results(tmp_path / "x.json")


@pytest.mark.skipif(not OFFICIAL.exists(), reason="published head scores (../shared/niah) not present")
def test_published_llama2_7b_80k_reproduces_reference_top_heads():
    result = load_results(OFFICIAL / "llama-2-7b-80k.json")
    assert (result.n_layers, result.n_heads) == (32, 32)
    top = [(layer, head, round(score, 2)) for layer, head, score in result.ranking(5)]
    # The reference README: [16,19] 0.94, [11,15] 0.92, [8,26] 0.80, [6,9] 0.62, [7,12] 0.61.
    assert top == [(16, 19, 0.94), (11, 15, 0.92), (8, 26, 0.80), (6, 9, 0.62), (7, 12, 0.61)]
