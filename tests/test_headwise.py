"""The head-wise cache keeps only what a KV policy keeps, and computes what the masking
simulation computes.

The simulation (-inf scores over a full cache, `compression_hooks`) is the oracle: at every
decode step every logit must agree within float tolerance, and generated tokens and recorded
argmaxes must be identical. Windows are small and decodes long, so rings wrap many times; the
policies split grouped KV heads unevenly, so a query head that follows the wrong KV head, a
streaming head that reads a key outside its sink and window, a ring that overwrites its sink
or a position that shifts after the ring wraps changes logits.
"""

from __future__ import annotations

import pytest
import torch
from planted import NEEDLE, PLANTED, build_planted_model, haystack_text
from test_tl_internals import random_model

from rh_lens.errors import InputError
from rh_lens.heads import KVHead
from rh_lens.interventions.compression import KVCompression, compression_hooks
from rh_lens.model.generation import Decoding, _extend, decode_prompts, forward, prefill
from rh_lens.model.headwise import GROWTH, KVPolicy, kv_bytes
from rh_lens.model.tl_internals import (
    compress_kv_cache,
    fused_attention,
    headwise_kv_cache,
    kv_cache_bytes,
    native_windows,
    truncate_kv_cache,
)
from rh_lens.tasks.niah import build_trial, tokenize_haystack


def gqa_model():
    """Rotary, 8 query heads over 4 KV heads, a sliding-window layer (window 24) first."""
    return random_model(n_layers=3, n_heads=8, n_key_value_heads=4, attn_types=["local", "global", "global"], window_size=24)


def policy_for(model, full: list[tuple[int, int]], sink: int = 3, window: int = 10, share: float = 0.0) -> KVPolicy:
    cfg = model.cfg
    n_kv = cfg.n_key_value_heads or cfg.n_heads
    return KVPolicy("test", cfg.n_layers, cfg.n_heads, n_kv, frozenset(KVHead(*h) for h in full), sink, window, share)


def random_prompt(model, n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, model.cfg.d_vocab, (n,), generator=torch.Generator().manual_seed(seed))


@torch.inference_mode()
def step_logits(model, prompt, fed, policy, *, real: bool, decode_only: bool, chunk_size: int | None = None):
    """Logits at each decode step, the prompt prefilled and then `fed` one token a step:
    through the head-wise cache (`real`) or the full cache under the simulation's hooks."""
    max_tokens = len(prompt) + len(fed)
    hooks = compression_hooks(policy)
    if real:
        if decode_only:
            cache = compress_kv_cache(model, prefill(model, prompt, chunk_size), policy, max_tokens)
        else:
            cache = headwise_kv_cache(model, policy, max_tokens)
            _extend(model, cache, prompt, 0, chunk_size)
        hooks = []
    else:
        with model.hooks(fwd_hooks=[] if decode_only else hooks):
            cache = prefill(model, prompt, chunk_size)
    logits = []
    with model.hooks(fwd_hooks=hooks), fused_attention(model):
        for token in fed:
            logits.append(forward(model, token.view(1, 1), cache)[0, -1])
    return torch.stack(logits), cache


# Uneven splits: in some layers only one KV head of a group pair is full, in others none or all.
SPLITS = {"quarter": [(0, 1), (1, 3), (2, 0)], "half": [(0, 0), (0, 3), (1, 1), (1, 2), (2, 0), (2, 2)]}


@pytest.mark.parametrize("decode_only", [False, True], ids=["windowed", "decode-only"])
@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("chunk_size", [None, 7, 64], ids=["one-chunk", "chunks-shorter-than-ring", "chunks-longer"])
def test_every_decode_logit_matches_the_masking_simulation(split, decode_only, chunk_size):
    model = gqa_model()
    policy = policy_for(model, SPLITS[split])
    prompt, fed = random_prompt(model, 150), random_prompt(model, 60, seed=1)  # 60 steps: the 10-slot ring wraps 6 times
    real, cache = step_logits(model, prompt, fed, policy, real=True, decode_only=decode_only, chunk_size=chunk_size)
    masked, _ = step_logits(model, prompt, fed, policy, real=False, decode_only=decode_only, chunk_size=chunk_size)
    torch.testing.assert_close(real, masked, atol=2e-5, rtol=2e-5)
    assert cache.entries[0].past_keys.size(1) == len(prompt) + len(fed)  # TransformerLens's position offset


def test_a_growing_window_streaminglm_policy_matches_too():
    model = gqa_model()
    policy = policy_for(model, [], sink=2, window=5, share=0.3)  # the window grows with the context
    prompt, fed = random_prompt(model, 90), random_prompt(model, 40, seed=1)
    real, _ = step_logits(model, prompt, fed, policy, real=True, decode_only=False, chunk_size=16)
    masked, _ = step_logits(model, prompt, fed, policy, real=False, decode_only=False, chunk_size=16)
    torch.testing.assert_close(real, masked, atol=2e-5, rtol=2e-5)


def test_the_masked_and_real_caches_differ_from_the_full_cache():
    """The comparison above can fail: the policy changes the logits."""
    model = gqa_model()
    policy = policy_for(model, SPLITS["quarter"])
    prompt, fed = random_prompt(model, 150), random_prompt(model, 20, seed=1)
    real, _ = step_logits(model, prompt, fed, policy, real=True, decode_only=False)
    everything, _ = step_logits(
        model, prompt, fed, policy_for(model, [(l, k) for l in range(3) for k in range(4)]), real=True, decode_only=False
    )
    assert (real - everything).abs().max() > 1e-2


planted = build_planted_model()
haystack = tokenize_haystack(planted.tokenizer, haystack_text(), 300)
planted_trials = [
    build_trial(planted.tokenizer, haystack, NEEDLE, length, depth)
    for length, depth in ((250, 10), (300, 50), (280, 90))  # the longest not first
]


@pytest.mark.parametrize("decode_only", [False, True], ids=["windowed", "decode-only"])
@pytest.mark.parametrize("batch_size", [1, 3])
@pytest.mark.parametrize("keep_retrieval_head", [True, False])
def test_decoding_records_what_the_simulation_records(decode_only, batch_size, keep_retrieval_head):
    """Tokens and every head's argmax at every step (prompt positions), one prompt at a time
    and three left-padded rows; the planted retrieval head full (the needle copied) or
    streaming (the needle lost)."""
    full = [PLANTED] if keep_retrieval_head else []
    policy = policy_for(planted, full, sink=4, window=16)
    prompts = [t.prompt_ids for t in planted_trials]
    decoding = Decoding(batch_size=batch_size, kv_policy=policy, kv_decode_only=decode_only)
    real = {i: (g.tokens, g.argmax_keys) for i, g in decode_prompts(planted, prompts, decoding)}
    hooks = compression_hooks(policy)
    simulated = Decoding(batch_size=batch_size)
    if decode_only:
        runs = decode_prompts(planted, prompts, simulated, decode_hooks=hooks)
        masked = {i: (g.tokens, g.argmax_keys) for i, g in runs}
    else:
        with planted.hooks(fwd_hooks=hooks):
            masked = {i: (g.tokens, g.argmax_keys) for i, g in decode_prompts(planted, prompts, simulated)}
    assert real.keys() == masked.keys() == {0, 1, 2}
    for i in real:
        assert real[i][0] == masked[i][0], f"prompt {i}: tokens differ"
        assert torch.equal(real[i][1], masked[i][1]), f"prompt {i}: argmax keys differ"
    answer = planted.tokenizer.decode(real[0][0])
    assert (NEEDLE.real_needle in answer) == keep_retrieval_head


def test_measured_bytes_are_the_predicted_ones():
    """Rings hold exactly sink + window slots (and their positions); full heads every key
    plus their buffers' growth room; the full cache at least every key of every head."""
    model = random_model(n_layers=3, n_heads=8, n_key_value_heads=4, use_local_attn=False, attn_types=None)
    cfg, chunk = model.cfg, 64
    policy = policy_for(model, SPLITS["quarter"], sink=4, window=32)
    prompt = random_prompt(model, 400)
    cache = headwise_kv_cache(model, policy, 400)
    _extend(model, cache, prompt, 0, chunk)
    predicted, full = kv_bytes(policy, 400, cfg.d_head, cfg.dtype.itemsize)
    growth = len(policy.full) * (GROWTH + chunk) * 2 * cfg.d_head * cfg.dtype.itemsize
    positions = cfg.n_layers * (4 + 32) * 8  # one ring per layer, int64 positions
    measured = kv_cache_bytes(cache)
    assert predicted + positions <= measured <= predicted + positions + growth
    assert measured < 0.5 * full
    assert kv_cache_bytes(prefill(model, prompt, chunk)) >= full  # the simulation keeps every key


def test_a_sliding_window_layer_is_counted_against_the_models_real_cache():
    """Gemma-3-style: a local layer's full cache is its window, and so are the bytes kept."""
    model = gqa_model()  # layer 0: window 24
    cfg, chunk = model.cfg, 64
    policy = policy_for(model, SPLITS["quarter"], sink=4, window=16)
    cache = headwise_kv_cache(model, policy, 400)
    _extend(model, cache, random_prompt(model, 400), 0, chunk)
    per_token = 2 * cfg.d_head * cfg.dtype.itemsize
    predicted, full = kv_bytes(policy, 400, cfg.d_head, cfg.dtype.itemsize, native_windows(model))
    assert full == 4 * (24 + 400 + 400) * per_token  # 4 KV heads per layer; layer 0 holds 24 tokens
    assert predicted == (1 * 24 + 3 * (4 + 16) + 2 * (1 * 400 + 3 * (4 + 16))) * per_token
    positions = ((24 + 20) + 2 * 20) * 8
    growth = 2 * (GROWTH + chunk) * per_token  # the full heads of layers 1 and 2
    assert predicted + positions <= kv_cache_bytes(cache) <= predicted + positions + growth


def test_a_sliding_window_layer_keeps_only_its_window():
    model = gqa_model()  # layer 0: window 24
    policy = policy_for(model, [(0, 0), (0, 1), (0, 2), (0, 3)], sink=4, window=16)
    cache = headwise_kv_cache(model, policy, 500)
    _extend(model, cache, random_prompt(model, 500), 0, None)
    layer = cache.entries[0].rh_headwise
    assert layer.full is None and [r.sink + r.ring for r in layer.rings] == [24]


def test_bad_input_is_refused():
    model = gqa_model()
    with pytest.raises(InputError, match="outside"):
        policy_for(model, [(5, 0)])
    with pytest.raises(InputError, match="window"):
        policy_for(model, [], window=0)
    other = KVPolicy("other", 5, 8, 4, frozenset(), 4, 16)
    with pytest.raises(InputError, match="model has 3 x 8"):
        headwise_kv_cache(model, other, 100)
    cache = headwise_kv_cache(model, policy_for(model, []), 100)
    with pytest.raises(InputError, match="cut back"):
        truncate_kv_cache(cache, 10)
    with pytest.raises(RuntimeError, match="fused_attention"):
        model(random_prompt(model, 5)[None], past_kv_cache=cache)  # TransformerLens's own forward
    capped = random_model()  # a logit soft cap is fine; a score soft cap is not
    capped.cfg.attn_scores_soft_cap = 50.0
    with pytest.raises(InputError, match="does not support"):
        headwise_kv_cache(capped, policy_for(capped, []), 100)
    real = KVCompression(policy_for(model, []))  # the default cache is real: hooks alone would free nothing
    with pytest.raises(InputError, match='cache="masked"'):
        with real(model):
            pass
    with KVCompression(policy_for(model, []), cache="masked")(model):
        assert model.hook_dict["blocks.0.attn.hook_attn_scores"].fwd_hooks
