"""Greedy decoding and the fused-attention prefill, on the planted-head model."""

import torch

from planted import NEEDLE, build_planted_model, haystack_text
from rh_lens.generation import fused_attention, greedy_decode, prefill
from rh_lens.niah import build_trial, tokenize_haystack

model = build_planted_model()
trial = build_trial(model.tokenizer, tokenize_haystack(model.tokenizer, haystack_text(), 300), NEEDLE, 300, 50)
tokens = torch.tensor(trial.prompt_ids)


def test_fused_prefill_fills_the_same_cache_as_explicit_attention():
    for chunk in (None, 16):
        fused, explicit = prefill(model, tokens, chunk, fused=True), prefill(model, tokens, chunk, fused=False)
        for a, b in zip(fused.entries, explicit.entries):
            torch.testing.assert_close(a.past_keys, b.past_keys)
            torch.testing.assert_close(a.past_values, b.past_values)


def test_layers_with_pattern_hooks_are_not_fused():
    seen = []
    with model.hooks(fwd_hooks=[("blocks.1.attn.hook_pattern", lambda p, hook: seen.append(p.shape))]):
        with fused_attention(model) as all_fused:
            assert not all_fused
            assert model.blocks[0].attn.forward.__name__ == "_sdpa_forward"
            assert model.blocks[1].attn.forward.__name__ != "_sdpa_forward"
        prefill(model, tokens[:40], chunk_size=20)
    assert seen == [torch.Size([1, 4, 20, 20]), torch.Size([1, 4, 20, 40])]
    assert "forward" not in vars(model.blocks[0].attn)  # restored on exit


def test_greedy_decode_continues_the_answer_and_records_every_step():
    generation = greedy_decode(model, trial.prompt_ids, max_new_tokens=7, chunk_size=32)
    start, end = trial.answer_span
    assert generation.tokens[: end - start] == trial.prompt_ids[start:end]
    assert generation.argmax_keys.shape == (7, model.cfg.n_layers, model.cfg.n_heads)
    assert greedy_decode(model, trial.prompt_ids, 7, record_attention=False).tokens == generation.tokens
