"""Distractors: another answer in the same sentence form, or other facts, in the same prompt.
Which answer the model gives, and which heads copy from which span."""

from __future__ import annotations

import pytest
from planted import NEEDLE, PLANTED, build_planted_model, haystack_text

from rh_lens.detection.run import run_trial
from rh_lens.errors import TrialError
from rh_lens.tasks.grading import response_class, rouge1_recall
from rh_lens.tasks.needles import BUILTIN_NEEDLES, Needle
from rh_lens.tasks.niah import DISTRACTOR_ANSWERS, build_trial, distractors_for, tokenize_haystack

model = build_planted_model()
haystack = tokenize_haystack(model.tokenizer, haystack_text(), 300)
OTHER = Needle("The secret code is: river stone cloud maple window.", NEEDLE.question, "river stone cloud maple window")


def test_both_answers_are_in_the_prompt_with_exact_spans():
    trial = build_trial(model.tokenizer, haystack, NEEDLE, 300, 50, chat=False, distractors=[(OTHER, 0)])
    tok = model.tokenizer
    (start, end), ((d_start, d_end),) = trial.answer_span, trial.distractor_spans
    assert tok.decode(trial.prompt_ids[start:end]) == NEEDLE.real_needle
    assert tok.decode(trial.prompt_ids[d_start:d_end]) == OTHER.real_needle
    assert d_end < start  # depth 0 comes first
    assert trial.key.endswith(f"-x0-{OTHER.id}")
    plain = build_trial(model.tokenizer, haystack, NEEDLE, 300, 50, chat=False)
    assert plain.key == trial.key.removesuffix(f"-x0-{OTHER.id}") and not plain.distractor_spans


def test_the_head_that_copies_the_distractor_gets_the_distractors_score():
    """The planted induction head follows the earliest match: with the distractor first, the
    model answers the distractor, and the head's copies count for the distractor's span."""
    first = run_trial(model, build_trial(model.tokenizer, haystack, NEEDLE, 300, 50, chat=False, distractors=[(OTHER, 0)]), 8)
    assert first.response.startswith(OTHER.real_needle) and first.response_class == "distractor" and not first.success
    layer, head = PLANTED
    assert first.distractor_scores[0][layer][head] >= 1.0 and first.head_scores[layer][head] == 0.0  # 8 steps: it goes on copying
    last = run_trial(model, build_trial(model.tokenizer, haystack, NEEDLE, 300, 0, chat=False, distractors=[(OTHER, 100)]), 8)
    assert last.response.startswith(NEEDLE.real_needle) and last.response_class == "correct" and last.success
    assert last.head_scores[layer][head] == 1.0 and last.distractor_scores[0][layer][head] == 0.0


def test_distractor_sets_for_the_built_in_needles():
    for needle in BUILTIN_NEEDLES:
        ((other, depth),) = distractors_for(needle, BUILTIN_NEEDLES, 25, "same-form")
        assert other.question == needle.question and other.real_needle == DISTRACTOR_ANSWERS[needle.real_needle]
        assert depth == 75
        assert rouge1_recall(other.real_needle, needle.real_needle) < 0.5  # ROUGE tells the two apart
        multi = distractors_for(needle, BUILTIN_NEEDLES, 90, "multi-key")
        assert [n for n, _ in multi] == [n for n in BUILTIN_NEEDLES if n != needle] and [d for _, d in multi] == [23, 57]
    with pytest.raises(TrialError, match="no built-in distractor answer"):
        distractors_for(NEEDLE, [NEEDLE], 0, "same-form")


@pytest.mark.parametrize(
    "response, expected",
    [
        ("alpha bravo charlie delta echo", "correct"),
        ("river stone cloud maple window", "distractor"),
        ("garden lamp violin paper", "other-context"),
        ("purple elephants dancing wildly", "invented"),
        ("What is the secret code?", "other-context"),
    ],
)
def test_response_classes(response, expected):
    trial = build_trial(model.tokenizer, haystack, NEEDLE, 300, 50, chat=False, distractors=[(OTHER, 0)])
    recall = rouge1_recall(response, NEEDLE.real_needle)
    assert response_class(response, recall, [rouge1_recall(response, OTHER.real_needle)], trial) == expected
