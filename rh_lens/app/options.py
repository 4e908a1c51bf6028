"""Command-line options shared by `rh-lens` and the scripts in experiments/, declared once.

The model, device and NIAH grid options (haystack, needles, lengths, depths, prompt) read
the same everywhere, and numbers are checked as they are parsed, so a bad value is one
line from argparse before anything loads.
"""

from __future__ import annotations

import argparse
import math

from rh_lens.errors import InputError
from rh_lens.execution.options import RunOptions
from rh_lens.model.generation import MAX_NEW_TOKENS
from rh_lens.model.loading import CATALOGUE, DTYPES
from rh_lens.tasks.arithmetic import CHAIN_OF_THOUGHT_TOKENS, ArithmeticGrid, answers_in_one_line
from rh_lens.tasks.arithmetic import MODES as ARITHMETIC_MODES
from rh_lens.tasks.data import TASKS, load_needles
from rh_lens.tasks.documents import QAGrid
from rh_lens.tasks.needles import BUILTIN_NEEDLES, Needle
from rh_lens.tasks.niah import DEFAULT_DEPTHS, DEFAULT_LENGTHS, DISTRACTORS, PROMPTS, Grid

MODEL_HELP = f"catalogue name ({', '.join(CATALOGUE)}), HF directory, .gguf file or TransformerLens name"

# --- checked numbers -------------------------------------------------------------------


def _number(kind, text: str, what: str):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{what}, got {text!r}") from None
    return value


def positive_int(text: str) -> int:
    value = _number(int, text, "expected a whole number >= 1")
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    value = _number(int, text, "expected a whole number >= 0")
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {value}")
    return value


def percent(text: str) -> int:
    """A needle depth: a whole percentage of the haystack, 0 to 100."""
    value = _number(int, text, "expected a depth in percent, a whole number from 0 to 100")
    if not 0 <= value <= 100:
        raise argparse.ArgumentTypeError(f"depths are percentages from 0 to 100, got {value}")
    return value


def unit_interval(text: str) -> float:
    """A threshold: a finite number from 0 to 1."""
    value = _number(float, text, "expected a number from 0 to 1")
    if not (math.isfinite(value) and 0 <= value <= 1):
        raise argparse.ArgumentTypeError(f"expected a number from 0 to 1, got {text}")
    return value


# --- declarations ------------------------------------------------------------------------


def add_model_arguments(parser: argparse.ArgumentParser, multiple: bool = False, default_models=None) -> None:
    """--model M (or --models M [M ...] with `multiple`) and --device."""
    if multiple:
        parser.add_argument("--models", nargs="+", default=default_models, required=default_models is None, help=MODEL_HELP)
    else:
        parser.add_argument("--model", required=True, help=MODEL_HELP)
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    parser.add_argument(
        "--dtype",
        choices=list(DTYPES),
        default=None,
        help="precision of weights and computation (default: float32 on the CPU, bfloat16 on a GPU)",
    )
    parser.add_argument(
        "--verify-cache", action="store_true", help="check every cached model file against its recorded sha256 before loading"
    )


def add_text_arguments(parser: argparse.ArgumentParser, one_haystack: bool = False) -> None:
    """--haystack, --needles and --prompt: what the prompts are made of."""
    if one_haystack:
        parser.add_argument(
            "--haystack",
            default="pydoc",
            help="directory of .txt files, a .txt file, 'pydoc' (default), 'synthetic' or 'ruler-essays'",
        )
    else:
        parser.add_argument(
            "--haystack",
            nargs="+",
            default=None,
            help="directory of .txt files, a .txt file, 'pydoc' (default), 'synthetic' or 'ruler-essays'; one, or one per needle",
        )
    parser.add_argument(
        "--needles",
        help="JSONL file of {needle, question, real_needle}, or a built-in set: 'long' (answers of 10+ tokens), 'bank' "
        "(40 needles of varied answer kinds), 'bank-a' / 'bank-b' (its two halves, for held-out splits); "
        "default: the 3 built-in short-answer needles",
    )
    parser.add_argument(
        "--prompt",
        choices=list(PROMPTS),
        default="auto",
        help="chat template if the tokenizer has one (auto), always (chat) or never (plain)",
    )


def question_range(text: str) -> tuple[int, int]:
    """START:STOP (or N for 0:N): a slice of the seeded question order."""
    start, _, stop = text.rpartition(":") if ":" in text else ("0", ":", text)
    a, b = (
        _number(int, start or "0", f"expected START:STOP or N, got {text!r}"),
        _number(int, stop, f"expected START:STOP or N, got {text!r}"),
    )
    if not 0 <= a < b:
        raise argparse.ArgumentTypeError(f"expected START:STOP with 0 <= START < STOP, got {text!r}")
    return a, b


def add_grid_arguments(parser: argparse.ArgumentParser) -> None:
    """The grid: what the trials are (--task, and the NIAH text options or the questions),
    plus --lengths and --depths."""
    parser.add_argument(
        "--task",
        choices=("niah",) + TASKS + ("arithmetic",),
        default="niah",
        help="niah (needles in a haystack, the default), squad or hotpotqa (real questions among distractor paragraphs), "
        "world (built-in world-knowledge questions, asked closed-book), arithmetic (sums and differences of numbers "
        "stated in the context, graded exactly; --questions picks the problems, --mode how they are asked)",
    )
    parser.add_argument(
        "--mode",
        choices=ARITHMETIC_MODES,
        default="cot",
        help="with --task arithmetic: cot (a worked chain of thought, the default), answer-only, or in-question (the "
        "numbers stated in the question itself: arithmetic with nothing to copy from the context)",
    )
    parser.add_argument(
        "--closed-book",
        action="store_true",
        help="with --task squad/hotpotqa: ask each question alone, without its documents (answers from the weights)",
    )
    parser.add_argument(
        "--questions",
        type=question_range,
        default=(0, 20),
        metavar="START:STOP",
        help="with --task squad/hotpotqa/world: questions START to STOP of the seeded order (default 0:20); "
        "a disjoint range is a held-out split",
    )
    parser.add_argument(
        "--disjoint-from",
        type=question_range,
        default=None,
        metavar="START:STOP",
        help="with --task squad/hotpotqa/world: leave out the questions that share a gold paragraph, an article, the "
        "question or the answer with questions START:STOP (the ranking's --questions), so that --heldout can pass",
    )
    parser.add_argument("--question-seed", type=non_negative_int, default=0, help="seed of the question order (default 0)")
    parser.add_argument("--data", default=None, help="a SQuAD- or HotpotQA-format JSON file instead of RULER's copy")
    add_text_arguments(parser)
    parser.add_argument(
        "--lengths", nargs="+", type=positive_int, default=list(DEFAULT_LENGTHS), help="context lengths in tokens"
    )
    parser.add_argument(
        "--depths", nargs="+", type=percent, default=list(DEFAULT_DEPTHS), help="needle depths in percent (0-100)"
    )
    parser.add_argument(
        "--distractor",
        choices=DISTRACTORS,
        default=None,
        help="also insert the needle with another answer (same-form) or the other needles (multi-key)",
    )


def add_parallel_arguments(parser: argparse.ArgumentParser) -> None:
    """--workers and --ray-address: trials sharded on Ray (pip install 'rh-lens[ray]')."""
    parser.add_argument(
        "--workers", type=positive_int, default=None, help="run the trials on this many Ray workers, each holding the model"
    )
    parser.add_argument(
        "--ray-address", default=None, help="a Ray cluster to run the workers on (default: start a local Ray instance)"
    )


def add_decoding_arguments(parser: argparse.ArgumentParser) -> None:
    """--batch-size and --no-share-prefix: how many trials are decoded together, and whether
    each is prefilled from the prompt prefix it shares with the one before."""
    parser.add_argument(
        "--batch-size",
        type=positive_int,
        default=None,
        help="trials decoded together (default: 8 on a CPU, 16 on a GPU, fewer when their caches would pass 4 / 16 GB)",
    )
    parser.add_argument(
        "--no-share-prefix",
        dest="share_prefix",
        action="store_false",
        help="prefill every trial from an empty cache, once per condition (default: reuse the cache of the prompt prefix shared "
        "with the trial before, and one prefill for all conditions that read the prompt unchanged)",
    )


def add_other_haystack_argument(parser: argparse.ArgumentParser) -> None:
    """--other-haystack, beside --heldout (ablate, compress, atlas): the workflows' `other_haystack`."""
    parser.add_argument(
        "--other-haystack",
        action="store_true",
        help="--heldout, and refuse an evaluation cut from the ranking's haystack too (for real documents: the same "
        "data file's distractor paragraphs)",
    )


# --- values ------------------------------------------------------------------------------


def needles_from_args(args: argparse.Namespace) -> list[Needle]:
    return load_needles(args.needles) if args.needles else list(BUILTIN_NEEDLES)


def grid_from_args(args: argparse.Namespace) -> Grid | QAGrid | ArithmeticGrid:
    if getattr(args, "closed_book", False) and args.task == "niah":
        raise InputError("--closed-book is for --task squad or hotpotqa (or --task world, closed-book already)")
    if getattr(args, "disjoint_from", None) and getattr(args, "task", "niah") == "niah":
        raise InputError("--disjoint-from is for --task squad, hotpotqa or world: it leaves out questions")
    if getattr(args, "task", "niah") == "arithmetic":
        if getattr(args, "needles", None) or getattr(args, "distractor", None) or getattr(args, "closed_book", False):
            raise InputError("--needles, --distractor and --closed-book are not for --task arithmetic")
        haystacks = args.haystack or ["ruler-essays"]
        if len(haystacks) != 1:
            raise InputError("--task arithmetic takes one --haystack")
        return ArithmeticGrid(
            args.questions, tuple(args.lengths), tuple(args.depths), args.mode, haystacks[0], args.prompt, args.question_seed
        )
    if getattr(args, "task", "niah") != "niah":
        given = [name for name in ("needles", "haystack", "distractor") if getattr(args, name, None)]
        if given:
            raise InputError(f"--{given[0]} is for --task niah; --task {args.task} asks questions about real paragraphs")
        return QAGrid(
            args.task,
            args.questions,
            tuple(args.lengths),
            tuple(args.depths),
            args.prompt,
            args.question_seed,
            args.data,
            getattr(args, "closed_book", False),
            disjoint_from=getattr(args, "disjoint_from", None),
        )
    return Grid(
        tuple(needles_from_args(args)),
        tuple(args.lengths),
        tuple(args.depths),
        tuple(args.haystack or ["pydoc"]),
        args.prompt,
        getattr(args, "distractor", None),
    )


def needle_from_args(args: argparse.Namespace) -> Needle:
    """The needle `--needle N` picks out of `--needles` (or the built-in ones)."""
    needles = needles_from_args(args)
    if not 0 <= args.needle < len(needles):
        raise InputError(f"--needle {args.needle}: there are {len(needles)} needles (0 to {len(needles) - 1})")
    return needles[args.needle]


def run_options_from_args(args: argparse.Namespace) -> RunOptions:
    """The `RunOptions` of a command's parsed arguments (options a command lacks keep their
    defaults; no --max-new-tokens: 50, or `CHAIN_OF_THOUGHT_TOKENS` for a chain of thought)."""
    given = {name: getattr(args, name) for name in RunOptions.__dataclass_fields__ if hasattr(args, name)}
    if given.get("max_new_tokens", MAX_NEW_TOKENS) is None:
        thinking = getattr(args, "task", "niah") == "arithmetic" and not answers_in_one_line(args.mode)
        given["max_new_tokens"] = CHAIN_OF_THOUGHT_TOKENS if thinking else MAX_NEW_TOKENS
    return RunOptions(**given)
