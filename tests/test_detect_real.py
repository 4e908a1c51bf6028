"""End to end on a real model: SmolLM2-135M-Instruct from the offline catalogue, a small grid."""

import pytest

from rh_lens import BUILTIN_NEEDLES, detect, load_model, trial_grid

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    return load_model("smollm2-135m", device="cpu")


def test_detection_on_smollm2_finds_retrieval_heads_deterministically(smollm2, tmp_path):
    trials = trial_grid(smollm2.tokenizer, BUILTIN_NEEDLES[1:], [600, 1800], [20, 80], max_tokens=smollm2.cfg.n_ctx)
    assert max(len(t.prompt_ids) for t in trials) <= 2000
    first = detect(smollm2, trials, tmp_path / "a", progress=False)
    second = detect(smollm2, trials, tmp_path / "b", progress=False)

    assert len(first.successful) >= 1, [t.response for t in first.trials]
    assert len(first.retrieval_heads(0.1)) >= 1
    assert first.ranking()[0][2] > 0.5  # the best head copies most of the answer
    assert [t.generated_ids for t in first.trials] == [t.generated_ids for t in second.trials]
    assert first.ranking(20) == second.ranking(20)
    # Sparsity, as in the paper: far from every head copies.
    assert first.fraction_above(0.1) < 0.25


def test_fused_prefill_matches_explicit_attention(smollm2):
    # Prefill runs through SDPA when no hook listens to the attention pattern; decoding
    # afterwards must see the same cache as with TransformerLens's explicit attention.
    import torch

    from rh_lens.generation import greedy_decode, prefill

    (trial,) = trial_grid(smollm2.tokenizer, BUILTIN_NEEDLES[1:2], [1200], [50])
    tokens = torch.tensor(trial.prompt_ids)
    fused, explicit = prefill(smollm2, tokens[:-1], 256, fused=True), prefill(smollm2, tokens[:-1], 256, fused=False)
    with torch.inference_mode():
        a = smollm2(tokens[None, -1:], past_kv_cache=fused)
        b = smollm2(tokens[None, -1:], past_kv_cache=explicit)
    assert (a - b).abs().max().item() < 1e-3  # fp32, different summation order
    assert greedy_decode(smollm2, trial.prompt_ids, 12).tokens == greedy_decode(smollm2, trial.prompt_ids, 12, chunk_size=10_000).tokens


def test_hooks_on_the_pattern_disable_fusion(smollm2):
    import torch

    from rh_lens.generation import prefill

    seen = []
    with smollm2.hooks(fwd_hooks=[("blocks.3.attn.hook_pattern", lambda p, hook: seen.append(p.shape))]):
        prefill(smollm2, torch.arange(100, 140), chunk_size=20)
    assert seen == [torch.Size([1, 9, 20, 20]), torch.Size([1, 9, 20, 40])]
