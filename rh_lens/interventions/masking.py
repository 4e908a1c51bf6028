"""Causal ablation of attention heads, and the paper's masking experiment on NIAH.

`HeadMask(heads, method)` is the intervention (see `interventions.base`); `mask_heads(model,
heads, method)` the same as a context manager usable around any forward pass, generation or
experiment; `ablation_experiment` the paper's top-K vs random-K conditions. Methods, all
through TransformerLens hook points:
- "uniform" (the paper's masking): the head's pre-softmax scores (`hook_attn_scores`) are
  set to one constant where the causal mask and padding allow attention, so it attends
  uniformly to the keys it may see and outputs the mean of their values;
- "zero": the head's output (`hook_z`) is set to 0;
- "mean": the head's output is replaced by its mean over a reference set of prompts
  (`head_means`).
With grouped-query attention each query head is masked on its own, not its whole group:
both hook points are per query head.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, ClassVar

import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens import HookedTransformer

from rh_lens.detection.records import DetectionResult
from rh_lens.errors import InputError
from rh_lens.execution.options import RunOptions
from rh_lens.execution.runs import InProcess
from rh_lens.heads import Head, all_heads, check_heads, heads_by_layer, heads_of
from rh_lens.interventions.base import Condition, Intervention, InterventionResult, check_shape, evaluate, run_conditions
from rh_lens.model.generation import prefill
from rh_lens.model.tl_internals import Hook, allowed_keys
from rh_lens.tasks.grading import NiahRecord
from rh_lens.tasks.niah import Trial

METHODS = ("uniform", "zero", "mean")


def ablation_hooks(
    heads: Iterable[Head], method: str = "uniform", mean_z: Float[Tensor, "layer head d_head"] | None = None
) -> list[Hook]:
    """TransformerLens (hook name, function) pairs that ablate `heads` with `method`."""
    if method not in METHODS:
        raise InputError(f"unknown ablation method {method!r}; choose from {', '.join(METHODS)}")
    if method == "mean" and mean_z is None:
        raise InputError("mean ablation needs mean_z: compute it with head_means(model, prompts)")
    hooks = []
    for layer, idx in heads_by_layer(heads).items():
        if method == "uniform":

            def uniform(scores: Tensor, hook, idx=idx) -> Tensor:  # [batch, head, query, key]
                chosen = scores[:, idx]
                # Keep the keys the head may not see (causal mask, window, padding); flatten the rest.
                scores[:, idx] = torch.where(allowed_keys(chosen), torch.zeros_like(chosen), chosen)
                return scores

            hooks.append((f"blocks.{layer}.attn.hook_attn_scores", uniform))
        else:
            value = None if method == "zero" else mean_z[layer, idx]

            def replace_z(z: Tensor, hook, idx=idx, value=value) -> Tensor:  # [batch, pos, head, d_head]
                z[:, :, idx] = 0.0 if value is None else value.to(z)
                return z

            hooks.append((f"blocks.{layer}.attn.hook_z", replace_z))
    return hooks


@contextmanager
def mask_heads(
    model: HookedTransformer,
    heads: Iterable[Head],
    method: str = "uniform",
    mean_z: Float[Tensor, "layer head d_head"] | None = None,
):
    """Ablate `heads` for every forward pass inside the context (all positions)."""
    with HeadMask(heads, method, mean_z=mean_z)(model):
        yield model


@torch.inference_mode()
def head_means(model: HookedTransformer, prompts: Sequence[Sequence[int]]) -> Float[Tensor, "layer head d_head"]:
    """Each head's output `hook_z` averaged over every position of the reference prompts."""
    total = torch.zeros(model.cfg.n_layers, model.cfg.n_heads, model.cfg.d_head, dtype=torch.float64)
    count = 0

    def accumulate(z: Tensor, hook) -> None:
        total[hook.layer()] += z[0].double().sum(dim=0).cpu()

    with model.hooks(fwd_hooks=[(lambda name: name.endswith("attn.hook_z"), accumulate)]):
        for prompt in prompts:
            prefill(model, torch.as_tensor(list(prompt), device=model.cfg.device))
            count += len(prompt)
    return (total / count).float()


def random_heads(n_layers: int, n_heads: int, k: int, exclude: Iterable[Head], seed: int) -> list[Head]:
    """k heads drawn uniformly (seeded) from those not in `exclude`."""
    excluded = set(heads_of(exclude))
    pool = [h for h in all_heads(n_layers, n_heads) if h not in excluded]
    if k > len(pool):
        raise InputError(f"cannot draw {k} heads from the {len(pool)} outside the excluded set")
    return sorted(random.Random(seed).sample(pool, k))


def ks_for_thresholds(detection: DetectionResult, thresholds: Sequence[float]) -> dict[float, int]:
    """Threshold -> how many heads score at or above it (the K of a masking condition)."""
    for t in thresholds:
        if not 0 <= t <= 1:
            raise InputError(f"threshold {t}: must be a number from 0 to 1")
    return {float(t): len(detection.retrieval_heads(t)) for t in thresholds}


def default_ks(n_layers: int, n_heads: int) -> list[int]:
    """About 2%, 5% and 10% of all heads: the paper masked 20, 50 and 100 of Llama-2-7B's 1024."""
    total = n_layers * n_heads
    return sorted({max(1, round(f * total)) for f in (0.02, 0.05, 0.1)})


# --- the intervention ---------------------------------------------------------------------


@dataclass(frozen=True)
class HeadMask(Intervention):
    """`heads` ablated with `method` (see the module docstring); `with HeadMask(heads)(model):`
    masks them in every forward pass inside the block."""

    kind: ClassVar[str] = "head_mask"
    heads: tuple[Head, ...]  # any iterable of heads or (layer, head) pairs; kept as a tuple of Head
    method: str = "uniform"
    decode_only: bool = False
    mean_z: Float[Tensor, "layer head d_head"] | None = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "heads", tuple(heads_of(self.heads)))
        if self.method not in METHODS:
            raise InputError(f"unknown ablation method {self.method!r}; choose from {', '.join(METHODS)}")

    def hooks(self, model: HookedTransformer) -> list[Hook]:
        return ablation_hooks(self.heads, self.method, self.mean_z)

    def check(self, model: HookedTransformer) -> None:
        check_heads(self.heads, model.cfg.n_layers, model.cfg.n_heads)

    def to_json(self) -> dict[str, Any]:
        # mean_z is not stored: it is recomputed from the grid's prompts (`head_means`)
        return {"kind": self.kind, "heads": [str(h) for h in self.heads], "method": self.method, "decode_only": self.decode_only}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> HeadMask:
        """The mask a file describes (a mean ablation without its means: `hooks` refuses it)."""
        return cls(data["heads"], data["method"], data["decode_only"])


def evaluate_niah(
    model: HookedTransformer,
    trials: Sequence[Trial],
    heads: Iterable[Head] = (),
    *,
    method: str = "uniform",
    decode_only: bool = False,
    mean_z: Float[Tensor, "layer head d_head"] | None = None,
    out_dir: str | Path | None = None,
    options: RunOptions = RunOptions(),
    settings: dict[str, Any] | None = None,
    desc: str = "niah",
    executor=None,
) -> list[NiahRecord]:
    """The NIAH grid answered with `heads` ablated (at every position, or at decode steps
    only): `evaluate` under a `HeadMask`."""
    mask = HeadMask(heads, method, decode_only, mean_z)
    return evaluate(model, trials, mask, out_dir=out_dir, options=options, settings=settings, desc=desc, executor=executor)


# --- the paper's experiment: top-K retrieval heads vs random heads ---------------------


class AblationResult(InterventionResult):
    """The masking experiment's conditions: none, top-K (group `top-K`), K random heads per
    seed (group `random-K`); metadata `kind`, `k`, `seed`."""

    @property
    def method(self) -> str:
        return self.settings.get("method", "uniform")

    def comparison_pairs(self) -> list[tuple[str, str]]:
        """Top-K against random-K at each K, then every group against no masking."""
        groups = self.groups()
        pairs = [(f"top-{k}", f"random-{k}") for k in self.ks() if f"top-{k}" in groups and f"random-{k}" in groups]
        return pairs + super().comparison_pairs()

    def ks(self) -> list[int]:
        return sorted({c.metadata["k"] for c in self.conditions if c.metadata.get("kind") == "top"})

    def threshold_rows(self) -> list[dict[str, Any]]:
        """With thresholds in the settings (`ablate --thresholds`): per threshold, the heads at or
        above it, and NIAH recall with them masked against as many random heads."""
        rows = {(r["kind"], r["k"]): r for r in self.summary()}
        return [
            {
                "threshold": float(t),
                "n_heads": k,
                "top_recall": rows.get(("top", k), {}).get("mean_recall"),
                "random_recall": rows.get(("random", k), {}).get("mean_recall"),
                "random_std": rows.get(("random", k), {}).get("std_over_seeds"),
                "none_recall": rows[("none", 0)]["mean_recall"],
            }
            for t, k in self.settings.get("thresholds", {}).items()
        ]


@dataclass(frozen=True, kw_only=True)
class MaskingOptions:
    """What a masking experiment runs (`rh-lens ablate`'s options): the top-K heads masked
    for each of `ks` (None: `default_ks`) against K random heads for each of `seeds`;
    `method`: how a head is masked (`METHODS`); `decode_only`: masked at decode steps only, not
    over the prompt; `thresholds`: instead of `ks`, the heads at or above each retrieval-score
    threshold (resolved against a ranking by `ablate_grid`)."""

    ks: tuple[int, ...] | None = None
    seeds: tuple[int, ...] = (0, 1, 2)
    method: str = "uniform"
    decode_only: bool = False
    thresholds: tuple[float, ...] | None = None

    def __post_init__(self):
        if self.method not in METHODS:
            raise InputError(f"unknown masking method {self.method!r}; choose from {', '.join(METHODS)}")
        if self.ks is not None and (not self.ks or min(self.ks) < 1):
            raise InputError(f"K {list(self.ks)}: each must be at least 1")
        for name in ("ks", "seeds", "thresholds"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, tuple(getattr(self, name)))


def ranking_and_excluded(detection: DetectionResult, largest_k: int) -> tuple[list[Head], set[Head]]:
    """The heads best first, and those random controls never draw: the top `largest_k` and
    every head at or above the threshold (shared by masking, steering and fine-tuning)."""
    ranking = [Head(layer, head) for layer, head, _ in detection.ranking()]
    return ranking, set(ranking[:largest_k]) | {Head(layer, head) for layer, head, _ in detection.retrieval_heads()}


def ablation_conditions(
    detection: DetectionResult,
    ks: Sequence[int],
    seeds: Sequence[int],
    *,
    method: str = "uniform",
    decode_only: bool = False,
    mean_z: Float[Tensor, "layer head d_head"] | None = None,
) -> list[Condition]:
    """No masking; the top-K heads by retrieval score; K random heads drawn only from outside
    the top list (the largest K's top heads and every head above the threshold)."""
    ranking, outside = ranking_and_excluded(detection, max(ks))

    def mask(heads: Sequence[Head]) -> HeadMask:
        return HeadMask(heads, method, decode_only, mean_z)

    conditions = [Condition("none", None, "none", {"kind": "none", "k": 0})]
    for k in ks:
        conditions.append(Condition(f"top-{k}", mask(ranking[:k]), f"top-{k}", {"kind": "top", "k": k}))
        for seed in seeds:
            heads = random_heads(detection.n_layers, detection.n_heads, k, outside, seed)
            conditions.append(
                Condition(f"random-{k}-seed{seed}", mask(heads), f"random-{k}", {"kind": "random", "k": k, "seed": seed})
            )
    return conditions


def ablation_experiment(
    model: HookedTransformer,
    trials: Sequence[Trial],
    detection: DetectionResult,
    masking: MaskingOptions = MaskingOptions(),
    *,
    out_dir: str | Path | None = None,
    options: RunOptions = RunOptions(),
    settings: dict[str, Any] | None = None,
    executor=None,
) -> AblationResult:
    """The paper's masking experiment (`masking`: see `MaskingOptions`; its `thresholds` are
    `ablate_grid`'s to resolve); each condition's trials are saved (and resumed) under
    `<out_dir>/conditions/<name>/`, the whole result in `<out_dir>/ablation.json`.
    `executor`: as for `detect`."""
    check_shape("scores", detection.n_layers, detection.n_heads, model)
    ks = list(masking.ks or default_ks(model.cfg.n_layers, model.cfg.n_heads))
    method, decode_only = masking.method, masking.decode_only
    settings = {**(settings or {}), "ks": ks, "seeds": list(masking.seeds), "method": method, "decode_only": decode_only}
    executor = executor or InProcess(model)
    # Mean ablation: each head's mean output over a few of the grid's own prompts.
    mean_z = executor.call(partial(head_means, prompts=[t.prompt_ids for t in trials[:4]])) if method == "mean" else None
    conditions = ablation_conditions(detection, ks, masking.seeds, method=method, decode_only=decode_only, mean_z=mean_z)
    return run_conditions(
        model,
        trials,
        conditions,
        experiment="ablation",
        out_dir=out_dir,
        options=options,
        settings=settings,
        executor=executor,
        result_type=AblationResult,
    )
