"""Retrieval-head detection: run NIAH trials, score every head, keep every finished trial.

Each finished trial is written to `<out>/trials/<key>.json` at once, so an interrupted run
resumes where it stopped (`resume=True`) without redoing finished trials.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from .generation import MAX_NEW_TOKENS, greedy_decode
from .niah import Trial
from .results import DetectionResult, TrialRecord, write_json
from .scoring import DEFAULT_THRESHOLD, SUCCESS_RECALL, copy_scores, rouge1_recall


def run_trial(
    model: HookedTransformer,
    trial: Trial,
    max_new_tokens: int = MAX_NEW_TOKENS,
    chunk_size: int | None = None,
) -> TrialRecord:
    """Decode one trial greedily and score every head on it."""
    started = time.perf_counter()
    generation = greedy_decode(model, trial.prompt_ids, max_new_tokens, record_attention=True, chunk_size=chunk_size)
    response = model.tokenizer.decode(generation.tokens, skip_special_tokens=True).strip()
    recall = rouge1_recall(response, trial.needle.real_needle)
    head_scores = copy_scores(
        generation.argmax_keys, torch.tensor(generation.tokens), torch.tensor(trial.prompt_ids), trial.answer_span
    )
    return TrialRecord(
        key=trial.key,
        context_length=trial.context_length,
        depth=trial.depth,
        needle_id=trial.needle.id,
        haystack=trial.haystack,
        prompt_sha256=hashlib.sha256(json.dumps(trial.prompt_ids).encode()).hexdigest(),
        prompt_length=len(trial.prompt_ids),
        answer_span=trial.answer_span,
        answer=trial.needle.real_needle,
        generated_ids=generation.tokens,
        response=response,
        rouge_recall=recall,
        success=recall > SUCCESS_RECALL,
        head_scores=head_scores.tolist(),
        seconds=time.perf_counter() - started,
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
) -> DetectionResult:
    """Run every trial and aggregate. With `out_dir`, each finished trial is saved as it
    completes; `resume=True` reuses the saved trials of an earlier run of the same settings."""
    name = model.cfg.model_name
    settings = {**(settings or {}), "max_new_tokens": max_new_tokens, "model": name}
    trial_dir = Path(out_dir) / "trials" if out_dir is not None else None
    done: dict[str, TrialRecord] = {}
    if trial_dir is not None:
        done = _prepare_run(Path(out_dir), settings, resume)
    records = []
    bar = tqdm(trials, desc=f"detect {name}", unit="trial", disable=not progress)
    for trial in bar:
        record = done.get(trial.key)
        if record is None:
            record = run_trial(model, trial, max_new_tokens, chunk_size)
            if trial_dir is not None:
                write_json(trial_dir / f"{trial.key}.json", record.__dict__)
        records.append(record)
        n_ok = sum(r.success for r in records)
        bar.set_postfix(success=f"{n_ok}/{len(records)}", last=f"{record.rouge_recall:.2f}")
    return DetectionResult(name, model.cfg.n_layers, model.cfg.n_heads, records, threshold, settings)


def _prepare_run(out_dir: Path, settings: dict[str, Any], resume: bool) -> dict[str, TrialRecord]:
    """Record the run's settings; on resume, check they match and load the finished trials."""
    manifest = out_dir / "run.json"
    trial_dir = out_dir / "trials"
    if manifest.exists() and resume:
        previous = json.loads(manifest.read_text())
        if previous != json.loads(json.dumps(settings)):
            raise ValueError(f"cannot resume {out_dir}: its settings differ ({previous} vs {settings})")
        done = {}
        for path in sorted(trial_dir.glob("*.json")):
            record = TrialRecord.from_json(json.loads(path.read_text()))
            done[record.key] = record
        return done
    if trial_dir.exists() and any(trial_dir.glob("*.json")):
        raise FileExistsError(f"{out_dir} already holds trials of a run: pass resume=True (--resume) or use a new directory")
    write_json(manifest, settings)
    return {}
