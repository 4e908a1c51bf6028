"""Retrieval-head detection: run NIAH trials, score every head, keep every finished trial.

Each finished trial is written to `<out>/trials/<key>.json` at once (see `runs`), so an
interrupted run resumes where it stopped (`resume=True`) without redoing finished trials.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
from transformer_lens import HookedTransformer

from rh_lens.detection.adaptive import shuffled, top_k_stable
from rh_lens.detection.records import DetectionResult, TrialRecord
from rh_lens.detection.scoring import DEFAULT_THRESHOLD, copied_offsets, copy_events, event_scores
from rh_lens.errors import InputError
from rh_lens.execution.options import RunOptions
from rh_lens.execution.runs import InProcess, run_trials
from rh_lens.model.generation import MAX_NEW_TOKENS, Decoding, Generation
from rh_lens.model.loading import dtype_name
from rh_lens.tasks.grading import Answer, answer_trial, answer_trials
from rh_lens.tasks.niah import Trial


def run_trial(
    model: HookedTransformer,
    trial: Trial,
    max_new_tokens: int = MAX_NEW_TOKENS,
    chunk_size: int | None = None,
) -> TrialRecord:
    """Decode one trial greedily and score every head on it."""
    answer, generation = answer_trial(model, trial, max_new_tokens, record_attention=True, chunk_size=chunk_size)
    return score_trial(trial, answer, generation)


def decode_and_score(
    model: HookedTransformer, trials: Sequence[Trial], decoding: Decoding = Decoding()
) -> Iterator[tuple[int, TrialRecord]]:
    """`run_trial` for many trials, decoded as `decoding` says: (index, record) as each
    trial's answer ends. A task an executor can ship to a worker (see
    `execution.runs.run_trials`)."""
    for i, answer, generation in answer_trials(model, trials, decoding, record_attention=True):
        yield i, score_trial(trials[i], answer, generation)


def score_trial(trial: Trial, answer: Answer, generation: Generation) -> TrialRecord:
    """A decoded trial's record: its graded answer and every head's retrieval score."""
    emitted, prompt = torch.tensor(generation.tokens), torch.tensor(trial.prompt_ids)
    events = copy_events(generation.argmax_keys, emitted, prompt, trial.answer_span)
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
    *,
    options: RunOptions = RunOptions(),
    threshold: float = DEFAULT_THRESHOLD,
    settings: dict[str, Any] | None = None,
    executor=None,
    until_stable: int | None = None,
    patience: int | None = None,
    order_seed: int = 0,
) -> DetectionResult:
    """Run every trial and aggregate. With `out_dir`, each finished trial is saved as it
    completes; `options.resume` reuses the saved trials of an earlier run of the same
    settings; `options.decoding` (token budget, chunk, batch size, prefix sharing) and
    `options.progress` apply.
    `executor`: who runs the trials (default: this process, on `model`; a
    `rh_lens.execution.distributed.RayPool` runs them on Ray workers, and `model` may then
    be a `ModelSpec`).

    `until_stable=K`: adaptive detection. The trials run in a random order (seed
    `order_seed`) and the run stops once the top-K heads (scoring > 0) have stayed the same
    set for `patience` trials in a row (default: max(5, 20% of the grid)); the result holds
    the trials run."""
    if not 0 <= threshold <= 1:  # also refuses NaN
        raise InputError(f"threshold {threshold}: must be a number from 0 to 1")
    name = model.cfg.model_name
    settings = {
        **(settings or {}),
        "max_new_tokens": options.max_new_tokens,
        "chunk_size": options.chunk_size,
        "model": name,
        "dtype": dtype_name(model),
    }
    stop = None
    if until_stable:
        trials = shuffled(trials, order_seed)
        patience = patience or max(5, math.ceil(0.2 * len(trials)))
        settings.update(until_stable=until_stable, patience=patience, order_seed=order_seed)
        stop = partial(top_k_stable, until_stable, patience)
    task = partial(decode_and_score, decoding=options.decoding)
    records = run_trials(
        trials,
        task,
        TrialRecord,
        executor or InProcess(model),
        out_dir=out_dir,
        resume=options.resume,
        settings=settings,
        desc=f"detect {name}",
        progress=options.progress,
        stop=stop,
    )
    return DetectionResult(name, model.cfg.n_layers, model.cfg.n_heads, records, threshold, settings)
