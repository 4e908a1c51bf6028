"""The retrieval score of Wu et al. (2024), exactly as their reference implementation computes it.

Per trial: at every decode step t the model emits w_t; a head "copies" at step t when
the key it attends to most (top-1 of its newest attention row) lies inside the answer
span [s, e) and holds the very token w_t. Each copy event is worth 1 / (e - s).
A trial counts only if the model retrieved the answer (ROUGE-1 recall > 0.5), and a
head's retrieval score is the mean of its trial scores over those trials.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

DEFAULT_THRESHOLD = 0.1  # heads scoring at least this are retrieval heads
SUCCESS_RECALL = 0.5  # a trial counts when ROUGE-1 recall exceeds this


def copy_scores(
    argmax_keys: Int[Tensor, "step layer head"],
    emitted: Int[Tensor, "step"],
    prompt_ids: Int[Tensor, "pos"],
    answer_span: tuple[int, int],
) -> Float[Tensor, "layer head"]:
    """Each head's trial score: copy events from the answer span, each worth 1/|span|.

    `argmax_keys[t]` is where each head looked at decode step t (keys past the prompt
    are generated tokens, never inside the span), `emitted[t]` the token emitted there.
    """
    start, end = answer_span
    if not 0 <= start < end <= len(prompt_ids):
        raise ValueError(f"answer span {answer_span} is not inside a prompt of {len(prompt_ids)} tokens")
    in_span = (argmax_keys >= start) & (argmax_keys < end)
    attended_token = prompt_ids[argmax_keys.clamp(max=len(prompt_ids) - 1)]
    copied = in_span & (attended_token == emitted[:, None, None])
    return copied.sum(dim=0).float() / (end - start)


@lru_cache(maxsize=1)
def _rouge_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rouge1"], use_stemmer=True)


def rouge1_recall(response: str, answer: str) -> float:
    """Stemmed ROUGE-1 recall of the response against the answer span, in [0, 1]."""
    return _rouge_scorer().score(answer, response)["rouge1"].recall


def retrieval_scores(
    trial_scores: Float[Tensor, "trial layer head"], success: Bool[Tensor, "trial"]
) -> Float[Tensor, "layer head"]:
    """Mean trial score over the successful trials (zeros when no trial succeeded)."""
    if not success.any():
        return torch.zeros(trial_scores.shape[1:])
    return trial_scores[success].mean(dim=0)
