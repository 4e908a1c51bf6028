"""Detection results as plain data: per-trial records, the aggregate, JSON in and out.

Two file formats are read and written:
- ours: `{"format": "rh_lens.detection/1", "model": ..., "settings": ..., "trials": [...]}`,
  one record per trial with everything needed to audit or rescore it;
- the reference's published format `{"layer-head": [trial scores of successful trials]}`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from rh_lens.detection.scoring import DEFAULT_THRESHOLD, retrieval_scores
from rh_lens.errors import ResultsFileError
from rh_lens.execution.files import read_json, write_json
from rh_lens.heads import Head, all_heads
from rh_lens.tasks.grading import Answer

FORMAT = "rh_lens.detection/1"


def rank_heads(scores: Float[Tensor, "layer head"] | list[list[float]], top: int | None = None) -> list[tuple[int, int, float]]:
    """(layer, head, score), best first; ties broken by (layer, head) so rankings are stable."""
    heads = [(layer, head, float(s)) for layer, row in enumerate(scores) for head, s in enumerate(row)]
    heads.sort(key=lambda h: (-h[2], h[0], h[1]))
    return heads[:top] if top is not None else heads


@dataclass(kw_only=True)
class TrialRecord(Answer):
    """A detection trial: the graded answer and every head's score. `head_scores[layer][head]`
    is the head's trial score; `copied["layer-head"]` the answer-span offsets (key - span
    start) the head copied, one per copy event, for heads with any (None in files written
    before it was recorded)."""

    answer_span: tuple[int, int] | None
    head_scores: list[list[float]]
    copied: dict[str, list[int]] | None = None
    distractor_spans: list[tuple[int, int]] | None = None
    distractor_scores: list[list[list[float]]] | None = None  # per distractor: the rule applied to its span

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TrialRecord:
        record = cls(**data)
        if record.answer_span is not None:
            record.answer_span = tuple(record.answer_span)  # JSON has no tuples
        if record.distractor_spans is not None:
            record.distractor_spans = [tuple(span) for span in record.distractor_spans]
        return record


@dataclass
class DetectionResult:
    """All trials of a detection run and what follows from them."""

    model: str
    n_layers: int
    n_heads: int
    trials: list[TrialRecord]
    threshold: float = DEFAULT_THRESHOLD
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def successful(self) -> list[TrialRecord]:
        return [t for t in self.trials if t.success]

    def scores(self) -> Float[Tensor, "layer head"]:
        """Each head's retrieval score: mean trial score over the successful trials."""
        if not self.trials:
            return torch.zeros(self.n_layers, self.n_heads)
        trial_scores = torch.tensor([t.head_scores for t in self.trials], dtype=torch.float64)
        success = torch.tensor([t.success for t in self.trials])
        return retrieval_scores(trial_scores, success)

    def ranking(self, top: int | None = None) -> list[tuple[int, int, float]]:
        """(layer, head, score), best first (see `rank_heads`)."""
        return rank_heads(self.scores(), top)

    def retrieval_heads(self, threshold: float | None = None) -> list[tuple[int, int, float]]:
        limit = self.threshold if threshold is None else threshold
        return [h for h in self.ranking() if h[2] >= limit]

    def fraction_above(self, threshold: float | None = None) -> float:
        return len(self.retrieval_heads(threshold)) / (self.n_layers * self.n_heads)

    # --- JSON -------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, **asdict(self)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DetectionResult:
        trials = [TrialRecord.from_json(t) for t in data["trials"]]
        n_layers, n_heads = int(data["n_layers"]), int(data["n_heads"])
        for t in trials:
            if len(t.head_scores) != n_layers or any(len(row) != n_heads for row in t.head_scores):
                raise ValueError(f"trial {t.key} has head scores of another shape than {n_layers} x {n_heads}")
        return cls(str(data["model"]), n_layers, n_heads, trials, float(data["threshold"]), data.get("settings", {}))

    def to_published(self) -> dict[str, list[float]]:
        """The reference's format: per head, its trial scores over the successful trials."""
        good = self.successful
        return {
            str(head): [t.head_scores[head.layer][head.head] for t in good] for head in all_heads(self.n_layers, self.n_heads)
        }

    @classmethod
    def from_published(cls, data: dict[str, list[float]], model: str = "published") -> DetectionResult:
        """Read `{"layer-head": [scores]}`; list index i becomes successful trial i."""
        heads = {Head.parse(key): values for key, values in data.items()}
        n_layers = max(layer for layer, _ in heads) + 1
        n_heads = max(head for _, head in heads) + 1
        n_trials = {len(v) for v in heads.values()}
        if len(n_trials) != 1:
            raise ResultsFileError(f"published scores have lists of different lengths {sorted(n_trials)}")
        trials = []
        for i in range(n_trials.pop()):
            matrix = [[heads.get((layer, head), [0.0] * (i + 1))[i] for head in range(n_heads)] for layer in range(n_layers)]
            trials.append(
                TrialRecord(
                    key=f"published-{i}",
                    context_length=None,
                    depth=None,
                    needle_id=None,
                    haystack=None,
                    answer=None,
                    generated_ids=[],
                    response=None,
                    rouge_recall=None,
                    success=True,
                    answer_span=None,
                    head_scores=matrix,
                )
            )
        return cls(model, n_layers, n_heads, trials)


def save_results(result: DetectionResult, path: str | Path) -> None:
    write_json(path, result.to_json())


def load_results(path: str | Path) -> DetectionResult:
    """Load our results file or a published `{"layer-head": [...]}` file."""
    data = read_json(path, "results file")
    try:
        if isinstance(data, dict) and data.get("format") == FORMAT:
            return DetectionResult.from_json(data)
        if isinstance(data, dict) and data and all("-" in k and isinstance(v, list) for k, v in data.items()):
            return DetectionResult.from_published(data, model=Path(path).stem)
    except (KeyError, TypeError, ValueError) as e:  # missing or unexpected fields, wrong types
        raise ResultsFileError(f"{path}: a damaged results file ({type(e).__name__}: {e})") from None
    raise ResultsFileError(f"{path}: neither an rh_lens results file nor a published {{'layer-head': [scores]}} file")
