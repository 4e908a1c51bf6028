"""A head atlas per model: every head-finding method on the same detection trials, judged by
masking on held-out trials (see rh_lens.analysis.atlas).

Detection: NIAH split A (the 3 built-in needles in the pydoc haystack, 1000/2000 tokens,
depths 0/25/50/75/100: 30 trials), the split experiments/beyond_niah.py ranks on. Evaluation,
sharing no needle or question with it (--heldout checks): the needle bank's second half over
RULER's essays (20 needles, 1000 tokens, depth 50) and SQuAD questions 10:30 (1000 tokens,
depth 50). Every method, patching included (the built-in needles have corrupted twins).
Masking K at 2%, 5% and 10% of the heads, two random draws; KV policies at 25% full KV
heads, sink 4 + window 128, decode-only. Every method but duo-gates by default: training the
gates takes 150 steps of ~40 s on SmolLM2 at one CPU thread (docs/head-atlas.md); add it with
--methods.

Every atlas is one `rh-lens atlas` command (`--print` shows them), run with --resume into
<runs>/<model>/<set>/ and skipped once its atlas.json exists. The maps depend only on the
detection trials, which every set shares, so a set starts from the maps of a finished one
(its maps/ copied) and computes only what they lack. Then the tables of whatever
has finished are written to <results>/head_atlas.json and .md, and their figures to docs/
(head-atlas-overview.png: every atlas at the smallest K and at the same KV bytes; one
recall-vs-K figure per atlas).
"""

from __future__ import annotations

import argparse
import shlex
import shutil
from pathlib import Path

from common import DOCS_DIR, RESULTS_DIR

from rh_lens.analysis.atlas import ATLAS_METHODS, Atlas
from rh_lens.app import cli
from rh_lens.app.plots import atlas_overview, atlas_recall_vs_k, save_figure
from rh_lens.app.reports import format_atlas
from rh_lens.execution.files import write_json

MODELS = ["smollm2-135m", "gemma-3-270m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"]
DETECTION = ["--lengths", "1000", "2000", "--depths", "0", "25", "50", "75", "100"]
EVALUATION = {
    "bank-b": "--needles bank-b --haystack ruler-essays --lengths 1000 --depths 50",
    "squad-b": "--task squad --questions 10:30 --lengths 1000 --depths 50",
}
METHODS = [m for m in ATLAS_METHODS if m != "duo-gates"]
ATLAS = [
    "--random-seeds",
    "2",
    "--full-fraction",
    "0.25",
    "--sink",
    "4",
    "--window",
    "128",
    "--heldout",
]


def commands(model: str, runs: Path, methods: list[str]) -> dict[str, list[str]]:
    """Evaluation set -> the rh-lens command line of its atlas."""
    return {
        name: ["atlas", "--model", model, *DETECTION, "--evaluate", grid, "--methods", *methods, *ATLAS]
        + ["--out", str(runs / model / name), "--resume"]
        for name, grid in EVALUATION.items()
    }


def reuse_maps(model_runs: Path, name: str) -> Path | None:
    """Copy a finished sibling atlas's maps/ into set `name`'s run before it starts (the
    detection grid is the same for every set); returns where they came from, if anywhere."""
    target = model_runs / name / "maps"
    if target.exists():
        return None
    for sibling in sorted(model_runs.glob("*/atlas.json")):
        if sibling.parent.name != name and (sibling.parent / "maps").is_dir():
            shutil.copytree(sibling.parent / "maps", target)
            return sibling.parent
    return None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--sets", nargs="+", choices=list(EVALUATION), default=list(EVALUATION))
    parser.add_argument("--methods", nargs="+", choices=list(ATLAS_METHODS), default=METHODS)
    parser.add_argument("--runs", type=Path, default=Path("runs/head_atlas"), help="where the runs go")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--figures-dir", type=Path, default=DOCS_DIR, help="where the figures go (default docs/)")
    parser.add_argument("--print", action="store_true", help="print the commands and stop")
    parser.add_argument("--tabulate-only", action="store_true", help="read the finished atlases, run nothing")
    args = parser.parse_args(argv)
    for model in args.models:
        for name, argv_ in commands(model, args.runs, args.methods).items():
            done = (args.runs / model / name / "atlas.json").exists()
            if name not in args.sets or args.tabulate_only or (done and not args.print):
                continue
            if args.print:
                print(shlex.join(["rh-lens", *argv_]))
                continue
            if source := reuse_maps(args.runs / model, name):
                print(f"{model} {name}: starting from the maps of {source}")
            if cli.main(argv_):
                raise SystemExit(f"{model} {name} failed")
    if args.print:
        return
    found = [
        (model, name, Atlas.load(path))
        for model in args.models
        for name in args.sets
        if (path := args.runs / model / name / "atlas.json").exists()
    ]
    write_json(args.results_dir / "head_atlas.json", [{"set": name, **atlas.to_json()} for _, name, atlas in found])
    if found:
        save_figure(
            atlas_overview({f"{model}\n{name}": atlas for model, name, atlas in found}),
            args.figures_dir / "head-atlas-overview.png",
        )
        for model, name, atlas in found:
            save_figure(atlas_recall_vs_k(atlas), args.figures_dir / f"{model}-atlas-{name}-recall-vs-k.png")
    text = "\n\n".join(f"## {model} on {name}\n\n```\n{format_atlas(atlas)}\n```" for model, name, atlas in found)
    (args.results_dir / "head_atlas.md").write_text("# Head atlas: generated by experiments/head_atlas.py\n\n" + text + "\n")
    print(text)


if __name__ == "__main__":
    main()
