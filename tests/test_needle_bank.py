"""The needle bank: big enough, varied, not guessable, and split into halves that share nothing."""

from __future__ import annotations

import re

import pytest

from rh_lens.tasks.data import load_needles
from rh_lens.tasks.needle_bank import ANSWER_KINDS, NEEDLE_BANK, NEEDLE_SPLITS
from rh_lens.tasks.needles import answer_chars

# Words that carry no content: sharing them is not a leak.
_FUNCTION_WORDS = set(
    "the a an of in on at by to and with from for its his her their is are was were every each before after above below under beneath behind over off by they it".split()
)


def content_words(text: str) -> set[str]:
    # Numbers count whole ("4,816"), so a code's digit groups are not mistaken for another's number.
    return {w for w in re.findall(r"[a-z]+|[0-9][0-9,]*[0-9]|[0-9]", text.lower()) if w not in _FUNCTION_WORDS}


def test_the_bank_is_large_and_varied():
    assert len(NEEDLE_BANK) >= 30
    assert len({n.real_needle for n in NEEDLE_BANK}) == len(NEEDLE_BANK)
    assert set(ANSWER_KINDS) == {n.real_needle for n in NEEDLE_BANK}
    kinds = set(ANSWER_KINDS.values())
    assert {"name", "number", "place", "phrase"} <= kinds
    for needle in NEEDLE_BANK:
        assert 2 <= len(re.findall(r"[A-Za-z]+|[0-9]+", needle.real_needle)) <= 12, needle.real_needle


def test_every_answer_sits_inside_its_needle():
    for needle in NEEDLE_BANK:
        start, stop = answer_chars(needle)
        assert needle.needle[start:stop] == needle.real_needle


def test_no_question_gives_its_answer_away():
    for needle in NEEDLE_BANK:
        leaked = content_words(needle.real_needle) & content_words(needle.question)
        assert not leaked, (needle.question, leaked)


def test_no_needle_holds_another_needles_answer_words():
    # A head that copies one needle's answer must not score on another's span.
    for needle in NEEDLE_BANK:
        answer = content_words(needle.real_needle)
        for other in NEEDLE_BANK:
            if other is not needle:
                shared = answer & content_words(other.needle + " " + other.question)
                assert not shared, (needle.real_needle, other.needle, shared)


def test_the_halves_are_disjoint_and_each_holds_every_kind():
    a, b = NEEDLE_SPLITS["bank-a"], NEEDLE_SPLITS["bank-b"]
    assert set(a) | set(b) == set(NEEDLE_SPLITS["bank"]) and not set(a) & set(b)
    assert abs(len(a) - len(b)) <= 1
    every_kind = set(ANSWER_KINDS.values())
    for half in (a, b):
        assert {ANSWER_KINDS[n.real_needle] for n in half} == every_kind
    assert load_needles("bank-b") == list(b)


@pytest.mark.slow
def test_answers_are_3_to_15_tokens_for_every_small_model(real_model):
    for name in ("smollm2-135m", "qwen2.5-coder-0.5b"):
        tokenizer = real_model(name).tokenizer
        for needle in NEEDLE_BANK:
            n = len(tokenizer(" " + needle.real_needle, add_special_tokens=False)["input_ids"])
            assert 3 <= n <= 15, (name, needle.real_needle, n)
