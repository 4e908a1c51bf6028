"""One function per `rh-lens` command: load what it needs, compute, save, return.

Each takes plain values (a model name or a loaded model, a `Grid`, paths) and returns the
result with the paths it wrote, so the command line, experiments/ and notebooks run the
very same steps; printing is left to the caller (`rh_lens.app.reports` formats the tables).
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
from transformer_lens import HookedTransformer

from rh_lens.analysis.analyses import ACTIVATION_THRESHOLD, TOP_K, Analysis, Comparison, analyze, compare
from rh_lens.analysis.atlas import Atlas, AtlasOptions, build_atlas, effects
from rh_lens.app.reports import (
    save_ablation,
    save_analysis,
    save_atlas,
    save_comparison,
    save_compression,
    save_detection,
    save_finetune,
    save_patching,
    save_run_comparison,
    save_steering,
)
from rh_lens.detection.records import DetectionResult, load_results
from rh_lens.detection.run import detect
from rh_lens.detection.scoring import DEFAULT_THRESHOLD
from rh_lens.errors import InputError
from rh_lens.execution.files import read_json
from rh_lens.execution.options import RunOptions
from rh_lens.execution.runs import run_directory
from rh_lens.interventions.base import InterventionResult, cost_differences
from rh_lens.interventions.compression import CompressionOptions, CompressionResult, compression_experiment
from rh_lens.interventions.head_tuning import FinetuneArms, FinetuneExperimentResult, finetune_experiment
from rh_lens.interventions.masking import AblationResult, MaskingOptions, ablation_experiment, ks_for_thresholds
from rh_lens.interventions.patching import (
    METRICS,
    PatchingOptions,
    PatchingResult,
    activation_patching,
    document_patching_pair,
    effect_vs_score,
    patching_pair,
)
from rh_lens.interventions.steering import SteeringOptions, SteeringResult, steering_experiment
from rh_lens.model.loading import check_cache_of, load_model, load_model_spec
from rh_lens.tasks.arithmetic import ArithmeticGrid
from rh_lens.tasks.data import haystack_name, load_haystack
from rh_lens.tasks.documents import QAGrid
from rh_lens.tasks.needles import Needle
from rh_lens.tasks.niah import PROMPTS, Grid, tokenize_haystack
from rh_lens.tasks.splits import check_split, offences, refusal, shared_items, split_of
from rh_lens.uncertainty import PairedTest

logger = logging.getLogger(__name__)


def _model(model: str | HookedTransformer, options: RunOptions, checkpoint: int | None = None) -> HookedTransformer:
    if isinstance(model, (str, Path)):
        return load_model(
            model, device=options.device, dtype=options.dtype, verify_cache=options.verify_cache, checkpoint=checkpoint
        )
    if checkpoint is not None:
        raise InputError("a training checkpoint is loaded from a model name: give the name, not a loaded model")
    return model


@contextmanager
def _executor(model, options: RunOptions, checkpoint: int | None = None):
    """(the model, or its spec when workers hold it; the executor: None = this process)."""
    if not options.workers:
        yield _model(model, options, checkpoint), None
        return
    if checkpoint is not None:
        raise InputError("training checkpoints are not loaded by Ray workers: run without --workers")
    if not isinstance(model, (str, Path)):
        raise InputError("workers load the model themselves: give its name or path, not a loaded model")
    from rh_lens.execution.distributed import RayPool

    if options.verify_cache:
        check_cache_of(str(model))
    with RayPool(str(model), options.workers, options.ray_address, options.device, options.dtype) as pool:
        yield load_model_spec(model, pool.device, pool.dtype), pool


def _ranking(
    scores: str | Path | DetectionResult, grid: Grid | QAGrid, heldout: bool = False, other_haystack: bool = False
) -> tuple[DetectionResult, dict[str, Any]]:
    """The detection result that ranks the heads, and the run's settings with the split the
    ranking came from: read first, so bad input fails before a model loads. Evaluating on
    trials that share content with the ranking's is a warning, and with `heldout` an error
    (see `_split_check`)."""
    detection = scores if isinstance(scores, DetectionResult) else load_results(scores)
    settings = {**grid.settings(), "scores": str(scores) if not isinstance(scores, DetectionResult) else detection.model}
    return detection, settings | _split_check(detection.settings, settings, heldout, settings["scores"], other_haystack)


def _split_check(
    ranked: dict[str, Any], evaluated: dict[str, Any], heldout: bool, source: str, other_haystack: bool = False
) -> dict[str, Any]:
    """Which split a ranking came from and what an evaluation shares with it, by content
    (`rh_lens.tasks.splits.check_split`: the same item, question or answer, a near-duplicate
    needle, a gold paragraph or article in common; the same haystack too with
    `other_haystack`, which implies `heldout`). A violation is a warning, and with `heldout`
    an error; so is, with `heldout`, a ranking that does not record its trials or whose
    content is unknown. Recorded: `ranked_on`, `shared_with_ranking` (ids), `heldout` (asked
    for, hence checked), `shares_nothing` (what the check found) and `split_check`."""
    heldout = heldout or other_haystack
    ranked_on = split_of(ranked)
    shared = shared_items(ranked_on, split_of(evaluated))
    check = check_split(ranked, evaluated, other_haystack=other_haystack)
    if not check["split_known"]:
        if heldout:
            raise InputError(f"--heldout: {source} does not record the trials its ranking came from")
    elif check["violations"]:
        if heldout:
            raise InputError(refusal(check, ranked_on, evaluated))
        failed = check["violations"]
        if "same_item" in failed:
            what = f"{len(shared)} of the ranking's own {'needles' if ranked_on['task'] == 'niah' else 'questions'}"
        else:
            what = f"trials that fail the split check {', '.join(failed)} ({offences(check['checks'][failed[0]])})"
        logger.warning(f"warning: evaluating on {what}: the result is in-grid, not held out (--heldout refuses this)")
    elif check["content_unknown"] and heldout:
        unknown = check["content_unknown"]
        raise InputError(
            f"--heldout: {source} records {len(unknown)} of its needles or questions by id only "
            f"({', '.join(unknown[:3])}{', ...' if len(unknown) > 3 else ''}) and neither the built-in needles nor "
            f"RULER's data hold them: their content is unknown, so a near-duplicate cannot be ruled out; detect again "
            f"with this version of rh-lens"
        )
    return {
        "ranked_on": ranked_on,
        "shared_with_ranking": shared,
        "heldout": heldout,
        "shares_nothing": check["passed"],
        "split_check": check,
    }


def detect_grid(
    model: str | HookedTransformer,
    grid: Grid | QAGrid,
    out: str | Path,
    *,
    options: RunOptions = RunOptions(),
    threshold: float = DEFAULT_THRESHOLD,
    until_stable: int | None = None,
    patience: int | None = None,
    order_seed: int = 0,
    checkpoint: int | None = None,
) -> tuple[DetectionResult, list[Path]]:
    """`rh-lens detect`: the grid's trials, every head scored, saved with `save_detection`.
    The output directory is checked and locked, and the haystacks read, before the model loads.
    `options.workers`: run the trials on that many Ray workers (a local Ray instance, or the
    cluster at `options.ray_address`), each holding the model; the scores are those of a run
    in one process.
    `until_stable`, `patience`, `order_seed`: adaptive detection (see `detect`). `checkpoint`:
    a training step of a model published with its checkpoints (see `load_model`)."""
    if isinstance(grid, ArithmeticGrid):
        raise InputError(
            "arithmetic trials have no answer span to score (the answer is computed, not copied): detect on "
            "NIAH or documents, then ablate on arithmetic"
        )
    if isinstance(grid, QAGrid) and grid.is_closed_book:
        raise InputError("closed-book questions have no document to copy an answer from: detect on niah, squad or hotpotqa")
    settings = grid.settings()  # reads the haystacks: a missing one fails before anything else
    if checkpoint is not None:
        settings["checkpoint"] = checkpoint
    with run_directory(out, options.resume, options.overwrite), _executor(model, options, checkpoint) as (model, executor):
        trials = grid.trials(model.tokenizer, model.cfg.n_ctx)
        result = detect(
            model,
            trials,
            out,
            options=options,
            threshold=threshold,
            settings=settings,
            executor=executor,
            until_stable=until_stable,
            patience=patience,
            order_seed=order_seed,
        )
        return result, save_detection(result, out)


def _grid_run(model, grid: Grid | QAGrid | ArithmeticGrid, out: str | Path, options: RunOptions, experiment, save):
    """Hold `out`, load the model (or start its workers), make the grid's trials, run
    `experiment(model, trials, executor=...)` and save its result with `save(result, out)`."""
    with run_directory(out, options.resume, options.overwrite), _executor(model, options) as (model, executor):
        result = experiment(model, grid.trials(model.tokenizer, model.cfg.n_ctx), executor=executor)
        return result, save(result, out)


def ablate_grid(
    model: str | HookedTransformer,
    scores: str | Path | DetectionResult,
    grid: Grid | QAGrid,
    out: str | Path,
    *,
    masking: MaskingOptions = MaskingOptions(),
    heldout: bool = False,
    other_haystack: bool = False,
    options: RunOptions = RunOptions(),
) -> tuple[AblationResult, list[Path]]:
    """`rh-lens ablate`: the grid with no masking, the top-K heads of `scores` masked and K
    random others masked (`masking`: see `MaskingOptions`), saved with `save_ablation`.
    `masking.thresholds`: instead of K, mask the heads at or above each threshold (the paper's
    0.1 is a choice: what does it change?). `heldout`: refuse a grid that shares needles or
    questions with the ranking's detection run, by content (the same question or answer, a
    near-duplicate needle, a gold paragraph or article in common: see `_split_check`);
    `other_haystack`: `heldout`, and the haystack must differ too. `options`: as for `detect_grid`."""
    detection, settings = _ranking(scores, grid, heldout, other_haystack)
    if masking.thresholds:
        by_threshold = ks_for_thresholds(detection, masking.thresholds)
        ks = sorted({k for k in by_threshold.values() if k > 0})
        if not ks:
            raise InputError(f"no head scores at or above any of the thresholds {', '.join(map(str, masking.thresholds))}")
        settings["thresholds"] = {str(t): k for t, k in by_threshold.items()}
        masking = replace(masking, ks=tuple(ks), thresholds=None)
    run = partial(ablation_experiment, detection=detection, masking=masking, out_dir=out, options=options, settings=settings)
    return _grid_run(model, grid, out, options, run, save_ablation)


def steer_grid(
    model: str | HookedTransformer,
    scores: str | Path | DetectionResult,
    grid: Grid | QAGrid,
    out: str | Path,
    *,
    steering: SteeringOptions = SteeringOptions(),
    heldout: bool = False,
    other_haystack: bool = False,
    options: RunOptions = RunOptions(),
) -> tuple[SteeringResult, list[Path]]:
    """`rh-lens steer`: the grid with no intervention, the top-K heads of `scores` boosted at
    each factor and K random others boosted by the same factor (`steering`: see
    `SteeringOptions`), saved with `save_steering`. `heldout`, `other_haystack`: as for `ablate_grid`."""
    detection, settings = _ranking(scores, grid, heldout, other_haystack)
    run = partial(steering_experiment, detection=detection, steering=steering, out_dir=out, options=options, settings=settings)
    return _grid_run(model, grid, out, options, run, save_steering)


def finetune_grid(
    model: str | HookedTransformer,
    scores: str | Path | DetectionResult,
    train: Grid | QAGrid,
    evaluation: Grid | QAGrid,
    out: str | Path,
    *,
    arms: FinetuneArms = FinetuneArms(),
    general_text: str = "pydoc",
    options: RunOptions = RunOptions(),
) -> tuple[FinetuneExperimentResult, list[Path]]:
    """`rh-lens finetune`: each arm (the top-K heads of `scores`, K random heads, LoRA of the
    same size) trained from fresh weights on the answers of `train`'s trials, then judged on
    `evaluation`'s, which must share nothing with the training trials nor with the ranking's
    (checked by content, as `ablate --heldout`: refused otherwise), and on the first 1,024
    tokens of `general_text` (a haystack name or path: forgetting). Saved with `save_finetune`."""
    detection, settings = _ranking(scores, evaluation, heldout=True)
    training = _split_check(train.settings(), evaluation.settings(), True, "the training grid")
    if options.workers:
        raise InputError("fine-tuning runs in one process: leave out --workers")
    text = load_haystack(general_text)
    with run_directory(out, options.resume, options.overwrite):
        base = _model(model, options)
        train_trials = train.trials(base.tokenizer, base.cfg.n_ctx)
        evaluation_trials = evaluation.trials(base.tokenizer, base.cfg.n_ctx)
        tokens = torch.tensor(tokenize_haystack(base.tokenizer, text, 1024 + 200)[:1024])
        models = iter([base])

        def load() -> HookedTransformer:  # the loaded model first, then fresh copies for each arm
            return next(models, None) or _model(model, options)

        result = finetune_experiment(load, detection, train_trials, evaluation_trials, tokens, arms, out_dir=out, options=options)
        result.settings |= settings | {"train_split_check": training.get("split_check")}
        return result, save_finetune(result, out)


def compress_grid(
    model: str | HookedTransformer,
    scores: str | Path | DetectionResult,
    grid: Grid | QAGrid,
    out: str | Path,
    *,
    compression: CompressionOptions = CompressionOptions(),
    heldout: bool = False,
    other_haystack: bool = False,
    options: RunOptions = RunOptions(),
) -> tuple[CompressionResult, list[Path]]:
    """`rh-lens compress`: the grid under the full cache and, at each fraction of KV heads kept
    full, the retrieval-head policy, random KV heads (one per seed), StreamingLLM at the same
    bytes and RazorAttention's heads (`compression`: see `CompressionOptions`); saved with
    `save_compression`. `heldout`, `other_haystack`: as for `ablate_grid`."""
    detection, settings = _ranking(scores, grid, heldout, other_haystack)
    run = partial(
        compression_experiment, detection=detection, compression=compression, out_dir=out, options=options, settings=settings
    )
    return _grid_run(model, grid, out, options, run, save_compression)


def atlas_grid(
    model: str | HookedTransformer,
    grid: Grid | QAGrid,
    evaluation: Grid | QAGrid,
    out: str | Path,
    *,
    atlas_options: AtlasOptions = AtlasOptions(),
    heldout: bool = False,
    other_haystack: bool = False,
    options: RunOptions = RunOptions(),
) -> tuple[Atlas, list[Path]]:
    """`rh-lens atlas`: every method's map on `grid`'s trials, judged on `evaluation`'s
    (`rh_lens.analysis.atlas`), saved with `save_atlas`. `heldout`, `other_haystack`: refuse
    an evaluation grid that shares needles or questions with `grid`, as for `ablate_grid`.
    `options`: as for `detect_grid` (no workers)."""
    if options.workers:
        raise InputError("the atlas runs in one process: leave out --workers")
    settings = {"detection": grid.settings(), "evaluation": evaluation.settings()}
    settings |= _split_check(settings["detection"], settings["evaluation"], heldout, "the detection grid", other_haystack)
    with run_directory(out, options.resume, options.overwrite):
        model = _model(model, options)
        trials = grid.trials(model.tokenizer, model.cfg.n_ctx)
        evaluation_trials = evaluation.trials(model.tokenizer, model.cfg.n_ctx)
        atlas = build_atlas(model, trials, evaluation_trials, out, options=atlas_options, run=options, settings=settings)
        return atlas, save_atlas(atlas, out)


@dataclass(frozen=True, kw_only=True)
class PatchTask:
    """The clean prompt `rh-lens patch` builds its pair from: `needle` in `haystack` at
    `context_length` tokens and `depth` percent, or with `document` the one question of that
    grid among its distractor paragraphs; `corrupted_answer`: the corrupted prompt's answer
    (None: the needle's built-in twin; a document question needs one of its answer's token
    length); `prompt`: the prompt style (`PROMPTS`)."""

    needle: Needle | None = None
    haystack: str = "pydoc"
    context_length: int = 1000
    depth: int = 50
    corrupted_answer: str | None = None
    prompt: str = "auto"
    document: QAGrid | None = None


def patch_needle(
    model: str | HookedTransformer,
    out: str | Path,
    task: PatchTask,
    patching: PatchingOptions = PatchingOptions(),
    *,
    scores: str | Path | None = None,
    options: RunOptions = RunOptions(),
) -> tuple[PatchingResult, dict[str, Any] | None, list[Path]]:
    """`rh-lens patch`: a clean/corrupted pair for `task`, every patch `patching` asks for, and
    with `scores` the correlation of head-output effect with retrieval score; saved with
    `save_patching`. Returns (result, correlation or None, paths)."""
    detection = load_results(scores) if scores else None  # bad input fails first
    document, haystack = task.document, task.haystack
    if document is not None:
        if document.is_closed_book or len(document.selected()) != 1:
            raise InputError("patching a real-document task takes one question with its documents (--question N)")
        if task.corrupted_answer is None:
            raise InputError("patching a real-document question needs --corrupted-answer (same token length as its answer)")
        haystack, text = document.task, None
    else:
        text = load_haystack(haystack)
    if options.resume or options.workers:
        raise InputError("patching neither resumes nor runs on workers: it is one pair of prompts")
    with run_directory(out, overwrite=options.overwrite):
        model = _model(model, options)
        if document is not None:
            pair = document_patching_pair(
                model,
                document.corpus(),
                document.selected()[0],
                task.context_length,
                task.depth,
                task.corrupted_answer,
                PROMPTS[document.prompt],
                document.seed,
                max_new_tokens=options.max_new_tokens,
            )
        else:
            pair = patching_pair(
                model,
                task.needle,
                tokenize_haystack(model.tokenizer, text, task.context_length),
                task.context_length,
                task.depth,
                task.corrupted_answer,
                PROMPTS[task.prompt],
                haystack_name(haystack),
                max_new_tokens=options.max_new_tokens,
            )
        result = activation_patching(
            model,
            pair,
            patching.heads,
            patching.kinds,
            patching.directions,
            patching.positions,
            patching.tail,
            patching.batch_size,
            METRICS[patching.metric](pair),
            progress=options.progress,
            settings={"haystack": str(haystack)}
            | ({} if document is None else {"question": document.selected()[0].id, "data_sha256": document.corpus().sha256}),
        )
        correlation = None
        if detection is not None and "head_out" in result.effects:
            correlation = effect_vs_score(result, detection, "head_out", next(iter(result.effects["head_out"])))
        return result, correlation, save_patching(result, out, correlation)


RESULT_FILES = (
    "results.json",
    "ablation.json",
    "compression.json",
    "steering.json",
    "finetune.json",
    "atlas.json",
)  # what `show` reads in a run directory


def load_any(path: str | Path) -> DetectionResult | InterventionResult | Atlas:
    """`rh-lens show`: a results file of any command (or a run directory holding one), by its
    format. An atlas written before its intervals and paired tests gets them from the
    per-trial records in `evaluation.json` beside it."""
    path = Path(path)
    if path.is_dir():
        found = [path / name for name in RESULT_FILES if (path / name).exists()]
        if not found:
            raise InputError(f"{path} is a directory with no results file in it ({', '.join(RESULT_FILES)})")
        path = found[0]
    data = read_json(path, "results file")
    kind = str(data.get("format", "")).split("/")[0] if isinstance(data, dict) else ""
    if kind == "rh_lens.ablation":
        return AblationResult.load(path)
    if kind == "rh_lens.compression":
        return CompressionResult.load(path)
    if kind == "rh_lens.steering":
        return SteeringResult.load(path)
    if kind == "rh_lens.finetune":
        return FinetuneExperimentResult.load(path)
    if kind == "rh_lens.atlas":
        atlas = Atlas.load(path)
        evaluation = path.parent / "evaluation.json"
        if not atlas.tests and evaluation.exists():
            atlas = replace(atlas, **effects(InterventionResult.load(evaluation), atlas.ks))
        return atlas
    return load_results(path)


def analyze_file(
    results: str | Path,
    out: str | Path,
    *,
    threshold: float | None = None,
    activation_threshold: float = ACTIVATION_THRESHOLD,
    overwrite: bool = False,
) -> tuple[DetectionResult, Analysis, list[Path]]:
    """`rh-lens analyze`: sparsity, dynamic activation and coverage of a results file
    (threshold None: the file's), saved with `save_analysis`."""
    result = load_results(results)
    analysis = analyze(result, result.threshold if threshold is None else threshold, activation_threshold)
    with run_directory(out, overwrite=overwrite):
        return result, analysis, save_analysis(analysis, out)


def compare_runs(
    a: str | Path, b: str | Path, out: str | Path, *, overwrite: bool = False
) -> tuple[list[PairedTest], list[Path]]:
    """`rh-lens compare` of two masking runs on the same problems asked two ways (with a chain
    of thought and answer-only, ...): for every masked group both ran, whether it costs run a
    more than run b (`cost_difference`, paired per problem), saved with `save_run_comparison`."""
    first, second = results = [load_any(a), load_any(b)]
    for path, result in zip((a, b), results):
        if not isinstance(result, AblationResult):
            raise InputError(f"{path}: not a masking run (ablation.json); compare two masking runs, or two rankings")
    # named by how they ask (cot, answer-only, ...), else by their place
    name_a, name_b = (str(r.settings.get("mode")) for r in results)
    if name_a == name_b:
        name_a, name_b = "a", "b"
    runs = {name_a: first, name_b: second}
    tests = cost_differences(first, second, names=(name_a, name_b))
    if not tests:
        raise InputError(f"{a} and {b} share no masked condition (top-K, random-K) to compare")
    with run_directory(out, overwrite=overwrite):
        return tests, save_run_comparison(tests, runs, out)


def compare_files(
    a: str | Path,
    b: str | Path,
    out: str | Path,
    *,
    top_k: int = TOP_K,
    threshold: float = DEFAULT_THRESHOLD,
    resamples: int = 0,
    overwrite: bool = False,
) -> tuple[Comparison, list[Path]]:
    """`rh-lens compare`: two results files of one architecture, saved with `save_comparison`;
    `resamples` > 0 adds bootstrap intervals (see `compare`)."""
    comparison = compare(load_results(a), load_results(b), top_k, threshold, resamples)
    with run_directory(out, overwrite=overwrite):
        return comparison, save_comparison(comparison, out)
