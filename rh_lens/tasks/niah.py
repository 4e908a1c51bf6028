"""Needle-in-a-haystack trials: haystacks, needles, prompts and exact answer spans.

A trial is one prompt: a haystack cut to a target length in tokens, a needle sentence
inserted at a depth (moved back to a sentence end), then the question. The retrieval
score needs the answer span's exact token positions in the prompt, so every trial
carries them and building a trial fails loudly when they cannot be found.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from rh_lens.errors import InputError, TrialError
from rh_lens.tasks.data import haystack_name, load_haystack
from rh_lens.tasks.needles import BUILTIN_NEEDLES, Needle, answer_chars

# Room left for the question and answer, as in the reference implementation.
QUESTION_BUDGET = 200
SENTENCE_ENDS = (".", "!", "?")
QUESTION_TEMPLATE = "\nBased on the content of the book, Question: {question}\nAnswer:"
CHAT_TEMPLATE = "<book>{context}</book>" + QUESTION_TEMPLATE


# --- the grid ----------------------------------------------------------------------


def linear_grid(start: float, stop: float, num: int) -> list[int]:
    """Rounded linear steps, as the reference builds its lengths and depths."""
    return [int(x) for x in np.round(np.linspace(start, stop, num=num))]


@dataclass
class Trial:
    """One prompt with the exact token positions [start, end) of its answer span."""

    context_length: int
    depth: int
    needle: Needle
    haystack: str
    prompt: str
    prompt_ids: list[int]
    answer_span: tuple[int, int]
    chat: bool
    distractors: tuple[Needle, ...] = ()  # other sentences with other answers, in the same prompt
    distractor_depths: tuple[int, ...] = ()
    distractor_spans: tuple[tuple[int, int], ...] = ()
    # "rouge": ROUGE-1 recall of the answer words (NIAH, documents); "number": the response's
    # final number must equal the answer (`rh_lens.tasks.arithmetic`)
    grading: str = "rouge"
    # the answer ends with its first line (NIAH, documents, a bare number); False: it runs
    # until the end of the turn (a worked chain of thought, `rh_lens.tasks.arithmetic`)
    one_line: bool = True
    key: str = field(init=False)

    def __post_init__(self) -> None:
        self.key = f"len{self.context_length}-depth{self.depth}-{self.haystack}-{self.needle.id}" + "".join(
            f"-x{depth}-{d.id}" for d, depth in zip(self.distractors, self.distractor_depths)
        )

    @property
    def prompt_sha256(self) -> str:
        """The prompt's identity in results files: sha256 of its token ids as JSON."""
        return hashlib.sha256(json.dumps(list(self.prompt_ids)).encode()).hexdigest()


def _sentence_end_before(tokenizer, ids: Sequence[int], position: int) -> int:
    """Move an insertion point back until the token before it ends a sentence."""
    while position > 0 and not tokenizer.decode(ids[position - 1 : position]).rstrip().endswith(SENTENCE_ENDS):
        position -= 1
    return position


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def insert_needle(tokenizer, haystack_ids: Sequence[int], needle: str, context_length: int, depth: int) -> str:
    """Cut the haystack so haystack + needle fill `context_length` minus the question budget,
    and insert the needle at `depth` percent, at the previous sentence end (token level)."""
    return insert_sentences(tokenizer, haystack_ids, [(needle, depth)], context_length)


def insert_sentences(tokenizer, haystack_ids: Sequence[int], sentences: Sequence[tuple[str, int]], context_length: int) -> str:
    """`insert_needle` for several (sentence, depth) pairs: the haystack is cut to leave room
    for all of them, and each goes in at its depth, at the previous sentence end."""
    budget = context_length - QUESTION_BUDGET - sum(len(_encode(tokenizer, " " + text)) for text, _ in sentences)
    if budget <= 0:
        raise TrialError(f"context length {context_length} leaves no room for a haystack")
    if len(haystack_ids) < budget:
        raise TrialError(f"haystack has {len(haystack_ids)} tokens, {budget} needed for length {context_length}")
    ids = list(haystack_ids[:budget])
    points = [
        len(ids) if depth >= 100 else _sentence_end_before(tokenizer, ids, int(len(ids) * depth / 100)) for _, depth in sentences
    ]
    order = sorted(range(len(sentences)), key=lambda i: (points[i], i))
    parts, start = [], 0
    for rank, i in enumerate(order):
        segment = tokenizer.decode(ids[start : points[i]])
        parts += [segment.rstrip() if rank == 0 else segment.strip(), sentences[i][0]]
        start = points[i]
    parts.append(tokenizer.decode(ids[start:]).lstrip())
    return " ".join(part for part in parts if part)


def corrupt_needle(needle: Needle, answer: str) -> Needle:
    """The same needle sentence and question with `answer` in place of the real answer."""
    start, end = answer_chars(needle)
    return Needle(needle.needle[:start] + answer + needle.needle[end:], needle.question, answer, needle.answer_start)


# Distractors in the same sentence form: another answer sharing no content word with the
# true one (else ROUGE-1 could not tell which of the two a response gives).
DISTRACTOR_ANSWERS = {
    "the Amber Kestrel": "the Grey Heron",
    "purple otter seventeen": "silver badger forty",
    "in a green tin box under the kitchen stairs": "behind a loose brick in the chapel wall",
    "walk the old harbour wall at dawn and watch the fishing boats return": "climb the bell tower at noon and count the red roofs below",
    "three spoons of smoked juniper honey and a pinch of blue sea salt": "two cups of burnt barley flour with a drop of pine oil",
    "in a green tin box under the third step of the cellar stairs": "behind a loose brick inside the old chapel wall by the well",
}
DISTRACTORS = ("same-form", "multi-key")


def distractors_for(needle: Needle, needles: Sequence[Needle], depth: int, kind: str | None) -> list[tuple[Needle, int]]:
    """(distractor, depth) pairs for a trial. "same-form": the needle with another answer, 50
    percentage points away; "multi-key": the other needles of the set (other facts of the
    same kind, one asked), spread over the other depths."""
    if kind is None:
        return []
    if kind == "same-form":
        if needle.real_needle not in DISTRACTOR_ANSWERS:
            raise TrialError(
                f"no built-in distractor answer for {needle.real_needle!r}: same-form distractors need the built-in needles"
            )
        return [(corrupt_needle(needle, DISTRACTOR_ANSWERS[needle.real_needle]), (depth + 50) % 100)]
    if kind == "multi-key":
        others = [n for n in needles if n != needle]
        if not others:
            raise TrialError("multi-key distractors need at least two needles")
        return [(other, (depth + round(100 * (i + 1) / (len(others) + 1))) % 100) for i, other in enumerate(others)]
    raise TrialError(f"unknown distractor kind {kind!r}; choose from {', '.join(DISTRACTORS)}")


def locate_answer(tokenizer, prompt: str, prompt_ids: list[int], offsets, char_span: tuple[int, int]) -> tuple[int, int]:
    """Token span [start, end) covering the characters `char_span` of the prompt."""
    lo, hi = char_span
    covered = [i for i, (a, b) in enumerate(offsets) if b > a and a < hi and b > lo]
    if not covered:
        raise TrialError(f"no prompt token covers the answer {prompt[lo:hi]!r}")
    start, end = covered[0], covered[-1] + 1
    decoded = tokenizer.decode(prompt_ids[start:end])
    if prompt[lo:hi].split()[0].lower() not in decoded.lower():
        raise TrialError(f"answer tokens decode to {decoded!r}, expected {prompt[lo:hi]!r}")
    return start, end


def overlap_locate(prompt_ids: Sequence[int], answer_ids: Sequence[int], min_overlap: float = 0.9) -> tuple[int, int]:
    """The reference's search: the first window whose token set covers > 90% of the answer's."""
    wanted = set(answer_ids)
    for i in range(len(prompt_ids)):
        if len(wanted & set(prompt_ids[i : i + len(answer_ids)])) / len(wanted) > min_overlap:
            return i, i + len(answer_ids)
    raise TrialError("answer tokens not found in the prompt")


def resolve_chat(tokenizer, chat: bool | None) -> bool:
    """`chat=None`: the chat template when the tokenizer has one."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if chat and not has_template:
        raise TrialError("this model's tokenizer has no chat template: use the plain prompt (--prompt plain or auto)")
    return has_template if chat is None else chat


def render_prompt(tokenizer, message: str, chat: bool) -> tuple[str, bool]:
    """The prompt text of `message` (inside the chat template as the user's turn, or as it is),
    and whether tokenizing it should add special tokens (a template carries its own BOS)."""
    if chat:
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": message}], tokenize=False, add_generation_prompt=True
        ), False
    return message, True


def build_trial(
    tokenizer,
    haystack_ids: Sequence[int],
    needle: Needle,
    context_length: int,
    depth: int,
    chat: bool | None = None,
    max_tokens: int | None = None,
    haystack: str = "haystack",
    distractors: Sequence[tuple[Needle, int]] = (),
) -> Trial:
    """Build one trial. `haystack_ids` is the tokenised haystack (see `tokenize_haystack`).

    chat=None uses the tokenizer's chat template when it has one. `max_tokens` is the
    model's context window: a longer prompt is an error, never a silent truncation.
    `distractors`: (needle, depth) pairs also inserted (another answer in the same sentence
    form, or other facts), each with its exact answer span.
    """
    if context_length < 1:
        raise TrialError(f"context length {context_length}: must be a positive number of tokens")
    if not 0 <= depth <= 100:
        raise TrialError(f"depth {depth}: must be a percentage from 0 to 100")
    chat = resolve_chat(tokenizer, chat)
    for other, other_depth in distractors:
        if not 0 <= other_depth <= 100:
            raise TrialError(f"distractor depth {other_depth}: must be a percentage from 0 to 100")
        if other.needle == needle.needle or needle.needle in other.needle or other.needle in needle.needle:
            raise TrialError(f"distractor {other.needle!r} cannot be told apart from the needle")
    sentences = [(needle.needle, depth)] + [(other.needle, other_depth) for other, other_depth in distractors]
    context = insert_sentences(tokenizer, haystack_ids, sentences, context_length)
    template = CHAT_TEMPLATE if chat else "{context}" + QUESTION_TEMPLATE
    prompt, special = render_prompt(tokenizer, template.format(context=context, question=needle.question), chat)
    needle_at = prompt.find(needle.needle)
    if needle_at < 0:
        raise TrialError("needle not found in the prompt text")
    a, b = answer_chars(needle)
    other_spans = []
    if tokenizer.is_fast:
        encoded = tokenizer(prompt, add_special_tokens=special, return_offsets_mapping=True)
        prompt_ids, offsets = list(encoded["input_ids"]), encoded["offset_mapping"]
        span = locate_answer(tokenizer, prompt, prompt_ids, offsets, (needle_at + a, needle_at + b))
        for other, _ in distractors:
            at, (c, d) = prompt.find(other.needle), answer_chars(other)
            if at < 0:
                raise TrialError(f"distractor {other.needle!r} not found in the prompt text")
            other_spans.append(locate_answer(tokenizer, prompt, prompt_ids, offsets, (at + c, at + d)))
    else:  # slow tokenizers have no character offsets: fall back to the reference's search
        if distractors:
            raise TrialError("distractors need a fast tokenizer: the reference's search cannot tell two answers apart")
        prompt_ids = tokenizer(prompt, add_special_tokens=special)["input_ids"]
        span = overlap_locate(prompt_ids, _encode(tokenizer, needle.real_needle))
    if max_tokens is not None and len(prompt_ids) > max_tokens:
        raise TrialError(f"trial of {len(prompt_ids)} tokens is longer than the model's context of {max_tokens} tokens")
    return Trial(
        context_length,
        depth,
        needle,
        haystack,
        prompt,
        prompt_ids,
        span,
        chat,
        tuple(o for o, _ in distractors),
        tuple(d for _, d in distractors),
        tuple(other_spans),
    )


def tokenize_haystack(tokenizer, text: str, min_tokens: int) -> list[int]:
    """Token ids of the haystack, repeated (as the reference reads its files in a loop) to at least `min_tokens`."""
    ids = _encode(tokenizer, text)
    if not ids:
        raise TrialError("empty haystack")
    repeats = -(-min_tokens // len(ids))
    if repeats > 1:
        ids = _encode(tokenizer, "\n\n".join([text] * repeats))
    return ids


def trial_grid(
    tokenizer,
    needles: Sequence[Needle],
    lengths: Iterable[int],
    depths: Iterable[int],
    haystacks: Sequence[str | Path | None] = (None,),
    chat: bool | None = None,
    max_tokens: int | None = None,
    distractor: str | None = None,
) -> list[Trial]:
    """Every (needle, length, depth) trial. One haystack for all needles, or one per needle
    (the reference pairs its three needles with three haystacks). `distractor`: None,
    "same-form" or "multi-key" (see `distractors_for`)."""
    lengths, depths = list(lengths), list(depths)
    if len(haystacks) not in (1, len(needles)):
        raise InputError(f"give one haystack, or one per needle ({len(needles)}); got {len(haystacks)}")
    pairs = zip(needles, haystacks if len(haystacks) > 1 else list(haystacks) * len(needles))
    tokenized: dict[str, list[int]] = {}
    trials = []
    for needle, source in pairs:
        name = haystack_name(source)
        if name not in tokenized:
            tokenized[name] = tokenize_haystack(tokenizer, load_haystack(source), max(lengths))
        for length in lengths:
            for depth in depths:
                others = distractors_for(needle, needles, depth, distractor)
                trials.append(build_trial(tokenizer, tokenized[name], needle, length, depth, chat, max_tokens, name, others))
    return trials


# --- a grid as one value -----------------------------------------------------------------

DEFAULT_LENGTHS = (500, 1000, 2000)
DEFAULT_DEPTHS = (0, 25, 50, 75, 100)
PROMPTS = {"auto": None, "chat": True, "plain": False}  # prompt style -> build_trial's `chat`


@dataclass(frozen=True)
class Grid:
    """A NIAH grid: every (needle, context length, depth), each needle in its haystack (one
    haystack for all, or one per needle). `prompt`: "auto" (the chat template when the
    tokenizer has one), "chat" or "plain". The defaults are rh_lens's demo grid."""

    needles: tuple[Needle, ...] = BUILTIN_NEEDLES
    lengths: tuple[int, ...] = DEFAULT_LENGTHS
    depths: tuple[int, ...] = DEFAULT_DEPTHS
    haystacks: tuple[str, ...] = ("pydoc",)
    prompt: str = "auto"
    distractor: str | None = None

    def trials(self, tokenizer, max_tokens: int | None = None) -> list[Trial]:
        """Every trial of the grid; `max_tokens` is the model's context window."""
        if self.prompt not in PROMPTS:
            raise InputError(f"prompt must be one of {', '.join(PROMPTS)}, not {self.prompt!r}")
        return trial_grid(
            tokenizer, self.needles, self.lengths, self.depths, self.haystacks, PROMPTS[self.prompt], max_tokens, self.distractor
        )

    def settings(self) -> dict:
        """What identifies the grid in a run's settings (a resumed run must match them),
        the content of each haystack included, and what each needle says (`needle_content`:
        what a held-out check compares). Reads the haystacks: a missing one fails here."""
        settings = {
            "haystack": [str(h) for h in self.haystacks],
            "haystack_sha256": [hashlib.sha256(load_haystack(h).encode()).hexdigest() for h in self.haystacks],
            "needles": [n.id for n in self.needles],
            "lengths": list(self.lengths),
            "depths": list(self.depths),
            "prompt": self.prompt,
        } | ({"distractor": self.distractor} if self.distractor else {})
        return settings | {"needle_content": [n.content() for n in self.needles]}
