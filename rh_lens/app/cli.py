"""Command line: `rh-lens detect`, `show`, `ablate`, `compress`, `atlas`, `patch`, `analyze` and `compare`.

Thin: each command parses its options, calls one library function (`rh_lens.app.workflows`,
or `load_results` for `show`) and prints the table `rh_lens.app.reports` formats. User errors
(`RhLensError`) become one line on stderr and exit status 1; anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys

from rh_lens import __version__
from rh_lens.analysis.analyses import ACTIVATION_THRESHOLD, TOP_K
from rh_lens.analysis.atlas import ATLAS_METHODS, DEFAULT_METHODS, Atlas, AtlasOptions
from rh_lens.analysis.statistics import bootstrap
from rh_lens.app import workflows
from rh_lens.app.options import (
    add_decoding_arguments,
    add_grid_arguments,
    add_model_arguments,
    add_other_haystack_argument,
    add_parallel_arguments,
    add_text_arguments,
    grid_from_args,
    needle_from_args,
    non_negative_int,
    percent,
    positive_int,
    run_options_from_args,
    unit_interval,
)
from rh_lens.app.reports import (
    format_ablation,
    format_analysis,
    format_atlas,
    format_bootstrap,
    format_comparison,
    format_compression,
    format_finetune,
    format_patching,
    format_ranking,
    format_run_comparison,
    format_steering,
    format_written,
)
from rh_lens.detection.scoring import DEFAULT_THRESHOLD
from rh_lens.errors import RhLensError
from rh_lens.execution.runs import saved_trials
from rh_lens.heads import Head
from rh_lens.interventions.compression import CompressionOptions, CompressionResult
from rh_lens.interventions.head_tuning import FinetuneArms, FinetuneExperimentResult, FinetuneOptions
from rh_lens.interventions.masking import METHODS, AblationResult, MaskingOptions
from rh_lens.interventions.patching import DEFAULT_KINDS, DIRECTIONS, KINDS, METRICS, POSITIONS, PatchingOptions
from rh_lens.interventions.steering import STEERING_METHODS, SteeringOptions, SteeringResult
from rh_lens.model.generation import MAX_NEW_TOKENS
from rh_lens.tasks.arithmetic import CHAIN_OF_THOUGHT_TOKENS
from rh_lens.tasks.documents import QAGrid


def run_detect(args: argparse.Namespace) -> None:
    result, written = workflows.detect_grid(
        args.model,
        grid_from_args(args),
        args.out,
        options=run_options_from_args(args),
        threshold=args.threshold,
        until_stable=args.until_stable,
        patience=args.patience,
        order_seed=args.order_seed,
        checkpoint=args.checkpoint,
    )
    if args.until_stable:
        print(
            f"stopped after {len(result.trials)} trials: the top {args.until_stable} heads stayed the same for "
            f"{result.settings['patience']} trials (order seed {args.order_seed})"
        )
    print(format_ranking(result, args.top, args.threshold))
    print(format_written(written))


def run_show(args: argparse.Namespace) -> None:
    result = workflows.load_any(args.results)
    if isinstance(result, AblationResult):
        print(format_ablation(result))
    elif isinstance(result, CompressionResult):
        print(format_compression(result))
    elif isinstance(result, SteeringResult):
        print(format_steering(result))
    elif isinstance(result, FinetuneExperimentResult):
        print(format_finetune(result))
    elif isinstance(result, Atlas):
        print(format_atlas(result))
    elif args.ci:
        print(format_bootstrap(bootstrap(result, args.resamples, args.ci_top_k, args.confidence, args.seed), args.top))
    else:
        print(format_ranking(result, args.top, args.threshold))


def run_ablate(args: argparse.Namespace) -> None:
    result, written = workflows.ablate_grid(
        args.model,
        args.scores,
        grid_from_args(args),
        args.out,
        masking=MaskingOptions(
            ks=args.top_k,
            seeds=tuple(range(args.random_seeds)),
            method=args.method,
            decode_only=args.decode_only,
            thresholds=args.thresholds,
        ),
        heldout=args.heldout,
        other_haystack=args.other_haystack,
        options=run_options_from_args(args),
    )
    print(format_ablation(result))
    print(format_written(written))


def run_steer(args: argparse.Namespace) -> None:
    result, written = workflows.steer_grid(
        args.model,
        args.scores,
        grid_from_args(args),
        args.out,
        steering=SteeringOptions(
            ks=tuple(args.top_k),
            factors=tuple(args.factors),
            seeds=tuple(range(args.random_seeds)),
            method=args.method,
            decode_only=args.decode_only,
            score_heads=not args.no_head_scores,
        ),
        heldout=args.heldout,
        other_haystack=args.other_haystack,
        options=run_options_from_args(args),
    )
    print(format_steering(result))
    print(format_written(written))


def run_finetune(args: argparse.Namespace) -> None:
    training = FinetuneOptions(steps=args.steps, lr=args.lr, batch_size=args.train_batch, seed=args.seed)
    result, written = workflows.finetune_grid(
        args.model,
        args.scores,
        grid_from_args(args.train),
        grid_from_args(args),
        args.out,
        arms=FinetuneArms(k=args.top_k, seeds=tuple(range(args.random_seeds)), lora=not args.no_lora, training=training),
        general_text=args.text,
        options=run_options_from_args(args),
    )
    print(format_finetune(result))
    print(format_written(written))


def run_compress(args: argparse.Namespace) -> None:
    result, written = workflows.compress_grid(
        args.model,
        args.scores,
        grid_from_args(args),
        args.out,
        compression=CompressionOptions(
            fractions=tuple(args.full_fraction),
            seeds=tuple(range(args.random_seeds)),
            sink=args.sink,
            window=args.window,
            decode_only=args.decode_only,
            cache=args.cache,
        ),
        heldout=args.heldout,
        other_haystack=args.other_haystack,
        options=run_options_from_args(args),
    )
    print(format_compression(result))
    print(format_written(written))


def atlas_options_from_args(args: argparse.Namespace) -> AtlasOptions:
    """The `AtlasOptions` of parsed `atlas` arguments."""
    return AtlasOptions(
        methods=tuple(args.methods),
        head_fractions=tuple(args.head_fractions),
        random_seeds=args.random_seeds,
        full_fraction=args.full_fraction,
        sink=args.sink,
        window=args.window,
        kv_decode_only=not args.kv_windowed,
        masking=args.method,
        resamples=args.resamples,
    )


def run_atlas(args: argparse.Namespace) -> None:
    atlas, written = workflows.atlas_grid(
        args.model,
        grid_from_args(args),
        grid_from_args(args.evaluate),
        args.out,
        atlas_options=atlas_options_from_args(args),
        heldout=args.heldout,
        other_haystack=args.other_haystack,
        options=run_options_from_args(args),
    )
    print(format_atlas(atlas))
    print(format_written(written))


class _GridParser(argparse.ArgumentParser):
    """Parses the grid options inside --evaluate; a bad one is --evaluate's error."""

    def error(self, message: str):
        raise argparse.ArgumentTypeError(message)


def evaluation_grid(text: str) -> argparse.Namespace:
    """--evaluate "GRID OPTIONS": the evaluation trials, in the grid options of detect."""
    parser = _GridParser(prog="--evaluate", add_help=False)
    add_grid_arguments(parser)
    return parser.parse_args(shlex.split(text))


def run_patch(args: argparse.Namespace) -> None:
    document = None
    if args.task != "niah":
        document = QAGrid(
            args.task, (args.question, args.question + 1), prompt=args.prompt, seed=args.question_seed, data=args.data
        )
    task = workflows.PatchTask(
        needle=needle_from_args(args),
        haystack=args.haystack,
        context_length=args.context_length,
        depth=args.depth,
        corrupted_answer=args.corrupted_answer,
        prompt=args.prompt,
        document=document,
    )
    patching = PatchingOptions(
        heads=args.heads,
        kinds=args.kinds,
        directions=args.directions,
        positions=args.positions,
        metric=args.metric,
        tail=args.tail,
        batch_size=args.batch_size,
    )
    result, correlation, written = workflows.patch_needle(
        args.model, args.out, task, patching, scores=args.scores, options=run_options_from_args(args)
    )
    print(format_patching(result, args.top, correlation))
    print(format_written(written))


def run_analyze(args: argparse.Namespace) -> None:
    result, analysis, written = workflows.analyze_file(
        args.results, args.out, threshold=args.threshold, activation_threshold=args.activation_threshold, overwrite=args.overwrite
    )
    print(format_ranking(result, args.top, analysis.universality.threshold))
    print(format_analysis(analysis))
    print(format_written(written))


def run_compare(args: argparse.Namespace) -> None:
    if isinstance(workflows.load_any(args.a), AblationResult):  # two masking runs, not two rankings
        tests, written = workflows.compare_runs(args.a, args.b, args.out, overwrite=args.overwrite)
        print(format_run_comparison(tests, args.a, args.b))
        print(format_written(written))
        return
    comparison, written = workflows.compare_files(
        args.a, args.b, args.out, top_k=args.top_k, threshold=args.threshold, resamples=args.resamples, overwrite=args.overwrite
    )
    for warning in comparison.warnings:
        print(f"rh-lens: warning: {warning}", file=sys.stderr)
    print(format_comparison(comparison))
    print(format_written(written))


def head_argument(text: str) -> Head:
    try:
        return Head.parse(text)
    except RhLensError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line on stderr (exit status 2)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def out_arguments(p: argparse.ArgumentParser, resume: bool = False) -> None:
    """--out, --overwrite, and --resume for commands that run trials."""
    p.add_argument("--out", required=True, help="output directory (new or empty, unless --overwrite or --resume)")
    choice = p.add_mutually_exclusive_group()
    choice.add_argument("--overwrite", action="store_true", help="write into a non-empty --out, replacing an earlier run there")
    if resume:
        choice.add_argument("--resume", action="store_true", help="continue the interrupted run in --out")


def heldout_argument(p: argparse.ArgumentParser, ranking: str = "the --scores ranking was detected on") -> None:
    p.add_argument(
        "--heldout",
        action="store_true",
        help=f"refuse to evaluate on needles or questions {ranking}, compared by content: the same or a near-duplicate "
        "needle, question or answer, a shared paragraph or article (without it: a warning)",
    )
    add_other_haystack_argument(p)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="rh-lens", description="Find and test retrieval heads.")
    parser.add_argument("--version", action="version", version=f"rh-lens {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    def run_arguments(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--max-new-tokens",
            type=positive_int,
            default=None,
            help=f"greedy decoding budget (default {MAX_NEW_TOKENS}; {CHAIN_OF_THOUGHT_TOKENS} for a chain of thought, "
            "--task arithmetic --mode cot or in-question)",
        )
        add_decoding_arguments(p)
        add_parallel_arguments(p)
        out_arguments(p, resume=True)

    d = commands.add_parser("detect", help="detect retrieval heads with needle-in-a-haystack trials")
    add_model_arguments(d)
    add_grid_arguments(d)
    run_arguments(d)
    d.add_argument("--threshold", type=unit_interval, default=DEFAULT_THRESHOLD, help="retrieval-head threshold (default 0.1)")
    d.add_argument(
        "--chunk-size",
        type=positive_int,
        default=None,
        help="prefill chunk in tokens (bounds memory; default 512, or 4096 with fused attention)",
    )
    d.add_argument("--top", type=positive_int, default=20, help="heads to print")
    d.add_argument(
        "--until-stable",
        type=positive_int,
        default=None,
        metavar="K",
        help="adaptive: run the grid in a random order, stop once the top K heads stop changing",
    )
    d.add_argument(
        "--patience",
        type=positive_int,
        default=None,
        help="with --until-stable: trials the top K must stay the same (default: max(5, 20%% of the grid))",
    )
    d.add_argument("--order-seed", type=non_negative_int, default=0, help="with --until-stable: seed of the trial order")
    d.add_argument(
        "--checkpoint",
        type=non_negative_int,
        default=None,
        metavar="STEP",
        help="a training step of a TransformerLens model published with checkpoints, e.g. --model EleutherAI/pythia-70m --checkpoint 4000 (needs the hub)",
    )
    d.set_defaults(run=run_detect)

    a = commands.add_parser("ablate", help="mask top-K retrieval heads vs K random heads and rerun NIAH")
    add_model_arguments(a)
    add_grid_arguments(a)
    run_arguments(a)
    a.add_argument("--scores", required=True, help="detection results (ours or the reference's format)")
    how_many = a.add_mutually_exclusive_group()
    how_many.add_argument(
        "--top-k", nargs="+", type=positive_int, default=None, help="K values (default: ~2%%, 5%%, 10%% of all heads)"
    )
    how_many.add_argument(
        "--thresholds",
        nargs="+",
        type=unit_interval,
        default=None,
        help="mask the heads at or above each threshold (e.g. 0.05 0.1 0.2 0.3 0.5) instead",
    )
    a.add_argument("--random-seeds", type=non_negative_int, default=3, help="random-K draws per K (seeds 0..N-1)")
    a.add_argument("--method", choices=METHODS, default="uniform", help="uniform attention (the paper), zero or mean output")
    a.add_argument("--decode-only", action="store_true", help="mask at decode steps only, not over the prompt")
    heldout_argument(a)
    a.set_defaults(run=run_ablate)

    k = commands.add_parser("compress", help="KV-cache compression: full cache for retrieval heads, sink + window for the rest")
    add_model_arguments(k)
    add_grid_arguments(k)
    run_arguments(k)
    k.add_argument("--scores", required=True, help="detection results ranking the heads (ours or the reference's format)")
    k.add_argument(
        "--full-fraction", nargs="+", type=unit_interval, default=[0.1, 0.25, 0.5], help="fractions of KV heads kept full"
    )
    k.add_argument("--sink", type=non_negative_int, default=4, help="first tokens every streaming head keeps (default 4)")
    k.add_argument("--window", type=positive_int, default=256, help="recent tokens every streaming head keeps (default 256)")
    k.add_argument("--random-seeds", type=non_negative_int, default=2, help="random KV-head draws per fraction (seeds 0..N-1)")
    k.add_argument("--decode-only", action="store_true", help="compress at decode steps only (a cache compressed after prefill)")
    k.add_argument(
        "--cache",
        choices=("masked", "real"),
        default="real",
        help="real: a head-wise cache that stores only the keys kept and frees the rest (the default); masked: streaming "
        "heads' keys hidden in the full cache (the simulation, the oracle the real cache is tested against)",
    )
    heldout_argument(k)
    k.set_defaults(run=run_compress)

    s = commands.add_parser("steer", help="boost top-K retrieval heads vs K random heads and rerun NIAH")
    add_model_arguments(s)
    add_grid_arguments(s)
    run_arguments(s)
    s.add_argument("--scores", required=True, help="detection results (ours or the reference's format)")
    s.add_argument("--top-k", nargs="+", type=positive_int, default=[5], help="K values (default 5)")
    s.add_argument("--factors", nargs="+", type=float, default=[2.0, 4.0], help="boost factors (default 2 4)")
    s.add_argument("--random-seeds", type=non_negative_int, default=2, help="random-K draws per K and factor (seeds 0..N-1)")
    s.add_argument(
        "--method",
        choices=STEERING_METHODS,
        default="sharpen",
        help="sharpen: attention scores times the factor (a lower temperature); output: head outputs times the factor",
    )
    s.add_argument("--decode-only", action="store_true", help="boost at decode steps only, not over the prompt")
    s.add_argument(
        "--no-head-scores",
        action="store_true",
        help="do not record every head's copy score on each trial (faster; resumes a run started without them)",
    )
    heldout_argument(s)
    s.set_defaults(run=run_steer)

    f = commands.add_parser(
        "finetune", help="train only the top-K retrieval heads vs K random heads vs LoRA, judge on other trials"
    )
    add_model_arguments(f)
    add_grid_arguments(f)
    run_arguments(f)
    f.add_argument("--scores", required=True, help="detection results (ours: they must record their trials)")
    f.add_argument(
        "--train",
        type=evaluation_grid,
        required=True,
        metavar='"GRID OPTIONS"',
        help='the training trials, in detect\'s grid options (e.g. "--needles bank-a --haystack ruler-essays --lengths 1000"); '
        "the grid options of this command are the held-out trials every arm is judged on",
    )
    f.add_argument("--top-k", type=positive_int, default=5, help="heads trained (default 5)")
    f.add_argument("--random-seeds", type=non_negative_int, default=1, help="random-head arms (default 1)")
    f.add_argument("--no-lora", action="store_true", help="leave out the LoRA arm")
    f.add_argument("--steps", type=positive_int, default=100, help="optimiser steps per arm (default 100)")
    f.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate, no weight decay (default 1e-4)")
    f.add_argument("--train-batch", type=positive_int, default=4, help="training sequences per step (default 4)")
    f.add_argument("--seed", type=non_negative_int, default=0, help="the order training sequences are drawn in")
    f.add_argument(
        "--text", default="pydoc", help="general text for the forgetting check: a haystack name or path (default pydoc)"
    )
    f.set_defaults(run=run_finetune)

    t = commands.add_parser("atlas", help="every head-finding method on the same trials, judged by masking on other trials")
    add_model_arguments(t)
    add_grid_arguments(t)
    run_arguments(t)
    t.add_argument(
        "--evaluate",
        type=evaluation_grid,
        required=True,
        metavar='"GRID OPTIONS"',
        help="the trials masking and the KV policies are judged on, in detect's grid options, e.g. "
        '"--needles bank-b --haystack ruler-essays --lengths 1000 --depths 50"',
    )
    t.add_argument(
        "--methods",
        nargs="+",
        choices=list(ATLAS_METHODS),
        default=list(DEFAULT_METHODS),
        help="head-finding methods (default: all but duo-gates and patching: gate training and two forward passes per trial)",
    )
    t.add_argument(
        "--head-fractions",
        nargs="+",
        type=unit_interval,
        default=[0.02, 0.05, 0.10],
        help="K for masking, as fractions of all heads (default 0.02 0.05 0.10)",
    )
    t.add_argument("--random-seeds", type=positive_int, default=3, help="random-K and random KV-head draws (default 3)")
    t.add_argument("--method", choices=METHODS, default="uniform", help="how a head is masked (as ablate --method)")
    t.add_argument("--full-fraction", type=unit_interval, default=0.25, help="KV heads kept full (default 0.25)")
    t.add_argument("--sink", type=non_negative_int, default=4, help="first tokens every streaming head keeps (default 4)")
    t.add_argument("--window", type=positive_int, default=128, help="recent tokens every streaming head keeps (default 128)")
    t.add_argument(
        "--kv-windowed",
        action="store_true",
        help="KV policies windowed over the prompt too, as the shipped cache runs (default: the prompt prefilled whole, "
        "compressed before the first decode step: compress --decode-only)",
    )
    t.add_argument("--resamples", type=non_negative_int, default=1000, help="bootstrap resamples of the agreement (default 1000)")
    heldout_argument(t, "of the detection grid (--evaluate's trials against the maps')")
    t.set_defaults(run=run_atlas)

    p = commands.add_parser("patch", help="activation patching: which heads carry the needle's answer")
    add_model_arguments(p)
    add_text_arguments(p, one_haystack=True)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--heads", nargs="+", type=head_argument, help="heads to patch, LAYER-HEAD (e.g. 12-3 14-1)")
    which.add_argument("--all-heads", action="store_true", help="patch every head")
    p.add_argument("--context-length", type=positive_int, default=1000, help="prompt length in tokens (default 1000)")
    p.add_argument("--depth", type=percent, default=50, help="needle depth in percent (default 50)")
    p.add_argument("--needle", type=non_negative_int, default=0, help="which needle (index, default 0)")
    p.add_argument(
        "--task",
        choices=("niah", "squad", "hotpotqa"),
        default="niah",
        help="niah (default), or one real-document question among distractor paragraphs (needs --corrupted-answer)",
    )
    p.add_argument(
        "--question", type=non_negative_int, default=0, help="with --task squad/hotpotqa: which question of the seeded order"
    )
    p.add_argument("--question-seed", type=non_negative_int, default=0, help="seed of the question order (default 0)")
    p.add_argument("--data", default=None, help="a SQuAD- or HotpotQA-format JSON file instead of RULER's copy")
    p.add_argument("--corrupted-answer", help="the corrupted prompt's answer, same token length (default: built-in alternatives)")
    p.add_argument(
        "--kinds",
        nargs="+",
        choices=KINDS,
        default=list(DEFAULT_KINDS),
        help="what to patch (default: head_out pattern resid; mlp_out too on request)",
    )
    p.add_argument(
        "--directions",
        nargs="+",
        choices=DIRECTIONS,
        default=list(DIRECTIONS),
        help="denoise (clean into corrupted), noise (reverse)",
    )
    p.add_argument(
        "--positions", choices=POSITIONS, default="final", help="patch heads at the answer position only, or at all positions"
    )
    p.add_argument(
        "--metric",
        choices=list(METRICS),
        default="logit_diff",
        help="function of the answer-position logits (default: logit difference, normalised)",
    )
    p.add_argument("--tail", type=non_negative_int, default=24, help="prompt-end tokens shown one by one in the residual map")
    p.add_argument("--batch-size", type=positive_int, default=8, help="patched runs per forward pass")
    p.add_argument("--scores", help="detection results: adds effect vs retrieval score (Spearman, scatter)")
    p.add_argument("--max-new-tokens", type=positive_int, default=MAX_NEW_TOKENS, help="decoding budget for the lead-in")
    p.add_argument("--top", type=positive_int, default=10, help="heads to print")
    out_arguments(p)
    p.set_defaults(run=run_patch)

    s = commands.add_parser(
        "show",
        help="print a results file: a ranking (ours or the reference's format), or an ablate, compress or atlas result "
        "with its 95%% intervals and paired tests",
    )
    s.add_argument("results", help="a results file, or a run directory holding one")
    s.add_argument("--top", type=positive_int, default=20)
    s.add_argument("--threshold", type=unit_interval, default=None, help="retrieval-head threshold (default: the file's)")
    s.add_argument("--ci", action="store_true", help="bootstrap intervals of the scores and the stability of the top K")
    s.add_argument(
        "--resamples", type=positive_int, default=1000, help="bootstrap resamples of the successful trials (default 1000)"
    )
    s.add_argument("--confidence", type=unit_interval, default=0.95, help="interval coverage (default 0.95)")
    s.add_argument(
        "--ci-top-k", type=positive_int, default=10, help="size of the top set whose stability is measured (default 10)"
    )
    s.add_argument("--seed", type=non_negative_int, default=0, help="bootstrap seed")
    s.set_defaults(run=run_show)

    n = commands.add_parser("analyze", help="dynamic activation, coverage and sparsity of a results file, with figures")
    n.add_argument("results", help="results file (ours; published files give no per-trial details nor coverage)")
    n.add_argument("--threshold", type=unit_interval, default=None, help="retrieval-head threshold (default: the file's)")
    n.add_argument(
        "--activation-threshold",
        type=unit_interval,
        default=ACTIVATION_THRESHOLD,
        help="a head is active in a trial above this trial score (default 0.1)",
    )
    n.add_argument("--top", type=positive_int, default=10, help="heads to print")
    out_arguments(n)
    n.set_defaults(run=run_analyze)

    c = commands.add_parser(
        "compare",
        help="compare two results files of one architecture (ours or published), or two masking runs on the same "
        "problems asked two ways (does each mask cost one more than the other, per problem)",
    )
    c.add_argument("a", help="a results file (a ranking), or a masking run (its ablation.json or directory)")
    c.add_argument("b", help="the same kind as a")
    c.add_argument("--top-k", type=positive_int, default=TOP_K, help="size of the top lists compared (default 20)")
    c.add_argument("--threshold", type=unit_interval, default=DEFAULT_THRESHOLD)
    c.add_argument(
        "--resamples",
        type=non_negative_int,
        default=1000,
        help="bootstrap resamples of each file's trials for 95%% intervals (default 1000; 0: none)",
    )
    out_arguments(c)
    c.set_defaults(run=run_compare)
    return parser


def main(argv: list[str] | None = None) -> int:
    import matplotlib

    matplotlib.use("Agg")  # the command line only writes figures to files
    _show_progress_messages()
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit:  # --help, --version, or a bad option (one line already printed)
        return exit.code or 0
    try:
        args.run(args)
    except RhLensError as err:
        print(f"rh-lens: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"rh-lens: interrupted; {interrupted_note(args, argv)}", file=sys.stderr)
        return 130
    return 0


def _show_progress_messages() -> None:
    """rh_lens's INFO messages (model downloads, dequantization) on stderr, as "rh_lens: ..."."""
    logger = logging.getLogger("rh_lens")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("rh_lens: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def interrupted_note(args: argparse.Namespace, argv: list[str]) -> str:
    """What an interrupted command saved, and how to go on."""
    if not hasattr(args, "resume"):
        return "nothing was saved"
    n = saved_trials(args.out)
    again = argv if args.resume else [a for a in argv if a != "--overwrite"] + ["--resume"]
    return f"{n} finished trial{'s' if n != 1 else ''} saved in {args.out}; continue with: {shlex.join(['rh-lens', *again])}"


if __name__ == "__main__":
    sys.exit(main())
