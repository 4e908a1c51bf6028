"""Needles: a fact sentence, the question that asks for it, and the answer inside it.

The built-in needles live here; the 40-needle bank is `rh_lens.tasks.needle_bank`, and
reading needles from files or by set name is `rh_lens.tasks.data.load_needles`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from rh_lens.errors import TrialError


@dataclass(frozen=True)
class Needle:
    """One line of the reference JSONL format: the sentence, its question, the answer span."""

    needle: str
    question: str
    real_needle: str
    # Where the answer starts inside `needle` when the data says so (SQuAD's character offset):
    # a paragraph can hold the answer's words more than once, and the annotated one is scored.
    answer_start: int | None = None

    @property
    def id(self) -> str:
        parts = (self.needle, self.question, self.real_needle) + (() if self.answer_start is None else (str(self.answer_start),))
        return hashlib.sha1("\n".join(parts).encode()).hexdigest()[:8]

    def content(self) -> dict[str, str]:
        """What a held-out check compares (`rh_lens.tasks.splits`), as run settings record it."""
        return {"id": self.id, "needle": self.needle, "question": self.question, "answer": self.real_needle}


# Answers nobody knows without reading the haystack: retrieval, not recall.
BUILTIN_NEEDLES = (
    Needle(
        needle="The ship that carried the first settlers to Velora Bay was named the Amber Kestrel.",
        question="What was the name of the ship that carried the first settlers to Velora Bay?",
        real_needle="the Amber Kestrel",
    ),
    Needle(
        needle="The password to the archive room at the Halvorsen Institute is purple otter seventeen.",
        question="What is the password to the archive room at the Halvorsen Institute?",
        real_needle="purple otter seventeen",
    ),
    Needle(
        needle="The lighthouse keeper on Fennick Island hid his ledger in a green tin box under the kitchen stairs.",
        question="Where did the lighthouse keeper on Fennick Island hide his ledger?",
        real_needle="in a green tin box under the kitchen stairs",
    ),
)


# Answers of 10 tokens or more, as the reference's needles have: with a short answer one copy
# event is a large share of the span (a 3-token answer: 0.33), so a single lucky argmax can
# cross the 0.1 threshold; with these it takes two or more.
BUILTIN_LONG_NEEDLES = (
    Needle(
        needle="The best thing to do in Velora Bay is to walk the old harbour wall at dawn and watch the fishing boats return.",
        question="What is the best thing to do in Velora Bay?",
        real_needle="walk the old harbour wall at dawn and watch the fishing boats return",
    ),
    Needle(
        needle="The secret recipe of the Halvorsen Institute bakery calls for three spoons of smoked juniper honey and a pinch of blue sea salt.",
        question="What does the secret recipe of the Halvorsen Institute bakery call for?",
        real_needle="three spoons of smoked juniper honey and a pinch of blue sea salt",
    ),
    Needle(
        needle="The lighthouse keeper on Fennick Island hid his ledger in a green tin box under the third step of the cellar stairs.",
        question="Where did the lighthouse keeper on Fennick Island hide his ledger?",
        real_needle="in a green tin box under the third step of the cellar stairs",
    ),
)


def answer_chars(needle: Needle) -> tuple[int, int]:
    """Where the answer lies inside the needle sentence (the reference's answers differ in case,
    e.g. 'Because ...' inside '... because ...')."""
    answer = needle.real_needle.strip()
    if needle.answer_start is not None:
        start = needle.answer_start
        if needle.needle[start : start + len(answer)] != answer:
            raise TrialError(f"answer {answer!r} is not at character {start} of its paragraph: the data file is wrong there")
        return start, start + len(answer)
    for candidate in (answer, answer.rstrip(".!?")):
        start = needle.needle.lower().find(candidate.lower()) if candidate else -1
        if start >= 0:
            return start, start + len(candidate)
    raise TrialError(f"answer {needle.real_needle!r} is not part of needle {needle.needle!r}")
