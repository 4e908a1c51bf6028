"""Detection runs: every finished trial on disk, resume after a crash without redoing work."""

import pytest
from planted import NEEDLE, PLANTED, build_planted_model, haystack_text

import rh_lens.detection.run as detection
from rh_lens.analysis.analyses import coverage
from rh_lens.errors import RunDirectoryError
from rh_lens.execution.options import RunOptions
from rh_lens.tasks.niah import build_trial, tokenize_haystack


@pytest.fixture(scope="module")
def planted():
    model = build_planted_model()
    haystack = tokenize_haystack(model.tokenizer, haystack_text(), 300)
    trials = [build_trial(model.tokenizer, haystack, NEEDLE, length, 50) for length in (260, 280, 300)]
    return model, trials


def test_interrupted_run_resumes_without_redoing_trials(planted, tmp_path, monkeypatch):
    model, trials = planted
    settings = {"grid": "test"}
    real_score_trial = detection.score_trial  # called as each trial's answer ends
    calls = []

    def crash_on_third(trial, *args):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(trial.key)
        return real_score_trial(trial, *args)

    monkeypatch.setattr(detection, "score_trial", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        detection.detect(model, trials, tmp_path, settings=settings, options=RunOptions(max_new_tokens=8, progress=False))
    assert len(list((tmp_path / "trials").glob("*.json"))) == 2
    (unfinished,) = {t.key for t in trials} - set(calls)

    with pytest.raises(RunDirectoryError, match="resume"):
        detection.detect(model, trials, tmp_path, settings=settings, options=RunOptions(max_new_tokens=8, progress=False))
    with pytest.raises(RunDirectoryError, match="settings differ"):
        detection.detect(
            model, trials, tmp_path, settings={"grid": "other"}, options=RunOptions(resume=True, max_new_tokens=8, progress=False)
        )

    calls.clear()
    monkeypatch.setattr(detection, "score_trial", lambda trial, *a: calls.append(trial.key) or real_score_trial(trial, *a))
    resumed = detection.detect(
        model, trials, tmp_path, settings=settings, options=RunOptions(resume=True, max_new_tokens=8, progress=False)
    )
    assert calls == [unfinished]
    fresh = detection.detect(model, trials, None, settings=settings, options=RunOptions(max_new_tokens=8, progress=False))
    assert [t.head_scores for t in resumed.trials] == [t.head_scores for t in fresh.trials]
    assert resumed.ranking(1)[0][:2] == PLANTED


def test_trial_records_are_complete(planted, tmp_path):
    model, trials = planted
    result = detection.detect(model, trials[:1], tmp_path, options=RunOptions(max_new_tokens=8, progress=False))
    trial = result.trials[0]
    assert trial.response.startswith(NEEDLE.real_needle)
    assert trial.success and trial.rouge_recall == 1.0
    assert trial.prompt_length == len(trials[0].prompt_ids) and len(trial.prompt_sha256) == 64
    assert trial.generated_ids[:5] == trials[0].prompt_ids[trial.answer_span[0] : trial.answer_span[1]]
    assert len(trial.head_scores) == 2 and len(trial.head_scores[0]) == 4


def test_copied_offsets_agree_with_head_scores(planted):
    model, trials = planted
    result = detection.detect(model, trials, options=RunOptions(max_new_tokens=8, progress=False))
    for trial in result.trials:
        start, end = trial.answer_span
        assert set(trial.copied) == {"1-2"}  # only the planted head copies
        assert trial.copied["1-2"] == list(range(end - start))  # each answer token once, in order
        for layer, row in enumerate(trial.head_scores):
            for head, score in enumerate(row):
                assert len(trial.copied.get(f"{layer}-{head}", [])) / (end - start) == pytest.approx(score)
    curves = coverage(result)
    assert curves.ranked_heads[0] == "1-2" and curves.mean_coverage[0] == 1.0
