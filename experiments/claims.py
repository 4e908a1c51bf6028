"""The paper's untested claim and the seed's two proposals, as runs: chain of thought under
masking, steering retrieval heads, and fine-tuning only them.

Heads are ranked as experiments/rigor.py ranks them (NIAH A: the 3 built-in needles in the
pydoc haystack, 1000/2000 tokens, 5 depths; the same run directory, so one ranking serves
both), and every step is judged on trials that share no needle, question or answer with that
ranking (`--heldout`):

- `cot-answer-only`, `cot-cot`, `cot-in-question`: 50 arithmetic problems (`--task arithmetic`)
  at 1000 tokens, depths 25 and 75 (100 trials per condition), asked answer-only, with a worked
  chain of thought, or with the numbers in the question (the control with nothing to copy);
  the top-K retrieval heads masked against K random heads, K = 5, 10, 20, 50 (as many as the
  model has of its 2-15%), two random draws; greedy, at most 96 new tokens answer-only and 256
  for a chain of thought, which runs over lines to the end of the turn; `cot-<mode>-decode`
  the same with the heads masked only while the answer is generated, when the reasoning
  copies the numbers (every condition decodes each problem from one prefill);
- `steer-niah`: bank-b needles in RULER's essays at 2000 and 4000 tokens, depths 25/50/75, where
  small models lose the middle: the top 5 heads sharpened by 1.5, 2, 4 and 8 against 5 random
  heads sharpened as much (120 trials per condition); `steer-niah-decode` the same with the
  heads boosted only while the answer is generated (the prompt read as it is: every condition
  decodes each trial from one prefill, so it runs in a fraction of the time); `steer-squad-decode`
  the same boosts on 40 SQuAD questions among distractor paragraphs (1000 tokens, the gold
  paragraph at depths 25/50/75: 120 trials per condition); `steer-hotpotqa-decode` the same on 40
  HotpotQA questions (both gold paragraphs among distractors); `steer-squad-output-decode` the
  SQuAD run with the heads' outputs (`hook_z`) scaled instead of their attention sharpened;
- `finetune` (SmolLM2 only, CPU): the top 5 heads, 5 random heads (2 draws) and LoRA of the same
  size, each trained 100 steps on bank-a needles at 500 and 1000 tokens, judged on bank-b
  needles at 1000 and 2000 tokens and on general text.

Every step is one `rh-lens` command (`--print` shows them), run with --resume into
<runs>/<model>/<step>/; `--tabulate-only` summarises whatever has finished into
experiments/results/claims/<model>/<step>.json (rows with intervals, paired tests:
experiments/summarize_run.py) and experiments/results/claims.json.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from common import DOCS_DIR, RESULTS_DIR
from rigor import DETECTION
from summarize_run import summarize

from rh_lens.app import cli
from rh_lens.app.plots import recall_vs_k_panels, save_figure
from rh_lens.execution.files import write_json
from rh_lens.interventions import AblationResult, cost_differences
from rh_lens.tasks.arithmetic import CHAIN_OF_THOUGHT_TOKENS

MODES = ("answer-only", "cot", "in-question")
MODELS = ["smollm2-135m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"]
ARITHMETIC = ["--task", "arithmetic", "--questions", "0:50", "--lengths", "1000", "--depths", "25", "75"]
COT_K = ["--top-k", "5", "10", "20", "50", "--random-seeds", "2", "--heldout"]
# a number on one line, or a worked chain of thought (see CHAIN_OF_THOUGHT_TOKENS)
BUDGET = {"answer-only": "96", "cot": str(CHAIN_OF_THOUGHT_TOKENS), "in-question": str(CHAIN_OF_THOUGHT_TOKENS)}
STEER = ["--needles", "bank-b", "--haystack", "ruler-essays", "--lengths", "2000", "4000", "--depths", "25", "50", "75"]
STEER_QA = ["--questions", "0:40", "--lengths", "1000", "--depths", "25", "50", "75"]
BOOSTS = ["--top-k", "5", "--factors", "1.5", "2", "4", "8", "--random-seeds", "2", "--heldout"]
TRAIN = "--needles bank-a --haystack ruler-essays --lengths 500 1000 --depths 0 50 100"
FINETUNE = ["--train", TRAIN, "--needles", "bank-b", "--haystack", "ruler-essays", "--lengths", "1000", "2000"]
FINETUNE += ["--depths", "0", "50", "100", "--top-k", "5", "--random-seeds", "2", "--steps", "100", "--lr", "1e-4"]
OUTPUT = {"detect": "results.json", "ablate": "ablation.json", "steer": "steering.json", "finetune": "finetune.json"}


def steps(model: str, runs: Path) -> dict[str, list[str]]:
    """Step name -> the rh-lens command (without --out)."""
    ranking = ["--model", model, "--scores", str(runs / model / "niah" / "results.json")]
    plan = {"niah": ["detect", "--model", model, *DETECTION]}
    for mode in MODES:
        plan[f"cot-{mode}"] = ["ablate", *ranking, *ARITHMETIC, "--mode", mode, *COT_K, "--max-new-tokens", BUDGET[mode]]
        plan[f"cot-{mode}-decode"] = [*plan[f"cot-{mode}"], "--decode-only"]
    plan["steer-niah"] = ["steer", *ranking, *STEER, *BOOSTS]
    plan["steer-niah-decode"] = ["steer", *ranking, *STEER, *BOOSTS, "--decode-only"]
    for task in ("squad", "hotpotqa"):
        plan[f"steer-{task}-decode"] = ["steer", *ranking, "--task", task, *STEER_QA, *BOOSTS, "--decode-only"]
    plan["steer-squad-output-decode"] = [*plan["steer-squad-decode"], "--method", "output"]
    if model == "smollm2-135m":
        plan["finetune"] = ["finetune", *ranking, *FINETUNE]
    return plan


def run(model: str, runs: Path, only: list[str] | None, dry: bool) -> None:
    for name, command in steps(model, runs).items():
        if only and name not in only and name != "niah":
            continue
        out = runs / model / name
        argv = [*command, "--out", str(out), "--resume"]
        if dry:
            print("rh-lens " + " ".join(f"'{a}'" if " " in a else a for a in argv))
        elif not (out / OUTPUT[command[0]]).exists():
            print(f"== {model} {name}", flush=True)
            if cli.main(argv):
                raise SystemExit(f"{model} {name} failed")


def tabulate(models: list[str], runs: Path, results_dir: Path, figures_dir: Path = DOCS_DIR) -> list[dict]:
    """Every finished step's summary, written beside the others; where the three ways of asking
    the arithmetic problems all finished, their comparison (`chain_of_thought`)."""
    summaries = []
    for model in models:
        for name, command in steps(model, runs).items():
            done = runs / model / name / OUTPUT[command[0]]
            if name == "niah" or not done.exists():
                continue
            summary = {"model": model, "step": name, **summarize(done)}
            write_json(results_dir / "claims" / model / f"{name}.json", summary)
            summaries.append(summary)
        for variant in ("", "-decode"):
            files = {mode: runs / model / f"cot-{mode}{variant}" / "ablation.json" for mode in MODES}
            if all(f.exists() for f in files.values()):
                chain_of_thought(model, variant, files, results_dir, figures_dir)
    return summaries


def chain_of_thought(model: str, variant: str, files: dict[str, Path], results_dir: Path, figures_dir: Path) -> None:
    """The paper's claim as paired tests on the same problems: does masking cost the chain of
    thought more than answer-only, and more than the same reasoning with nothing to copy
    (in-question)? Each masked group's drop from no masking, per problem (`cost_difference`);
    a figure of accuracy against K, one panel per way of asking."""
    by_mode = {mode: AblationResult.load(file) for mode, file in files.items()}
    tests = [
        test.to_json()
        for other in ("answer-only", "in-question")
        for test in cost_differences(by_mode["cot"], by_mode[other], names=("cot", other))
    ]
    where = "decode steps only" if variant else "every position"
    write_json(
        results_dir / "claims" / model / f"cot-modes{variant}.json",
        {
            "model": model,
            "masked_at": where,
            "runs": {mode: str(file) for mode, file in files.items()},
            "tests": tests,
        },
    )
    title = f"{model}: arithmetic in a 1K context, heads masked at {where}"
    save_figure(recall_vs_k_panels(by_mode, title), figures_dir / f"{model}-chain-of-thought{variant}.png")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--steps", nargs="+", default=None, help="only these steps (default: all; niah always runs first)")
    parser.add_argument("--runs", type=Path, default=Path("runs/rigor"), help="where the runs go (rigor.py's: one ranking)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--print", action="store_true", help="print the commands and stop")
    parser.add_argument("--tabulate-only", action="store_true", help="summarise the finished steps, run nothing")
    args = parser.parse_args(argv)
    if not args.tabulate_only:
        for model in args.models:
            run(model, args.runs, args.steps, args.print)
    if not args.print:
        summaries = tabulate(args.models, args.runs, args.results_dir)
        write_json(args.results_dir / "claims.json", [{k: s[k] for k in ("model", "step", "run")} for s in summaries])
        print(f"{len(summaries)} finished steps summarised")


if __name__ == "__main__":
    main()
