"""One decoding pass for every decode-time head score: where each head looks, how much
attention its top keys get, and what its output writes toward the token emitted.

`HeadTrace` is a `StepObserver` (see `rh_lens.model.generation`). At every decode step it
keeps, for every query head:
- `top_keys`, `top_weights`: its `top_k` most-attended keys (prompt positions) and their
  attention weights, from the newest query's attention row;
- `logit_attribution`: its direct logit attribution to the token the step emits: the head's
  output (z W_O, no bias) through the final norm as the full residual stream sets it
  (centred for LayerNorm, divided by the stream's scale, times the norm's weight), dotted
  with that token's unembedding column. This is TransformerLens's `logit_attrs` on the
  norm-folded model; rh_lens loads models unprocessed, so the norm weight is applied here.
`trace_trials` decodes trials with it and keeps the argmax keys the retrieval score reads.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer

from rh_lens.execution.options import RunOptions
from rh_lens.model.generation import Generation
from rh_lens.tasks.grading import Answer, answer_trials
from rh_lens.tasks.niah import Trial

DEFAULT_TOP_K = 16  # keys kept per head and step: at least the longest answer span of most grids


class HeadTrace:
    """Records top keys and direct logit attribution per head at each decode step."""

    def __init__(self, model: HookedTransformer, top_k: int = DEFAULT_TOP_K):
        self.model, self.top_k = model, top_k
        cfg = model.cfg
        self.normalized = cfg.normalization_type in ("LN", "LNPre", "RMS", "RMSPre")
        self.center = cfg.normalization_type in ("LN", "LNPre")
        self.norm_weight = getattr(model.ln_final, "w", None) if self.normalized else None
        self.hooks = [
            (lambda name: name.endswith("attn.hook_pattern"), self._pattern),
            (lambda name: name.endswith("attn.hook_z"), self._z),
        ]
        if self.normalized:
            self.hooks.append(("ln_final.hook_scale", self._scale))
        self.n_layers = cfg.n_layers

    def begin(self, n_rows: int) -> None:
        self.kept: list[dict[str, list[Tensor]]] = [
            {"top_keys": [], "top_weights": [], "logit_attribution": []} for _ in range(n_rows)
        ]
        self.step_keys: list[Tensor | None] = [None] * self.n_layers
        self.step_weights: list[Tensor | None] = [None] * self.n_layers
        self.step_outputs: list[Tensor | None] = [None] * self.n_layers
        self.step_scale: Tensor | None = None

    def _pattern(self, pattern: Float[Tensor, "batch head query key"], hook) -> None:
        row = pattern[:, :, -1]
        weights, keys = row.topk(min(self.top_k, row.size(-1)), dim=-1)
        self.step_keys[hook.layer()], self.step_weights[hook.layer()] = keys, weights

    def _z(self, z: Float[Tensor, "batch query head d_head"], hook) -> None:
        w_o = self.model.blocks[hook.layer()].attn.W_O  # [head, d_head, d_model]
        self.step_outputs[hook.layer()] = torch.einsum("bhd,hdm->bhm", z[:, -1].to(w_o.dtype), w_o)

    def _scale(self, scale: Float[Tensor, "batch query 1"], hook) -> None:
        self.step_scale = scale[:, -1, 0]

    def after_step(self, emitted: Int[Tensor, " row"], rows: list[int], padding: Int[Tensor, " row"]) -> None:
        outputs = torch.stack(self.step_outputs)  # [layer, batch, head, d_model]
        if self.center:
            outputs = outputs - outputs.mean(dim=-1, keepdim=True)
        direction = self.model.W_U[:, emitted].T  # [batch, d_model]
        if self.norm_weight is not None:
            direction = direction * self.norm_weight
        attribution = torch.einsum("lbhm,bm->lbh", outputs, direction)
        if self.normalized:
            attribution = attribution / self.step_scale[None, :, None]
        keys = torch.stack(self.step_keys) - padding[None, :, None, None]  # prompt positions
        weights = torch.stack(self.step_weights)
        for j, row in enumerate(rows):
            kept = self.kept[row]
            kept["top_keys"].append(keys[:, j].cpu())
            kept["top_weights"].append(weights[:, j].float().cpu())
            kept["logit_attribution"].append(attribution[:, j].float().cpu())

    def finish(self, row: int) -> dict[str, Tensor]:
        return {name: torch.stack(steps) for name, steps in self.kept[row].items()}


@dataclass
class TracedTrial:
    """A trial, its graded answer and its decoding as `HeadTrace` recorded it:
    `generation.argmax_keys` [step, layer, head] and `generation.observed` with `top_keys`,
    `top_weights` [step, layer, head, k] and `logit_attribution` [step, layer, head]."""

    trial: Trial
    answer: Answer
    generation: Generation


@torch.inference_mode()
def trace_trials(
    model: HookedTransformer, trials: Sequence[Trial], options: RunOptions = RunOptions(), top_k: int | None = None
) -> list[TracedTrial]:
    """Decode every trial once (as `options.decoding` says), recording what every
    decode-time method reads. `top_k`: keys kept per head and step (default: the longest
    answer span among the trials, at least DEFAULT_TOP_K)."""
    top_k = top_k or max([DEFAULT_TOP_K, *(t.answer_span[1] - t.answer_span[0] for t in trials)])
    traced: list[TracedTrial | None] = [None] * len(trials)
    for i, answer, generation in answer_trials(model, trials, options.decoding, observers=[HeadTrace(model, top_k)]):
        traced[i] = TracedTrial(trials[i], answer, generation)
    return traced
