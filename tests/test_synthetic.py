"""The synthetic retrieval task (trials and training sequences), one training step, and the
loader's training-checkpoint option."""

import pytest
import torch
from planted import DECOY, PLANTED, build_planted_model

from rh_lens.detection.probes import repeat_attention
from rh_lens.errors import InputError
from rh_lens.model import tl_internals
from rh_lens.model.loading import load_model
from rh_lens.tasks.niah import QUESTION_BUDGET, build_trial
from rh_lens.tasks.synthetic import Batches, SyntheticTask, sequence_ids, tiny_model, train_step

task = SyntheticTask()
tokenizer = task.tokenizer()
vocab = tokenizer.get_vocab()


def test_trials_carry_exact_answer_spans():
    trials = task.trials(tokenizer, 4, (240, 300), seed=3)
    assert len(trials) == 8 and len({t.prompt_sha256 for t in trials}) == 8
    for trial in trials:
        start, end = trial.answer_span
        answer_ids = trial.prompt_ids[start:end]
        assert answer_ids == [vocab[w] for w in trial.needle.real_needle.split()]
        assert len(answer_ids) == task.answer_tokens
        # The span is inside the needle sentence: "... k07 is" comes right before it.
        assert (
            trial.prompt_ids[start - 1] == vocab["is"] and trial.prompt_ids[start - 2] == vocab[trial.needle.question.split()[-2]]
        )
        assert trial.prompt_ids[-1] == vocab[":"] and len(trial.prompt_ids) <= trial.context_length - QUESTION_BUDGET + 40


def test_training_sequences_are_the_trials_tokens():
    generator = torch.Generator().manual_seed(0)
    needle = task.needle(generator)
    filler_text = task.haystack(10, generator)  # 10 sentences of 5 words and "."
    filler = tokenizer(filler_text, add_special_tokens=False)["input_ids"]
    assert len(filler) == 60
    needle_tokens = len(tokenizer(" " + needle.needle, add_special_tokens=False)["input_ids"])
    for depth, at in ((0, 0), (50, 30), (100, 60)):
        trial = build_trial(tokenizer, filler, needle, 60 + QUESTION_BUDGET + needle_tokens, depth, chat=False)
        ids, start = sequence_ids(tokenizer, filler, needle, at)
        assert ids[:start] == trial.prompt_ids
        assert ids[start:] == [vocab[w] for w in needle.real_needle.split()] + [tokenizer.eos_token_id]


def test_batches_mask_the_answer_and_the_control_answers_afresh():
    generator = torch.Generator().manual_seed(1)
    ids, mask = Batches(task, tokenizer, 20, 60)(4, generator)
    assert ids.shape == mask.shape and ids.shape[0] == 4
    for row, m in zip(ids.tolist(), mask.tolist()):
        predicted = [row[p + 1] for p in range(len(row) - 1) if m[p]]
        assert predicted[-1] == tokenizer.eos_token_id and len(predicted) == task.answer_tokens + 1
        needle_at = row.index(vocab["is"])  # the needle's "is" comes before the question's
        assert predicted[:-1] == row[needle_at + 1 : needle_at + 1 + task.answer_tokens]
    control, _ = Batches(task, tokenizer, 20, 60, retrieval=False)(8, torch.Generator().manual_seed(1))
    copied = 0
    for row in control.tolist():
        needle_at = row.index(vocab["is"])
        copied += row[needle_at + 1 : needle_at + 1 + task.answer_tokens] == row[-1 - task.answer_tokens : -1]
    assert copied == 0


def test_a_training_step_lowers_the_loss_on_a_fixed_batch():
    model = tiny_model(task, n_layers=1, n_heads=2, d_model=32, n_ctx=128, seed=0)
    ids, mask = Batches(task, model.tokenizer, 20, 40)(8, torch.Generator().manual_seed(2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    first, _ = train_step(model, optimizer, ids, mask)
    for _ in range(20):
        last, _ = train_step(model, optimizer, ids, mask)
    assert last < first - 0.5
    assert not model.training  # left in eval mode for detection


def test_repeat_attention_finds_the_planted_induction_head():
    model = build_planted_model()
    echo, induction = repeat_attention(model, length=20)
    assert tuple(divmod(int(induction.argmax()), model.cfg.n_heads)) == PLANTED
    assert induction[PLANTED] > 0.9
    assert tuple(divmod(int(echo.argmax()), model.cfg.n_heads)) == DECOY  # the duplicate-token head looks at the token itself


def test_checkpoint_reaches_the_loader(monkeypatch):
    calls = []

    def fake(name, **kwargs):
        calls.append((name, kwargs))
        raise RuntimeError("no hub here")

    monkeypatch.setattr(tl_internals.HookedTransformer, "from_pretrained_no_processing", fake)
    with pytest.raises(Exception, match="no hub here"):
        load_model("EleutherAI/pythia-70m", device="cpu", checkpoint=4000)
    assert calls == [("EleutherAI/pythia-70m", {"device": "cpu", "dtype": torch.float32, "checkpoint_value": 4000})]
    with pytest.raises(InputError, match="checkpoint"):
        load_model("smollm2-135m", checkpoint=10)


def test_checkpoint_on_the_command_line(capsys):
    from rh_lens.app.cli import main

    assert main(["detect", "--model", "EleutherAI/pythia-70m", "--checkpoint", "-3", "--out", "x"]) == 2
    assert "--checkpoint" in capsys.readouterr().err


def test_training_filler_is_cut_like_a_trials_haystack():
    """Trials cut the haystack mid-sentence; so must training, or the model never sees it."""
    ids, _ = Batches(task, tokenizer, 20, 60)(64, torch.Generator().manual_seed(4))
    before_question = [row[row.index(vocab["Based"]) - 1] for row in ids.tolist()]
    assert any(t != vocab["."] for t in before_question)
