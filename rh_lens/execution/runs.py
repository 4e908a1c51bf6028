"""Run directories and resumable runs over NIAH trials: every finished trial is on disk at once.

A run directory holds `run.json` (its settings) and `trials/<key>.json` (one record per
finished trial); an ablation holds one such run per condition under `conditions/`. The
rules, enforced by `run_directory`:

- one run at a time: a run holds a lock on its directory (`.rh_lens.lock`, taken with
  `filelock`, so it works across processes); a second run into it is refused at once;
- a fresh run needs an empty (or new) directory, so no file of yours is ever replaced;
  `overwrite=True` (`--overwrite`) allows a non-empty one and first removes the run state
  an earlier run left there (`run.json`, `trials/`, `conditions/`, `maps/`, `training/`);
- `resume=True` (`--resume`) continues the run in the directory without redoing finished
  trials, and refuses when its settings differ or when a saved trial was run on another
  prompt (the haystack, needles or tokenizer changed).
Outputs are written atomically and never through symlinks (`execution.files.write_atomic`).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from filelock import FileLock, Timeout
from tqdm.auto import tqdm

from rh_lens.errors import OutputError, ResultsFileError, RunDirectoryError
from rh_lens.execution.files import read_json, write_json
from rh_lens.model.generation import prefix_order
from rh_lens.tasks.niah import Trial

R = TypeVar("R")  # a dataclass record (an `Answer`) with `key`, `success`, `rouge_recall`, `prompt_sha256`, `from_json`

LOCK_NAME = ".rh_lens.lock"
# What a run leaves to resume from (maps: an atlas's; training: a fine-tuning run's checkpoints).
RUN_STATE = ("run.json", "trials", "conditions", "maps", "training")

_held: dict[Path, int] = {}  # run directories this process holds, with their nesting depth


def _contents(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir() if p.name != LOCK_NAME) if path.is_dir() else []


@contextmanager
def run_directory(out_dir: str | Path, resume: bool = False, overwrite: bool = False) -> Iterator[Path]:
    """Hold `out_dir` for one run: create it, lock it against every other run, and check
    this run may write there (see the module docstring). Re-entrant within a process: an
    inner entry for a directory already held only nests, without checking again."""
    path = Path(out_dir)
    key = path.resolve()
    if key in _held:
        _held[key] += 1
        try:
            yield path
        finally:
            _held[key] -= 1
        return
    try:
        path.mkdir(parents=True, exist_ok=True)
        lock = FileLock(path / LOCK_NAME, timeout=0)
        lock.acquire()
    except Timeout:
        raise RunDirectoryError(
            f"{path} is in use by another rh-lens run; wait for it to finish or choose another --out"
        ) from None
    except OSError as e:
        raise OutputError(f"cannot write to {path}: {e.strerror or e}") from None
    try:
        _check_directory(path, resume, overwrite)
        _held[key] = 1
        try:
            yield path
        finally:
            del _held[key]
    finally:
        lock.release()


def _check_directory(path: Path, resume: bool, overwrite: bool) -> None:
    for name in ("trials", "conditions"):
        if (path / name).is_symlink():
            raise RunDirectoryError(f"{path / name} is a symlink; rh-lens never writes through symlinks")
    contents = _contents(path)
    if not contents:
        return
    if overwrite:
        for name in RUN_STATE:
            target = path / name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            elif target.exists() or target.is_symlink():
                target.unlink()
        return
    is_run = any((path / name).exists() for name in RUN_STATE)
    if resume and is_run:
        return
    if resume:
        raise RunDirectoryError(
            f"cannot resume in {path}: it holds no rh-lens run (no run.json, trials/, conditions/, maps/ or training/)"
        )
    what = (
        "an earlier rh-lens run: --resume continues it"
        if is_run
        else f"files ({', '.join(contents[:3])}{', ...' if len(contents) > 3 else ''})"
    )
    raise RunDirectoryError(f"{path} is not empty, it holds {what}; --overwrite writes there anyway, or choose a new --out")


def saved_trials(out_dir: str | Path) -> int:
    """How many finished trials a run directory holds (all conditions of an ablation)."""
    return sum(1 for _ in Path(out_dir).glob("**/trials/*.json"))


# A task: what is done to trials on a model, `task(model, trials)`, yielding (index in
# `trials`, record) as each trial finishes (in any order). Given many trials at once, a task
# can share work between them (a prompt prefix, a decode step).
Task = Callable[[Any, Sequence[Trial]], Iterator[tuple[int, R]]]


class InProcess:
    """Runs trials on a model in this process, all in one call of the task."""

    def __init__(self, model):
        self.model = model

    def map(self, task: Task, trials: Sequence[Trial]) -> Iterator[tuple[int, R]]:
        """(index, record) for every trial, as each finishes."""
        yield from task(self.model, trials)

    def call(self, function: Callable[[Any], Any]) -> Any:
        """`function(model)`, once."""
        return function(self.model)


def run_trials(
    trials: Sequence[Trial],
    task: Task,
    record_type: type[R],
    executor,
    *,
    out_dir: str | Path | None = None,
    resume: bool = False,
    settings: dict[str, Any] | None = None,
    desc: str = "trials",
    progress: bool = True,
    stop: Callable[[list[R]], bool] | None = None,
) -> list[R]:
    """`task(model, trials)` on every trial not finished yet, by `executor` (`InProcess(model)`,
    or `rh_lens.execution.distributed.RayPool` for workers that each hold the model). Each record is
    saved as soon as it arrives, whatever ran it, so any executor can resume any run.
    Records come back in trial order. The trials are handed to the executor in `prefix_order`
    of their prompts, so that trials sharing a prompt prefix run one after the other.
    `stop(records)`, asked of every finished prefix of the trials in order, ends the run
    early: the records of that prefix come back (the trials then run in their own order,
    so that the prefixes it is asked of finish first)."""
    if out_dir is None:
        return _run(trials, task, executor, {}, None, desc, progress, stop)
    with run_directory(out_dir, resume):
        done = _prepare(Path(out_dir), settings or {}, resume, record_type, trials)
        return _run(trials, task, executor, done, Path(out_dir) / "trials", desc, progress, stop)


def _run(trials, task, executor, done: dict, trial_dir: Path | None, desc: str, progress: bool, stop=None) -> list:
    records = {i: done[t.key] for i, t in enumerate(trials) if t.key in done}
    asked = 0  # prefixes of finished trials (in trial order) asked of `stop` so far

    def stopping_point() -> int | None:
        nonlocal asked
        finished = 0
        while finished in records:
            finished += 1
        for n in range(asked + 1, finished + 1) if stop is not None else ():
            if stop([records[i] for i in range(n)]):
                return n
        asked = max(asked, finished)
        return None

    todo = [i for i in range(len(trials)) if i not in records]
    if stop is None:
        todo = [todo[j] for j in prefix_order([trials[i].prompt_ids for i in todo])]
    with tqdm(total=len(trials), initial=len(records), desc=desc, unit="trial", disable=not progress) as bar:
        n = stopping_point()
        for j, record in executor.map(task, [trials[i] for i in todo]) if n is None else ():
            records[todo[j]] = record
            if trial_dir is not None:
                write_json(trial_dir / f"{record.key}.json", asdict(record))
            bar.update()
            bar.set_postfix(
                success=f"{sum(r.success for r in records.values())}/{len(records)}", last=f"{record.rouge_recall:.2f}"
            )
            n = stopping_point()
            if n is not None:
                break
    return [records[i] for i in range(n if n is not None else len(trials))]


def run_trials_together(
    trials: Sequence[Trial],
    task: Callable[..., Iterator[tuple[int, tuple[int, R]]]],
    record_type: type[R],
    executor,
    runs: Sequence[tuple[str | Path | None, dict[str, Any]]],
    *,
    resume: bool = False,
    desc: str = "trials",
    progress: bool = True,
) -> list[list[R]]:
    """Several runs over the same trials by one task that answers a trial for all of them at
    once (conditions sharing a prefill, see `rh_lens.model.generation.decode_conditions`).
    `runs`: each run's (output directory or None, settings), saved and resumed exactly as
    `run_trials` saves one run, so each can also be resumed alone. `task(model, trials,
    wanted=...)` yields (index, (run, record)); `wanted` maps each trial's key to the runs it
    is still missing. Records come back per run, in trial order."""
    with ExitStack() as stack:
        done = []
        for out_dir, settings in runs:
            if out_dir is not None:
                stack.enter_context(run_directory(out_dir, resume))
            done.append({} if out_dir is None else _prepare(Path(out_dir), settings, resume, record_type, trials))
        records = [{i: saved[t.key] for i, t in enumerate(trials) if t.key in saved} for saved in done]
        todo = [i for i in range(len(trials)) if any(i not in r for r in records)]
        todo = [todo[j] for j in prefix_order([trials[i].prompt_ids for i in todo])]
        wanted = {trials[i].key: [run for run, r in enumerate(records) if i not in r] for i in todo}
        with tqdm(
            total=len(trials) * len(runs), initial=sum(map(len, records)), desc=desc, unit="answer", disable=not progress
        ) as bar:
            for j, (run, record) in executor.map(partial(task, wanted=wanted), [trials[i] for i in todo]):
                records[run][todo[j]] = record
                if runs[run][0] is not None:
                    write_json(Path(runs[run][0]) / "trials" / f"{record.key}.json", asdict(record))
                bar.update()
    return [[r[i] for i in range(len(trials))] for r in records]


def _prepare(out_dir: Path, settings: dict[str, Any], resume: bool, record_type, trials: Sequence[Trial]) -> dict:
    """Record the run's settings; on resume, check they match and load the finished trials,
    each checked against the prompt it would be run on now."""
    manifest, trial_dir = out_dir / "run.json", out_dir / "trials"
    saved = sorted(trial_dir.glob("*.json")) if trial_dir.is_dir() else []
    if not resume:
        if saved:
            raise RunDirectoryError(
                f"{out_dir} already holds trials of a run: pass resume=True (--resume) or use a new directory"
            )
        write_json(manifest, settings)
        return {}
    if not manifest.exists():
        if saved:
            raise RunDirectoryError(
                f"cannot resume {out_dir}: its run.json is gone, so the settings of its {len(saved)} saved trials are "
                f"unknown; start again with --overwrite, or use a new directory"
            )
        write_json(manifest, settings)
        return {}
    previous = read_json(manifest, "run.json")
    if _trial_settings(previous) != _trial_settings(json.loads(json.dumps(settings))):
        raise RunDirectoryError(f"cannot resume {out_dir}: its settings differ ({_difference(previous, settings)})")
    if previous != json.loads(json.dumps(settings)):
        write_json(manifest, settings)  # only what describes the split changed: record it as checked now
    done = {}
    for file in saved:
        try:
            record = record_type.from_json(read_json(file, "trial record"))
        except (TypeError, KeyError, AttributeError) as e:
            raise ResultsFileError(f"{file}: a damaged trial record ({e}); delete it to run that trial again") from None
        done[record.key] = record
    for trial in trials:
        record = done.get(trial.key)
        if record is not None and record.prompt_sha256 is not None and record.prompt_sha256 != trial.prompt_sha256:
            raise RunDirectoryError(
                f"cannot resume {out_dir}: trial {trial.key} was run on another prompt than it would be now "
                f"(the haystack, needles or tokenizer changed); start again with --overwrite, or use a new directory"
            )
    return done


# Settings that describe a run's trials against another run's (the held-out check and the
# needle or question text it reads) and not the trials themselves: a run started before they
# were recorded resumes, each saved trial still checked against its prompt.
SPLIT_KEYS = (
    "needle_content",
    "question_content",
    "ranked_on",
    "shared_with_ranking",
    "heldout",
    "shares_nothing",
    "split_check",
)


def _trial_settings(settings: Any) -> Any:
    return {k: v for k, v in settings.items() if k not in SPLIT_KEYS} if isinstance(settings, dict) else settings


def _difference(previous: Any, settings: dict[str, Any]) -> str:
    """The settings that differ, as `name: saved -> now`."""
    now = json.loads(json.dumps(settings))
    if not isinstance(previous, dict):
        return f"run.json holds {type(previous).__name__}"
    keys = [k for k in sorted(set(previous) | set(now)) if previous.get(k) != now.get(k)]
    return "; ".join(f"{k}: {previous.get(k)!r} -> {now.get(k)!r}" for k in keys)
