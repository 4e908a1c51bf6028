"""The query-focused retrieval score of QRHead (Zhang et al., 2025), no decoding needed: at
the prompt, the attention mass from the question's tokens to the gold text (the needle, or
the gold paragraph), averaged over the question's tokens, minus the same with the question
replaced by a null query ("N/A", QRHead's default), so a head that attends there whatever
is asked scores 0. It needs no decoding; its map still averages the trials answered right,
as every method's does (`base.head_map`).

Where rh_lens differs from QRHead's code: the query tokens are the question's own (QRHead
also counts its instruction and chat suffix), and every gold token counts (QRHead drops the
tokens under mean - 2 std of a document's calibrated scores)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens import HookedTransformer

from rh_lens.detection.trace import TracedTrial
from rh_lens.errors import TrialError
from rh_lens.tasks.niah import Trial

NULL_QUERY = "N/A"


def _encode(tokenizer, trial: Trial, prompt: str):
    """The prompt's ids and character offsets, with special tokens added as the trial's were."""
    for special in (False, True):
        encoded = tokenizer(prompt, add_special_tokens=special, return_offsets_mapping=True)
        if prompt != trial.prompt or list(encoded["input_ids"]) == list(trial.prompt_ids):
            return encoded
    raise TrialError(f"trial {trial.key}: its prompt does not tokenize back to its prompt ids")


def _tokens(offsets, lo: int, hi: int) -> list[int]:
    return [i for i, (a, b) in enumerate(offsets) if b > a and a < hi and b > lo]


def spans(tokenizer, trial: Trial, question: str) -> tuple[list[int], list[int], list[int]]:
    """Token ids of the trial's prompt with its question replaced by `question`, the
    question's token positions and the gold text's (the question is the prompt's last
    occurrence of it; the gold text sits before it)."""
    q_at = trial.prompt.rfind(trial.needle.question)
    gold_at = trial.prompt.find(trial.needle.needle)
    if q_at < 0 or gold_at < 0 or gold_at + len(trial.needle.needle) > q_at:
        raise TrialError(f"trial {trial.key}: the question must follow the gold text in the prompt")
    prompt = trial.prompt[:q_at] + question + trial.prompt[q_at + len(trial.needle.question) :]
    encoded = _encode(tokenizer, trial, prompt)
    offsets = encoded["offset_mapping"]
    gold = _tokens(offsets, gold_at, gold_at + len(trial.needle.needle))
    query = _tokens(offsets, q_at, q_at + len(question))
    return list(encoded["input_ids"]), query, gold


@torch.inference_mode()
def question_to_gold(model: HookedTransformer, ids: list[int], query: list[int], gold: list[int]) -> Float[Tensor, "layer head"]:
    """Each head's attention mass on the gold tokens, averaged over the query tokens."""
    mass = torch.zeros(model.cfg.n_layers, model.cfg.n_heads)
    query_rows, gold_keys = torch.tensor(query), torch.tensor(gold)

    def read(pattern: Float[Tensor, "batch head query key"], hook) -> None:
        mass[hook.layer()] = pattern[0][:, query_rows][..., gold_keys].sum(dim=-1).mean(dim=-1).float().cpu()

    tokens = torch.tensor([ids], device=model.cfg.device)
    model.run_with_hooks(
        tokens, fwd_hooks=[(lambda name: name.endswith("attn.hook_pattern"), read)], stop_at_layer=model.cfg.n_layers
    )
    return mass


def trial_score(model: HookedTransformer, trial: Trial) -> Float[Tensor, "layer head"]:
    asked = question_to_gold(model, *spans(model.tokenizer, trial, trial.needle.question))
    null = question_to_gold(model, *spans(model.tokenizer, trial, NULL_QUERY))
    return asked - null


def trial_scores(model: HookedTransformer, traced: Sequence[TracedTrial]) -> Float[Tensor, "trial layer head"]:
    return torch.stack([trial_score(model, t.trial) for t in traced])
