"""Held-out masking and KV compression at a referee's power: intervals on every cell, paired tests.

Heads are ranked on NIAH A (the 3 built-in needles in the pydoc haystack, 1000/2000 tokens,
depths 0/25/50/75/100: 30 trials) and judged on trials the ranking never saw, checked by
content (`--heldout`): the 20 needles of the bank's second half (`bank-b`: other facts, other
answers) in RULER's essays (another haystack), at 1000/2000/4000 tokens and depths 0/50/100:
180 trials per condition.

- masking: no masking, the top-K retrieval heads (K = 5 and 14: 2% and 5% of SmolLM2's 270)
  and K random heads (2 seeds), uniform attention at every position;
- compression: the real head-wise cache, windowed (the cache rh_lens ships: prefill and
  decode), 25% of KV heads full, sink 4 + window 128: retrieval heads against random KV heads
  (2 seeds), StreamingLLM at the same bytes and RazorAttention.

Every step is one `rh-lens` command (`--print` shows them), run with --resume into
<runs>/<model>/<step>/. The tables read whatever has finished (a masking run still going: its
finished conditions; the table says how many of the planned), and are written to
experiments/results/rigor.json and rigor.md with every trial's record under
experiments/results/rigor/<model>/<step>.json, so each interval and test can be recomputed
from committed data (`rh-lens show experiments/results/rigor/<model>/<step>.json`).
"""

from __future__ import annotations

import argparse
import shlex
import shutil
from dataclasses import asdict
from pathlib import Path

from common import DOCS_DIR, RESULTS_DIR

from rh_lens.analysis.atlas import Atlas, atlas_conditions, effects, map_agreement
from rh_lens.app import cli
from rh_lens.app.options import add_grid_arguments, grid_from_args
from rh_lens.app.plots import heldout_bars, save_figure
from rh_lens.app.reports import format_ablation, format_atlas, format_compression
from rh_lens.detection.probes import razor_scores
from rh_lens.detection.records import load_results
from rh_lens.execution.files import read_json, write_json
from rh_lens.interventions.base import InterventionResult, saved_conditions
from rh_lens.interventions.compression import CompressionOptions, CompressionResult, compression_conditions
from rh_lens.interventions.masking import AblationResult, ablation_conditions
from rh_lens.model.loading import load_model
from rh_lens.tasks.splits import check_split

MODELS = ["smollm2-135m", "qwen2.5-coder-0.5b", "gemma-3-270m"]
DETECTION = ["--lengths", "1000", "2000", "--depths", "0", "25", "50", "75", "100"]
HELD_OUT = ["--needles", "bank-b", "--haystack", "ruler-essays", "--lengths", "1000", "2000", "4000"]
HELD_OUT += ["--depths", "0", "50", "100", "--heldout"]
# K: 2% and 5% of the model's heads (SmolLM2 30 x 9, Qwen2.5-Coder-0.5B 24 x 14, Gemma-3-270M 18 x 4)
TOP_K = {"smollm2-135m": ["5", "14"], "qwen2.5-coder-0.5b": ["7", "17"], "gemma-3-270m": ["1", "4"]}
MASKING = ["--method", "uniform", "--random-seeds", "2"]
COMPRESSION = ["--full-fraction", "0.25", "--random-seeds", "2", "--sink", "4", "--window", "128", "--cache", "real"]
# The atlas on the same held-out trials: every default method's top 2% of heads masked against
# as many random heads, and its KV policy at 25% full (windowed, as the compression step).
ATLAS = ["--head-fractions", "0.02", "--random-seeds", "2", "--full-fraction", "0.25", "--sink", "4", "--window", "128"]
ATLAS += ["--kv-windowed", "--heldout"]
OUTPUT = {"detect": "results.json", "ablate": "ablation.json", "compress": "compression.json", "atlas": "atlas.json"}


def steps(model: str, runs: Path) -> dict[str, list[str]]:
    """Step name -> the rh-lens command (without --out)."""
    ranking = ["--model", model, "--scores", str(runs / model / "niah" / "results.json")]
    return {
        "niah": ["detect", "--model", model, *DETECTION],
        "ablate-bank-b": ["ablate", *ranking, "--top-k", *TOP_K[model], *MASKING, *HELD_OUT],
        "compress-bank-b": ["compress", *ranking, *COMPRESSION, *HELD_OUT],
        "atlas-bank-b": ["atlas", "--model", model, *DETECTION, "--evaluate", " ".join(HELD_OUT[:-1]), *ATLAS],
    }


def run(model: str, runs: Path, only: list[str] | None, dry: bool) -> None:
    for name, command in steps(model, runs).items():
        out = runs / model / name
        if only and name not in only and name != "niah":
            continue
        argv = [*command, "--out", str(out), "--resume"]
        if dry:
            print("rh-lens " + shlex.join(argv))
        elif not (out / OUTPUT[command[0]]).exists():
            print(f"== {model} {name}", flush=True)
            if cli.main(argv):
                raise SystemExit(f"{model} {name} failed")


def _trials(model: str) -> tuple:
    """The held-out trials of every step, and the model they were tokenized for."""
    loaded = load_model(model)
    parser = argparse.ArgumentParser()
    add_grid_arguments(parser)
    grid = grid_from_args(parser.parse_args([a for a in HELD_OUT if a != "--heldout"]))
    return grid.trials(loaded.tokenizer, loaded.cfg.n_ctx), loaded


def _finished(out: Path, planned, n_trials: int) -> list:
    # only finished conditions: a seed half run would pull its group's mean away from its interval's
    return [c for c in saved_conditions(out, planned) if len(c.records) == n_trials]


def _run_settings(out: Path) -> dict | None:
    """The settings the conditions of a run still going were started with (none: not started)."""
    runs = sorted((out / "conditions").glob("*/run.json"))
    if not runs:
        return None
    settings = read_json(runs[0])
    settings.pop("intervention", None)
    return settings


def _unfinished_ablation(out: Path, model: str) -> AblationResult | None:
    """A masking run still going: those of its planned conditions that have finished."""
    settings = _run_settings(out)
    if settings is None:
        return None
    detection = load_results(settings["scores"])
    planned = ablation_conditions(
        detection, settings["ks"], settings["seeds"], method=settings["method"], decode_only=settings["decode_only"]
    )
    n_trials = len(settings["needles"]) * len(settings["lengths"]) * len(settings["depths"])
    conditions = _finished(out, planned, n_trials)
    return AblationResult("ablation", model, conditions, settings) if conditions else None


def _unfinished_compression(out: Path, model: str) -> CompressionResult | None:
    """A compression run still going: its finished conditions. Rebuilding its policies takes
    the model (each policy's KV kept is measured on the trials)."""
    settings = _run_settings(out)
    if settings is None:
        return None
    trials, loaded = _trials(model)
    compression = CompressionOptions.from_settings(settings)
    planned = compression_conditions(loaded, load_results(settings["scores"]), trials, compression, razor_scores(loaded))
    conditions = _finished(out, planned, len(trials))
    return CompressionResult("compression", model, conditions, settings) if conditions else None


def _atlas_args(model: str, runs: Path) -> argparse.Namespace:
    out = runs / model / "atlas-bank-b"
    return cli.build_parser().parse_args([*steps(model, runs)["atlas-bank-b"], "--out", str(out)])


def _atlas_plan(model: str, runs: Path):
    """The atlas step's options, its maps (None until every map is written) and its planned
    conditions, from the step's own command line."""
    out = runs / model / "atlas-bank-b"
    args = _atlas_args(model, runs)
    options = cli.atlas_options_from_args(args)
    paths = {m: out / "maps" / f"{m}.json" for m in options.methods}
    if not all(p.exists() for p in paths.values()):
        return options, None, None, None
    maps = {m: load_results(p) for m, p in paths.items()}
    trials, loaded = _trials(model)
    ks = options.ks(loaded.cfg.n_layers, loaded.cfg.n_heads)
    return options, maps, atlas_conditions(loaded, maps, trials, ks, options), (loaded, trials, ks)


def _atlas_split(model: str, runs: Path) -> dict:
    """The held-out check `rh-lens atlas --heldout` made of its two grids, made again (a
    running atlas records it only in the atlas.json it writes at the end)."""
    args = _atlas_args(model, runs)
    grids = grid_from_args(args).settings(), grid_from_args(args.evaluate).settings()
    made = "at tabulation (the atlas is running)"
    options = asdict(cli.atlas_options_from_args(args))
    return {"heldout": True, "split_check": check_split(*grids), "split_check_made": made, "options": options}


def _unfinished_atlas(out: Path, model: str, runs: Path) -> tuple[Atlas, InterventionResult] | None:
    """An atlas still going: its maps and the effects of its finished conditions (Atlas's own
    rows and tests, computed from them)."""
    settings = _run_settings(out)
    options, maps, planned, context = _atlas_plan(model, runs)
    if settings is None or maps is None:
        return None
    loaded, trials, ks = context
    evaluation = InterventionResult("evaluation", model, _finished(out, planned, len(trials)), settings)
    if not evaluation.conditions:
        return None
    atlas = Atlas(
        model=loaded.cfg.model_name,
        n_layers=loaded.cfg.n_layers,
        n_heads=loaded.cfg.n_heads,
        methods=list(options.methods),
        ks=ks,
        maps={m: r.scores().tolist() for m, r in maps.items()},
        agreement=map_agreement(maps, options.top_k or max(ks), options.resamples),
        masking=[],
        kv=[],
        settings=_atlas_split(model, runs),
    )
    for key, rows in effects(evaluation, ks).items():
        setattr(atlas, key, rows)
    return atlas, evaluation


def load_step(model: str, runs: Path, name: str):
    """A step's result, finished or not (None: nothing finished yet); an atlas as (Atlas, its
    evaluation result)."""
    out = runs / model / name
    if name.startswith("ablate"):
        done = out / "ablation.json"
        return AblationResult.load(done) if done.exists() else _unfinished_ablation(out, model)
    if name.startswith("atlas"):
        if (out / "atlas.json").exists():
            return Atlas.load(out / "atlas.json"), InterventionResult.load(out / "evaluation.json")
        return _unfinished_atlas(out, model, runs)
    done = out / "compression.json"
    return CompressionResult.load(done) if done.exists() else _unfinished_compression(out, model)


def restore(model: str, runs: Path, results_dir: Path) -> list[str]:
    """Lay a model's committed records back as run state under `<runs>/<model>/`, so that a
    fresh checkout resumes each step where the last tabulated run stopped (every finished
    condition's run.json and trials, an atlas's maps, a finished step's output) and tabulates
    finished steps without rerunning them. A run directory that exists is left alone; returns
    the steps laid back."""
    committed = results_dir / "rigor" / model
    ranking = runs / model / "niah" / "results.json"
    if not ranking.exists() and (committed / "niah.json").exists():
        write_json(ranking, read_json(committed / "niah.json"))
    complete = {t["step"] for t in read_json(results_dir / "rigor.json") if t["model"] == model and t["complete"]}
    restored = []
    for name, command in steps(model, runs).items():
        out, records = runs / model / name, committed / f"{name}.json"
        if name == "niah" or out.exists() or not records.exists():
            continue
        result = read_json(records)
        if "scores" in result["settings"]:  # the ranking laid back above (the same file's content)
            result["settings"]["scores"] = str(ranking)
        for condition in result["conditions"]:
            where = out / "conditions" / condition["name"]
            write_json(where / "run.json", {**result["settings"], "intervention": condition["intervention"]})
            for record in condition["records"]:
                write_json(where / "trials" / f"{record['key']}.json", record)
        if command[0] == "atlas":
            shutil.copytree(committed / name / "maps", out / "maps")
            if name in complete:
                write_json(out / "evaluation.json", result)
                write_json(out / "atlas.json", read_json(committed / name / "atlas.json"))
        elif name in complete:
            write_json(out / OUTPUT[command[0]], result)
        restored.append(name)
    return restored


def _split(result, ranking: Path) -> dict:
    """The held-out check the run recorded, or for a run started before checks by content were
    recorded, the same check made now on the two runs' settings (`check_split`)."""
    split = {k: result.settings[k] for k in ("heldout", "ranked_on", "split_check") if k in result.settings}
    if "split_check" not in split:
        split["split_check"] = check_split(load_results(ranking).settings, result.settings)
        split["split_check_made"] = "at tabulation (the run recorded needle ids only)"
    return split


def _atlas_rows(atlas: Atlas) -> list[dict]:
    """The atlas's masking and KV rows, each named as a condition of the other steps' tables."""
    rows = []
    for r in atlas.masking:
        name = r["method"] if r["method"] == "none" else f"top-{r['k']}-{r['method']}"
        rows.append({**r, "condition": name.replace("top-", "random-") if r["method"] == "random" else name})
    for r in atlas.kv:
        if r["method"] != "full":
            rows.append({**r, "condition": f"kv-{r['method']}"})
    for r in rows:
        r.setdefault("success_rate", None)
    return rows


def tabulate(models: list[str], runs: Path, results_dir: Path) -> list[dict]:
    """Per model and step: the split check, the summary rows (intervals included) and the
    paired tests; every trial's record written beside them (an atlas's maps too)."""
    tables = []
    for model in models:
        ranking = runs / model / "niah" / "results.json"
        if ranking.exists():  # the ranking every step of the model is judged against
            write_json(results_dir / "rigor" / model / "niah.json", read_json(ranking))
        for name in [n for n in steps(model, runs) if n != "niah"]:
            loaded = load_step(model, runs, name)
            if loaded is None:
                continue
            kind, out = name.split("-")[0], runs / model / name
            records = results_dir / "rigor" / model / f"{name}.json"
            if kind == "atlas":
                atlas, result = loaded
                shutil.rmtree(records.with_suffix(""), ignore_errors=True)
                shutil.copytree(out / "maps", records.with_suffix("") / "maps")
                if (out / "atlas.json").exists():
                    write_json(records.with_suffix("") / "atlas.json", atlas.to_json())
                planned = len(_atlas_plan(model, runs)[2])
                rows, tests = _atlas_rows(atlas), atlas.tests
                split = {k: v for k, v in atlas.settings.items() if k in ("heldout", "ranked_on", "split_check")}
            else:
                result = loaded
                planned = {"ablate": 7, "compress": 6}[kind]  # conditions: see the module docstring
                rows, tests = result.summary(), [t.to_json() for t in result.comparisons()]
                split = _split(result, ranking)
            write_json(records, result.to_json())
            tables.append(
                {
                    "model": model,
                    "step": name,
                    "records": f"experiments/results/rigor/{model}/{name}.json",
                    "complete": (out / OUTPUT[kind]).exists(),
                    "conditions_run": len(result.conditions),
                    "conditions_planned": planned,
                    "split": split,
                    "rows": rows,
                    "tests": tests,
                }
            )
    return tables


def _cell(x: float, interval, percent: bool = False) -> str:
    if percent:
        return f"{100 * x:.0f}% [{100 * interval[0]:.0f}%, {100 * interval[1]:.0f}%]"
    return f"{x:.3f} [{interval[0]:.3f}, {interval[1]:.3f}]"


def docs_tables(t: dict) -> list[str]:
    """The step's rows and tests as markdown tables, each with its Source line (for docs/)."""
    source = f"Source: experiments/results/rigor.json model={t['model']} step={t['step']}"
    size = {"ablate": "K", "compress": "KV kept", "atlas": "K or KV kept"}[t["step"].split("-")[0]]
    lines = [
        f"| condition | {size} | trials | mean recall [95%] | retrieved [95%] | kept right [95%] |",
        "|---|---|---|---|---|---|",
    ]
    for r in t["rows"]:
        what = f"{100 * r['kv_kept']:.1f}%" if "kv_kept" in r else r["k"]
        kept = "-" if r["retained"] is None else _cell(r["retained"], r["retained_interval"], percent=True)
        lines.append(
            f"| {r['condition']} | {what} | {r['n_trials']} | {_cell(r['mean_recall'], r['recall_interval'])} "
            f"| {_cell(r['success_rate'], r['success_interval'], percent=True)} | {kept} |"
        )
    lines += [
        "",
        source,
        "",
        "| a vs b | trials | a - b [95%] | p (sign-flip) | McNemar a:b, p | verdict |",
        "|---|---|---|---|---|---|",
    ]
    for p in t["tests"]:
        mcnemar = "-" if p["mcnemar_p"] is None else f"{p['a_only']}:{p['b_only']}, {p['mcnemar_p']:.3g}"
        lines.append(
            f"| {p['a']} vs {p['b']} | {p['n']} | {p['difference']:+.3f} [{p['interval'][0]:+.3f}, {p['interval'][1]:+.3f}] "
            f"| {p['p_value']:.3g} | {mcnemar} | {p['verdict']} |"
        )
    return [*lines, "", source, ""]


def markdown(tables: list[dict], runs: Path) -> str:
    lines = ["# Held-out masking, compression and atlas with intervals: generated by experiments/rigor.py", ""]
    for t in tables:
        state = "complete" if t["complete"] else f"running: {t['conditions_run']} of {t['conditions_planned']} conditions so far"
        lines += [f"## {t['model']}: {t['step']} ({state})", "", f"Every trial: `{t['records']}`", "", "```"]
        result = load_step(t["model"], runs, t["step"])
        if t["step"].startswith("atlas"):
            lines += [format_atlas(result[0])]
        else:
            lines += [format_ablation(result) if isinstance(result, AblationResult) else format_compression(result)]
        lines += ["```", ""]
        lines += docs_tables(t)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--steps", nargs="+", default=None, help="only these steps (default: all; niah always runs first)")
    parser.add_argument("--runs", type=Path, default=Path("runs/rigor"), help="where the runs go")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--print", action="store_true", help="print the commands and stop")
    parser.add_argument("--tabulate-only", action="store_true", help="read the runs (finished or not), run nothing")
    args = parser.parse_args(argv)
    if args.print:
        for model in args.models:
            run(model, args.runs, args.steps, dry=True)
        return
    for model in MODELS:  # what earlier runs committed, where this checkout has no run directory
        restore(model, args.runs, args.results_dir)
    if not args.tabulate_only:
        for model in args.models:
            run(model, args.runs, args.steps, dry=False)
    tables = tabulate(MODELS, args.runs, args.results_dir)  # every model's: rigor.json is one file
    for t in tables:  # one figure per step: every condition's recall with its 95% interval
        kind = {"ablate": "masking", "compress": "compression", "atlas": "atlas"}[t["step"].split("-")[0]]
        title = f"{t['model']}: held-out {kind}\n{t['rows'][0]['n_trials']} trials per condition, 95% intervals"
        save_figure(heldout_bars({t["step"]: t["rows"]}, title=title), DOCS_DIR / f"{t['model']}-held-out-{kind}.png")
    write_json(args.results_dir / "rigor.json", tables)
    text = markdown(tables, args.runs)
    (args.results_dir / "rigor.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
