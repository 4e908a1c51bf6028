"""NIAH under an intervention: the experiment that masking, KV compression and every later
way of acting on heads share.

An `Intervention` is a small object that acts on a model through TransformerLens hooks, as a
kvpress press acts on a model: `hooks(model)` gives the (hook point, function) pairs, and
`with intervention(model): ...` applies them to every forward pass inside the block. With
`decode_only` the experiment applies them at decode steps only (the prompt is read as it is,
as a cache compressed after prefill behaves). Each kind lives in its own file (masking.py,
compression.py) and registers itself by its `kind`, so results files name it and read it back.

The experiment: conditions (a name, an intervention or none, metadata) x trials -> one graded
`NiahRecord` per trial (`run_conditions`), each condition resumable under
`<out>/conditions/<name>/`; conditions that read the prompt unchanged (`decode_only`, or
none) share each trial's prefill (`evaluate_together`). `InterventionResult.summary` gives
one row per group of conditions (the seeds of one random draw form a group), each mean with
its 95% interval over trials, and `InterventionResult.paired` / `comparisons` test two
groups on the same trials (`rh_lens.uncertainty`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from jaxtyping import Float
from transformer_lens import HookedTransformer

from rh_lens.detection.scoring import copy_scores
from rh_lens.errors import InputError, ResultsFileError
from rh_lens.execution.files import read_json, write_json
from rh_lens.execution.options import RunOptions
from rh_lens.execution.runs import InProcess, run_directory, run_trials, run_trials_together
from rh_lens.heads import Head
from rh_lens.model.generation import Decoding, Generation, decode_conditions
from rh_lens.model.loading import dtype_name
from rh_lens.model.tl_internals import Hook
from rh_lens.tasks.grading import (
    RESPONSE_CLASSES,
    Answer,
    NiahRecord,
    answer_trials,
    decoding_for,
    grade,
    outcome,
    recall_grid,
)
from rh_lens.tasks.niah import Trial
from rh_lens.uncertainty import CONFIDENCE, PairedTest, bootstrap_interval, paired_test, wilson

KINDS: dict[str, type[Intervention]] = {}  # kind -> class, filled as each kind's module is imported


class Intervention:
    """Acts on a model through hooks. A subclass sets `kind`, implements `hooks(model)` and
    `to_json()` / `from_json(data)`, and has a `decode_only` field."""

    kind: ClassVar[str]
    decode_only: bool = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "kind" in cls.__dict__:
            KINDS[cls.kind] = cls

    def hooks(self, model: HookedTransformer) -> list[Hook]:
        raise NotImplementedError

    def check(self, model: HookedTransformer) -> None:
        """Refuse a model this intervention does not fit (before any trial runs)."""

    def decoding(self, decoding: Decoding) -> Decoding:
        """How trials are decoded under this intervention (a real compressed cache changes
        the cache itself, not only hooks)."""
        return decoding

    def to_json(self) -> dict[str, Any]:
        """`{"kind": ..., ...}`: what `intervention_from_json` reads back."""
        raise NotImplementedError

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Intervention:
        raise NotImplementedError

    @contextmanager
    def __call__(self, model: HookedTransformer) -> Iterator[HookedTransformer]:
        """Apply the hooks to every forward pass inside the block, at every position."""
        with model.hooks(fwd_hooks=self.hooks(model)):
            yield model


def intervention_from_json(data: dict[str, Any]) -> Intervention:
    """The intervention a results file describes, of whichever registered kind."""
    kind = data.get("kind")
    if kind not in KINDS:
        raise InputError(f"unknown intervention kind {kind!r} (known: {', '.join(KINDS)})")
    return KINDS[kind].from_json(data)


def check_shape(what: str, n_layers: int, n_heads: int, model: HookedTransformer) -> None:
    """Refuse head scores or a head set made for another architecture."""
    if (n_layers, n_heads) != (model.cfg.n_layers, model.cfg.n_heads):
        raise InputError(f"{what} are for {n_layers} x {n_heads} heads, the model has {model.cfg.n_layers} x {model.cfg.n_heads}")


def answer_under(
    intervention: Intervention | None,
    decoding: Decoding,
    model: HookedTransformer,
    trials: Sequence[Trial],
    score_heads: bool = False,
) -> Iterator[tuple[int, NiahRecord]]:
    """Trials answered under `intervention` (None: the model as it is), (index, record) as
    each answer ends: a task an executor can ship to a worker (see `execution.runs.run_trials`).
    `score_heads`: each record carries every head's copy score on its trial."""
    hooks = intervention.hooks(model) if intervention is not None else []
    decode_only = intervention is not None and intervention.decode_only
    decoding = intervention.decoding(decoding) if intervention is not None else decoding
    with model.hooks(fwd_hooks=[] if decode_only else hooks):
        answers = answer_trials(model, trials, decoding, record_attention=score_heads, decode_hooks=hooks if decode_only else ())
        for i, answer, generation in answers:
            yield i, _niah_record(answer, trials[i], generation if score_heads else None)


def reads_prompt_unchanged(intervention: Intervention | None) -> bool:
    """Whether the model reads a prompt as it is under `intervention` (none, or one that acts
    from the first decode step on): such conditions can share each trial's prefill."""
    return intervention is None or intervention.decode_only


def answer_under_each(
    interventions: Sequence[Intervention | None],
    decoding: Decoding,
    model: HookedTransformer,
    trials: Sequence[Trial],
    wanted: dict[str, list[int]] | None = None,
    score_heads: bool = False,
) -> Iterator[tuple[int, tuple[int, NiahRecord]]]:
    """Trials answered under each of `interventions` (all `reads_prompt_unchanged`), every
    trial prefilled once for all of them (`decode_conditions`): (index, (intervention's
    place, record)); `wanted[trial key]`: the interventions still to run on it (default all).
    Each record is the one `answer_under` gives under that intervention alone."""
    decoding = decoding_for(trials, decoding)
    conditions = [(decoding, []) if i is None else (i.decoding(decoding), i.hooks(model)) for i in interventions]
    runs = None if wanted is None else [wanted[trial.key] for trial in trials]
    prompts = [t.prompt_ids for t in trials]
    for i, c, generation in decode_conditions(model, prompts, conditions, runs, record_attention=score_heads):
        answer = grade(model, trials[i], generation)
        yield i, (c, _niah_record(answer, trials[i], generation if score_heads else None))


def _niah_record(answer: Answer, trial: Trial, generation: Generation | None = None) -> NiahRecord:
    """The record of a graded answer; with the `generation`'s recorded attention, every
    head's copy score on the trial too."""
    head_scores = None
    if generation is not None:
        emitted, prompt = torch.tensor(generation.tokens), torch.tensor(trial.prompt_ids)
        head_scores = copy_scores(generation.argmax_keys, emitted, prompt, trial.answer_span).tolist()
    return NiahRecord(**vars(answer), outcome=outcome(answer.rouge_recall), head_scores=head_scores)


def _checked_settings(model, intervention: Intervention | None, settings: dict[str, Any] | None) -> dict[str, Any]:
    """A condition's run settings, after refusing an intervention that does not fit the model
    (here, not in a worker)."""
    if intervention is not None:
        intervention.check(model)
        intervention.hooks(model)
    return {**(settings or {}), "intervention": intervention.to_json() if intervention is not None else None}


def evaluate(
    model: HookedTransformer,
    trials: Sequence[Trial],
    intervention: Intervention | None = None,
    *,
    out_dir: str | Path | None = None,
    options: RunOptions = RunOptions(),
    settings: dict[str, Any] | None = None,
    desc: str = "niah",
    executor=None,
) -> list[NiahRecord]:
    """The trials answered under one intervention, one resumable per-trial file each when
    `out_dir` is given. `executor`: who runs the trials (default: this process, on `model`; a
    `RayPool` runs them on Ray workers, and `model` may then be a `ModelSpec`)."""
    settings = _checked_settings(model, intervention, settings)
    task = partial(answer_under, intervention, options.decoding, score_heads=options.score_heads)
    return run_trials(
        trials,
        task,
        NiahRecord,
        executor or InProcess(model),
        out_dir=out_dir,
        resume=options.resume,
        settings=settings,
        desc=desc,
        progress=options.progress,
    )


def evaluate_together(
    model: HookedTransformer,
    trials: Sequence[Trial],
    interventions: Sequence[Intervention | None],
    *,
    out_dirs: Sequence[str | Path | None],
    options: RunOptions = RunOptions(),
    settings: dict[str, Any] | None = None,
    desc: str = "niah",
    executor=None,
) -> list[list[NiahRecord]]:
    """`evaluate` for several interventions that read the prompt unchanged, each trial
    prefilled once for all of them; each intervention's run saved (and resumable) in its own
    `out_dirs` entry with the settings `evaluate` gives it, so either way resumes the other."""
    runs = [(out, _checked_settings(model, i, settings)) for i, out in zip(interventions, out_dirs, strict=True)]
    task = partial(answer_under_each, list(interventions), options.decoding, score_heads=options.score_heads)
    executor = executor or InProcess(model)
    return run_trials_together(
        trials, task, NiahRecord, executor, runs, resume=options.resume, desc=desc, progress=options.progress
    )


@dataclass
class Condition:
    """One condition of an experiment: its `name` (unique; its trials live in
    `conditions/<name>/`), what is done to the model (None: nothing), the `group` it is
    summarised with (the seeds of one random draw share a group) and what it is (`metadata`:
    e.g. kind, K and seed, or method, full fraction, seed and KV kept)."""

    name: str
    intervention: Intervention | None
    group: str
    metadata: dict[str, Any] = field(default_factory=dict)
    records: list[NiahRecord] = field(default_factory=list)

    @property
    def seed(self) -> int | None:
        return self.metadata.get("seed")

    def mean_recall(self) -> float:
        return float(np.mean([r.rouge_recall for r in self.records])) if self.records else float("nan")

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "group": self.group,
            "metadata": self.metadata,
            "intervention": self.intervention.to_json() if self.intervention is not None else None,
            "records": [vars(r) for r in self.records],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Condition:
        intervention = intervention_from_json(data["intervention"]) if data["intervention"] is not None else None
        records = [NiahRecord.from_json(r) for r in data["records"]]
        return cls(data["name"], intervention, data["group"], data["metadata"], records)


@dataclass
class InterventionResult:
    """An experiment's conditions with their records. `experiment` names it ("ablation",
    "compression"); its file format is `rh_lens.<experiment>/2`."""

    experiment: str
    model: str
    conditions: list[Condition]
    settings: dict[str, Any] = field(default_factory=dict)
    baseline: ClassVar[str] = "none"  # the group acted on by nothing: what `retained` compares with

    def groups(self) -> dict[str, list[Condition]]:
        groups: dict[str, list[Condition]] = {}
        for condition in self.conditions:
            groups.setdefault(condition.group, []).append(condition)
        return groups

    def per_trial(self, group: str) -> tuple[dict[str, float], dict[str, float]]:
        """(recall, success) per trial key of a group, each averaged over the group's seeds:
        the trial, not the (trial, seed) pair, is what a mean is taken over."""
        conditions = self.groups().get(group)
        if not conditions:
            raise InputError(f"no condition group {group!r} (groups: {', '.join(self.groups())})")
        recall: dict[str, list[float]] = {}
        success: dict[str, list[float]] = {}
        for condition in conditions:
            for r in condition.records:
                recall.setdefault(r.key, []).append(r.rouge_recall)
                success.setdefault(r.key, []).append(float(r.success))
        return {k: float(np.mean(v)) for k, v in recall.items()}, {k: float(np.mean(v)) for k, v in success.items()}

    def summary(self) -> list[dict[str, Any]]:
        """One row per group: its metadata (numbers that differ between seeds averaged), mean
        ROUGE-1 recall (mean and spread over seeds; `n_seeds` None for an unseeded group),
        retrieved, no-answer-word and response-class rates; `retained`: of the trials the
        baseline answered right, the fraction still answered right (None without a baseline).
        Read on closed-book questions, `retained` is the accuracy a model keeps on what it knew.
        Intervals (95%, over the `n_trials` trials, seeds averaged per trial first):
        `recall_interval` a percentile bootstrap, `success_interval` Wilson's (a bootstrap for
        a seeded group), `retained_interval` Wilson's over the baseline's right trials."""
        groups = self.groups()
        right = {r.key for c in groups.get(self.baseline, []) for r in c.records if r.success}
        rows = []
        for group, conditions in groups.items():
            per_seed = [c.mean_recall() for c in conditions]
            records = [r for c in conditions for r in c.records]
            seeded = any(c.seed is not None for c in conditions)
            recall, success = self.per_trial(group) if records else ({}, {})
            kept = [success[k] for k in sorted(right) if k in success]  # sorted: a seeded bootstrap, run to run
            rows.append(
                {
                    "condition": group,
                    **_shared_metadata(conditions),
                    "mean_recall": float(np.mean(per_seed)),
                    "std_over_seeds": float(np.std(per_seed)) if len(per_seed) > 1 else 0.0,
                    "n_seeds": len(conditions) if seeded else None,
                    "n_trials": len(recall),
                    "recall_interval": _listed(bootstrap_interval(list(recall.values()))),
                    "success_rate": float(np.mean([r.success for r in records])),
                    "success_interval": _listed(_rate_interval(list(success.values()))),
                    "absent_rate": float(np.mean([r.outcome == "absent" for r in records])),
                    "retained": float(np.mean([r.success for r in records if r.key in right])) if right else None,
                    "retained_interval": _listed(_rate_interval(kept)) if right else None,
                    "n_baseline_right": len(right),
                    "classes": {k: float(np.mean([r.response_class == k for r in records])) for k in RESPONSE_CLASSES},
                }
            )
        return rows

    def paired(self, a: str, b: str, confidence: float = CONFIDENCE) -> PairedTest:
        """Group `a` against group `b` on the trials both ran (see `rh_lens.uncertainty.paired_test`)."""
        (recall_a, success_a), (recall_b, success_b) = self.per_trial(a), self.per_trial(b)
        return paired_test(recall_a, recall_b, names=(a, b), success_a=success_a, success_b=success_b, confidence=confidence)

    def copy_score(self, group: str, heads: Sequence[Head]) -> tuple[float, list[float] | None] | None:
        """How much `heads` copy under a group: per trial, their mean copy score (the
        retrieval score's per-trial term, from records with `head_scores`), seeds averaged
        per trial, then the mean over every trial (not only the retrieved ones, which a
        condition changes) with its 95% bootstrap interval; None when no record has scores."""
        per_trial: dict[str, list[float]] = {}
        for condition in self.groups().get(group, []):
            for r in condition.records:
                if r.head_scores is not None:
                    per_trial.setdefault(r.key, []).append(float(np.mean([r.head_scores[h.layer][h.head] for h in heads])))
        if not per_trial:
            return None
        means = [float(np.mean(per_trial[k])) for k in sorted(per_trial)]
        return float(np.mean(means)), _listed(bootstrap_interval(means))

    def drops(self, group: str) -> dict[tuple[str | None, int | None, int | None], float]:
        """Per problem (needle, context length, depth), the recall lost from the baseline to
        `group` (seeds averaged): the problem, not the trial key, so that two runs asking the
        same problems another way (a chain of thought, answer-only) pair up."""
        none, masked = self.per_trial(self.baseline)[0], self.per_trial(group)[0]
        where = {r.key: (r.needle_id, r.context_length, r.depth) for c in self.conditions for r in c.records}
        return {where[k]: none[k] - masked[k] for k in sorted(none.keys() & masked.keys())}

    def comparison_pairs(self) -> list[tuple[str, str]]:
        """The (a, b) group pairs a table of this experiment claims something about: every
        group against the baseline. Subclasses add their own (top-K against random-K, ...)."""
        return [(group, self.baseline) for group in self.groups() if group != self.baseline and self.baseline in self.groups()]

    def comparisons(self, confidence: float = CONFIDENCE) -> list[PairedTest]:
        """`paired` for every pair of `comparison_pairs`."""
        return [self.paired(a, b, confidence) for a, b in self.comparison_pairs()]

    def recall_grid(self, group: str) -> tuple[list[int], list[int], Float[np.ndarray, "depth length"]]:
        """Mean recall per (depth, length) over needles (and seeds) of a group: the paper's NIAH heatmap."""
        return recall_grid([r for c in self.groups()[group] for r in c.records])

    @property
    def decode_only(self) -> bool:
        return bool(self.settings.get("decode_only"))

    def to_json(self) -> dict[str, Any]:
        return {
            "format": f"rh_lens.{self.experiment}/2",
            "experiment": self.experiment,
            "model": self.model,
            "settings": self.settings,
            "conditions": [c.to_json() for c in self.conditions],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> InterventionResult:
        conditions = [Condition.from_json(c) for c in data["conditions"]]
        return cls(data["experiment"], data["model"], conditions, data.get("settings", {}))

    @classmethod
    def load(cls, path: str | Path) -> InterventionResult:
        data = read_json(path, "results file")
        try:
            return cls.from_json(data)
        except (KeyError, TypeError, ValueError) as e:
            raise ResultsFileError(f"{path}: not an rh_lens {cls.__name__} file ({type(e).__name__}: {e})") from None


def cost_difference(
    a: InterventionResult, b: InterventionResult, group: str, names: tuple[str, str] = ("a", "b"), confidence: float = CONFIDENCE
) -> PairedTest:
    """Whether `group` (top-5 masked, ...) costs run `a` more recall than run `b`, on the same
    problems asked two ways (the paper's chain-of-thought claim: `a` with a worked chain of
    thought, `b` answer-only). Paired per problem (`InterventionResult.drops`): a's drop minus
    b's, bootstrap interval and sign-flip p as `paired_test`; the verdict reads
    "<a> > <b>" when a loses more."""
    drops_a, drops_b = a.drops(group), b.drops(group)
    return paired_test(
        {str(k): v for k, v in drops_a.items()},
        {str(k): v for k, v in drops_b.items()},
        names=(f"{names[0]} drop {group}", f"{names[1]} drop {group}"),
        confidence=confidence,
    )


def cost_differences(a: InterventionResult, b: InterventionResult, names: tuple[str, str] = ("a", "b")) -> list[PairedTest]:
    """`cost_difference` for every masked group (not the baseline) that both runs have."""
    groups = [g for g in a.groups() if g != a.baseline and g in b.groups()]
    return [cost_difference(a, b, group, names) for group in groups]


def _listed(interval: tuple[float, float] | None) -> list[float] | None:
    return None if interval is None else list(interval)  # as it reads back from JSON


def _rate_interval(successes: Sequence[float]) -> tuple[float, float] | None:
    """Wilson's interval of per-trial successes that are whole (1/0); a bootstrap when
    they are fractions (seeds averaged per trial)."""
    if all(s in (0.0, 1.0) for s in successes):
        return wilson(int(sum(successes)), len(successes))
    return bootstrap_interval(successes)


def _shared_metadata(conditions: Sequence[Condition]) -> dict[str, Any]:
    """The metadata of a group: the first condition's less its seed; numbers that differ
    between the conditions are averaged."""
    shared = {k: v for k, v in conditions[0].metadata.items() if k != "seed"}
    for key, value in shared.items():
        values = [c.metadata.get(key) for c in conditions]
        if isinstance(value, (int, float)) and not isinstance(value, bool) and len(set(values)) > 1:
            shared[key] = float(np.mean(values))
    return shared


def saved_conditions(out_dir: str | Path, planned: Sequence[Condition]) -> list[Condition]:
    """The planned conditions of a run still going (or stopped) with the records its trials
    have saved so far under `<out_dir>/conditions/<name>/trials/`; those with none left out.
    A table read from it is of fewer trials than planned: `summary`'s `n_trials` says so."""
    found = []
    for condition in planned:
        paths = sorted((Path(out_dir) / "conditions" / condition.name / "trials").glob("*.json"))
        if paths:
            records = [NiahRecord.from_json(read_json(p, "trial file")) for p in paths]
            found.append(Condition(condition.name, condition.intervention, condition.group, condition.metadata, records))
    return found


def run_conditions(
    model: HookedTransformer,
    trials: Sequence[Trial],
    conditions: Sequence[Condition],
    *,
    experiment: str,
    out_dir: str | Path | None = None,
    options: RunOptions = RunOptions(),
    settings: dict[str, Any] | None = None,
    executor=None,
    result_type: type[InterventionResult] = InterventionResult,
) -> InterventionResult:
    """Every condition over every trial; each condition's trials saved (and resumed) under
    `<out_dir>/conditions/<name>/`, the whole result in `<out_dir>/<experiment>.json`. With
    `options.share_prefix`, the conditions that read the prompt unchanged (none, decode-only
    interventions) run together, each trial prefilled once for all of them; the records are
    those of running each alone."""
    names = [c.name for c in conditions]
    if len(set(names)) != len(names):
        raise InputError(f"condition names must be unique, got {names}")
    executor = executor or InProcess(model)
    settings = {**(settings or {}), "max_new_tokens": options.max_new_tokens, "dtype": dtype_name(model)}
    if options.chunk_size is not None:
        settings["chunk_size"] = options.chunk_size
    if options.score_heads:  # a resumed run must record what its saved trials recorded
        settings["score_heads"] = True

    def where(condition: Condition) -> Path | None:
        return Path(out_dir) / "conditions" / condition.name if out_dir is not None else None

    # Conditions that read the prompt unchanged share each trial's prefill (with prefix sharing on).
    together = [c for c in conditions if reads_prompt_unchanged(c.intervention)] if options.share_prefix else []
    together = together if len(together) > 1 else []
    with run_directory(out_dir, options.resume) if out_dir is not None else nullcontext():
        for condition in conditions:
            if not any(condition is c for c in together):
                condition.records = evaluate(
                    model,
                    trials,
                    condition.intervention,
                    options=options,
                    settings=settings,
                    desc=condition.name,
                    executor=executor,
                    out_dir=where(condition),
                )
        if together:
            shared = evaluate_together(
                model,
                trials,
                [c.intervention for c in together],
                out_dirs=[where(c) for c in together],
                options=options,
                settings=settings,
                desc=f"{len(together)} conditions, one prefill",
                executor=executor,
            )
            for condition, records in zip(together, shared):
                condition.records = records
        result = result_type(experiment, model.cfg.model_name, list(conditions), settings)
        if out_dir is not None:
            write_json(Path(out_dir) / f"{experiment}.json", result.to_json())
    return result
