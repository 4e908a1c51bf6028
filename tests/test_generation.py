"""Greedy decoding on the planted-head model (the fused prefill is tested in test_tl_internals)."""

import torch

from planted import NEEDLE, build_planted_model, haystack_text
from rh_lens.generation import greedy_decode
from rh_lens.niah import build_trial, tokenize_haystack

model = build_planted_model()
trial = build_trial(model.tokenizer, tokenize_haystack(model.tokenizer, haystack_text(), 300), NEEDLE, 300, 50)
tokens = torch.tensor(trial.prompt_ids)


def test_greedy_decode_continues_the_answer_and_records_every_step():
    generation = greedy_decode(model, trial.prompt_ids, max_new_tokens=7, chunk_size=32)
    start, end = trial.answer_span
    assert generation.tokens[: end - start] == trial.prompt_ids[start:end]
    assert generation.argmax_keys.shape == (7, model.cfg.n_layers, model.cfg.n_heads)
    assert greedy_decode(model, trial.prompt_ids, 7, record_attention=False).tokens == generation.tokens
