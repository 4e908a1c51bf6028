"""HeadKV's retrieval-reasoning score (Fu et al., 2024, arXiv 2410.19258; FYYFU/HeadKV
`Important_Head/retrieval_head_detection_r2.py`): at each of the first N decode steps (N = the
answer's token count), the attention weight a head puts on those of its top-k keys (k = the
answer span's length) that lie inside the span, divided by k x N, summed over the steps. No
check that the attended token is the one emitted, so a head reading the answer while the model
writes it counts even when it looks one token off. A head's map is the mean over the trials
answered right (`base.head_map`), as HeadKV's is the mean of its per-trial list.

The normalisation, 1 / (k x N): a trial's score is the mean over the answer's tokens of the
attention on the in-span top-k keys, / k. It is the one that computed HeadKV's published
scores (`Important_Head/head_score/*_retrieval_reasoning_heads.json`, added in 84e4c2b, where
line L227 of that file reads `10 * v / ((needle_end - needle_start) * answer_tokens_num)`),
the scores its KV-cache allocation reads (`headkv/snapkv_utils.py` L379-L385 @ 0862a09).
HeadKV's later commit 4c68d6b turned that line into a comment and divides by k alone
(L227-L228 @ 0862a09: a sum over the steps), without recomputing the published files; rh_lens
follows the published scores. The factor 10 is left out: a constant changes no ranking.

Where rh_lens differs from HeadKV's code, and why: N here is the answer span's token count
(HeadKV tokenizes the answer on its own, which can differ by a token); the steps are the first
N of the atlas's one greedy decoding (HeadKV stops there, or at a newline or EOS, L255), and a
trial counts when it retrieved the answer (ROUGE-1 recall > 0.5) rather than token F1 > 50
(L314-L317): the same trials for every decode-time method. HeadKV's native setup (Llama-3-8B-
and Mistral-7B-Instruct, its two retrieval-reasoning needles, contexts up to 10K tokens) is not
the atlas's (small models, NIAH at 1-2K tokens)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens import HookedTransformer

from rh_lens.detection.trace import TracedTrial


def trial_score(traced: TracedTrial) -> Float[Tensor, "layer head"]:
    start, end = traced.trial.answer_span
    k = end - start
    n = k  # the answer's token count: the answer is the span's text
    observed = traced.generation.observed
    # FYYFU/HeadKV Important_Head/retrieval_head_detection_r2.py @ 0862a09: top-k with k the
    # span's length (L218, L222), keys inside the span (L225), decoding stopped after the
    # answer's token count (L255)
    keys, weights = observed["top_keys"][:n, ..., :k], observed["top_weights"][:n, ..., :k]  # [step, layer, head, k]
    if keys.size(-1) < k:
        raise ValueError(f"the trace kept {keys.size(-1)} keys per head, the answer span has {k}: trace with top_k >= {k}")
    inside = (keys >= start) & (keys < end)
    # each weight / (k x N), summed: L227 @ 84e4c2b, the code of the published scores (x 10 left out)
    return (weights * inside).sum(dim=(0, -1)) / (k * n)


def trial_scores(model: HookedTransformer, traced: Sequence[TracedTrial]) -> Float[Tensor, "trial layer head"]:
    return torch.stack([trial_score(t) for t in traced])
