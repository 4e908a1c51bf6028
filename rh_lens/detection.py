"""Retrieval-head detection: run NIAH trials, score every head, keep every finished trial.

Each finished trial is written to `<out>/trials/<key>.json` at once (see `runs`), so an
interrupted run resumes where it stopped (`resume=True`) without redoing finished trials.
"""

from __future__ import annotations

import math
import re
import time
from functools import partial
from pathlib import Path
from typing import Any, Sequence

import torch
from transformer_lens import HookedTransformer

from .errors import InputError
from .generation import MAX_NEW_TOKENS, Generation, greedy_decode
from .niah import Trial
from .results import Answer, DetectionResult, TrialRecord
from .runs import InProcess, run_trials
from .scoring import DEFAULT_THRESHOLD, SUCCESS_RECALL, copied_offsets, copy_events, event_scores, rouge1_recall
from .statistics import shuffled, stable_after, top_k_indices


def answer_trial(
    model: HookedTransformer,
    trial: Trial,
    max_new_tokens: int = MAX_NEW_TOKENS,
    record_attention: bool = True,
    chunk_size: int | None = None,
    decode_hooks: Sequence[tuple] = (),
) -> tuple[Answer, Generation]:
    """The decode-and-grade step shared by detection and ablation: greedy decoding (under
    whatever hooks are on the model, plus `decode_hooks` at decode steps), the response,
    its ROUGE-1 recall against the answer and success."""
    started = time.perf_counter()
    generation = greedy_decode(model, trial.prompt_ids, max_new_tokens, record_attention, chunk_size, decode_hooks)
    response = model.tokenizer.decode(generation.tokens, skip_special_tokens=True).strip()
    recall = rouge1_recall(response, trial.needle.real_needle)
    others = [rouge1_recall(response, d.real_needle) for d in trial.distractors]
    kind = response_class(response, recall, others, trial)
    answer = Answer(
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
        seconds=time.perf_counter() - started,
        response_class=kind,
        distractor_recalls=others or None,
    )
    return answer, generation


STOPWORDS = frozenset("the and for with was were are has have had his her its our their this that from into under over "
                      "what where which who how not but all any can will would could should there here then than them "
                      "they you your about after before name named".split())  # fmt: skip


def _words(text: str) -> set[str]:
    return {w for w in re.findall(r"[a-z]+", text.lower()) if len(w) >= 3}


def response_class(response: str, recall: float, distractor_recalls: Sequence[float], trial: Trial) -> str:
    """"correct" (recall > 0.5, above every distractor's), "distractor" (a distractor's answer
    recalled better), else "invented" when most of the response's content words (3+ letters,
    not stopwords, not in the question) are not in the prompt, and "other-context" when they
    are (or when it has none: it only restates the question)."""
    best_other = max(distractor_recalls, default=0.0)
    if recall > SUCCESS_RECALL and recall > best_other:
        return "correct"
    if best_other > SUCCESS_RECALL and best_other > recall:
        return "distractor"
    content = _words(response) - STOPWORDS - _words(trial.needle.question)
    if not content:
        return "other-context"
    from_prompt = len(content & _words(trial.prompt)) / len(content)
    return "invented" if from_prompt < 0.5 else "other-context"


def run_trial(
    model: HookedTransformer,
    trial: Trial,
    max_new_tokens: int = MAX_NEW_TOKENS,
    chunk_size: int | None = None,
) -> TrialRecord:
    """Decode one trial greedily and score every head on it."""
    answer, generation = answer_trial(model, trial, max_new_tokens, record_attention=True, chunk_size=chunk_size)
    events = copy_events(
        generation.argmax_keys, torch.tensor(generation.tokens), torch.tensor(trial.prompt_ids), trial.answer_span
    )
    emitted, prompt = torch.tensor(generation.tokens), torch.tensor(trial.prompt_ids)
    distractor_scores = [
        event_scores(copy_events(generation.argmax_keys, emitted, prompt, span), span).tolist() for span in trial.distractor_spans
    ]
    return TrialRecord(
        **vars(answer),
        answer_span=trial.answer_span,
        head_scores=event_scores(events, trial.answer_span).tolist(),
        copied=copied_offsets(events, generation.argmax_keys, trial.answer_span),
        distractor_spans=list(trial.distractor_spans) or None,
        distractor_scores=distractor_scores or None,
    )


def detect(
    model: HookedTransformer,
    trials: Sequence[Trial],
    out_dir: str | Path | None = None,
    resume: bool = False,
    threshold: float = DEFAULT_THRESHOLD,
    settings: dict[str, Any] | None = None,
    max_new_tokens: int = MAX_NEW_TOKENS,
    chunk_size: int | None = None,
    progress: bool = True,
    executor=None,
    until_stable: int | None = None,
    patience: int | None = None,
    order_seed: int = 0,
) -> DetectionResult:
    """Run every trial and aggregate. With `out_dir`, each finished trial is saved as it
    completes; `resume=True` reuses the saved trials of an earlier run of the same settings.
    `executor`: who runs the trials (default: this process, on `model`; a
    `rh_lens.distributed.RayPool` runs them on Ray workers, and `model` may then be a
    `ModelSpec`).

    `until_stable=K`: adaptive detection. The trials run in a random order (seed
    `order_seed`) and the run stops once the top-K heads (scoring > 0) have stayed the same
    set for `patience` trials in a row (default: max(5, 20% of the grid)); the result holds
    the trials run."""
    if not 0 <= threshold <= 1:  # also refuses NaN
        raise InputError(f"threshold {threshold}: must be a number from 0 to 1")
    name = model.cfg.model_name
    settings = {
        **(settings or {}), "max_new_tokens": max_new_tokens, "chunk_size": chunk_size, "model": name,
        "dtype": str(model.cfg.dtype).removeprefix("torch."),
    }  # fmt: skip
    stop = None
    if until_stable:
        trials = shuffled(trials, order_seed)
        patience = patience or max(5, math.ceil(0.2 * len(trials)))
        settings.update(until_stable=until_stable, patience=patience, order_seed=order_seed)
        stop = partial(_top_k_stable, until_stable, patience)
    task = partial(_detection_task, max_new_tokens, chunk_size)
    records = run_trials(
        trials, task, TrialRecord, executor or InProcess(model), out_dir, resume, settings, f"detect {name}", progress, stop
    )
    return DetectionResult(name, model.cfg.n_layers, model.cfg.n_heads, records, threshold, settings)


def top_k_set(records: Sequence[TrialRecord], k: int) -> frozenset[int]:
    """The k best heads (flat indices) by retrieval score over these trials, among heads scoring > 0."""
    good = [r.head_scores for r in records if r.success]
    if not good:
        return frozenset()
    scores = torch.tensor(good, dtype=torch.float64).flatten(1).mean(dim=0)
    return frozenset(i for i in top_k_indices(scores, k).tolist() if scores[i] > 0)


def _top_k_stable(k: int, patience: int, records: Sequence[TrialRecord]) -> bool:
    """The stop rule of adaptive detection. `run_trials` asks it of every prefix in order and
    stops at the first yes, so only the last `patience` + 1 prefixes need a top-K set: the
    rule holds when they all leave the same one (not every prefix's, which made each
    question cost O(trials^2))."""
    if len(records) <= patience:
        return False
    recent = [top_k_set(records[:n], k) for n in range(len(records) - patience, len(records) + 1)]
    return stable_after(recent, patience) == len(recent)


def _detection_task(max_new_tokens: int, chunk_size: int | None, model: HookedTransformer, trial: Trial) -> TrialRecord:
    """One detection trial as a task an executor can ship to a worker (see `runs.run_trials`)."""
    return run_trial(model, trial, max_new_tokens, chunk_size)
