"""The experiment scripts' step plans: every command they would run is a valid rh-lens command
line, and the held-out steps ask the CLI to check that they are held out."""

import json
import sys
from pathlib import Path

import pytest
from fake_runs import arithmetic_run

from rh_lens.app.cli import build_parser
from rh_lens.app.options import grid_from_args
from rh_lens.tasks.data import load_needles

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
RESULTS = Path(__file__).resolve().parents[1] / "experiments" / "results"
beyond_niah = pytest.importorskip("beyond_niah")


@pytest.mark.parametrize("model", beyond_niah.MODELS)
def test_every_step_parses_and_held_out_steps_say_so(model, tmp_path):
    parser = build_parser()
    steps = beyond_niah.steps(model, tmp_path)
    assert {"niah", "squad-a"} <= steps.keys()
    for name, command in steps.items():
        args = parser.parse_args([*command, "--out", str(tmp_path / name)])
        assert args.model == model
        if command[0] in ("ablate", "compress"):
            assert args.scores == str(tmp_path / model / "niah" / "results.json")
            # every evaluation but the in-grid one refuses to run on the ranking's own trials
            assert args.heldout == (not name.startswith("ablate-in-grid")), name


head_atlas = pytest.importorskip("head_atlas")


@pytest.mark.parametrize("model", head_atlas.MODELS)
def test_every_atlas_parses_and_is_held_out(model, tmp_path):
    parser = build_parser()
    for name, command in head_atlas.commands(model, tmp_path, head_atlas.METHODS).items():
        args = parser.parse_args(command)
        assert args.model == model and args.heldout and args.out == str(tmp_path / model / name)
        assert args.evaluate.lengths == [1000]


def test_a_set_starts_from_the_maps_of_a_finished_one(tmp_path):
    # reuse is sound only while every set ranks on the same detection grid: the commands
    # differ in their evaluation grid and their run directory alone
    def detection(argv):
        return [a for i, a in enumerate(argv) if i == 0 or argv[i - 1] not in ("--evaluate", "--out")]

    plans = list(head_atlas.commands("m", tmp_path, head_atlas.METHODS).values())
    assert len(plans) > 1 and all(detection(p) == detection(plans[0]) for p in plans)
    (tmp_path / "bank-b" / "maps").mkdir(parents=True)
    (tmp_path / "bank-b" / "maps" / "retrieval.json").write_text("{}")
    assert head_atlas.reuse_maps(tmp_path, "squad-b") is None  # bank-b has not finished
    (tmp_path / "bank-b" / "atlas.json").write_text("{}")
    assert head_atlas.reuse_maps(tmp_path, "squad-b") == tmp_path / "bank-b"
    assert (tmp_path / "squad-b" / "maps" / "retrieval.json").read_text() == "{}"
    assert head_atlas.reuse_maps(tmp_path, "squad-b") is None  # its own maps are kept


rigor = pytest.importorskip("rigor")


@pytest.mark.parametrize("model", rigor.MODELS)
def test_the_power_plan_is_held_out_with_100_trials_over_3_lengths_and_3_depths(model, tmp_path):
    parser = build_parser()
    for name, command in rigor.steps(model, tmp_path).items():
        args = parser.parse_args([*command, "--out", str(tmp_path / name)])
        if command[0] == "detect":
            continue
        assert args.heldout and args.random_seeds >= 2, name
        grid = args.evaluate if command[0] == "atlas" else args  # an atlas's own grid is its detection grid
        assert len(grid.lengths) >= 3 and len(grid.depths) >= 3 and grid.haystack != ["pydoc"], name
        n_needles = len(load_needles(grid.needles))
        assert n_needles * len(grid.lengths) * len(grid.depths) >= 100


def test_committed_records_are_laid_back_as_run_state_and_tabulate_to_the_committed_tables(tmp_path):
    """A fresh checkout resumes and tabulates the power runs from experiments/results/rigor/:
    the finished steps come back whole (their tables equal the committed ones) and every saved
    trial is where `--resume` looks for it."""
    committed = [t for t in json.loads((RESULTS / "rigor.json").read_text()) if t["complete"] and t["model"] == "smollm2-135m"]
    assert committed, "no finished SmolLM2 step committed"
    restored = rigor.restore("smollm2-135m", tmp_path, RESULTS)
    assert {t["step"] for t in committed} <= set(restored)
    for t in committed:
        result = rigor.load_step("smollm2-135m", tmp_path, t["step"])
        assert json.loads(json.dumps(result.summary())) == t["rows"]
        records = json.loads((RESULTS / "rigor" / "smollm2-135m" / f"{t['step']}.json").read_text())
        for condition in records["conditions"]:
            trials = tmp_path / "smollm2-135m" / t["step"] / "conditions" / condition["name"] / "trials"
            assert sorted(p.stem for p in trials.glob("*.json")) == sorted(r["key"] for r in condition["records"])
    assert rigor.restore("smollm2-135m", tmp_path, RESULTS) == []  # run directories that exist are left alone


claims = pytest.importorskip("claims")


@pytest.mark.parametrize("model", claims.MODELS)
def test_the_claims_plan_parses_is_held_out_and_has_100_trials_per_condition(model, tmp_path):
    parser = build_parser()
    plan = claims.steps(model, tmp_path)
    assert {"cot-answer-only", "cot-cot", "cot-in-question", "steer-niah", "steer-squad-decode"} <= plan.keys()
    assert ("finetune" in plan) == (model == "smollm2-135m")
    for name, command in plan.items():
        args = parser.parse_args([*command, "--out", str(tmp_path / name)])
        if command[0] == "detect":
            continue
        assert args.scores == str(tmp_path / model / "niah" / "results.json")
        grid = grid_from_args(args)
        items = len(load_needles(args.needles)) if args.task == "niah" else len(grid.selected())
        assert items * len(args.lengths) * len(args.depths) >= 100, name
        if command[0] == "finetune":  # judged on the bank's other half, trained on the first
            assert args.train.needles == "bank-a" and args.needles == "bank-b"
        else:
            assert args.heldout and args.random_seeds >= 2, name


def test_the_three_ways_of_asking_are_compared_per_problem_with_a_figure(tmp_path):
    runs, results, figures = tmp_path / "runs", tmp_path / "results", tmp_path / "figures"
    losses = {"answer-only": lambda i: i % 10 != 0, "cot": lambda i: i % 2 == 0, "in-question": lambda i: i % 10 != 1}
    for mode, top_right in losses.items():
        arithmetic_run(runs / "m" / f"cot-{mode}-decode" / "ablation.json", mode, top_right)
    claims.tabulate(["m"], runs, results, figures)
    written = json.loads((results / "claims" / "m" / "cot-modes-decode.json").read_text())
    tests = {(t["a"], t["b"]): t for t in written["tests"]}
    # the chain of thought loses 20 of 40 under top-1, the other two 4 each; random-1 nothing
    assert tests["cot drop top-1", "answer-only drop top-1"]["difference"] == pytest.approx(16 / 40)
    assert tests["cot drop top-1", "in-question drop top-1"]["verdict"] == "cot drop top-1 > in-question drop top-1"
    assert tests["cot drop random-1", "answer-only drop random-1"]["verdict"] == "tie"
    assert written["masked_at"] == "decode steps only"
    assert (figures / "m-chain-of-thought-decode.png").read_bytes()[:4] == b"\x89PNG"
    assert not (results / "claims" / "m" / "cot-modes.json").exists()  # the everywhere runs did not finish
