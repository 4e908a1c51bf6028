"""The shared experiment: interventions as objects (hooks, context manager, JSON), one runner
over conditions with one summary, and the run options as one value."""

import argparse

import pytest
import torch
from planted import NEEDLE, PLANTED, build_planted_model, haystack_text

from rh_lens.app.options import run_options_from_args
from rh_lens.errors import InputError
from rh_lens.execution.options import RunOptions
from rh_lens.interventions.base import Condition, InterventionResult, intervention_from_json, run_conditions
from rh_lens.interventions.compression import KVCompression, KVPolicy
from rh_lens.interventions.masking import HeadMask, mask_heads
from rh_lens.tasks.niah import build_trial, tokenize_haystack

model = build_planted_model()
haystack = tokenize_haystack(model.tokenizer, haystack_text(), 300)
trials = [build_trial(model.tokenizer, haystack, NEEDLE, 300, depth) for depth in (0, 50, 100)]
tokens = torch.tensor(trials[1].prompt_ids)[None]
OPTIONS = RunOptions(max_new_tokens=6, progress=False)


def test_an_intervention_is_a_context_manager_with_the_hooks_of_mask_heads():
    clean = model(tokens)
    with HeadMask((PLANTED,))(model):
        masked = model(tokens)
    with mask_heads(model, [PLANTED]):
        assert torch.equal(model(tokens), masked)
    assert not torch.equal(masked, clean)
    assert torch.equal(model(tokens), clean)  # the hooks are gone after the block


@pytest.mark.parametrize(
    "intervention",
    [
        HeadMask((PLANTED, (0, 1)), "zero", decode_only=True),
        KVCompression(KVPolicy("p", 2, 4, 2, frozenset({(1, 1)}), sink=2, window=5, share=0.25), decode_only=False),
    ],
    ids=["head_mask", "kv_compression"],
)
def test_interventions_read_back_from_json_as_they_were(intervention):
    assert intervention_from_json(intervention.to_json()) == intervention
    with pytest.raises(InputError, match="unknown intervention kind"):
        intervention_from_json({**intervention.to_json(), "kind": "nonsense"})


def test_a_mean_mask_read_back_without_its_means_refuses_to_run():
    mask = intervention_from_json(HeadMask((PLANTED,), "mean", mean_z=torch.zeros(2, 4, 8)).to_json())
    with pytest.raises(InputError, match="mean ablation needs mean_z"):
        mask.hooks(model)


def test_the_runner_groups_seeds_and_resumes_to_the_same_result(tmp_path):
    conditions = [
        Condition("none", None, "none", {"kind": "none", "k": 0}),
        Condition("planted", HeadMask((PLANTED,)), "planted", {"kind": "top", "k": 1}),
        Condition("other-seed0", HeadMask(((0, 2),)), "other", {"kind": "random", "k": 1, "seed": 0}),
        Condition("other-seed1", HeadMask(((1, 3),)), "other", {"kind": "random", "k": 1, "seed": 1}),
    ]
    result = run_conditions(model, trials, conditions, experiment="test", out_dir=tmp_path, options=OPTIONS)
    rows = {row["condition"]: row for row in result.summary()}
    assert list(rows) == ["none", "planted", "other"]
    assert rows["none"]["mean_recall"] == 1.0 and rows["none"]["n_seeds"] is None
    assert rows["planted"]["mean_recall"] < 0.5  # the planted head carries retrieval
    assert rows["other"]["n_seeds"] == 2 and rows["other"]["mean_recall"] == 1.0
    assert "seed" not in rows["other"] and rows["other"]["kind"] == "random"
    assert {c.name for c in result.conditions} == {p.name for p in (tmp_path / "conditions").iterdir()}
    saved = InterventionResult.load(tmp_path / "test.json")
    assert saved.summary() == result.summary()
    assert [c.intervention for c in saved.conditions] == [c.intervention for c in conditions]
    fresh = [Condition(c.name, c.intervention, c.group, c.metadata) for c in conditions]
    resumed = run_conditions(
        model,
        trials,
        fresh,
        experiment="test",
        out_dir=tmp_path,
        options=RunOptions(resume=True, progress=False, max_new_tokens=6),
    )
    assert resumed.summary() == result.summary()


def test_conditions_that_read_the_prompt_unchanged_run_together_as_they_run_alone(tmp_path, monkeypatch):
    """None and decode-only masks share each trial's prefill; a mask at every position runs on
    its own. Every record equals the one-condition-at-a-time run's, and a run saved this way
    resumes the other way (and back)."""
    import rh_lens.interventions.base as base

    conditions = [
        Condition("none", None, "none"),
        Condition("planted-decode", HeadMask((PLANTED,), decode_only=True), "planted-decode"),
        Condition("other-decode", HeadMask(((0, 2),), decode_only=True), "other-decode"),
        Condition("planted", HeadMask((PLANTED,)), "planted"),
    ]
    together = []
    evaluate_together = base.evaluate_together
    monkeypatch.setattr(
        base, "evaluate_together", lambda m, t, i, **k: together.append(len(i)) or evaluate_together(m, t, i, **k)
    )

    def records(result):
        return {c.name: [{**vars(r), "seconds": None} for r in c.records] for c in result.conditions}

    def resume(share_prefix: bool):
        options = RunOptions(max_new_tokens=6, progress=False, resume=True, share_prefix=share_prefix)
        return run_conditions(model, trials, conditions, experiment="t", out_dir=tmp_path / "a", options=options)

    shared = run_conditions(model, trials, conditions, experiment="t", out_dir=tmp_path / "a", options=OPTIONS)
    assert together == [3]
    alone = run_conditions(
        model, trials, conditions, experiment="t", options=RunOptions(max_new_tokens=6, progress=False, share_prefix=False)
    )
    assert together == [3]  # without prefix sharing each condition runs alone
    assert records(shared) == records(alone)
    assert records(shared)["planted-decode"] != records(shared)["none"]  # the decode-time mask acts
    (tmp_path / "a" / "conditions" / "other-decode" / "trials" / f"{trials[1].key}.json").unlink()
    assert records(resume(share_prefix=False)) == records(alone)
    (tmp_path / "a" / "conditions" / "none" / "trials" / f"{trials[2].key}.json").unlink()
    assert records(resume(share_prefix=True)) == records(alone) and together == [3, 3]


def test_condition_names_must_be_unique():
    twice = [Condition("a", None, "a"), Condition("a", HeadMask((PLANTED,)), "b")]
    with pytest.raises(InputError, match="unique"):
        run_conditions(model, trials, twice, experiment="test", options=OPTIONS)


def test_run_options_are_checked_and_built_once_from_the_arguments():
    with pytest.raises(InputError):
        RunOptions(max_new_tokens=0)
    with pytest.raises(InputError):
        RunOptions(resume=True, overwrite=True)
    args = argparse.Namespace(device="cpu", dtype=None, verify_cache=True, max_new_tokens=7, overwrite=False, model="m", out="o")
    assert run_options_from_args(args) == RunOptions(device="cpu", verify_cache=True, max_new_tokens=7)
    with pytest.raises(TypeError):
        RunOptions("cpu")  # keyword-only
