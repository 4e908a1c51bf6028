"""What every head-finding method is: a function from a model and traced trials to one
score per head and trial (higher: the head matters more there), `trial_scores(model,
traced) -> [trial, layer, head]`. Decode-time methods read the one decoding pass
`rh_lens.detection.trace.trace_trials` records; prompt-only methods read the trials; a
data-free one gives every trial the same map.

Every method's map is then the retrieval score's aggregation (`head_map`): the mean over the
trials whose answer was retrieved, the same trials for every method. It comes as a
`DetectionResult`, so what works on a detection (`compare`, `bootstrap`, `ablate --scores`,
`compress --scores`) works on any method's map."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from jaxtyping import Float
from torch import Tensor
from transformer_lens import HookedTransformer

from rh_lens.detection.records import DetectionResult, TrialRecord
from rh_lens.detection.trace import TracedTrial

TrialScores = Callable[[HookedTransformer, Sequence[TracedTrial]], Float[Tensor, "trial layer head"]]


def head_map(method: str, trial_scores: TrialScores, model: HookedTransformer, traced: Sequence[TracedTrial]) -> DetectionResult:
    """One method's per-trial scores as a detection result (`settings["method"]` names it).
    A trial a method could not score (NaN scores, e.g. no corrupted twin to patch with) counts
    as not retrieved there, with scores 0; `settings["unscored"]` lists such trials."""
    scores = trial_scores(model, traced)
    scored = ~scores.isnan().flatten(1).any(dim=1)
    records = [
        TrialRecord(
            **(vars(t.answer) | {"success": t.answer.success and bool(ok)}),
            answer_span=t.trial.answer_span,
            head_scores=s.nan_to_num(0.0).tolist(),
        )
        for t, s, ok in zip(traced, scores, scored)
    ]
    settings = {
        "method": method,
        "model": model.cfg.model_name,
        "unscored": [t.trial.key for t, ok in zip(traced, scored) if not ok],
    }
    return DetectionResult(model.cfg.model_name, model.cfg.n_layers, model.cfg.n_heads, records, settings=settings)
