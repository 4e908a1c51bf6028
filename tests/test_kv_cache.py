"""The head-wise cache in plain `transformers`: `generate` with a `HeadwiseCache` computes what
a full cache computes when streaming heads are masked, and what rh_lens's TransformerLens path
computes on the same weights.

The oracle here is an attention function written for the test: eager attention over the full
cache (transformers' own mask: causality, sliding windows) with every streaming head's keys
outside `KVPolicy.keeps` set to -inf.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from test_models import TINY_VOCAB, _randomise, _tiny_tokenizer
from transformers import (
    AttentionInterface,
    AutoModelForCausalLM,
    DynamicCache,
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
)
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from rh_lens.errors import InputError
from rh_lens.heads import KVHead
from rh_lens.interventions.compression import export_duo_attention
from rh_lens.kv import ATTENTION, HeadwiseCache, KVBudget, KVPolicy, cache_bytes, kv_bytes, policy_from_head_map
from rh_lens.model.headwise import GROWTH

COMMON = dict(
    vocab_size=TINY_VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=8,
    num_key_value_heads=4,
    max_position_embeddings=512,
    tie_word_embeddings=False,
)
CONFIGS = {
    "llama": lambda: LlamaConfig(**COMMON),
    "qwen2": lambda: Qwen2Config(**COMMON),
    "mistral": lambda: MistralConfig(**COMMON, sliding_window=40),
    "gemma3": lambda: Gemma3TextConfig(
        **{**COMMON, "head_dim": 16}, sliding_window=24, layer_types=["sliding_attention", "full_attention", "sliding_attention"]
    ),
}
FULL = frozenset(KVHead(*h) for h in [(0, 1), (1, 3), (1, 0), (2, 2)])  # uneven: grouped heads split


def tiny(name: str):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(CONFIGS[name](), attn_implementation="eager").eval()
    _randomise(model, seed=3)
    return model


def policy(sink: int = 3, window: int = 12) -> KVPolicy:
    return KVPolicy("test", 3, 8, 4, FULL, sink, window)


MASKED = "rh_lens_test_masked"


def masked_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Eager attention over every key, streaming heads limited to what the policy keeps."""
    kept: KVPolicy = module.config.rh_test_policy
    group = query.size(1) // key.size(1)
    key, value = key.repeat_interleave(group, 1), value.repeat_interleave(group, 1)
    scores = query @ key.transpose(-1, -2) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask[:, :, :, : key.size(2)]
    n, k = query.size(2), key.size(2)
    if n > 1 and getattr(module.config, "rh_test_decode_only", False):  # the prompt sees every key
        return (scores.softmax(-1) @ value).transpose(1, 2).contiguous(), None
    queries, keys = torch.arange(k - n, k)[:, None], torch.arange(k)[None]
    streaming = kept.streaming_heads(module.layer_idx)
    scores[:, streaming] = scores[:, streaming].masked_fill(~kept.keeps(keys, queries), float("-inf"))
    return (scores.softmax(-1) @ value).transpose(1, 2).contiguous(), None


AttentionInterface.register(MASKED, masked_attention)
AttentionMaskInterface.register(MASKED, eager_mask)


@torch.inference_mode()
def step_logits(model, prompt, fed, cache, chunk: int | None = None):
    for start in range(0, prompt.size(1), chunk or prompt.size(1)):  # the prompt, in chunks
        logits = [model(prompt[:, start : start + (chunk or prompt.size(1))], cache=cache, use_cache=True).logits[0, -1]]
    for token in fed:
        logits.append(model(token.view(1, 1), cache=cache, use_cache=True).logits[0, -1])
    return torch.stack(logits)


@pytest.mark.parametrize("name", CONFIGS)
def test_every_logit_matches_the_masked_full_cache(name):
    model = tiny(name)
    prompt = torch.randint(0, TINY_VOCAB, (1, 90), generator=torch.Generator().manual_seed(1))
    fed = torch.randint(0, TINY_VOCAB, (50,), generator=torch.Generator().manual_seed(2))  # the ring wraps
    model.config.rh_test_policy = policy()
    model.set_attn_implementation(MASKED)
    masked = step_logits(model, prompt, fed, DynamicCache())
    cache = HeadwiseCache.from_head_map(policy(), model)
    real = step_logits(model, prompt, fed, cache)
    torch.testing.assert_close(real, masked, atol=1e-4, rtol=1e-4)
    model.set_attn_implementation("eager")
    full = step_logits(model, prompt, fed, DynamicCache())
    assert (full - masked).abs().max() > 1e-2  # the policy matters: the comparison can fail
    d_head = getattr(model.config, "head_dim", None) or 64 // 8
    kept, _ = kv_bytes(policy(), 140, d_head, 4)  # what the policy keeps of 140 tokens (a sliding layer keeps less)
    growth = len(FULL) * (GROWTH + 90) * 2 * d_head * 4  # full heads' buffers grow ahead
    assert 0 < cache.nbytes() <= kept + growth + 4096  # + each ring slot's position


@pytest.mark.parametrize("name", CONFIGS)
def test_decode_only_matches_a_full_prefill_then_the_masked_cache(name):
    """Decode-only: the prompt attends over every key, decoding only over what the policy
    keeps; the cache holds only that after the prompt."""
    model = tiny(name)
    prompt = torch.randint(0, TINY_VOCAB, (1, 90), generator=torch.Generator().manual_seed(1))
    fed = torch.randint(0, TINY_VOCAB, (30,), generator=torch.Generator().manual_seed(2))
    model.config.rh_test_policy, model.config.rh_test_decode_only = policy(), True
    model.set_attn_implementation(MASKED)
    masked = step_logits(model, prompt, fed, DynamicCache())
    cache = HeadwiseCache.from_head_map(policy(), model, mode="decode-only")
    real = step_logits(model, prompt, fed, cache)
    torch.testing.assert_close(real, masked, atol=1e-4, rtol=1e-4)
    windowed = step_logits(model, prompt, fed, HeadwiseCache.from_head_map(policy(), model))
    assert (windowed[0] - masked[0]).abs().max() > 1e-2  # the prompt's own logits differ between the modes
    with pytest.raises(InputError, match="prefills the prompt whole"):
        step_logits(model, prompt, fed[:1], HeadwiseCache.from_head_map(policy(), model, mode="decode-only"), chunk=30)


@pytest.mark.parametrize("name", ["llama", "gemma3"])
def test_a_chunked_prefill_computes_what_one_call_does(name):
    """Windowed from the first token, the cache gives the same logits whatever the prompt's
    chunks (shorter and longer than the ring), so `prefill_chunk_size` bounds prefill memory
    without changing a token."""
    model = tiny(name)
    prompt = torch.randint(3, TINY_VOCAB, (1, 90), generator=torch.Generator().manual_seed(1))
    fed = torch.randint(0, TINY_VOCAB, (20,), generator=torch.Generator().manual_seed(2))
    whole = step_logits(model, prompt, fed, HeadwiseCache.from_head_map(policy(), model))
    for chunk in (7, 32):
        chunked = step_logits(model, prompt, fed, HeadwiseCache.from_head_map(policy(), model), chunk=chunk)
        torch.testing.assert_close(chunked, whole, atol=1e-4, rtol=1e-4)
    kwargs = dict(max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=0)
    one = model.generate(prompt, cache=HeadwiseCache.from_head_map(policy(), model), **kwargs)
    split = model.generate(prompt, cache=HeadwiseCache.from_head_map(policy(), model), prefill_chunk_size=16, **kwargs)
    assert split.tolist() == one.tolist()


@pytest.mark.parametrize(("name", "decode_only"), [("llama", False), ("qwen2", False), ("llama", True)])
def test_generate_matches_rh_lens_decoding_on_the_same_weights(name, decode_only, tmp_path):
    """transformers `generate` with the cache, and rh_lens's TransformerLens decoding with the
    same policy and mode, emit the same tokens."""
    from rh_lens.model.generation import Decoding, decode_prompts
    from rh_lens.model.loading import load_model

    hf = tiny(name)
    hf.save_pretrained(tmp_path / name)
    _tiny_tokenizer().save_pretrained(tmp_path / name)
    tl = load_model(str(tmp_path / name), device="cpu")
    prompt = torch.randint(3, TINY_VOCAB, (1, 80), generator=torch.Generator().manual_seed(4))
    cache = HeadwiseCache.from_head_map(policy(), hf, mode="decode-only" if decode_only else "windowed")
    if decode_only:  # rh_lens prefills all but the prompt's last token, which is decoded (the reference's order)
        with torch.inference_mode():
            hf(prompt[:, :-1], cache=cache, use_cache=True)
            tokens = [int(prompt[0, -1])]
            for _ in range(30):
                tokens.append(int(hf(torch.tensor([[tokens[-1]]]), cache=cache, use_cache=True).logits[0, -1].argmax()))
        out = torch.tensor([prompt[0, :-1].tolist() + tokens])
    else:
        out = hf.generate(prompt, cache=cache, max_new_tokens=30, do_sample=False, eos_token_id=None, pad_token_id=0)
    decoding = Decoding(max_new_tokens=30, kv_policy=policy(), kv_decode_only=decode_only)
    ((_, generation),) = decode_prompts(tl, [prompt[0].tolist()], decoding, record_attention=False)
    assert len(generation.tokens) >= 20  # not stopped early: a long comparison
    assert out[0, 80:].tolist()[: len(generation.tokens)] == generation.tokens


def test_every_byte_the_cache_holds_is_counted():
    """With no full heads (no growth room) the measured bytes are `cache_bytes`'s prediction
    plus the head indices, to the byte; the prediction counts each slot's position."""
    model = tiny("llama")
    streaming = KVPolicy("streaming", 3, 8, 4, frozenset(), 3, 12)
    cache = HeadwiseCache.from_head_map(streaming, model)
    step_logits(
        model, torch.randint(0, TINY_VOCAB, (1, 60), generator=torch.Generator().manual_seed(1)), torch.tensor([5]), cache
    )
    indices = sum(
        t.untyped_storage().nbytes() for layer in cache.layers for pair in layer.storage._indices.values() for t in pair
    )
    d_head = 64 // 8
    assert cache.nbytes() == cache_bytes(streaming, 61, d_head, 4) + indices
    assert cache_bytes(streaming, 61, d_head, 4) == kv_bytes(streaming, 61, d_head, 4)[0] + 3 * 4 * 0 + 3 * (3 + 12) * 8


def test_a_budget_sets_the_full_heads_or_the_window(tmp_path):
    model = tiny("llama")
    d_head, per_token = 64 // 8, 2 * (64 // 8) * 4
    export_duo_attention(policy(), tmp_path)  # gates: FULL at 1, the rest at 0 (ties in (layer, head) order)
    gates = tmp_path / "full_attention_heads.tsv"
    streaming = KVPolicy("x", 3, 8, 4, frozenset(), 4, 16)
    # tokens: every head keeps 4 + 16 of 200; each full head 180 more
    budget = KVBudget(context=200, tokens=12 * 20 + 2 * 180 + 179)
    fitted = HeadwiseCache.from_head_map(gates, model, full_fraction=None, sink=4, window=16, budget=budget).policy
    assert len(fitted.full) == 2 and fitted.full < FULL and fitted.window == 16
    assert kv_bytes(fitted, 200, d_head, 4)[0] // per_token <= budget.tokens
    # bytes: the full heads are set (full_fraction), the window as long as the budget allows
    by_bytes = KVBudget(context=200, bytes=cache_bytes(streaming, 200, d_head, 4) + 4 * 180 * per_token + 8 * 8 * 3 - 1)
    windowed = HeadwiseCache.from_head_map(gates, model, full_fraction=1 / 3, sink=4, budget=by_bytes).policy
    assert windowed.full == FULL and cache_bytes(windowed, 200, d_head, 4) <= by_bytes.bytes
    assert cache_bytes(replace(windowed, window=windowed.window + 1), 200, d_head, 4) > by_bytes.bytes
    with pytest.raises(InputError, match="less than every KV head"):
        HeadwiseCache.from_head_map(gates, model, full_fraction=None, budget=KVBudget(context=200, tokens=10))
    with pytest.raises(InputError, match="exactly one"):
        KVBudget(context=200)


def test_head_maps_are_read_from_each_format(tmp_path):
    export_duo_attention(policy(), tmp_path)
    read = policy_from_head_map(tmp_path / "full_attention_heads.tsv", 3, 8, 4, full_fraction=None, sink=3, window=12)
    assert read.full == FULL
    with pytest.raises(InputError, match="the model has 2 x 4"):
        policy_from_head_map(tmp_path / "full_attention_heads.tsv", 2, 8, 4, full_fraction=None)
    with pytest.raises(InputError, match="model has 3 x 8"):
        policy_from_head_map(KVPolicy("x", 4, 8, 4, frozenset()), 3, 8, 4)


def test_bad_input_is_refused():
    model = tiny("llama")
    with pytest.raises(InputError, match="model has 3 x 8"):
        HeadwiseCache.from_head_map(KVPolicy("x", 2, 8, 4, frozenset()), model)
    with pytest.raises(InputError, match="more than the context"):
        HeadwiseCache(KVPolicy("x", 3, 8, 4, frozenset(), 4, 600), model.config)
    from transformers import GPT2Config

    with pytest.raises(InputError, match="supports llama"):
        HeadwiseCache(KVPolicy("x", 2, 4, 4, frozenset()), GPT2Config(n_layer=2, n_head=4))
    model.set_attn_implementation(ATTENTION)
    with pytest.raises(InputError, match="needs a HeadwiseCache"):
        model(torch.ones(1, 4, dtype=torch.long), cache=DynamicCache())


def test_a_long_prompt_in_one_call_is_pointed_to_chunks(monkeypatch):
    import warnings

    from rh_lens.kv import hf_cache

    monkeypatch.setattr(hf_cache, "CHUNK_HINT", 50)
    model = tiny("llama")
    prompt, fed = torch.randint(3, TINY_VOCAB, (1, 60), generator=torch.Generator().manual_seed(1)), torch.tensor([5])
    with pytest.warns(UserWarning, match="prefill_chunk_size"):
        step_logits(model, prompt, fed, HeadwiseCache.from_head_map(policy(), model))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # in chunks, or decode-only (which needs the whole prompt): no warning
        step_logits(model, prompt, fed, HeadwiseCache.from_head_map(policy(), model), chunk=30)
        step_logits(model, prompt, fed, HeadwiseCache.from_head_map(policy(), model, mode="decode-only"))


@pytest.mark.parametrize("mode", ["windowed", "decode-only"])
def test_no_layer_leaves_its_keys_to_the_cycle_collector(mode):
    """Every transient tensor is freed when its layer is done: none is held by a reference cycle
    (a decode-only prompt's keys once were, every layer's until Python's collector ran, and the
    memory peak nearly doubled)."""
    import gc

    model = tiny("llama")
    cache = HeadwiseCache.from_head_map(policy(), model, mode=mode)
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        step_logits(
            model, torch.randint(3, TINY_VOCAB, (1, 90), generator=torch.Generator().manual_seed(1)), torch.tensor([5]), cache
        )
        gc.collect()
        cycled = [o for o in gc.garbage if isinstance(o, torch.Tensor)]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    assert not cycled
