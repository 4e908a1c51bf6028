"""The experiment scripts' step plans: every command they would run is a valid rh-lens command
line, and the held-out steps ask the CLI to check that they are held out."""

import sys
from pathlib import Path

import pytest

from rh_lens.app.cli import build_parser

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
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
