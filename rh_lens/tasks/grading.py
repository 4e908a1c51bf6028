"""Grading an answer: what the model said to a trial, whether it retrieved the needle, and what
kind of answer it gave. Detection, masking and compression grade every trial here.

`success` is the paper's test: stemmed ROUGE-1 recall of the response (decoded without special
tokens, stripped) against the needle's answer above 0.5 (`SUCCESS_RECALL`), and not a
distractor's answer. `answer_trials` is the one decode-and-grade step (`answer_trial` for one).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Any

import numpy as np
from jaxtyping import Float
from transformer_lens import HookedTransformer

from rh_lens.errors import InputError
from rh_lens.model.generation import MAX_NEW_TOKENS, Decoding, Generation, StepObserver, decode_prompts
from rh_lens.model.tl_internals import Hook
from rh_lens.tasks.niah import Trial

SUCCESS_RECALL = 0.5  # a trial counts when ROUGE-1 recall exceeds this
RESPONSE_CLASSES = ("correct", "distractor", "other-context", "invented")  # see response_class


@lru_cache(maxsize=1)
def _rouge_tokenizer():
    """ROUGE-1's tokenizer (lower case, letters and digits, Porter-stemmed), shared by the
    recall and the word matching of `response_class`."""
    from rouge_score.tokenizers import DefaultTokenizer

    return DefaultTokenizer(use_stemmer=True)


@lru_cache(maxsize=1)
def _rouge_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rouge1"], tokenizer=_rouge_tokenizer())


def rouge1_recall(response: str, answer: str) -> float:
    """Stemmed ROUGE-1 recall of the response against the answer span, in [0, 1]."""
    return _rouge_scorer().score(answer, response)["rouge1"].recall


@dataclass(kw_only=True)
class Answer:
    """What a model answered to one NIAH trial, graded: the fields every per-trial record
    shares (detection, ablation). `success`: ROUGE-1 recall of the response > 0.5."""

    key: str
    context_length: int | None
    depth: int | None
    needle_id: str | None
    haystack: str | None
    answer: str | None
    generated_ids: list[int]
    response: str | None
    rouge_recall: float | None
    success: bool
    prompt_sha256: str | None = None
    prompt_length: int | None = None
    seconds: float | None = None
    # Which answer the response gives: "correct", "distractor" (a distractor's answer),
    # "other-context" (text from the prompt) or "invented" (mostly words the prompt lacks).
    response_class: str | None = None
    distractor_recalls: list[float] | None = None  # ROUGE-1 recall against each distractor's answer

    @classmethod
    def from_json(cls, data: dict[str, Any]):
        return cls(**data)


@dataclass(kw_only=True)
class NiahRecord(Answer):
    """One NIAH trial's graded answer. `outcome`: retrieved (recall > 0.5), partial, or absent
    (no answer word in the response: the model hallucinated or paraphrased). `head_scores`
    (with `RunOptions(score_heads=True)`): each head's copy score on the trial, the
    retrieval score's per-trial term (`rh_lens.detection.scoring.copy_scores`), [layer][head]."""

    outcome: str
    head_scores: list[list[float]] | None = None


def outcome(recall: float) -> str:
    return "retrieved" if recall > SUCCESS_RECALL else "partial" if recall > 0 else "absent"


STOPWORDS = frozenset(
    "the and for with was were are has have had his her its our their this that from into under over "
    "what where which who how not but all any can will would could should there here then than them "
    "they you your about after before name named".split()
)


@lru_cache(maxsize=1)
def _stemmed_stopwords() -> frozenset[str]:
    return frozenset(_rouge_tokenizer().tokenize(" ".join(STOPWORDS)))


def _words(text: str) -> set[str]:
    """Content words as ROUGE-1 counts them (the scorer's own tokenizer: lower case, letters
    and digits, Porter-stemmed), of 3+ characters, stopwords left out."""
    return {w for w in _rouge_tokenizer().tokenize(text) if len(w) >= 3} - _stemmed_stopwords()


def response_class(response: str, recall: float, distractor_recalls: Sequence[float], trial: Trial) -> str:
    """The kind of answer: "correct" (recall > 0.5, above every distractor's), "distractor" (a
    distractor's answer recalled better), else "invented" when most of the response's content
    words (tokens of 3+ characters as ROUGE-1 counts them, not stopwords, not in the question)
    are not in the prompt, and "other-context" when they are (or when it has none: it only
    restates the question)."""
    best_other = max(distractor_recalls, default=0.0)
    if recall > SUCCESS_RECALL and recall > best_other:
        return "correct"
    if best_other > SUCCESS_RECALL and best_other > recall:
        return "distractor"
    content = _words(response) - _words(trial.needle.question)
    if not content:
        return "other-context"
    from_prompt = len(content & _words(trial.prompt)) / len(content)
    return "invented" if from_prompt < 0.5 else "other-context"


def answer_trial(
    model: HookedTransformer,
    trial: Trial,
    max_new_tokens: int = MAX_NEW_TOKENS,
    record_attention: bool = True,
    chunk_size: int | None = None,
    decode_hooks: Sequence[Hook] = (),
) -> tuple[Answer, Generation]:
    """The decode-and-grade step shared by detection and ablation: greedy decoding (under
    whatever hooks are on the model, plus `decode_hooks` at decode steps), the response,
    its ROUGE-1 recall against the answer and success. Many trials: `answer_trials`."""
    decoding = Decoding(max_new_tokens=max_new_tokens, chunk_size=chunk_size, batch_size=1, share_prefix=False)
    ((_, answer, generation),) = answer_trials(model, [trial], decoding, record_attention, decode_hooks)
    return answer, generation


def answer_trials(
    model: HookedTransformer,
    trials: Sequence[Trial],
    decoding: Decoding = Decoding(),
    record_attention: bool = True,
    decode_hooks: Sequence[Hook] = (),
    observers: Sequence[StepObserver] = (),
) -> Iterator[tuple[int, Answer, Generation]]:
    """`answer_trial` for many trials, decoded as `decoding` says (prefixes shared, rows
    decoded together: `rh_lens.model.generation.decode_prompts`): (index, answer,
    generation) as each trial's answer ends."""
    prompts = [trial.prompt_ids for trial in trials]
    decoding = decoding_for(trials, decoding)
    for i, generation in decode_prompts(model, prompts, decoding, record_attention, decode_hooks, observers):
        yield i, grade(model, trials[i], generation), generation


def decoding_for(trials: Sequence[Trial], decoding: Decoding) -> Decoding:
    """`decoding` with the trials' rule for where an answer ends (`Trial.one_line`)."""
    rules = {trial.one_line for trial in trials}
    if len(rules) > 1:
        raise InputError("these trials end their answers differently (one line, or a whole turn): decode them apart")
    return replace(decoding, one_line=rules.pop()) if rules else decoding


def final_number(response: str) -> str | None:
    """The number a response gives as its answer: the first after its last "answer is", else
    its first number (commas in thousands dropped); None when it has none."""
    text = response.replace(",", "")
    lowered = text.lower()
    at = lowered.rfind("answer is")
    found = re.search(r"-?\d+", text[at:] if at >= 0 else text)
    return found.group() if found else None


def grade(model: HookedTransformer, trial: Trial, generation: Generation) -> Answer:
    """What the model answered to a trial, graded."""
    response = model.tokenizer.decode(generation.tokens, skip_special_tokens=True).strip()
    if trial.grading == "number":  # exact: the final number given (recall 1 or 0)
        given = final_number(response)
        recall = float(given == trial.needle.real_needle)
        others = []
        kind = "correct" if recall else "other-context" if given is not None and given in trial.prompt else "invented"
    else:
        recall = rouge1_recall(response, trial.needle.real_needle)
        others = [rouge1_recall(response, d.real_needle) for d in trial.distractors]
        kind = response_class(response, recall, others, trial)
    return Answer(
        key=trial.key,
        context_length=trial.context_length,
        depth=trial.depth,
        needle_id=trial.needle.id,
        haystack=trial.haystack,
        answer=trial.needle.real_needle,
        generated_ids=generation.tokens,
        response=response,
        rouge_recall=recall,
        success=recall > SUCCESS_RECALL and kind == "correct",  # a distractor's answer is no retrieval
        prompt_sha256=trial.prompt_sha256,
        prompt_length=len(trial.prompt_ids),
        seconds=generation.seconds,
        response_class=kind,
        distractor_recalls=others or None,
    )


def recall_grid(records) -> tuple[list[int], list[int], Float[np.ndarray, "depth length"]]:
    """Mean ROUGE-1 recall of NIAH records per (depth, context length): the paper's heatmap."""
    lengths = sorted({r.context_length for r in records})
    depths = sorted({r.depth for r in records})
    grid = np.full((len(depths), len(lengths)), np.nan)
    for i, depth in enumerate(depths):
        for j, length in enumerate(lengths):
            values = [r.rouge_recall for r in records if r.depth == depth and r.context_length == length]
            grid[i, j] = np.mean(values) if values else np.nan
    return lengths, depths, grid
