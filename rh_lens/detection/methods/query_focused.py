"""The query-focused retrieval score of QRHead (Zhang et al., 2025, arXiv 2506.09944), no
decoding needed: at the prompt, for each gold token (the needle, or the gold paragraph), the
attention it gets from the question's tokens, averaged over them, minus the same with the
question replaced by a null query ("N/A", QRHead's default), so a head that attends there
whatever is asked scores 0; the gold tokens whose calibrated score is not above mean - 2 std
(over the gold tokens, per head) are dropped, and the rest summed. Its map still averages the
trials answered right, as every method's does (`base.head_map`).

As QRHead's detection code (princeton-pli/QRHead @ 7a668e7, cited next to the code): the
null query (`src/qrretriever/attn_retriever.py` L32), the calibration per key token (L292), the
mean - 2 std drop and the sum over a document's tokens (L301-L312), and a head's score the mean
over instances of its score on their gold documents (`exp_scripts/detection/detect_qrhead_lme.py`
L25, L31).

Where rh_lens differs, and why: the query tokens are the question's own (QRHead's query span
also holds its late instruction, "Query:" and the chat suffix, L177-L178: rh_lens's NIAH
template has no such instruction of QRHead's, and plain and chat prompts end differently); the
gold text is the needle alone, one "document" (QRHead sums over the gold paragraphs of a
multi-document prompt); a gold text of one token keeps it (QRHead's std of one value is NaN,
which would drop it); and the map averages the trials answered right, not every instance. QRHead
detects on 70 LongMemEval or 128 NQ questions with Llama-3.1/3.2-Instruct and Qwen2.5-7B-Instruct,
not on the atlas's NIAH trials."""

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
def question_to_gold(
    model: HookedTransformer, ids: list[int], query: list[int], gold: list[int]
) -> Float[Tensor, "layer head gold"]:
    """Each head's attention on each gold token, averaged over the query tokens."""
    mass = torch.zeros(model.cfg.n_layers, model.cfg.n_heads, len(gold))
    query_rows, gold_keys = torch.tensor(query), torch.tensor(gold)

    def read(pattern: Float[Tensor, "batch head query key"], hook) -> None:
        # averaged over the query tokens: princeton-pli/QRHead src/qrretriever/attn_retriever.py L349 @ 7a668e7
        mass[hook.layer()] = pattern[0][:, query_rows][..., gold_keys].mean(dim=-2).float().cpu()

    tokens = torch.tensor([ids], device=model.cfg.device)
    model.run_with_hooks(
        tokens, fwd_hooks=[(lambda name: name.endswith("attn.hook_pattern"), read)], stop_at_layer=model.cfg.n_layers
    )
    return mass


def calibrated_sum(calibrated: Float[Tensor, "layer head gold"]) -> Float[Tensor, "layer head"]:
    """The sum over the gold tokens of their calibrated scores, leaving out, per head, those
    not above the mean - 2 std of that head's scores (std with Bessel's correction, torch's and
    QRHead's; a single gold token is kept)."""
    if calibrated.size(-1) < 2:
        return calibrated.sum(dim=-1)
    # princeton-pli/QRHead src/qrretriever/attn_retriever.py L304-L311 @ 7a668e7
    threshold = calibrated.mean(dim=-1) - 2 * calibrated.std(dim=-1)
    return calibrated.masked_fill(~(calibrated > threshold.unsqueeze(-1)), 0.0).sum(dim=-1)


def trial_score(model: HookedTransformer, trial: Trial) -> Float[Tensor, "layer head"]:
    ids, query, gold = spans(model.tokenizer, trial, trial.needle.question)
    null_ids, null_query, null_gold = spans(model.tokenizer, trial, NULL_QUERY)
    prefix = min(query + null_query, default=0)  # the prompt up to the question, the same in both (QRHead asserts it, L275-L277)
    if gold != null_gold or ids[:prefix] != null_ids[:prefix]:
        raise TrialError(f"trial {trial.key}: the prompt before the question must tokenize the same with the null query")
    # calibrated per gold token by the null query: princeton-pli/QRHead src/qrretriever/attn_retriever.py L292 @ 7a668e7
    calibrated = question_to_gold(model, ids, query, gold) - question_to_gold(model, null_ids, null_query, null_gold)
    return calibrated_sum(calibrated)


def trial_scores(model: HookedTransformer, traced: Sequence[TracedTrial]) -> Float[Tensor, "trial layer head"]:
    return torch.stack([trial_score(model, t.trial) for t in traced])
