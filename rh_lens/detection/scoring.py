"""The retrieval score of Wu et al. (2024): the rule of their reference implementation.

Per trial: at every decode step t the model emits w_t; a head "copies" at step t when
the key it attends to most (top-1 of its newest attention row) lies inside the answer
span [s, e) and holds the very token w_t. Each copy event is worth 1 / (e - s).
A trial counts only if the model retrieved the answer (stemmed ROUGE-1 recall of the
response, decoded without special tokens and stripped, against the answer > 0.5), and a
head's retrieval score is the mean of its trial scores over those trials (the success test is
`rh_lens.tasks.grading`, where every trial is graded). This rule,
the success test and the aggregation are the reference's (`retrieval_head_detection.py`).

Where rh_lens differs from the reference code, on purpose:
- Answer span: located from the tokenizer's character offsets of the answer inside the
  inserted needle (exact; case-insensitive), not as the first window whose token *set*
  covers > 90% of the answer's tokens (which can start a few tokens early, and returns
  no span when nothing matches, scoring every head 0 on a trial that still counts).
  That search is the fallback for tokenizers without offsets; a trial whose answer
  cannot be located is an error here (`TrialError`), never a silent 0.
- Stopping: the reference stops decoding only at Llama's newline token '<0x0A>' or at
  token id 144, and otherwise runs to 50 tokens (it never checks EOS; Qwen's newline,
  id 198, does not stop it). rh_lens stops at any token whose text holds a newline and
  at EOS or a chat model's end-of-turn token. In both, the stopping token is scored.
- Precision: the reference decodes in bf16 (argmax ties are possible there); rh_lens
  defaults to float32.
- Trials: needles go back to a sentence end found by decoding tokens (".", "!", "?"),
  not by the reference's Llama period token ids (used for every model by default); the
  haystack is repeated in tokens rather than appended while its word count is short; a
  prompt longer than the model's context is an error. Results files are written afresh,
  never merged into an existing file's lists.
"""

from __future__ import annotations

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from rh_lens.heads import Head

DEFAULT_THRESHOLD = 0.1  # heads scoring at least this are retrieval heads


def copy_events(
    argmax_keys: Int[Tensor, "step layer head"],
    emitted: Int[Tensor, " step"],
    prompt_ids: Int[Tensor, " pos"],
    answer_span: tuple[int, int],
) -> Bool[Tensor, "step layer head"]:
    """The rule: did each head copy at each decode step?

    `argmax_keys[t]` is where each head looked at decode step t (keys past the prompt
    are generated tokens, never inside the span), `emitted[t]` the token emitted there.
    A head copied when it looked inside the answer span at the very token emitted.
    """
    start, end = answer_span
    if not 0 <= start < end <= len(prompt_ids):
        raise ValueError(f"answer span {answer_span} is not inside a prompt of {len(prompt_ids)} tokens")
    in_span = (argmax_keys >= start) & (argmax_keys < end)
    # keys outside the prompt (generated tokens; before it, once a shift is applied) are never in the span
    attended_token = prompt_ids[argmax_keys.clamp(0, len(prompt_ids) - 1)]
    return in_span & (attended_token == emitted[:, None, None])


def event_scores(events: Bool[Tensor, "step layer head"], answer_span: tuple[int, int]) -> Float[Tensor, "layer head"]:
    """Each head's trial score: its copy events, each worth 1/|span|."""
    start, end = answer_span
    return events.sum(dim=0).float() / (end - start)


def copy_scores(
    argmax_keys: Int[Tensor, "step layer head"],
    emitted: Int[Tensor, " step"],
    prompt_ids: Int[Tensor, " pos"],
    answer_span: tuple[int, int],
) -> Float[Tensor, "layer head"]:
    """Each head's trial score: copy events from the answer span, each worth 1/|span|."""
    return event_scores(copy_events(argmax_keys, emitted, prompt_ids, answer_span), answer_span)


def copied_offsets(
    events: Bool[Tensor, "step layer head"], argmax_keys: Int[Tensor, "step layer head"], answer_span: tuple[int, int]
) -> dict[str, list[int]]:
    """Per head ("layer-head") with at least one copy event, the answer-span offset it copied
    at each event, in step order (so a head's list has one entry per event)."""
    copied: dict[str, list[int]] = {}
    for step, layer, head in events.nonzero().tolist():  # row-major: steps in order
        offset = int(argmax_keys[step, layer, head]) - answer_span[0]
        copied.setdefault(str(Head(layer, head)), []).append(offset)
    return copied


def retrieval_scores(
    trial_scores: Float[Tensor, "trial layer head"], success: Bool[Tensor, " trial"]
) -> Float[Tensor, "layer head"]:
    """Mean trial score over the successful trials (zeros when no trial succeeded)."""
    if not success.any():
        return torch.zeros(trial_scores.shape[1:])
    return trial_scores[success].mean(dim=0)
