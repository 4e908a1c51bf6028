"""Steering: boost retrieval heads instead of masking them.

Masking asks whether a model needs its retrieval heads; steering asks whether making them
act harder helps where the model fails to retrieve (the seed's "make retrieval heads activate
properly"). `HeadBoost(heads, factor, method)` acts on the chosen heads in every forward pass:

- "sharpen": their attention scores are multiplied by `factor` before the softmax (a lower
  temperature: each head puts more of its attention on the keys it already prefers, e.g. the
  needle it is copying from; keys the head may not see stay unseen);
- "output": their outputs (`hook_z`) are multiplied by `factor` (0 is zero ablation).

`steering_experiment` runs the NIAH grid with no intervention, the top-K retrieval heads
boosted at each factor, and K random heads (outside the top list and every head above the
threshold, as for masking) boosted by the same factor, per seed; `SteeringResult` compares
top-K with random-K at each (K, factor), and each with no intervention, on the same trials.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor
from transformer_lens import HookedTransformer

from rh_lens.detection.records import DetectionResult
from rh_lens.errors import InputError
from rh_lens.execution.options import RunOptions
from rh_lens.heads import Head, check_heads, heads_by_layer, heads_of
from rh_lens.interventions.base import Condition, Intervention, InterventionResult, check_shape, run_conditions
from rh_lens.interventions.masking import random_heads, ranking_and_excluded
from rh_lens.model.tl_internals import Hook, allowed_keys
from rh_lens.tasks.niah import Trial

STEERING_METHODS = ("sharpen", "output")


def steering_hooks(heads: Iterable[Head], factor: float, method: str = "sharpen") -> list[Hook]:
    """TransformerLens (hook name, function) pairs that boost `heads` by `factor`."""
    if method not in STEERING_METHODS:
        raise InputError(f"unknown steering method {method!r}; choose from {', '.join(STEERING_METHODS)}")
    hooks = []
    for layer, idx in heads_by_layer(heads).items():
        if method == "sharpen":

            def sharpen(scores: Tensor, hook, idx=idx) -> Tensor:  # [batch, head, query, key]
                chosen = scores[:, idx]
                # -inf (a key the head may not see) times a factor would stay -inf, but 0 * -inf is nan
                scores[:, idx] = torch.where(allowed_keys(chosen), chosen * factor, chosen)
                return scores

            hooks.append((f"blocks.{layer}.attn.hook_attn_scores", sharpen))
        else:

            def scale(z: Tensor, hook, idx=idx) -> Tensor:  # [batch, pos, head, d_head]
                z[:, :, idx] = z[:, :, idx] * factor
                return z

            hooks.append((f"blocks.{layer}.attn.hook_z", scale))
    return hooks


@dataclass(frozen=True)
class HeadBoost(Intervention):
    """`heads` boosted by `factor` with `method` (see the module docstring);
    `with HeadBoost(heads, 4.0)(model):` boosts them in every forward pass inside the block."""

    kind: ClassVar[str] = "head_boost"
    heads: tuple[Head, ...]
    factor: float
    method: str = "sharpen"
    decode_only: bool = False

    def __post_init__(self):
        object.__setattr__(self, "heads", tuple(heads_of(self.heads)))
        if self.method not in STEERING_METHODS:
            raise InputError(f"unknown steering method {self.method!r}; choose from {', '.join(STEERING_METHODS)}")
        if self.method == "sharpen" and not self.factor > 0:
            raise InputError(f"sharpening factor {self.factor}: must be > 0 (a temperature of 1/factor)")

    def hooks(self, model: HookedTransformer) -> list[Hook]:
        return steering_hooks(self.heads, self.factor, self.method)

    def check(self, model: HookedTransformer) -> None:
        check_heads(self.heads, model.cfg.n_layers, model.cfg.n_heads)

    def to_json(self) -> dict[str, Any]:
        heads = [str(h) for h in self.heads]
        return {"kind": self.kind, "heads": heads, "factor": self.factor, "method": self.method, "decode_only": self.decode_only}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> HeadBoost:
        return cls(data["heads"], data["factor"], data["method"], data["decode_only"])


@dataclass(frozen=True, kw_only=True)
class SteeringOptions:
    """What a steering experiment runs (`rh-lens steer`'s options): the top-K heads boosted
    for each of `ks` at each of `factors`, against K random heads at the same factor for each
    of `seeds`; `method` "sharpen" or "output"; `decode_only`: boosted at decode steps only;
    `score_heads`: every record carries each head's copy score (`RunOptions.score_heads`), so
    the top-K heads' retrieval can be read against the factor, not only the answers'."""

    ks: tuple[int, ...] = (5,)
    factors: tuple[float, ...] = (2.0, 4.0)
    seeds: tuple[int, ...] = (0, 1)
    method: str = "sharpen"
    decode_only: bool = False
    score_heads: bool = True

    def __post_init__(self):
        for name in ("ks", "factors", "seeds"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if not self.ks or min(self.ks) < 1:
            raise InputError(f"K {list(self.ks)}: each must be at least 1")
        if not self.factors:
            raise InputError("no boost factor")
        for factor in self.factors:
            HeadBoost((), factor, self.method)  # a bad method or factor fails here, not in a trial

    def settings(self) -> dict[str, Any]:
        return {
            "ks": list(self.ks),
            "factors": list(self.factors),
            "seeds": list(self.seeds),
            "method": self.method,
            "decode_only": self.decode_only,
        }


def steering_conditions(detection: DetectionResult, steering: SteeringOptions) -> list[Condition]:
    """No intervention; per K and factor, the top-K heads boosted (group `top-K-xF`) and K
    random heads drawn outside the top list boosted by the same factor (group `random-K-xF`)."""
    ranking, outside = ranking_and_excluded(detection, max(steering.ks))

    def boost(heads: Sequence[Head], factor: float) -> HeadBoost:
        return HeadBoost(heads, factor, steering.method, steering.decode_only)

    conditions = [Condition("none", None, "none", {"kind": "none", "k": 0, "factor": 1.0})]
    for k in steering.ks:
        for factor in steering.factors:
            top, rand = f"top-{k}-x{factor:g}", f"random-{k}-x{factor:g}"
            conditions.append(Condition(top, boost(ranking[:k], factor), top, {"kind": "top", "k": k, "factor": factor}))
            for seed in steering.seeds:
                heads = random_heads(detection.n_layers, detection.n_heads, k, outside, seed)
                meta = {"kind": "random", "k": k, "factor": factor, "seed": seed}
                conditions.append(Condition(f"{rand}-seed{seed}", boost(heads, factor), rand, meta))
    return conditions


class SteeringResult(InterventionResult):
    """The steering experiment's conditions (see `steering_conditions`); metadata `kind`,
    `k`, `factor`, `seed`."""

    def comparison_pairs(self) -> list[tuple[str, str]]:
        """Top-K against random-K at each K and factor, then every group against no intervention."""
        groups = self.groups()
        pairs = [(g, "random" + g[3:]) for g in groups if g.startswith("top-") and "random" + g[3:] in groups]
        return pairs + super().comparison_pairs()

    def factor_rows(self) -> list[dict[str, Any]]:
        """Per K and factor: mean recall (with its interval) of top-K and of random-K boosted,
        and with no intervention: what a recall-vs-factor figure plots; with head scores in the
        records, how much the top-K heads copy under each (`copy_score`: `*_score`, `*_score_interval`)."""
        rows = {r["condition"]: r for r in self.summary()}
        out = []
        for k in sorted({c.metadata["k"] for c in self.conditions if c.metadata.get("kind") == "top"}):
            top_heads = next(
                c.intervention.heads for c in self.conditions if c.metadata.get("kind") == "top" and c.metadata["k"] == k
            )
            for factor in sorted({c.metadata["factor"] for c in self.conditions if c.metadata.get("k") == k}):
                groups = {"top": f"top-{k}-x{factor:g}", "random": f"random-{k}-x{factor:g}", "none": "none"}
                row = {"k": k, "factor": factor}
                for name, group in groups.items():
                    found = rows.get(group, {})
                    row[f"{name}_recall"], row[f"{name}_interval"] = found.get("mean_recall"), found.get("recall_interval")
                    row[f"{name}_score"], row[f"{name}_score_interval"] = self.copy_score(group, top_heads) or (None, None)
                out.append(row)
        return out


def steering_experiment(
    model: HookedTransformer,
    trials: Sequence[Trial],
    detection: DetectionResult,
    steering: SteeringOptions = SteeringOptions(),
    *,
    out_dir: str | Path | None = None,
    options: RunOptions = RunOptions(),
    settings: dict[str, Any] | None = None,
    executor=None,
) -> SteeringResult:
    """The NIAH grid under every condition of `steering_conditions`; each condition's trials
    saved (and resumed) under `<out_dir>/conditions/<name>/`, the result in `<out_dir>/steering.json`."""
    check_shape("scores", detection.n_layers, detection.n_heads, model)
    return run_conditions(
        model,
        trials,
        steering_conditions(detection, steering),
        experiment="steering",
        out_dir=out_dir,
        options=replace(options, score_heads=options.score_heads or steering.score_heads),
        settings={**(settings or {}), **steering.settings()},
        executor=executor,
        result_type=SteeringResult,
    )
