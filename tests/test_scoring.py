"""The retrieval score: worked example, hand-made cases, and the planted-head model.

The planted-head tests are run against deliberately broken variants of the rule too
(`test_broken_rules_are_caught`), to show that they fail when the scoring is wrong.
"""

import pytest
import torch
from planted import DECOY, NEEDLE, PLANTED, build_planted_model, haystack_text

import rh_lens.detection.run as detection
import rh_lens.model.generation as generation
from rh_lens.detection.scoring import copied_offsets, copy_events, copy_scores, retrieval_scores
from rh_lens.execution.options import RunOptions
from rh_lens.tasks.grading import rouge1_recall
from rh_lens.tasks.niah import build_trial, tokenize_haystack


def test_worked_example_ten_token_answer_eight_copies():
    # Prompt of 30 tokens, answer at [10, 20); head (0, 0) copies 8 of the 10 answer tokens,
    # head (0, 1) looks at the right place but the model emits other tokens there.
    prompt = torch.arange(100, 130)
    emitted = prompt[10:20].clone()
    emitted[3] = emitted[7] = 999  # two steps where the model emits something else
    argmax = torch.zeros(10, 1, 3, dtype=torch.long)
    argmax[:, 0, 0] = torch.arange(10, 20)  # looks at the answer token it is emitting
    argmax[:, 0, 1] = torch.arange(9, 19)  # looks one token early: never the emitted one
    argmax[:, 0, 2] = torch.arange(20, 30)  # outside the span
    scores = copy_scores(argmax, emitted, prompt, (10, 20))
    assert scores[0, 0].item() == pytest.approx(0.8)
    assert scores[0, 1].item() == 0.0
    assert scores[0, 2].item() == 0.0


def test_copy_needs_span_and_token():
    prompt = torch.tensor([5, 6, 7, 8, 6])
    emitted = torch.tensor([6, 6])
    argmax = torch.tensor([[[1, 4, 0]], [[1, 1, 1]]])  # [step, layer, head]
    # head 0 copies twice from position 1 (inside span [1, 3)); head 1 once (pos 4 is outside
    # the span though it holds the token); head 2 once (pos 0 holds 5 at step 0).
    scores = copy_scores(argmax, emitted, prompt, (1, 3))
    assert scores.tolist() == [[1.0, 0.5, 0.5]]


def test_copied_offsets_name_each_event_in_step_order():
    prompt = torch.tensor([5, 6, 7, 8, 6])
    emitted = torch.tensor([6, 7, 6])
    argmax = torch.tensor([[[1, 4]], [[2, 2]], [[1, 0]]])  # [step, layer, head]
    events = copy_events(argmax, emitted, prompt, (1, 3))
    assert events[:, 0].tolist() == [[True, False], [True, True], [True, False]]
    # head 0 copied offsets 0, 1, 0 (one entry per event); head 1 only at step 1, offset 1
    assert copied_offsets(events, argmax, (1, 3)) == {"0-0": [0, 1, 0], "0-1": [1]}


def test_keys_past_the_prompt_never_count():
    prompt = torch.tensor([1, 2, 3])
    scores = copy_scores(torch.tensor([[[5]]]), torch.tensor([3]), prompt, (0, 3))
    assert scores.item() == 0.0


def test_keys_before_the_prompt_never_count():
    # a shifted argmax (shifted-copy) can point before position 0, even past -len(prompt)
    prompt = torch.tensor([1, 2, 3])
    scores = copy_scores(torch.tensor([[[-1, -3, -1005]]]), torch.tensor([3]), prompt, (0, 3))
    assert scores.tolist() == [[0.0, 0.0, 0.0]]


def test_span_must_lie_in_prompt():
    with pytest.raises(ValueError):
        copy_scores(torch.zeros(1, 1, 1, dtype=torch.long), torch.tensor([1]), torch.arange(5), (3, 9))


def test_retrieval_score_averages_successful_trials_only():
    trial_scores = torch.tensor([[[1.0, 0.0]], [[0.5, 0.0]], [[0.0, 1.0]]])
    success = torch.tensor([True, True, False])
    assert retrieval_scores(trial_scores, success).tolist() == [[0.75, 0.0]]
    assert retrieval_scores(trial_scores, torch.zeros(3, dtype=torch.bool)).tolist() == [[0.0, 0.0]]


def test_rouge1_recall_is_stemmed_recall_against_the_answer():
    answer = "eat a sandwich and sit in Dolores Park"
    assert rouge1_recall("Eat a sandwich and sit in Dolores Park on a sunny day.", answer) == 1.0
    assert rouge1_recall("sitting in the park", answer) == pytest.approx(3 / 8)  # sit~sitting, in, park
    assert rouge1_recall("", answer) == 0.0


# --- planted-head model -------------------------------------------------------------


@pytest.fixture(scope="module")
def planted():
    model = build_planted_model()
    haystack = tokenize_haystack(model.tokenizer, haystack_text(), 300)
    trials = [build_trial(model.tokenizer, haystack, NEEDLE, 300, d, max_tokens=model.cfg.n_ctx) for d in (0, 25, 50, 75, 100)]
    return model, trials


def planted_head_is_found(model, trials) -> tuple[bool, str]:
    """The check of the planted model: (passed, why not)."""
    result = detection.detect(model, trials, options=RunOptions(progress=False, max_new_tokens=8, chunk_size=16))
    scores = result.scores()
    if not all(t.success for t in result.trials):
        return False, "not every trial retrieved the answer"
    if result.ranking()[0][:2] != PLANTED:
        return False, f"top head is {result.ranking()[0]}"
    if scores[PLANTED].item() < 0.99:
        return False, f"planted head scores {scores[PLANTED].item()}"
    others = scores.clone()
    others[PLANTED] = 0
    if others.max().item() > 0.01:
        return False, f"another head scores {others.max().item()}"
    return True, ""


def test_planted_head_ranks_first_with_score_one(planted):
    model, trials = planted
    passed, why = planted_head_is_found(model, trials)
    assert passed, why


def _off_by_one(argmax_keys, emitted, prompt_ids, answer_span):
    # Compares with the token fed at the step instead of the token emitted.
    fed = torch.cat([prompt_ids[-1:], emitted[:-1]])
    return _reference_copy(argmax_keys, fed, prompt_ids, answer_span)


def _no_token_check(argmax_keys, emitted, prompt_ids, answer_span):
    start, end = answer_span
    return (argmax_keys >= start) & (argmax_keys < end)


_reference_copy = copy_events

BROKEN_RULES = {
    "off-by-one token": ("copy_events", _off_by_one),
    "no token check": ("copy_events", _no_token_check),
    "argmax over heads": ("newest_row_argmax", lambda pattern: pattern[0, :, -1].argmax(dim=0)[: pattern.shape[1]]),
    "argmax over queries": ("newest_row_argmax", lambda pattern: pattern[0].argmax(dim=1)[:, -1]),
    "last key": ("newest_row_argmax", lambda pattern: torch.full((pattern.shape[1],), pattern.shape[-1] - 1)),
}


@pytest.mark.parametrize("name", sorted(BROKEN_RULES))
def test_broken_rules_are_caught(planted, monkeypatch, name):
    attribute, broken = BROKEN_RULES[name]
    module = detection if attribute == "copy_events" else generation
    monkeypatch.setattr(module, attribute, broken)
    model, trials = planted
    passed, _ = planted_head_is_found(model, trials)
    assert not passed, f"the planted-head check did not notice the broken rule: {name}"


def test_decoy_head_looks_into_the_span(planted):
    # The decoy only makes the tests meaningful if it really attends inside the answer span.
    model, trials = planted
    trial = trials[2]
    gen = generation.greedy_decode(model, trial.prompt_ids, max_new_tokens=6, chunk_size=16)
    start, end = trial.answer_span
    decoy_keys = gen.argmax_keys[1:5, DECOY[0], DECOY[1]]
    assert ((decoy_keys >= start) & (decoy_keys < end)).all()
