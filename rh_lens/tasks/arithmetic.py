"""Arithmetic over numbers stated in a long context: the paper's chain-of-thought claim, on a
task made here (no reasoning dataset is on the package index).

The paper reports that masking retrieval heads barely changes answer-only accuracy but breaks
chain-of-thought answers, because the reasoning must copy numbers out of the context. Each
problem states two or three numbers in fact sentences about an invented place ("On Monday,
the Quellstone bakery sold 37 loaves."), placed together at a depth of a long haystack, with
distractor facts (the same place on days not asked, another place on the days asked) at other
depths; the question asks for their total or difference. Three ways to ask it (`MODES`):

- "answer-only": the final number only (two worked examples show the form);
- "cot": a worked chain of thought first, copying each number, then "The answer is N." (it
  runs over lines: such trials are decoded to the end of the turn, `Trial.one_line` False,
  with `CHAIN_OF_THOUGHT_TOKENS` new tokens on the command line unless told otherwise);
- "in-question": the facts stated in the question itself, the haystack and distractors kept:
  arithmetic that needs no copying from the context (the control LOCOS proposes).

Problems are drawn from a seeded generator, so problem i is the same everywhere; `problems=
(start, stop)` takes a slice. Trials are graded exactly (`Trial.grading = "number"`): the number
after the last "answer is" in the response, else its first number, against the answer.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from rh_lens.errors import InputError, TrialError
from rh_lens.tasks.data import load_haystack
from rh_lens.tasks.needles import Needle
from rh_lens.tasks.niah import PROMPTS, Trial, insert_sentences, render_prompt, resolve_chat, tokenize_haystack

MODES = ("answer-only", "cot", "in-question")
# new tokens a worked chain of thought gets unless told otherwise: Qwen2.5-Coder-0.5B's took
# 98-139 tokens (problems 200-205); the 50 of a NIAH answer would cut most of them off
CHAIN_OF_THOUGHT_TOKENS = 256


def answers_in_one_line(mode: str) -> bool:
    """Whether answers asked in `mode` end with their first line (a bare number), or run over
    lines to the end of the turn (a worked chain of thought: `cot`, `in-question`)."""
    return mode == "answer-only"


# (place, verb in the past tense, verb's infinitive, item): invented places, so no model knows the numbers
PLACES = (
    ("the Quellstone bakery", "sold", "sell", "loaves"),
    ("the Harrowmere ferry", "carried", "carry", "passengers"),
    ("the Brisket Lane library", "lent", "lend", "books"),
    ("the Oskvik fish market", "shipped", "ship", "crates"),
    ("the Tallow Hill orchard", "picked", "pick", "baskets"),
    ("the Wrenfield mill", "ground", "grind", "sacks"),
    ("the Saltmarsh pottery", "fired", "fire", "bowls"),
    ("the Corrin Bay boatyard", "painted", "paint", "hulls"),
)
DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday")
INSTRUCTION = {
    "answer-only": "Answer the question with the final number only.",
    "cot": "Answer the question. Think step by step, copying each number you need from the text, then end with "
    "'The answer is N.'",
}
INSTRUCTION["in-question"] = INSTRUCTION["cot"]
EXAMPLES = (  # worked examples about places no problem uses: (facts, question, steps, answer)
    (
        "On Monday, the Ashgrove dairy filled 20 churns. On Friday, the Ashgrove dairy filled 13 churns.",
        "How many churns did the Ashgrove dairy fill on Monday and Friday together?",
        "On Monday the Ashgrove dairy filled 20 churns and on Friday 13 churns. 20 + 13 = 33.",
        33,
    ),
    (
        "On Tuesday, the Pellow forge shod 41 horses. On Thursday, the Pellow forge shod 17 horses.",
        "How many more horses did the Pellow forge shoe on Tuesday than on Thursday?",
        "On Tuesday the Pellow forge shod 41 horses and on Thursday 17 horses. 41 - 17 = 24.",
        24,
    ),
)


@dataclass(frozen=True)
class Problem:
    """One problem: its fact sentences (what must be copied), the question, the worked steps,
    the answer, and distractor facts (other numbers of the same form)."""

    index: int
    facts: tuple[str, ...]
    question: str
    steps: str
    answer: int
    distractors: tuple[str, ...]

    @property
    def id(self) -> str:
        return self.needle().id

    def needle(self) -> Needle:
        """As a `Needle` (what run settings and held-out checks record): the facts, the question, the answer."""
        return Needle(" ".join(self.facts), self.question, str(self.answer))


def problem(index: int, seed: int = 0) -> Problem:
    """Problem `index` of the seeded sequence: a total of two or three days, or a difference of two."""
    rng = random.Random(f"{seed}-{index}")
    place, verb, infinitive, item = rng.choice(PLACES)
    other = rng.choice([p for p in PLACES if p[0] != place])
    kind = rng.choice(("total-2", "total-3", "difference"))
    n = 3 if kind == "total-3" else 2
    days = rng.sample(DAYS, n + 1)
    asked, spare = days[:n], days[n]
    values = rng.sample(range(12, 90), n)
    if kind == "difference":
        values.sort(reverse=True)
    facts = tuple(f"On {d}, {place} {verb} {v} {item}." for d, v in zip(asked, values))
    distractors = (
        f"On {spare}, {place} {verb} {rng.randrange(12, 90)} {item}.",
        f"On {asked[0]}, {other[0]} {other[1]} {rng.randrange(12, 90)} {other[3]}.",
    )
    copied = " and ".join(f"on {d} {v} {item}" for d, v in zip(asked, values))
    if kind == "difference":
        question = f"How many more {item} did {place} {infinitive} on {asked[0]} than on {asked[1]}?"
        answer, sum_text = values[0] - values[1], f"{values[0]} - {values[1]}"
    else:
        question = f"How many {item} did {place} {infinitive} on {' and '.join(asked)} together?"
        answer, sum_text = sum(values), " + ".join(map(str, values))
    steps = f"{place[0].upper() + place[1:]} {verb} {copied}. {sum_text} = {answer}."
    return Problem(index, facts, question, steps, answer, distractors)


def _examples(mode: str) -> str:
    shown = []
    for facts, question, steps, answer in EXAMPLES:
        reply = str(answer) if mode == "answer-only" else f"{steps} The answer is {answer}."
        shown.append(f"Facts: {facts}\nQuestion: {question}\nAnswer: {reply}")
    return "\n\n".join(shown)


def arithmetic_trial(
    tokenizer, p: Problem, haystack_ids, context_length: int, depth: int, mode: str, chat: bool | None, haystack: str
) -> Trial:
    """One problem as a trial (see the module docstring). The answer is not in the prompt, so
    the trial has no answer span; it serves masking and compression, not detection."""
    if mode not in MODES:
        raise InputError(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")
    chat = resolve_chat(tokenizer, chat)
    in_context = () if mode == "in-question" else tuple((f, depth) for f in p.facts)
    others = tuple((d, (depth + 33 * (i + 1)) % 100) for i, d in enumerate(p.distractors))
    context = insert_sentences(tokenizer, haystack_ids, [*in_context, *others], context_length)
    question = f"{' '.join(p.facts)} {p.question}" if mode == "in-question" else p.question
    message = (
        f"{context}\n\n{INSTRUCTION[mode]} Two examples of the form, about other facts:\n\n{_examples(mode)}\n\n"
        f"Now the question about the text above.\nQuestion: {question}\nAnswer:"
    )
    prompt, special = render_prompt(tokenizer, message, chat)
    prompt_ids = list(tokenizer(prompt, add_special_tokens=special)["input_ids"])
    needle = p.needle()
    one_line = answers_in_one_line(mode)
    return Trial(
        context_length, depth, needle, f"{haystack}-{mode}", prompt, prompt_ids, (0, 0), chat, grading="number", one_line=one_line
    )


@dataclass(frozen=True)
class ArithmeticGrid:
    """Problems `start` to `stop` (seeded) at every context length and depth, asked in `mode`,
    in `haystack`; `prompt` as for `Grid`."""

    problems: tuple[int, int] = (0, 20)
    lengths: tuple[int, ...] = (1000,)
    depths: tuple[int, ...] = (50,)
    mode: str = "cot"
    haystack: str = "ruler-essays"
    prompt: str = "auto"
    seed: int = 0

    def selected(self) -> list[Problem]:
        start, stop = self.problems
        if not 0 <= start < stop:
            raise InputError(f"problems {start}:{stop}: give START:STOP with 0 <= START < STOP")
        return [problem(i, self.seed) for i in range(start, stop)]

    def trials(self, tokenizer, max_tokens: int | None = None) -> list[Trial]:
        haystack_ids = tokenize_haystack(tokenizer, load_haystack(self.haystack), max(self.lengths))
        trials = [
            arithmetic_trial(tokenizer, p, haystack_ids, length, depth, self.mode, PROMPTS[self.prompt], self.haystack)
            for p in self.selected()
            for length in self.lengths
            for depth in self.depths
        ]
        longest = max(len(t.prompt_ids) for t in trials)
        if max_tokens is not None and longest > max_tokens:
            raise TrialError(f"a trial of {longest} tokens is longer than the model's context of {max_tokens} tokens")
        return trials

    def settings(self) -> dict:
        needles = [p.needle() for p in self.selected()]
        return {
            "task": "arithmetic",
            "mode": self.mode,
            "problems": list(self.problems),
            "seed": self.seed,
            "haystack": [self.haystack],
            "needles": [n.id for n in needles],
            "lengths": list(self.lengths),
            "depths": list(self.depths),
            "prompt": self.prompt,
            "needle_content": [n.content() for n in needles],
            # recorded where answers run past their first line: a run saved before they did
            # (cut at the first line) then refuses to resume rather than mix the two
            **({} if answers_in_one_line(self.mode) else {"answers_end": "end of turn"}),
        }
