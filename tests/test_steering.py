"""Steering (boosting heads) on the planted-head model: a factor of 1 changes nothing,
sharpening the planted head restores retrieval its weakened query lost (a random head
sharpened does not), and the experiment compares top-K with random-K on the same trials."""

import json

import pytest
import torch
from planted import NEEDLE, PLANTED, build_planted_model, haystack_text, weakened_planted_model, write_inputs

import rh_lens.app.cli as cli
import rh_lens.app.workflows as workflows
from rh_lens.detection.records import DetectionResult, TrialRecord
from rh_lens.detection.run import decode_and_score
from rh_lens.errors import InputError
from rh_lens.execution.options import RunOptions
from rh_lens.interventions.base import evaluate, intervention_from_json
from rh_lens.interventions.masking import HeadMask
from rh_lens.interventions.steering import HeadBoost, SteeringOptions, steering_experiment
from rh_lens.tasks.niah import build_trial, tokenize_haystack

OPTIONS = RunOptions(max_new_tokens=6, progress=False)
WEAKENING = 100.0


def weakened():
    """The planted model with its retrieval head's query divided by 100 (`weakened_planted_model`)."""
    return weakened_planted_model(WEAKENING)


model = build_planted_model()
haystack = tokenize_haystack(model.tokenizer, haystack_text(), 300)
trials = [build_trial(model.tokenizer, haystack, NEEDLE, 300, depth) for depth in (0, 50, 100)]


def ids(records):
    return [r.generated_ids for r in records]


@pytest.mark.parametrize("method", ["sharpen", "output"])
def test_a_factor_of_one_changes_nothing(method):
    plain = evaluate(model, trials, None, options=OPTIONS)
    boosted = evaluate(model, trials, HeadBoost([PLANTED, (0, 0)], 1.0, method), options=OPTIONS)
    assert ids(boosted) == ids(plain) and all(r.success for r in plain)


def test_sharpening_the_planted_head_restores_what_its_weakened_query_lost():
    weak = weakened()
    original = evaluate(model, trials, None, options=OPTIONS)
    lost = evaluate(weak, trials, None, options=OPTIONS)
    assert not any(r.success for r in lost)  # the softened head no longer retrieves
    restored = evaluate(weak, trials, HeadBoost([PLANTED], WEAKENING, "sharpen"), options=OPTIONS)
    assert ids(restored) == ids(original)
    other = evaluate(weak, trials, HeadBoost([(1, 3)], WEAKENING, "sharpen"), options=OPTIONS)
    assert ids(other) == ids(lost)  # a head that does not retrieve, sharpened: nothing comes back


def test_output_boosting_scales_the_heads_output_and_zero_is_zero_ablation():
    zero = evaluate(model, trials, HeadMask([PLANTED], "zero"), options=OPTIONS)
    assert ids(evaluate(model, trials, HeadBoost([PLANTED], 0.0, "output"), options=OPTIONS)) == ids(zero)
    tokens = torch.tensor(trials[1].prompt_ids)[None]
    _, clean = model.run_with_cache(tokens)
    with HeadBoost([PLANTED], 3.0, "output")(model):
        _, boosted = model.run_with_cache(tokens)
    name = f"blocks.{PLANTED[0]}.attn.hook_z"
    torch.testing.assert_close(boosted[name][:, :, PLANTED[1]], 3.0 * clean[name][:, :, PLANTED[1]])
    assert torch.equal(boosted[name][:, :, 0], clean[name][:, :, 0])


def test_a_boost_is_written_and_read_back_and_bad_ones_are_refused():
    boost = HeadBoost([PLANTED], 2.5, "output", decode_only=True)
    assert intervention_from_json(json.loads(json.dumps(boost.to_json()))) == boost
    with pytest.raises(InputError, match="must be > 0"):
        HeadBoost([PLANTED], 0.0, "sharpen")
    with pytest.raises(InputError, match="unknown steering method"):
        HeadBoost([PLANTED], 2.0, "louder")
    with pytest.raises(InputError, match="must be > 0"):
        SteeringOptions(factors=(2.0, -1.0))
    with pytest.raises(InputError):
        HeadBoost([(5, 0)], 2.0).check(model)


def ranking() -> DetectionResult:
    """A ranking with the planted head first and one other head above the threshold."""
    record = dict(key="t", context_length=300, depth=50, needle_id="n", haystack="h", answer=None, generated_ids=[])
    record |= dict(response=None, rouge_recall=1.0, success=True, answer_span=None)
    return DetectionResult("planted", 2, 4, [TrialRecord(**record, head_scores=[[0.0] * 4, [0.0, 0.05, 0.9, 0.0]])])


def test_the_experiment_compares_the_top_heads_with_random_heads_at_each_factor(tmp_path):
    options = SteeringOptions(ks=(1,), factors=(10.0, 100.0), seeds=(0, 1), method="sharpen")
    result = steering_experiment(weakened(), trials, ranking(), options, out_dir=tmp_path, options=OPTIONS)
    names = [c.name for c in result.conditions]
    assert names[:4] == ["none", "top-1-x10", "random-1-x10-seed0", "random-1-x10-seed1"]
    rows = {r["condition"]: r for r in result.summary()}
    assert rows["none"]["mean_recall"] < 0.5 and rows["top-1-x100"]["mean_recall"] == 1.0
    assert rows["random-1-x100"]["n_seeds"] == 2 and rows["random-1-x100"]["mean_recall"] < 0.5
    for c in result.conditions:  # random heads are never the planted one
        if c.metadata["kind"] == "random":
            assert PLANTED not in c.intervention.heads
    pairs = result.comparison_pairs()
    assert ("top-1-x100", "random-1-x100") in pairs and ("top-1-x100", "none") in pairs
    factor_rows = {r["factor"]: r for r in result.factor_rows()}
    assert factor_rows[100.0]["top_recall"] == 1.0 and factor_rows[100.0]["none_recall"] == rows["none"]["mean_recall"]
    assert (tmp_path / "steering.json").exists()
    assert len(list((tmp_path / "conditions" / "top-1-x100" / "trials").glob("*.json"))) == 3


@pytest.mark.parametrize("merge", [True, False])
def test_each_record_carries_the_scores_detection_gives_the_same_answer(merge):
    """Steering records every head's copy score on each trial: with no intervention, exactly
    what detection (`decode_and_score`, its own decoding and the scoring rule) gives those
    trials; sharpened, the planted head copies the answer where unboosted it does not, and
    `factor_rows` reads that rise (a score taken from the wrong row, or from no head, would not)."""
    options = RunOptions(max_new_tokens=6, progress=False, merge_conditions=merge)
    steering = SteeringOptions(ks=(1,), factors=(100.0,), seeds=(0,))
    result = steering_experiment(weakened(), trials, ranking(), steering, options=options)
    none = {r.key: r.head_scores for r in result.groups()["none"][0].records}
    detected = {trials[i].key: record.head_scores for i, record in decode_and_score(weakened(), trials)}
    assert none == detected
    boosted = {r.key: r.head_scores[PLANTED[0]][PLANTED[1]] for r in result.groups()["top-1-x100"][0].records}
    assert all(score > 0.5 for score in boosted.values()) and all(s[PLANTED[0]][PLANTED[1]] < 0.5 for s in none.values())
    (row,) = result.factor_rows()
    assert row["top_score"] == pytest.approx(sum(boosted.values()) / len(boosted))
    assert row["none_score"] < 0.5 < row["top_score"] and row["top_score_interval"][0] <= row["top_score"]
    unscored = steering_experiment(
        weakened(), trials, ranking(), SteeringOptions(ks=(1,), factors=(100.0,), seeds=(0,), score_heads=False), options=options
    )
    assert all(r.head_scores is None for c in unscored.conditions for r in c.records)
    assert unscored.factor_rows()[0]["top_score"] is None


def steer_argv(tmp_path, monkeypatch, depths: list[str]) -> list[str]:
    """`rh-lens steer` on the weakened planted model: top-1 at x100 against one random draw."""
    monkeypatch.setattr(workflows, "load_model", lambda name, **kwargs: weakened())
    hay, needles = write_inputs(tmp_path)
    scores = tmp_path / "scores.json"
    scores.write_text(json.dumps({"1-2": [0.9], "1-1": [0.05], "1-3": [0.0]}))  # the reference's published format
    grid = ["--haystack", hay, "--needles", needles, "--lengths", "300", "--depths", *depths]
    argv = ["steer", "--model", "planted", "--scores", str(scores), "--top-k", "1", "--factors", "100", *grid]
    return [*argv, "--random-seeds", "1", "--max-new-tokens", "6", "--out", str(tmp_path / "run")]


def test_steer_on_the_command_line_prints_intervals_and_show_reads_it(tmp_path, monkeypatch, capsys):
    assert cli.main(steer_argv(tmp_path, monkeypatch, ["0", "100"])) == 0
    printed = capsys.readouterr().out
    assert "top-1-x100" in printed and "[" in printed and "top-1-x100 vs random-1-x100" in printed
    assert "How much the top-K heads copy" in printed  # the planted head's copy score, per factor
    assert (tmp_path / "run" / "recall_vs_factor.png").read_bytes()[:4] == b"\x89PNG"
    assert cli.main(["show", str(tmp_path / "run")]) == 0
    assert "top-1-x100" in capsys.readouterr().out


def test_steer_without_head_scores_records_none_and_prints_no_score_table(tmp_path, monkeypatch, capsys):
    """`--no-head-scores` (a faster run, or one resuming a run started without scores)."""
    assert cli.main([*steer_argv(tmp_path, monkeypatch, ["0"]), "--no-head-scores"]) == 0
    assert "How much the top-K heads copy" not in capsys.readouterr().out
    saved = json.loads((tmp_path / "run" / "steering.json").read_text())
    records = [r for condition in saved["conditions"] for r in condition["records"]]
    assert records and all(r.get("head_scores") is None for r in records)
