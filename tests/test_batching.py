"""Many prompts at once: prefix sharing and batched decoding give what one prompt at a time gives.

Every comparison is exact (tokens, their number, and every head's argmax at every step), so a
forked cache that leaks one prompt into another, a padded row whose positions shift, or a row
that stops late or early fails it.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from planted import NEEDLE, PLANTED, build_planted_model, haystack_text
from test_tl_internals import random_model

import rh_lens.model.generation as generation
from rh_lens.interventions.compression import KVCompression, KVPolicy
from rh_lens.interventions.masking import HeadMask
from rh_lens.model.generation import _LEFT_PADDING as LEFT_PADDING
from rh_lens.model.generation import (
    SEQUENTIAL,
    Decoding,
    PrefixCache,
    decode_conditions,
    decode_prompts,
    key_positions,
    prefix_order,
)
from rh_lens.tasks.grading import answer_trials
from rh_lens.tasks.needles import Needle
from rh_lens.tasks.niah import build_trial, tokenize_haystack

planted = build_planted_model()
haystack = tokenize_haystack(planted.tokenizer, haystack_text(), 300)
OTHER = Needle(
    needle="The secret code is: echo delta charlie.", question="What is the secret code?", real_needle="echo delta charlie"
)
# Prompts of four lengths sharing their first tokens (one haystack), two needles.
trials = [
    build_trial(planted.tokenizer, haystack, needle, length, depth)
    for needle in (NEEDLE, OTHER)
    for length, depth in ((300, 50), (260, 50), (240, 90), (280, 10))
]


def random_prompts(model, n: int = 6, seed: int = 1) -> list[list[int]]:
    """Token prompts of different lengths that share prefixes of different lengths."""
    generator = torch.Generator().manual_seed(seed)
    base = torch.randint(0, model.cfg.d_vocab, (120,), generator=generator).tolist()
    prompts = []
    for i in range(n):
        tail = torch.randint(0, model.cfg.d_vocab, (10 + 7 * i,), generator=generator).tolist()
        prompts.append(base[: 20 + 15 * i] + tail)
    return prompts


def decoded(model, prompts, decoding, **kwargs) -> dict[int, tuple[list[int], torch.Tensor | None]]:
    return {i: (g.tokens, g.argmax_keys) for i, g in decode_prompts(model, prompts, decoding, **kwargs)}


def assert_same(got, expected) -> None:
    assert got.keys() == expected.keys()
    for i in expected:
        assert got[i][0] == expected[i][0], f"prompt {i}: tokens differ"
        if expected[i][1] is not None:
            assert torch.equal(got[i][1], expected[i][1]), f"prompt {i}: argmax keys differ"


MODES = [Decoding(batch_size=1), Decoding(batch_size=3, share_prefix=False), Decoding(batch_size=3), Decoding(batch_size=8)]


@pytest.mark.parametrize("decoding", MODES, ids=["prefix", "batch", "both", "one-batch"])
def test_random_model_decodes_every_prompt_as_alone(decoding):
    """Rotary positions, grouped-query heads, a sliding-window layer: the rows of a padded batch
    and prompts prefilled from a shared prefix see exactly the keys they see alone."""
    model = random_model()
    prompts = random_prompts(model)
    expected = decoded(model, prompts, SEQUENTIAL)
    decoding = Decoding(max_new_tokens=12, batch_size=decoding.batch_size, share_prefix=decoding.share_prefix)
    assert_same(decoded(model, prompts, decoding), {i: (t[:12], a[:12]) for i, (t, a) in expected.items()})


@pytest.mark.parametrize("decoding", MODES, ids=["prefix", "batch", "both", "one-batch"])
def test_planted_trials_answer_and_stop_as_alone(decoding, monkeypatch):
    """Learned position embeddings, answers that end at different steps, two needles in prompts
    that share their start: each row gets its own needle's answer and stops where it stops alone."""
    full_stop = planted.tokenizer.convert_tokens_to_ids(".")
    monkeypatch.setattr(generation, "_eos_ids", lambda model: {full_stop})  # the planted model ends its answer with "."
    prompts = [t.prompt_ids for t in trials]
    order = prefix_order(prompts)
    expected = decoded(planted, prompts, SEQUENTIAL)
    got = {order[k]: v for k, v in decoded(planted, [prompts[i] for i in order], decoding).items()}
    assert_same(got, expected)
    assert len({len(tokens) for tokens, _ in expected.values()}) > 1  # rows stop at different steps
    for trial, i in zip(trials, range(len(trials))):
        answer = planted.tokenizer.decode(got[i][0])
        assert trial.needle.real_needle in answer, answer  # no row answers with the other needle


def test_a_prefix_cache_recomputes_only_what_differs():
    prompts = [t.prompt_ids[:-1] for t in trials[:2]]
    shared = next(i for i, (a, b) in enumerate(zip(*prompts)) if a != b)
    cache = PrefixCache(planted)
    cache.prefill(torch.tensor(prompts[0]))
    cache.prefill(torch.tensor(prompts[1]))
    assert (cache.reused, cache.computed) == (shared, len(prompts[0]) + len(prompts[1]) - shared)


@pytest.mark.parametrize("kind", ["compression", "compression-decode-only", "mask"])
def test_hooks_act_on_every_row_at_its_own_positions(kind):
    """A KV policy counts its sink and window from each row's first real token (not from the
    padding); a head mask flattens each row over its own keys."""
    model = random_model(window_size=64)  # the model's own window wide enough for the policy's to matter
    policy = KVPolicy("test", 2, 4, 2, frozenset({(1, 0)}), sink=3, window=5)
    intervention = {
        "compression": KVCompression(policy, cache="masked"),
        "compression-decode-only": KVCompression(policy, decode_only=True, cache="masked"),
        "mask": HeadMask([(0, 1), (1, 3)]),
    }[kind]
    prompts = random_prompts(model)
    hooks = intervention.hooks(model)

    def run(decoding):
        if intervention.decode_only:
            return decoded(model, prompts, decoding, decode_hooks=hooks)
        with model.hooks(fwd_hooks=hooks):
            return decoded(model, prompts, decoding)

    decoding = Decoding(max_new_tokens=10, batch_size=6)
    expected = run(Decoding(max_new_tokens=10, batch_size=1, share_prefix=False))
    assert_same(run(decoding), expected)
    assert_same(run(Decoding(max_new_tokens=10, batch_size=6, share_prefix=False)), expected)
    unhooked = decoded(model, prompts, Decoding(max_new_tokens=10, batch_size=1))
    assert any(not torch.equal(unhooked[i][1], expected[i][1]) for i in expected)  # the hooks change what heads do


@pytest.mark.parametrize("batch_size,merge", [(1, True), (4, True), (None, True), (4, False)])
def test_conditions_that_read_the_prompt_unchanged_share_one_prefill(batch_size, merge, monkeypatch):
    """No intervention, decode-time masks and a KV policy applied after prefill: each prompt is
    prefilled once for all of them, and each decodes exactly as it does alone (tokens and
    every head's argmax at every step), whether the conditions without a KV policy decode in
    one batch (each row under its own condition's hooks, padding included) or one after
    another."""
    model = random_model(n_layers=3, attn_types=["local", "global", "global"], window_size=24)
    policy = KVPolicy("test", 3, 4, 2, frozenset({(1, 0), (2, 1)}), sink=3, window=5)
    decoding = Decoding(max_new_tokens=10, batch_size=batch_size, merge_conditions=merge)
    conditions = [
        (decoding, []),
        (decoding, HeadMask([(1, 1), (2, 3)]).hooks(model)),
        (decoding, KVCompression(policy, decode_only=True, cache="masked").hooks(model)),
        (replace(decoding, kv_policy=policy, kv_decode_only=True), []),
    ]
    prompts = random_prompts(model)
    prompts = [prompts[i] for i in prefix_order(prompts)]
    computed = []
    extend = generation._extend
    monkeypatch.setattr(
        generation,
        "_extend",
        lambda m, c, tokens, start, *a: computed.append(len(tokens) - start) or extend(m, c, tokens, start, *a),
    )
    rows_per_step = []
    forward = generation.forward
    monkeypatch.setattr(
        generation, "forward", lambda m, tokens, *a, **k: rows_per_step.append(len(tokens)) or forward(m, tokens, *a, **k)
    )
    got: dict[int, dict] = {c: {} for c in range(len(conditions))}
    for i, c, g in decode_conditions(model, prompts, conditions, record_attention=True):
        got[c][i] = (g.tokens, g.argmax_keys)
    prompts_at_once = batch_size or len(prompts)
    # Merged, the three conditions without a KV policy share decode steps: rows of several conditions in one.
    assert (max(rows_per_step) == 3 * prompts_at_once) if merge else (max(rows_per_step) == prompts_at_once)
    shared = sum(computed)
    computed.clear()
    list(decode_conditions(model, prompts, conditions[:1]))
    assert shared == sum(computed) < sum(len(p) - 1 for p in prompts)  # one prefill for four conditions, prefixes shared
    for c, (decoding, hooks) in enumerate(conditions):
        alone = Decoding(max_new_tokens=10, batch_size=1, share_prefix=False, kv_policy=decoding.kv_policy, kv_decode_only=True)
        assert_same(got[c], decoded(model, prompts, alone, decode_hooks=hooks))
    assert got[0] != got[1] and any(not torch.equal(got[0][i][1], got[2][i][1]) for i in got[0])  # the conditions differ


def test_only_conditions_that_read_the_prompt_unchanged_share_a_prefill():
    from rh_lens.errors import InputError

    model = random_model()
    policy = KVPolicy("test", 2, 4, 2, frozenset({(1, 0)}), sink=3, window=5)
    with pytest.raises(InputError, match="windowed KV policy"):
        list(decode_conditions(model, random_prompts(model), [(Decoding(), []), (Decoding(kv_policy=policy), [])]))
    with pytest.raises(InputError, match="chunk size"):
        list(decode_conditions(model, random_prompts(model), [(Decoding(), []), (Decoding(chunk_size=16), [])]))


def test_key_positions_discount_each_rows_padding():
    assert key_positions(4, "cpu").tolist() == [[0, 1, 2, 3]]
    token = LEFT_PADDING.set(torch.tensor([0, 2]))
    try:
        assert key_positions(4, "cpu").tolist() == [[0, 1, 2, 3], [-2, -1, 0, 1]]
    finally:
        LEFT_PADDING.reset(token)


def test_answers_come_back_for_every_trial_in_any_batching():
    answers = {i: a for i, a, _ in answer_trials(planted, trials, Decoding(max_new_tokens=8, batch_size=3))}
    assert sorted(answers) == list(range(len(trials)))
    assert all(answers[i].key == trial.key and answers[i].success for i, trial in enumerate(trials))


def test_bad_batch_sizes_are_refused():
    from rh_lens.errors import InputError

    with pytest.raises(InputError, match="batch size 0"):
        Decoding(batch_size=0)


def test_rows_of_conditions_decoded_together_keep_their_own_hooks_as_others_leave(monkeypatch):
    """Answers that end at "." (4, 6 or 1 tokens here): rows of three conditions leave one
    batch at different steps, and each row left decodes under its own condition's hooks to the
    end, exactly as that condition decodes the prompt alone."""
    monkeypatch.setattr(generation, "_eos_ids", lambda model: {planted.tokenizer.convert_tokens_to_ids(".")})
    decoding = Decoding(max_new_tokens=12, batch_size=4)
    conditions = [
        (decoding, []),
        (decoding, HeadMask([PLANTED], decode_only=True).hooks(planted)),
        (decoding, HeadMask([(0, 2)], decode_only=True).hooks(planted)),
    ]
    prompts = [t.prompt_ids for t in trials]
    got: dict[int, dict] = {c: {} for c in range(len(conditions))}
    for i, c, g in decode_conditions(planted, prompts, conditions, record_attention=True):
        got[c][i] = (g.tokens, g.argmax_keys)
    assert len({len(tokens) for c in got for tokens, _ in got[c].values()}) >= 3  # rows leave at three steps at least
    assert got[0] != got[1]  # the planted head's mask acts on its rows only
    for c, (_, hooks) in enumerate(conditions):
        assert_same(got[c], decoded(planted, prompts, replace(SEQUENTIAL, max_new_tokens=12), decode_hooks=hooks))
