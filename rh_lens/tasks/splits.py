"""Which trials a run used, so that a ranking is judged on trials it was not computed from.

A run's settings name its items: the needles of a NIAH grid (by id) or the questions of a
real-document grid (by dataset id), and, since content checks, what each item says
(`needle_content`: the sentence, question and answer of each needle; `question_content`:
each question's text, answer, the sha256 of its gold paragraphs and its article titles).
Two runs overlap when they share an item, whatever the lengths, depths or haystacks: the
same fact asked again is not held out. `split_of` and `shared_items` compare ids;
`check_split` compares content (`CHECKS`), so a near-duplicate needle, the same question
under another id, or another question on the same paragraph or article is caught too.

Settings written before content checks record ids only: built-in needles (`BUILTIN_NEEDLES`,
`BUILTIN_LONG_NEEDLES`, the bank) are found again by id, and questions from the corpus when
the data file's sha256 is RULER's copy's; anything else is "content unknown".
"""

from __future__ import annotations

import re
import string
from collections import defaultdict
from typing import Any

from rh_lens.errors import InputError
from rh_lens.tasks.data import load_corpus
from rh_lens.tasks.grading import _words
from rh_lens.tasks.needle_bank import NEEDLE_BANK
from rh_lens.tasks.needles import BUILTIN_LONG_NEEDLES, BUILTIN_NEEDLES

# The checks between two items, then the one between the two runs' haystacks.
ITEM_CHECKS = (
    "same_item",  # the same needle or question id
    "same_question",  # the same question text (normalised)
    "near_duplicate_needle",  # needle sentences or answers sharing most content words
    "shared_answer",  # the same answer (normalised)
    "shared_paragraph",  # a gold paragraph in common (sha256)
    "shared_title",  # an article title in common
)
CHECKS = ITEM_CHECKS + ("same_haystack",)  # same_haystack: reported, a violation only when asked
# Content-word Jaccard (ROUGE-1's stemmed tokens, 3+ characters, no stopwords) at or above
# which two needle sentences, or two answers, are the same fact reworded. The built-in
# Fennick Island pair (BUILTIN_NEEDLES vs BUILTIN_LONG_NEEDLES: the same question, the ledger
# in a green tin box under other stairs) reaches 0.71 on the sentences and exactly 0.5 on the
# answers; any other two of the 46 built-in needles (both built-in sets and the 40-needle
# bank) reach at most 0.14 on either (tests/test_splits.py checks every pair). 0.5 catches
# the pair on either measure with room on both sides.
NEAR_DUPLICATE = 0.5


def normalise(text: str) -> str:
    """A question or answer as SQuAD's evaluation compares them: lower case, punctuation and
    the articles a/an/the removed, whitespace collapsed."""
    text = "".join(c for c in text.lower() if c not in string.punctuation)
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def jaccard(a: set[str], b: set[str]) -> float:
    return len(a & b) / len(a | b) if a | b else 0.0


# Tasks whose items are needles in a haystack (`needles`, `needle_content` in the settings);
# the others ask questions of a corpus (`questions`, `question_content`).
NEEDLE_TASKS = ("niah", "arithmetic")


def split_of(settings: dict[str, Any]) -> dict[str, Any] | None:
    """The items and text of a run, from its settings; None when the settings do not say
    (a published scores file records no trials)."""
    task = settings.get("task", "niah")
    in_haystack = task in NEEDLE_TASKS
    items = settings.get("needles") if in_haystack else settings.get("questions")
    if not items:
        return None
    text = {"haystack": settings.get("haystack")} if in_haystack else {"data_sha256": settings.get("data_sha256")}
    return {"task": task, "items": [f"{task}:{item}" for item in items], **text}


def shared_items(ranked_on: dict[str, Any] | None, evaluated_on: dict[str, Any] | None) -> list[str] | None:
    """The items two splits share (sorted), or None when either split is unknown."""
    if ranked_on is None or evaluated_on is None:
        return None
    return sorted(set(ranked_on["items"]) & set(evaluated_on["items"]))


# --- content -------------------------------------------------------------------------------


def _builtin_needles() -> dict[str, dict[str, str]]:
    return {n.id: n.content() for n in (*BUILTIN_NEEDLES, *BUILTIN_LONG_NEEDLES, *NEEDLE_BANK)}


def _corpus_questions(task: str, data_sha256: str | None) -> dict[str, dict[str, Any]]:
    """The questions of `task`'s built-in corpus (RULER's copy, or the world questions) by id,
    when it is the data file the settings name; else none."""
    try:
        corpus = load_corpus(task)
    except InputError:  # an unknown task, or RULER's copy cannot be fetched
        return {}
    return {q.id: q.content() for q in corpus.questions} if corpus.sha256 == data_sha256 else {}


def split_content(settings: dict[str, Any]) -> tuple[list[dict[str, Any]], list[str]] | None:
    """(each item's content, the items whose content is unknown), items named "task:id";
    None when the settings record no items. From the settings' `needle_content` /
    `question_content`, or for settings without them from the built-in needles and corpora."""
    task = settings.get("task", "niah")
    niah = task in NEEDLE_TASKS
    ids = settings.get("needles" if niah else "questions")
    if not ids:
        return None
    recorded = settings.get("needle_content" if niah else "question_content")
    if recorded is not None:
        known = {c["id"]: c for c in recorded}
    else:
        known = _builtin_needles() if niah else _corpus_questions(task, settings.get("data_sha256"))
    items, unknown = [], []
    for i in ids:
        content = known.get(i)
        if content is None:
            unknown.append(f"{task}:{i}")
            continue
        items.append(
            {
                "item": f"{task}:{i}",
                "question": content["question"],
                "answer": content["answer"],
                "needle": content.get("needle"),
                "paragraph_sha256": list(content.get("paragraph_sha256", ())),
                "articles": list(content.get("articles", ())),
            }
        )
    return items, unknown


def _offence(ranked: str, evaluated: str, shared: str) -> dict[str, str]:
    return {"ranked": ranked, "evaluated": evaluated, "shared": shared}


def _by_key(ranked: list[dict], evaluated: list[dict], keys, shown=lambda key, item: key) -> list[dict[str, str]]:
    """Pairs (ranked, evaluated) with a key in common; `keys(item)` gives an item's keys,
    `shown(key, evaluated item)` what the pair shares, as a message shows it."""
    index = defaultdict(list)
    for r in ranked:
        for key in keys(r):
            index[key].append(r["item"])
    found = {}
    for e in evaluated:
        for key in keys(e):
            for r in index.get(key, ()):
                found.setdefault((r, e["item"]), shown(key, e))
    return [_offence(r, e, what) for (r, e), what in found.items()]


def _near_duplicates(ranked: list[dict], evaluated: list[dict]) -> list[dict[str, str]]:
    """Pairs whose needle sentences (both NIAH needles) or answers reach `NEAR_DUPLICATE`."""

    def words(item):
        return {"needle": _words(item["needle"]) if item["needle"] else set(), "answer": _words(item["answer"])}

    ranked_words = [(r["item"], words(r)) for r in ranked]
    index = defaultdict(set)  # word -> ranked items holding it: only pairs sharing a word can match
    for n, (_, w) in enumerate(ranked_words):
        for word in w["needle"] | w["answer"]:
            index[word].add(n)
    found = []
    for e in evaluated:
        ew = words(e)
        for n in sorted(set().union(*(index.get(word, set()) for word in ew["needle"] | ew["answer"]))):
            item, rw = ranked_words[n]
            scores = {part: jaccard(rw[part], ew[part]) for part in ("needle", "answer")}
            part = max(scores, key=scores.get)
            if scores[part] >= NEAR_DUPLICATE:
                found.append(_offence(item, e["item"], f"{part} Jaccard {scores[part]:.2f}"))
    return found


def _title(title: str) -> str:
    """An article title as compared: SQuAD's underscores as spaces, case folded."""
    return " ".join(title.replace("_", " ").split()).casefold()


def _article(key: str, item: dict) -> str:
    return "article " + next((t for t in item["articles"] if _title(t) == key), key)


def compare_items(ranked: list[dict[str, Any]], evaluated: list[dict[str, Any]]) -> dict[str, list[dict[str, str]]]:
    """The item checks (`ITEM_CHECKS`) between two lists of item contents (`split_content`'s
    first part): per check, the offending pairs {"ranked", "evaluated", "shared"}."""

    def question(item):
        return [normalise(item["question"])] if normalise(item["question"]) else []

    def answer(item):
        return [normalise(item["answer"])] if normalise(item["answer"]) else []

    ids = {i["item"] for i in ranked}
    return {
        "same_item": [_offence(e["item"], e["item"], "id") for e in evaluated if e["item"] in ids],
        "same_question": _by_key(ranked, evaluated, question, lambda key, item: item["question"]),
        "near_duplicate_needle": _near_duplicates(ranked, evaluated),
        "shared_answer": _by_key(ranked, evaluated, answer, lambda key, item: item["answer"]),
        "shared_paragraph": _by_key(
            ranked, evaluated, lambda i: i["paragraph_sha256"], lambda sha, item: f"gold paragraph sha256 {sha[:12]}"
        ),
        "shared_title": _by_key(
            ranked, evaluated, lambda i: [_title(t) for t in i["articles"]], lambda key, item: _article(key, item)
        ),
    }


def _haystacks(settings: dict[str, Any]) -> list[tuple[str, str | None]]:
    """(name, sha256) of the text a run's trials are cut from: a NIAH grid's haystacks, a
    real-document grid's data file (its distractor paragraphs); none for closed-book questions."""
    task = settings.get("task", "niah")
    if task == "niah":
        names = settings.get("haystack") or []
        names = [names] if isinstance(names, str) else list(names)
        shas = settings.get("haystack_sha256") or [None] * len(names)
        return list(zip(names, shas))
    if settings.get("closed_book") or task == "world":
        return []
    return [(f"{task} paragraphs", settings.get("data_sha256"))]


def _same_haystack(ranked: dict[str, Any], evaluated: dict[str, Any]) -> list[dict[str, str]]:
    found = []
    for name, sha in _haystacks(ranked):
        for other, other_sha in _haystacks(evaluated):
            same = sha == other_sha if sha and other_sha else name == other  # settings without a sha: by name
            if same and not any(o["ranked"] == name and o["evaluated"] == other for o in found):
                found.append(_offence(name, other, f"sha256 {sha[:12]}" if sha else "same name"))
    return found


def check_split(ranked: dict[str, Any], evaluated: dict[str, Any], *, other_haystack: bool = False) -> dict[str, Any]:
    """Whether the trials of `evaluated` (a run's settings) are held out from those `ranked`
    (the settings of the run that ranked the heads), by content. Plain data:

    - `split_known`: both settings record their items (a published scores file does not);
    - `content_unknown`: items ("task:id") whose content neither the settings nor the
      built-in needles and corpora give;
    - `checks`: per name of `CHECKS`, the offending pairs {"ranked", "evaluated", "shared"}
      (for same_haystack, haystack names);
    - `violations`: the checks with offences, same_haystack only with `other_haystack`;
    - `passed`: split known, content known, no violation.
    """
    a, b = split_content(ranked), split_content(evaluated)
    result: dict[str, Any] = {
        "split_known": a is not None and b is not None,
        "content_unknown": [],
        "checks": {},
        "violations": [],
        "other_haystack": other_haystack,
        "passed": False,
    }
    if a is None or b is None:
        return result
    (ranked_items, ranked_unknown), (evaluated_items, evaluated_unknown) = a, b
    checks = compare_items(ranked_items, evaluated_items)
    ids = set(split_of(ranked)["items"])  # by id, whether or not the content is known
    checks["same_item"] = [_offence(i, i, "id") for i in dict.fromkeys(split_of(evaluated)["items"]) if i in ids]
    checks["same_haystack"] = _same_haystack(ranked, evaluated)
    violations = [name for name in ITEM_CHECKS if checks[name]]
    if other_haystack and checks["same_haystack"]:
        violations.append("same_haystack")
    unknown = ranked_unknown + evaluated_unknown
    result.update(checks=checks, content_unknown=unknown, violations=violations, passed=not unknown and not violations)
    return result


def held_out(settings: dict[str, Any]) -> bool | None:
    """Whether a run's evaluation trials share nothing with its ranking's: `shares_nothing`
    (content checked), or in results written before content checks `heldout` (which then
    meant the same, by id only); None when the settings do not say."""
    return settings.get("shares_nothing", settings.get("heldout"))


# What each held-out check found, as an error message says it; and what to do about it.
SPLIT_FINDINGS = {
    "same_question": "asks {n} question(s) the ranking's trials ask",
    "near_duplicate_needle": "has {n} needle(s) or answer(s) nearly the same as the ranking's (content-word Jaccard >= 0.5)",
    "shared_answer": "has {n} answer(s) the ranking's trials have",
    "shared_paragraph": "has {n} question(s) on a gold paragraph of the ranking's questions",
    "shared_title": "has {n} question(s) from an article the ranking's questions come from",
    "same_haystack": "is cut from the ranking's haystack",
}
NEEDLE_HINT = "choose needles of other facts (e.g. --needles bank-b against a ranking on bank-a)"
QUESTION_HINT = "leave such questions out with --disjoint-from START:STOP (the ranking's --questions)"


def offences(found: list[dict[str, str]]) -> str:
    """Up to 3 offending pairs of a check, evaluation ~ ranking: what they share."""
    shown = [f"{o['evaluated']} ~ {o['ranked']}: {o['shared']}" for o in found[:3]]
    return "; ".join(shown) + ("; ..." if len(found) > 3 else "")


def refusal(check: dict[str, Any], ranked_on: dict[str, Any], evaluated: dict[str, Any]) -> str:
    """The one-line error of a split that fails the held-out check: the first failing check,
    up to 3 of its offending pairs (evaluation ~ ranking), a hint, the other failing checks."""
    first, *others = check["violations"]
    found = check["checks"][first]
    also = f" (also failing: {', '.join(others)})" if others else ""
    if first == "same_item":
        what = f"{len(found)} of the ranking's own {'needles' if ranked_on['task'] == 'niah' else 'questions'}"
        items = ", ".join(o["evaluated"] for o in found[:3]) + (", ..." if len(found) > 3 else "")
        return (
            f"--heldout: the evaluation grid shares {what} with the detection run (same_item: {items}){also}; "
            f"choose other needles or --questions"
        )
    if first == "same_haystack":
        hint = "choose another --haystack or task, or leave out --other-haystack"
    else:
        hint = NEEDLE_HINT if evaluated.get("task", "niah") == "niah" else QUESTION_HINT
    what = SPLIT_FINDINGS[first].format(n=len(found))
    return f"--heldout: the evaluation grid {what} (split check {first}: {offences(found)}){also}; {hint}"
