"""Greedy decoding on the planted-head model (the fused prefill is tested in test_tl_internals)."""

from dataclasses import replace

import pytest
import torch
from planted import NEEDLE, build_planted_model, haystack_text

from rh_lens.errors import InputError
from rh_lens.model.generation import Decoding, decode_prompts, greedy_decode, prefill
from rh_lens.tasks.grading import answer_trials
from rh_lens.tasks.niah import build_trial, tokenize_haystack

model = build_planted_model()
trial = build_trial(model.tokenizer, tokenize_haystack(model.tokenizer, haystack_text(), 300), NEEDLE, 300, 50)
tokens = torch.tensor(trial.prompt_ids)


def test_greedy_decode_continues_the_answer_and_records_every_step():
    generation = greedy_decode(model, trial.prompt_ids, max_new_tokens=7, chunk_size=32)
    start, end = trial.answer_span
    assert generation.tokens[: end - start] == trial.prompt_ids[start:end]
    assert generation.argmax_keys.shape == (7, model.cfg.n_layers, model.cfg.n_heads)
    assert greedy_decode(model, trial.prompt_ids, 7, record_attention=False).tokens == generation.tokens


def test_a_chunk_ending_in_the_pad_token_is_not_masked():
    """SmolLM2's pad token is its chat template's <|im_end|>: TransformerLens would take a
    chunk ending in it for right padding and hide that token from every later query."""
    model = build_planted_model()
    model.tokenizer.pad_token, model.tokenizer.padding_side = "river", "right"
    ids = torch.tensor(trial.prompt_ids)
    boundary = trial.prompt_ids.index(model.tokenizer.pad_token_id) + 1  # the first chunk ends with the pad token
    chunked, whole = prefill(model, ids, chunk_size=boundary), prefill(model, ids, chunk_size=len(ids))
    for a, b in zip(chunked.entries, whole.entries):
        torch.testing.assert_close(a.past_keys, b.past_keys)
        torch.testing.assert_close(a.past_values, b.past_values)


def test_an_answer_ends_with_its_line_unless_its_trial_runs_to_the_end_of_the_turn(monkeypatch):
    """A worked chain of thought runs over lines: cut at its first, its final number is lost."""
    model = build_planted_model()
    charlie = model.tokenizer.convert_tokens_to_ids("charlie")
    decode = model.tokenizer.decode
    # the answer's third word read as a line break, as a multi-line answer's newline token would be
    monkeypatch.setattr(model.tokenizer, "decode", lambda ids, **kw: "\n" if list(ids) == [charlie] else decode(ids, **kw))

    def emitted(one_line: bool) -> list[int]:
        ((_, generation),) = decode_prompts(model, [trial.prompt_ids], Decoding(max_new_tokens=7, one_line=one_line))
        return generation.tokens

    start, end = trial.answer_span
    assert emitted(True) == trial.prompt_ids[start : start + 3]  # alpha bravo charlie: the line ends
    assert emitted(False)[: end - start] == trial.prompt_ids[start:end] and len(emitted(False)) == 7
    # the trial says which rule its answer follows; trials that differ are not decoded together
    ((_, answer, _),) = answer_trials(model, [replace(trial, one_line=False)], Decoding(max_new_tokens=7))
    assert len(answer.generated_ids) == 7
    ((_, answer, _),) = answer_trials(model, [trial], Decoding(max_new_tokens=7, one_line=False))
    assert len(answer.generated_ids) == 3
    with pytest.raises(InputError, match="decode them apart"):
        list(answer_trials(model, [trial, replace(trial, one_line=False)], Decoding(max_new_tokens=7)))
