"""Causal ablation of attention heads, and the paper's masking experiment on NIAH.

`mask_heads(model, heads, method)` is a context manager usable around any forward pass,
generation or experiment. Methods, all through TransformerLens hook points:
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
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens import HookedTransformer

from .detection import answer_trial
from .errors import InputError
from .generation import MAX_NEW_TOKENS, prefill
from .heads import Head, all_heads, heads_of
from .niah import Trial
from .results import Answer, DetectionResult, recall_grid, write_json
from .runs import InProcess, run_directory, run_trials
from .scoring import SUCCESS_RECALL
from .tl_internals import allowed_keys

METHODS = ("uniform", "zero", "mean")
RESPONSE_CLASSES = ("correct", "distractor", "other-context", "invented")  # see detection.response_class


def _by_layer(heads: Iterable[Head]) -> dict[int, list[int]]:
    layers: dict[int, list[int]] = {}
    for layer, head in heads_of(heads):
        layers.setdefault(layer, []).append(head)
    return layers


def ablation_hooks(
    heads: Iterable[Head], method: str = "uniform", mean_z: Float[Tensor, "layer head d_head"] | None = None
) -> list[tuple[str, Any]]:
    """TransformerLens (hook name, function) pairs that ablate `heads` with `method`."""
    if method not in METHODS:
        raise InputError(f"unknown ablation method {method!r}; choose from {', '.join(METHODS)}")
    if method == "mean" and mean_z is None:
        raise InputError("mean ablation needs mean_z: compute it with head_means(model, prompts)")
    hooks = []
    for layer, idx in _by_layer(heads).items():
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
    with model.hooks(fwd_hooks=ablation_hooks(heads, method, mean_z)):
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


# --- NIAH under ablation --------------------------------------------------------------


@dataclass(kw_only=True)
class NiahRecord(Answer):
    """One NIAH trial's graded answer. `outcome`: retrieved (recall > 0.5), partial, or absent
    (no answer word in the response: the model hallucinated or paraphrased)."""

    outcome: str


def outcome(recall: float) -> str:
    return "retrieved" if recall > SUCCESS_RECALL else "partial" if recall > 0 else "absent"


def niah_trial(
    model: HookedTransformer,
    trial: Trial,
    decode_hooks: Sequence[tuple] = (),
    max_new_tokens: int = MAX_NEW_TOKENS,
) -> NiahRecord:
    """Greedy answer to one trial under whatever hooks are on the model (plus decode-only ones)."""
    answer, _ = answer_trial(model, trial, max_new_tokens, record_attention=False, decode_hooks=decode_hooks)
    return NiahRecord(**vars(answer), outcome=outcome(answer.rouge_recall))


def masked_niah_trial(
    heads: Sequence[Head], method: str, decode_only: bool, mean_z, max_new_tokens: int, model: HookedTransformer, trial: Trial
) -> NiahRecord:
    """One NIAH trial answered with `heads` ablated (at every position, or at decode steps
    only): a task an executor can ship to a worker (see `runs.run_trials`)."""
    hooks = ablation_hooks(heads, method, mean_z)
    with model.hooks(fwd_hooks=[] if decode_only else hooks):
        return niah_trial(model, trial, hooks if decode_only else (), max_new_tokens)


def evaluate_niah(
    model: HookedTransformer,
    trials: Sequence[Trial],
    heads: Iterable[Head] = (),
    method: str = "uniform",
    decode_only: bool = False,
    mean_z: Float[Tensor, "layer head d_head"] | None = None,
    out_dir: str | Path | None = None,
    resume: bool = False,
    settings: dict[str, Any] | None = None,
    max_new_tokens: int = MAX_NEW_TOKENS,
    progress: bool = True,
    desc: str = "niah",
    executor=None,
) -> list[NiahRecord]:
    """The NIAH grid answered with `heads` ablated (at every position, or at decode steps
    only), one resumable per-trial file each when `out_dir` is given. `executor`: as for
    `detect`."""
    heads = heads_of(heads)
    ablation_hooks(heads, method, mean_z)  # a bad method or a missing mean_z fails here, not in a worker
    settings = {**(settings or {}), "heads": [str(h) for h in heads], "method": method, "decode_only": decode_only}
    task = partial(masked_niah_trial, heads, method, decode_only, mean_z, max_new_tokens)
    return run_trials(trials, task, NiahRecord, executor or InProcess(model), out_dir, resume, settings, desc, progress)


# --- the paper's experiment: top-K retrieval heads vs random heads ---------------------


@dataclass
class Condition:
    """One masking condition: none, the top-K retrieval heads, or K random other heads."""

    kind: str  # "none", "top" or "random"
    k: int
    seed: int | None
    heads: list[Head]
    records: list[NiahRecord] = field(default_factory=list)

    @property
    def name(self) -> str:
        return {"none": "none", "top": f"top-{self.k}", "random": f"random-{self.k}-seed{self.seed}"}[self.kind]

    def mean_recall(self) -> float:
        return float(np.mean([r.rouge_recall for r in self.records])) if self.records else float("nan")


@dataclass
class AblationResult:
    model: str
    method: str
    decode_only: bool
    conditions: list[Condition]
    settings: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> list[dict[str, Any]]:
        """Mean ROUGE recall per (kind, K); for random heads the mean and spread over seeds."""
        rows = []
        for kind, k in dict.fromkeys((c.kind, c.k) for c in self.conditions):
            group = [c for c in self.conditions if (c.kind, c.k) == (kind, k)]
            per_seed = [c.mean_recall() for c in group]
            records = [r for c in group for r in c.records]
            rows.append({
                "condition": group[0].name if kind != "random" else f"random-{k}",
                "kind": kind,
                "k": k,
                "mean_recall": float(np.mean(per_seed)),
                "std_over_seeds": float(np.std(per_seed)) if len(per_seed) > 1 else 0.0,
                "n_seeds": len(group) if kind == "random" else None,
                "success_rate": float(np.mean([r.success for r in records])),
                "absent_rate": float(np.mean([r.outcome == "absent" for r in records])),
                "classes": {k: float(np.mean([r.response_class == k for r in records])) for k in RESPONSE_CLASSES},
            })  # fmt: skip
        return rows

    def threshold_rows(self) -> list[dict[str, Any]]:
        """With thresholds in the settings (`ablate --thresholds`): per threshold, the heads at or
        above it, and NIAH recall with them masked against as many random heads."""
        rows = {(r["kind"], r["k"]): r for r in self.summary()}
        return [
            {"threshold": float(t), "n_heads": k, "top_recall": rows.get(("top", k), {}).get("mean_recall"),
             "random_recall": rows.get(("random", k), {}).get("mean_recall"), "random_std": rows.get(("random", k), {}).get("std_over_seeds"),
             "none_recall": rows[("none", 0)]["mean_recall"]}
            for t, k in self.settings.get("thresholds", {}).items()
        ]  # fmt: skip

    def recall_grid(self, kind: str, k: int) -> tuple[list[int], list[int], Float[np.ndarray, "depth length"]]:
        """Mean recall per (depth, length) over needles (and seeds): the paper's NIAH heatmap."""
        return recall_grid([r for c in self.conditions if (c.kind, c.k) == (kind, k) for r in c.records])

    def to_json(self) -> dict[str, Any]:
        data = {"format": "rh_lens.ablation/1", **asdict(self)}
        for condition in data["conditions"]:
            condition["heads"] = [str(h) for h in condition["heads"]]
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "AblationResult":
        conditions = [
            Condition(c["kind"], c["k"], c["seed"], heads_of(c["heads"]), [NiahRecord.from_json(r) for r in c["records"]])
            for c in data["conditions"]
        ]
        return cls(data["model"], data["method"], data["decode_only"], conditions, data.get("settings", {}))


def ablation_conditions(
    detection: DetectionResult, ks: Sequence[int], seeds: Sequence[int]
) -> list[Condition]:
    """No masking; the top-K heads by retrieval score; K random heads drawn only from outside
    the top list (the largest K's top heads and every head above the threshold)."""
    ranking = [Head(layer, head) for layer, head, _ in detection.ranking()]
    outside = set(ranking[: max(ks)]) | {Head(layer, head) for layer, head, _ in detection.retrieval_heads()}
    conditions = [Condition("none", 0, None, [])]
    for k in ks:
        conditions.append(Condition("top", k, None, ranking[:k]))
        for seed in seeds:
            conditions.append(Condition("random", k, seed, random_heads(detection.n_layers, detection.n_heads, k, outside, seed)))
    return conditions


def ablation_experiment(
    model: HookedTransformer,
    trials: Sequence[Trial],
    detection: DetectionResult,
    ks: Sequence[int] | None = None,
    seeds: Sequence[int] = (0, 1, 2),
    method: str = "uniform",
    decode_only: bool = False,
    out_dir: str | Path | None = None,
    resume: bool = False,
    settings: dict[str, Any] | None = None,
    max_new_tokens: int = MAX_NEW_TOKENS,
    progress: bool = True,
    executor=None,
) -> AblationResult:
    """The paper's masking experiment; each condition's trials are saved (and resumed)
    under `<out_dir>/conditions/<name>/`, the whole result in `<out_dir>/ablation.json`.
    `executor`: as for `detect`."""
    if (detection.n_layers, detection.n_heads) != (model.cfg.n_layers, model.cfg.n_heads):
        raise InputError(
            f"scores are for {detection.n_layers} x {detection.n_heads} heads, "
            f"the model has {model.cfg.n_layers} x {model.cfg.n_heads}"
        )
    ks = list(ks or default_ks(model.cfg.n_layers, model.cfg.n_heads))
    settings = {
        **(settings or {}), "ks": ks, "seeds": list(seeds), "max_new_tokens": max_new_tokens,
        "dtype": str(model.cfg.dtype).removeprefix("torch."),
    }  # fmt: skip
    conditions = ablation_conditions(detection, ks, seeds)
    executor = executor or InProcess(model)
    with run_directory(out_dir, resume) if out_dir is not None else nullcontext():
        # Mean ablation: each head's mean output over a few of the grid's own prompts.
        mean_z = executor.call(partial(head_means, prompts=[t.prompt_ids for t in trials[:4]])) if method == "mean" else None
        for condition in conditions:
            condition.records = evaluate_niah(
                model,
                trials,
                condition.heads,
                method,
                decode_only,
                mean_z,
                Path(out_dir) / "conditions" / condition.name if out_dir is not None else None,
                resume,
                settings,
                max_new_tokens,
                progress,
                desc=condition.name,
                executor=executor,
            )
        result = AblationResult(model.cfg.model_name, method, decode_only, conditions, settings)
        if out_dir is not None:
            write_json(Path(out_dir) / "ablation.json", result.to_json())
    return result
