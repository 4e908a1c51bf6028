"""Fine-tuning only chosen heads: the masks cover exactly a head's slices, every other entry
stays bit-identical through training, LoRA adapters start as a no-op and leave the model's
weights alone, and on the planted model training its (weakened) retrieval head lowers the
answer loss while training a head that reads nothing cannot."""

from functools import partial

import pytest
import torch
from planted import NEEDLE, PLANTED, build_planted_model, haystack_text, weakened_planted_model, write_inputs
from transformer_lens import HookedTransformer, HookedTransformerConfig

import rh_lens.interventions.head_tuning as head_tuning
from rh_lens.detection.records import DetectionResult, TrialRecord
from rh_lens.errors import InputError
from rh_lens.execution.options import RunOptions
from rh_lens.interventions.head_tuning import (
    FinetuneArms,
    FinetuneOptions,
    HeadTraining,
    LoRA,
    answer_loss,
    answer_sequence,
    finetune,
    finetune_experiment,
    head_masks,
    lora_rank_for,
    parameter_count,
)
from rh_lens.model.generation import PrefixCache
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


@pytest.mark.parametrize("arm", ["heads", "lora"])
def test_a_killed_training_run_resumes_from_its_checkpoint_to_the_same_weights(arm, tmp_path, monkeypatch):
    """Killed after 3 of 7 steps (checkpoints every 2), training goes on from step 2 and ends
    where an unbroken run ends: the same losses and bit-identical weights (a resume that
    restarted the batch sampler, lost the optimiser's moments or reloaded stale weights
    would not)."""
    monkeypatch.setattr(head_tuning, "CHECKPOINT_EVERY", 2)
    options = FinetuneOptions(steps=7, lr=1e-2, batch_size=2)

    def train(checkpoint=None):
        model = gqa_model()
        trainable = HeadTraining(model, head_masks(model, [(0, 1), (1, 2)])) if arm == "heads" else LoRA(model, rank=2)
        result = finetune(model, random_sequences(), trainable, options, arm, checkpoint=checkpoint)
        return result, [p.detach().clone() for p in trainable.params]

    unbroken, weights = train()
    checkpoint = tmp_path / "training.pt"
    original, calls = torch.optim.AdamW.step, []

    def killed_at_the_fourth_step(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(torch.optim.AdamW, "step", killed_at_the_fourth_step)
        with pytest.raises(KeyboardInterrupt):
            train(checkpoint)
    assert torch.load(checkpoint, weights_only=False)["step"] == 2
    resumed, resumed_weights = train(checkpoint)
    assert resumed.losses == unbroken.losses
    assert all(torch.equal(a, b) for a, b in zip(resumed_weights, weights, strict=True))
    with pytest.raises(InputError, match="another training run"):
        finetune(gqa_model(), random_sequences(), LoRA(gqa_model(), rank=1), options, "other", checkpoint=checkpoint)


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
    model = weakened_planted_model(30)
    haystack = tokenize_haystack(model.tokenizer, haystack_text(), 300)
    trials = [build_trial(model.tokenizer, haystack, NEEDLE, 300, depth) for depth in (0, 50, 100)]
    sequences = [answer_sequence(model.tokenizer, t) for t in trials]
    ids, mask = sequences[0]
    assert model.tokenizer.decode(ids[mask][:-1]).strip() == NEEDLE.real_needle
    options = FinetuneOptions(steps=15, lr=0.05, batch_size=3)
    start = answer_loss(model, sequences)
    finetune(model, sequences, HeadTraining(model, head_masks(model, [PLANTED])), options)
    assert answer_loss(model, sequences) < 0.5 * start
    idle = weakened_planted_model(30)  # head 1-3 has zero weights: it reads nothing and writes nothing, so no gradient moves it
    before = {n: p.detach().clone() for n, p in idle.named_parameters()}
    finetune(idle, sequences, HeadTraining(idle, head_masks(idle, [(1, 3)])), options)
    assert all(torch.equal(p, before[n]) for n, p in idle.named_parameters())
    assert answer_loss(idle, sequences) == start


def test_the_experiment_trains_each_arm_from_fresh_weights_and_judges_it_on_other_trials(tmp_path, monkeypatch):
    model = weakened_planted_model(30)
    haystack = tokenize_haystack(model.tokenizer, haystack_text(), 300)
    train = [build_trial(model.tokenizer, haystack, NEEDLE, 300, depth) for depth in (0, 50, 100)]
    held_out = [build_trial(model.tokenizer, haystack, NEEDLE, 280, depth) for depth in (25, 75)]
    text = torch.tensor(haystack[:100])
    record = dict(key="t", context_length=300, depth=50, needle_id="n", haystack="h", answer=None, generated_ids=[])
    record |= dict(response=None, rouge_recall=1.0, success=True, answer_span=None)
    ranking = DetectionResult("planted", 2, 4, [TrialRecord(**record, head_scores=[[0.0] * 4, [0.0, 0.05, 0.9, 0.0]])])
    arms = FinetuneArms(k=1, seeds=(0,), lora=True, training=FinetuneOptions(steps=15, lr=0.05, batch_size=3))
    options = RunOptions(max_new_tokens=6, progress=False)
    result = finetune_experiment(
        partial(weakened_planted_model, 30), ranking, train, held_out, text, arms, out_dir=tmp_path / "run", options=options
    )
    rows = {r["condition"]: r for r in result.summary()}
    assert set(rows) == {"none", "top-1", "random-1", "lora"}
    meta = {c.name: c.metadata for c in result.conditions}
    assert meta["none"]["training"] is None and meta["top-1"]["heads"] == ["1-2"]
    assert meta["top-1"]["heldout_answer_loss"] < 0.5 * meta["none"]["heldout_answer_loss"]
    # the random head (zero weights) cannot learn: same answers as no training
    assert [r.generated_ids for r in result.conditions[2].records] == [r.generated_ids for r in result.conditions[0].records]
    top, lora = meta["top-1"]["training"]["n_parameters"], meta["lora"]["training"]["n_parameters"]
    assert abs(lora - top) / top < 0.5  # LoRA at the top heads' size, to the nearest rank
    assert ("top-1", "random-1") in result.comparison_pairs() and ("top-1", "lora") in result.comparison_pairs()
    assert not list((tmp_path / "run" / "training").iterdir())  # each arm's checkpoint removed once it was judged
    # resumed: every arm judged already, so nothing trains again
    monkeypatch.setattr(head_tuning, "finetune", lambda *a, **k: pytest.fail("trained again"))
    again = finetune_experiment(
        partial(weakened_planted_model, 30),
        ranking,
        train,
        held_out,
        text,
        arms,
        out_dir=tmp_path / "run",
        options=RunOptions(max_new_tokens=6, progress=False, resume=True),
    )
    assert again.summary() == result.summary()


def test_finetune_on_the_command_line_refuses_training_on_the_evaluation_trials(tmp_path, monkeypatch, capsys):
    import json

    import rh_lens.app.cli as cli
    import rh_lens.app.workflows as workflows

    monkeypatch.setattr(workflows, "load_model", lambda name, **kwargs: build_planted_model())
    hay_dir, needle = write_inputs(tmp_path)
    hay = ["--haystack", hay_dir, "--needles", needle]
    ranking = tmp_path / "rank"
    detect = ["detect", "--model", "planted", *hay, "--lengths", "300", "--depths", "50", "--max-new-tokens", "6"]
    assert cli.main([*detect, "--out", str(ranking)]) == 0
    argv = ["finetune", "--model", "planted", "--scores", str(ranking / "results.json"), "--top-k", "1", "--steps", "2"]
    argv += ["--train", " ".join([*hay, "--lengths", "300", "--depths", "0"]), *hay, "--lengths", "280", "--depths", "100"]
    argv += ["--text", hay_dir, "--max-new-tokens", "6", "--out", str(tmp_path / "run")]
    assert cli.main(argv) == 1  # the same needle in training, evaluation and ranking: not held out
    assert "held" in capsys.readouterr().err.lower()
    assert not (tmp_path / "run").exists()
    # judged on another needle (words of the planted vocabulary): every arm runs, show reads it back
    other = {"needle": "The violin code is: river stone cloud maple lamp.", "question": "What is the violin code?"}
    (tmp_path / "other.jsonl").write_text(json.dumps(other | {"real_needle": "river stone cloud maple lamp"}) + "\n")
    argv[argv.index(needle, argv.index("--train") + 2)] = str(tmp_path / "other.jsonl")
    assert cli.main(argv) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert all(arm in printed for arm in ("none", "top-1", "random-1", "lora", "top-1 vs lora"))
    assert (tmp_path / "run" / "training_losses.png").read_bytes()[:4] == b"\x89PNG"
    assert cli.main(["show", str(tmp_path / "run")]) == 0 and "top-1 vs random-1" in capsys.readouterr().out


def test_the_answer_loss_is_the_cross_entropy_of_the_full_forward_pass_at_the_answer_tokens(monkeypatch):
    """Only the positions that predict an answer token are unembedded, and sequences that share
    a prompt prefix compute it once; the loss is still that of TransformerLens's own logits at
    the answer tokens (a mask shifted by one position, the wrong positions unembedded, or a
    cache holding another sequence's tokens would not match)."""
    model = gqa_model()
    sequences = random_sequences(3)
    # two more sequences share the first 12 tokens of the first one; one shares all of its prompt
    for shared in (12, 15):
        ids = sequences[0][0].clone()
        ids[shared:] = torch.randint(20, (20 - shared,), generator=torch.Generator().manual_seed(shared))
        sequences.append((ids, sequences[0][1]))
    expected = []
    for ids, mask in sequences:
        logits = model(ids[None])[0, :-1]
        expected.append(torch.nn.functional.cross_entropy(logits[mask[1:]], ids[1:][mask[1:]]).item())
    computed, caches = [], []
    original = head_tuning.forward
    monkeypatch.setattr(
        head_tuning, "forward", lambda m, tokens, *a, **k: computed.append(tokens.shape[1]) or original(m, tokens, *a, **k)
    )
    monkeypatch.setattr(head_tuning, "PrefixCache", lambda m: caches.append(PrefixCache(m)) or caches[-1])
    assert answer_loss(model, sequences) == pytest.approx(sum(expected) / len(expected), rel=1e-5)
    assert computed == [5] * 5  # each answer's own positions on top of its cached prompt
    prompts = [tuple(ids[:14].tolist()) for ids, _ in sequences]  # up to the position predicting the answer
    assert caches[0].computed == len({p[:k] for p in prompts for k in range(1, 15)})  # each prefix-tree node once
    with torch.no_grad():
        shifted = [(ids, mask.roll(-1)) for ids, mask in sequences]
        assert answer_loss(model, shifted) != pytest.approx(answer_loss(model, sequences), rel=1e-3)
    with pytest.raises(InputError, match="prompt"):
        answer_loss(model, [(torch.arange(5), torch.ones(5, dtype=torch.bool))])
