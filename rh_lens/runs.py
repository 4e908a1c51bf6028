"""Resumable runs over NIAH trials: every finished trial is on disk at once.

A run directory holds `run.json` (its settings) and `trials/<key>.json` (one record per
finished trial). An interrupted run resumes where it stopped without redoing finished
trials; resuming with other settings is refused, so results never mix two setups.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

from tqdm.auto import tqdm

from .errors import RunDirectoryError
from .niah import Trial
from .results import write_json

R = TypeVar("R")  # a dataclass record with `key`, `success`, `rouge_recall` and `from_json`


def run_trials(
    trials: Sequence[Trial],
    run_one: Callable[[Trial], R],
    record_type: type[R],
    out_dir: str | Path | None = None,
    resume: bool = False,
    settings: dict[str, Any] | None = None,
    desc: str = "trials",
    progress: bool = True,
) -> list[R]:
    """`run_one` on every trial, in order, saving each record as it is produced."""
    done: dict[str, R] = {}
    trial_dir = None
    if out_dir is not None:
        trial_dir = Path(out_dir) / "trials"
        done = _prepare(Path(out_dir), settings or {}, resume, record_type)
    records = []
    bar = tqdm(trials, desc=desc, unit="trial", disable=not progress)
    for trial in bar:
        record = done.get(trial.key)
        if record is None:
            record = run_one(trial)
            if trial_dir is not None:
                write_json(trial_dir / f"{trial.key}.json", asdict(record))
        records.append(record)
        bar.set_postfix(success=f"{sum(r.success for r in records)}/{len(records)}", last=f"{record.rouge_recall:.2f}")
    return records


def _prepare(out_dir: Path, settings: dict[str, Any], resume: bool, record_type) -> dict:
    """Record the run's settings; on resume, check they match and load the finished trials."""
    manifest, trial_dir = out_dir / "run.json", out_dir / "trials"
    if manifest.exists() and resume:
        previous = json.loads(manifest.read_text())
        if previous != json.loads(json.dumps(settings)):
            raise RunDirectoryError(f"cannot resume {out_dir}: its settings differ ({previous} vs {settings})")
        records = (record_type.from_json(json.loads(p.read_text())) for p in sorted(trial_dir.glob("*.json")))
        return {r.key: r for r in records}
    if trial_dir.exists() and any(trial_dir.glob("*.json")):
        raise RunDirectoryError(f"{out_dir} already holds trials of a run: pass resume=True (--resume) or use a new directory")
    write_json(manifest, settings)
    return {}
