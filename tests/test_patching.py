"""Activation patching: pairs, the batched engine against TransformerLens's own patching,
and the planted model where one head carries the answer."""

import pandas as pd
import pytest
import torch
from planted import NEEDLE, PLANTED, build_planted_model, build_tokenizer, haystack_text
from transformer_lens import HookedTransformer, HookedTransformerConfig, patching

from rh_lens.detection.records import DetectionResult, TrialRecord
from rh_lens.errors import PairError
from rh_lens.interventions.patching import (
    PatchingResult,
    activation_patching,
    cache_run,
    head_patches,
    logit_diff_metric,
    mlp_patches,
    patching_pair,
    resid_columns,
    resid_patches,
    run_patches,
)
from rh_lens.tasks.needles import Needle
from rh_lens.tasks.niah import corrupt_needle, tokenize_haystack

CORRUPTED = "echo delta charlie bravo alpha"  # same five words, another order: first token differs

planted = build_planted_model()
haystack = tokenize_haystack(planted.tokenizer, haystack_text(), 300)


def planted_pair(model=planted, depth=50):
    return patching_pair(model, NEEDLE, haystack, 300, depth, corrupted_answer=CORRUPTED, chat=False)


def random_model(n_key_value_heads=None) -> HookedTransformer:
    """A small model with MLPs, LayerNorm, rotary and (optionally) grouped-query attention."""
    torch.manual_seed(0)
    cfg = HookedTransformerConfig(
        n_layers=3,
        d_model=64,
        d_head=16,
        n_heads=4,
        d_mlp=128,
        d_vocab=len(planted.tokenizer),
        n_ctx=256,
        act_fn="gelu",
        normalization_type="LN",
        positional_embedding_type="rotary",
        n_key_value_heads=n_key_value_heads,
        init_weights=True,
        device="cpu",
    )
    model = HookedTransformer(cfg, tokenizer=build_tokenizer())
    with torch.no_grad():
        model.unembed.W_U.mul_(20)  # random logits far apart, so the pair's gap is not tiny
    return model


def test_corrupt_needle_swaps_only_the_answer():
    needle = corrupt_needle(NEEDLE, CORRUPTED)
    assert needle.needle == "The secret code is: echo delta charlie bravo alpha."
    assert (needle.question, needle.real_needle) == (NEEDLE.question, CORRUPTED)


def test_pair_differs_only_inside_the_answer_span():
    pair = planted_pair()
    clean, corrupted = pair.clean_ids, pair.corrupted_ids
    start, end = pair.clean.answer_span
    assert len(clean) == len(corrupted)
    differ = (clean != corrupted).nonzero().flatten().tolist()
    assert differ and all(start <= p < end for p in differ)
    assert planted.tokenizer.decode([pair.clean_token, pair.corrupted_token]) == "alpha echo"


def test_pair_builder_rejects_length_mismatch():
    with pytest.raises(PairError, match="differ in token length"):
        patching_pair(planted, NEEDLE, haystack, 300, 50, corrupted_answer="echo delta charlie", chat=False)


def test_pair_builder_rejects_an_identical_answer():
    with pytest.raises(PairError, match="tokenises like the clean one"):
        patching_pair(planted, NEEDLE, haystack, 300, 50, corrupted_answer=NEEDLE.real_needle, chat=False)


def test_pair_builder_needs_a_corrupted_answer_for_unknown_needles():
    needle = Needle("The code is: alpha bravo.", "What is the code?", "alpha bravo")
    with pytest.raises(PairError, match="give one of the same token length"):
        patching_pair(planted, needle, haystack, 300, 50, chat=False)


def normalised(model, pair, groups, direction="denoise"):
    clean, corrupted = cache_run(model, pair.clean_ids, "all"), cache_run(model, pair.corrupted_ids, "all")
    base, source = (corrupted, clean) if direction == "denoise" else (clean, corrupted)
    measured = run_patches(model, pair, base, source, groups, progress=False)
    metric = logit_diff_metric(pair)
    clean_value, corrupted_value = float(metric(clean.final_logits)), float(metric(corrupted.final_logits))
    return (measured - corrupted_value) / (clean_value - corrupted_value)


@pytest.mark.parametrize("positions", ["final", "all"])
@pytest.mark.parametrize("n_key_value_heads", [None, 2])
def test_patching_every_head_recovers_clean_and_nothing_stays_corrupted(positions, n_key_value_heads):
    model = random_model(n_key_value_heads)
    pair = planted_pair(model)
    every = [p for group in head_patches([(l, h) for l in range(3) for h in range(4)], "head_out", positions) for p in group]
    for direction in ("denoise", "noise"):
        nothing, everything = normalised(model, pair, [[], every], direction).tolist()
        clean_side = 1.0 if direction == "denoise" else 0.0
        # Every head output at the answer position restored: the final residual is the clean one.
        assert everything == pytest.approx(clean_side, abs=1e-3)
        assert nothing == pytest.approx(1 - clean_side, abs=1e-3)  # float32 noise only


def tl_reference(model, pair, tl_function, **kwargs):
    """TransformerLens's own (unbatched, full-forward) patching with the raw logit difference."""
    _, clean_cache = model.run_with_cache(pair.clean_ids[None])

    def metric(logits):
        return logits[0, -1, pair.clean_token] - logits[0, -1, pair.corrupted_token]

    return tl_function(model, pair.corrupted_ids[None], clean_cache, metric, **kwargs)


@pytest.mark.parametrize("n_key_value_heads", [None, 2])
def test_batched_engine_matches_transformer_lens_patching(n_key_value_heads):
    model = random_model(n_key_value_heads)
    pair = planted_pair(model)
    clean, corrupted = cache_run(model, pair.clean_ids, "all"), cache_run(model, pair.corrupted_ids, "all")
    heads = [(l, h) for l in range(3) for h in range(4)]

    def ours(groups):
        return run_patches(model, pair, corrupted, clean, groups, batch_size=5, progress=False)

    expected = tl_reference(model, pair, patching.get_act_patch_attn_head_out_all_pos)
    torch.testing.assert_close(ours(head_patches(heads, "head_out", "all")).view(3, 4), expected, atol=1e-4, rtol=1e-4)
    expected = tl_reference(model, pair, patching.get_act_patch_attn_head_pattern_all_pos)
    torch.testing.assert_close(ours(head_patches(heads, "pattern", "all")).view(3, 4), expected, atol=1e-4, rtol=1e-4)
    final = len(pair.clean_ids) - 1
    rows = pd.DataFrame([(l, final, h) for l, h in heads], columns=["layer", "pos", "head_index"])
    by_pos = tl_reference(model, pair, patching.get_act_patch_attn_head_out_by_pos, index_axis_names=None, index_df=rows)
    torch.testing.assert_close(ours(head_patches(heads, "head_out", "final")), by_pos, atol=1e-4, rtol=1e-4)
    columns = [c for c in resid_columns(pair, model.tokenizer, tail=6) if len(c["positions"]) == 1]
    rows = pd.DataFrame([(l, c["positions"][0]) for l in range(3) for c in columns], columns=["layer", "pos"])
    resid = tl_reference(model, pair, patching.get_act_patch_resid_pre, index_axis_names=None, index_df=rows)
    torch.testing.assert_close(ours(resid_patches(3, columns)), resid, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("n_key_value_heads", [None, 2])
def test_mlp_output_patching_matches_transformer_lens(n_key_value_heads):
    model = random_model(n_key_value_heads)
    pair = planted_pair(model)
    n = len(pair.clean_ids)
    clean, corrupted = cache_run(model, pair.clean_ids, mlp=True), cache_run(model, pair.corrupted_ids, mlp=True)
    final = run_patches(model, pair, corrupted, clean, mlp_patches(3, n, "final"), progress=False)
    expected = tl_reference(model, pair, patching.get_act_patch_mlp_out)  # [layer, position], one position at a time
    torch.testing.assert_close(final, expected[:, -1], atol=1e-4, rtol=1e-4)
    everywhere = run_patches(model, pair, corrupted, clean, mlp_patches(3, n, "all"), progress=False)
    _, clean_cache = model.run_with_cache(pair.clean_ids[None])
    for layer in range(3):  # TransformerLens with one hook replacing the layer's MLP output at every position
        name = f"blocks.{layer}.hook_mlp_out"
        logits = model.run_with_hooks(pair.corrupted_ids[None], fwd_hooks=[(name, lambda act, hook: clean_cache[hook.name])])
        difference = logits[0, -1, pair.clean_token] - logits[0, -1, pair.corrupted_token]
        assert float(everywhere[layer]) == pytest.approx(float(difference), abs=1e-4)


def test_final_pattern_cache_matches_full_pattern_patching():
    model = random_model()
    pair = planted_pair(model)
    heads = [(l, h) for l in range(3) for h in range(4)]
    groups = head_patches(heads, "pattern", "final")
    full = [cache_run(model, ids, "all") for ids in (pair.clean_ids, pair.corrupted_ids)]
    rows = [cache_run(model, ids, "final") for ids in (pair.clean_ids, pair.corrupted_ids)]
    a = run_patches(model, pair, full[1], full[0], groups, progress=False)
    b = run_patches(model, pair, rows[1], rows[0], groups, progress=False)
    torch.testing.assert_close(a, b)


def test_planted_head_has_the_largest_effect():
    pair = planted_pair()
    result = activation_patching(planted, pair, kinds=("head_out", "pattern"), progress=False)
    for direction in ("denoise", "noise"):
        ranking = result.ranking("head_out", direction)
        assert ranking[0][:2] == PLANTED
        assert ranking[0][2] == pytest.approx(1.0, abs=1e-3)
        assert all(abs(effect) < 1e-3 for _, _, effect in ranking[1:])
    # It looks at the same place in both runs ("where"), but carries another token ("what").
    assert result.effect("pattern", "denoise").abs().max() < 1e-3


def test_residual_stream_shows_where_the_answer_lives():
    pair = planted_pair()
    result = activation_patching(planted, pair, kinds=("resid",), directions=("denoise",), tail=4, progress=False)
    grid = result.effect("resid", "denoise")
    labels = [c["label"] for c in result.resid_columns]
    assert labels[0] == "alpha/echo"
    # The first answer token is what the planted head copies: patching it alone restores the answer.
    assert grid[:, 0].tolist() == pytest.approx([1.0, 1.0], abs=1e-3)
    # Positions after it carry nothing this two-layer model reads at the answer position.
    assert grid[:, 1:].abs().max() < 1e-3


def test_subset_of_heads_and_json_round_trip(tmp_path):
    pair = planted_pair()
    result = activation_patching(
        planted, pair, heads=[(1, 2), (0, 0)], kinds=("head_out",), directions=("denoise",), progress=False
    )
    grid = result.effect()
    assert torch.isnan(grid).sum() == 8 - 2
    assert grid[1, 2] == pytest.approx(1.0, abs=1e-3)
    again = PatchingResult.from_json(result.to_json())
    assert again.ranking() == result.ranking()


def test_bad_heads_and_kinds_are_refused():
    pair = planted_pair()
    with pytest.raises(ValueError, match="do not exist"):
        activation_patching(planted, pair, heads=[(2, 0)], progress=False)
    with pytest.raises(ValueError, match="unknown kind"):
        activation_patching(planted, pair, kinds=("mlp",), progress=False)


def test_effect_vs_score_is_the_spearman_correlation():
    from rh_lens.interventions.patching import effect_vs_score

    pair = planted_pair()
    result = activation_patching(planted, pair, kinds=("head_out",), directions=("denoise",), progress=False)
    scores = [[0.0] * 4 for _ in range(2)]
    scores[1][2], scores[1][1] = 0.9, 0.5  # planted head first, a decoy second
    trial = TrialRecord(
        key="t",
        context_length=None,
        depth=None,
        needle_id=None,
        haystack=None,
        answer=None,
        generated_ids=[],
        response=None,
        rouge_recall=1.0,
        success=True,
        answer_span=None,
        head_scores=scores,
    )
    detection = DetectionResult("planted", 2, 4, [trial])
    found = effect_vs_score(result, detection)
    assert found["n_heads"] == 8
    from scipy.stats import spearmanr

    assert found["spearman"] == pytest.approx(spearmanr(found["effect"], found["score"])[0])
    assert found["spearman"] > 0.5
