"""Fine-tuning only chosen heads: the masks cover exactly a head's slices, every other entry
stays bit-identical through training, LoRA adapters start as a no-op and leave the model's
weights alone, and on the planted model training its (weakened) retrieval head lowers the
answer loss while training a head that reads nothing cannot."""

import pytest
import torch
from planted import NEEDLE, PLANTED, build_planted_model, haystack_text
from transformer_lens import HookedTransformer, HookedTransformerConfig

from rh_lens.errors import InputError
from rh_lens.interventions.finetune import (
    FinetuneOptions,
    HeadTraining,
    LoRA,
    answer_loss,
    answer_sequence,
    finetune,
    head_masks,
    lora_rank_for,
    parameter_count,
)
from rh_lens.tasks.niah import build_trial, tokenize_haystack


def gqa_model() -> HookedTransformer:
    """2 layers, 4 query heads reading 2 KV heads, d_model 16, d_head 4, an MLP and RMSNorm."""
    torch.manual_seed(0)
    cfg = HookedTransformerConfig(
        n_layers=2,
        d_model=16,
        n_ctx=32,
        d_head=4,
        n_heads=4,
        n_key_value_heads=2,
        d_vocab=20,
        d_mlp=32,
        act_fn="silu",
        gated_mlp=True,
        normalization_type="RMS",
        positional_embedding_type="rotary",
    )
    return HookedTransformer(cfg)


def random_sequences(n: int = 6, length: int = 20) -> list:
    generator = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        ids = torch.randint(20, (length,), generator=generator)
        mask = torch.zeros(length, dtype=torch.bool)
        mask[-5:] = True
        out.append((ids, mask))
    return out


def test_a_heads_mask_is_its_query_slices_and_the_kv_head_it_reads():
    model = gqa_model()
    masks = head_masks(model, [(1, 3)])  # query head 3 reads KV head 1 (two query heads per KV head)
    assert set(masks) == {f"blocks.1.attn.{n}" for n in ("W_Q", "b_Q", "W_O", "_W_K", "_b_K", "_W_V", "_b_V")}
    assert masks["blocks.1.attn.W_Q"][3].all() and not masks["blocks.1.attn.W_Q"][:3].any()
    assert masks["blocks.1.attn._W_K"][1].all() and not masks["blocks.1.attn._W_K"][0].any()
    # W_Q 16x4 + b_Q 4 + W_O 4x16, and K and V of its KV head: 16x4 + 4 each
    assert parameter_count(masks) == 64 + 4 + 64 + 2 * (64 + 4)
    with pytest.raises(InputError):
        head_masks(model, [(2, 0)])


def test_training_heads_moves_only_their_entries():
    model = gqa_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    masks = head_masks(model, [(0, 1), (1, 2)])
    result = finetune(model, random_sequences(), HeadTraining(model, masks), FinetuneOptions(steps=5, lr=1e-2, batch_size=2))
    assert len(result.losses) == 5 and result.n_parameters == parameter_count(masks)
    for name, p in model.named_parameters():
        mask = masks.get(name, torch.zeros_like(p, dtype=torch.bool))
        assert torch.equal(p[~mask], before[name][~mask]), name  # bit-identical outside the heads
        if mask.any():
            assert not torch.equal(p[mask], before[name][mask]), name
        assert p.requires_grad  # frozen only while training


def test_lora_starts_as_a_no_op_trains_its_adapters_and_leaves_the_weights():
    model = gqa_model()
    tokens = torch.randint(20, (1, 12), generator=torch.Generator().manual_seed(2))
    plain = model(tokens)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    lora = LoRA(model, rank=2)
    with lora.active():
        assert torch.equal(model(tokens), plain)  # B = 0
    # per layer: A_q 16x2, B_q 2x16 (4 heads x 4), A_v 16x2, B_v 2x8 (2 KV heads x 4); 2 layers
    assert lora.n_parameters() == 2 * (32 + 32 + 32 + 16)
    result = finetune(model, random_sequences(), lora, FinetuneOptions(steps=5, lr=1e-2, batch_size=2), arm="lora")
    assert result.arm == "lora" and result.n_parameters == lora.n_parameters()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    with lora.active():
        assert not torch.equal(model(tokens), plain)
    assert torch.equal(model(tokens), plain)  # outside `active`, no adapter acts
    assert lora_rank_for(model, lora.n_parameters()) == 2


def test_training_the_planted_retrieval_head_lowers_the_answer_loss_and_an_idle_head_cannot():
    def weakened():
        model = build_planted_model()
        attn = model.blocks[PLANTED[0]].attn
        with torch.no_grad():  # a softer query: attention spreads over the haystack
            attn.W_Q[PLANTED[1]] /= 30
            attn.b_Q[PLANTED[1]] /= 30
        return model

    model = weakened()
    haystack = tokenize_haystack(model.tokenizer, haystack_text(), 300)
    trials = [build_trial(model.tokenizer, haystack, NEEDLE, 300, depth) for depth in (0, 50, 100)]
    sequences = [answer_sequence(model.tokenizer, t) for t in trials]
    ids, mask = sequences[0]
    assert model.tokenizer.decode(ids[mask][:-1]).strip() == NEEDLE.real_needle
    options = FinetuneOptions(steps=15, lr=0.05, batch_size=3)
    start = answer_loss(model, sequences)
    finetune(model, sequences, HeadTraining(model, head_masks(model, [PLANTED])), options)
    assert answer_loss(model, sequences) < 0.5 * start
    idle = weakened()  # head 1-3 has zero weights: it reads nothing and writes nothing, so no gradient moves it
    before = {n: p.detach().clone() for n, p in idle.named_parameters()}
    finetune(idle, sequences, HeadTraining(idle, head_masks(idle, [(1, 3)])), options)
    assert all(torch.equal(p, before[n]) for n, p in idle.named_parameters())
    assert answer_loss(idle, sequences) == start
