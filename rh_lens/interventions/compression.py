"""Retrieval-head-aware KV-cache compression: keep the whole cache only where heads fetch.

A `KVPolicy` (`rh_lens.model.headwise`) says which key-value heads keep every key ("full")
and which keep only the first `sink` tokens (attention sinks) and a recent `window`
("streaming", as in StreamingLLM and DuoAttention). It is applied at prefill and decode, or at
decode only (as a cache compressed after prefill behaves), in one of two ways: for real
(`cache="real"`, the default: a head-wise cache stores only the keys kept), or simulated through
TransformerLens hooks (`cache="masked"`: at `hook_attn_scores` the keys a streaming head does not
keep get no attention, -inf, and the full cache stays in memory; same results, the oracle).
Key-value memory is per key-value head, so under
grouped-query attention a policy decides per KV head, and all query heads reading a KV head
follow it; a KV head's retrieval score is the best retrieval score of its query heads.

Rankings: retrieval scores of a detection run (`retrieval_policy`); random KV heads
(`random_policy`); every head streaming with a window sized to keep the same bytes
(StreamingLLM, `streaming_policy`); and RazorAttention's data-free ranking, echo and
induction heads found on a repeated random sequence (`razor_scores`, `razor_policy`).
`kv_bytes` predicts the bytes a policy keeps, as kvpress reports them (the head-wise cache
measures its own: `rh_lens.model.tl_internals.kv_cache_bytes`).
`KVCompression(policy)` is the intervention (see `interventions.base`) and
`compression_experiment` the runner's conditions: every ranking at every budget.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from jaxtyping import Float
from torch import Tensor
from transformer_lens import HookedTransformer

from rh_lens.detection.probes import razor_scores
from rh_lens.detection.records import DetectionResult
from rh_lens.errors import InputError
from rh_lens.execution.files import write_atomic, write_json
from rh_lens.execution.options import RunOptions
from rh_lens.execution.runs import InProcess
from rh_lens.heads import KVHead
from rh_lens.interventions.base import Condition, Intervention, InterventionResult, check_shape, run_conditions
from rh_lens.model.generation import Decoding, key_positions
from rh_lens.model.headwise import KVPolicy, kv_bytes
from rh_lens.model.tl_internals import Hook, check_headwise, native_windows
from rh_lens.tasks.niah import Trial

METHODS = ("retrieval", "random", "streaming", "razor")


def compression_hooks(policy: KVPolicy) -> list[Hook]:
    """TransformerLens (hook name, function) pairs: streaming heads attend to no key outside
    their sink and recent window (causality and the model's own windows stay in force)."""
    hooks = []
    for layer in range(policy.n_layers):
        heads = policy.streaming_heads(layer)
        if heads:
            hooks.append((f"blocks.{layer}.attn.hook_attn_scores", partial(_stream, policy, heads)))
    return hooks


def _stream(policy: KVPolicy, heads: list[int], scores: Tensor, hook) -> Tensor:  # scores: [batch, head, query, key]
    n_query, n_key = scores.shape[-2:]
    key = key_positions(n_key, scores.device)  # [batch or 1, key]: each row's own positions (rows may be padded)
    query = key[:, -n_query:, None]  # this call's queries are the newest keys: [batch or 1, query, 1]
    keep = policy.keeps(key[:, None, :], query)  # [batch or 1, query, key]
    scores[:, heads] = scores[:, heads].masked_fill(~keep[:, None], float("-inf"))
    return scores


# --- rankings ---------------------------------------------------------------------------


def kv_head_scores(head_scores: Float[Tensor, "layer head"], n_kv_heads: int) -> Float[Tensor, "layer kv_head"]:
    """Each KV head's score: the best score among the query heads that read it."""
    n_layers, n_heads = head_scores.shape
    return head_scores.reshape(n_layers, n_kv_heads, n_heads // n_kv_heads).amax(dim=-1)


def rank_kv_heads(scores: Float[Tensor, "layer kv_head"]) -> list[KVHead]:
    """KV heads by score, best first; ties in (layer, head) order."""
    heads = [KVHead(layer, kv) for layer in range(scores.shape[0]) for kv in range(scores.shape[1])]
    return sorted(heads, key=lambda h: (-float(scores[h]), h))


def n_full_heads(n_layers: int, n_kv_heads: int, full_fraction: float) -> int:
    if not 0 <= full_fraction <= 1:
        raise InputError(f"full fraction {full_fraction}: must be from 0 to 1")
    return round(full_fraction * n_layers * n_kv_heads)


def _shape(model) -> tuple[int, int, int]:
    cfg = model.cfg
    return cfg.n_layers, cfg.n_heads, cfg.n_key_value_heads or cfg.n_heads


def top_policy(
    name: str, model, scores: Float[Tensor, "layer kv_head"], full_fraction: float, sink: int, window: int
) -> KVPolicy:
    """The best-scoring `full_fraction` of KV heads keep the whole cache."""
    return top_policy_for_shape(name, _shape(model), scores, full_fraction, sink, window)


def top_policy_for_shape(
    name: str, shape: tuple[int, int, int], scores: Float[Tensor, "layer kv_head"], full_fraction: float, sink: int, window: int
) -> KVPolicy:
    """`top_policy` for a model of (layers, query heads, KV heads)."""
    n_layers, n_heads, n_kv = shape
    if tuple(scores.shape) != (n_layers, n_kv):
        raise InputError(f"KV-head scores for {tuple(scores.shape)} layers x KV heads, the model has {n_layers} x {n_kv}")
    full = rank_kv_heads(scores)[: n_full_heads(n_layers, n_kv, full_fraction)]
    return KVPolicy(name, n_layers, n_heads, n_kv, frozenset(full), sink, window)


def retrieval_policy(model, detection: DetectionResult, full_fraction: float, sink: int = 4, window: int = 256) -> KVPolicy:
    """KV heads ranked by retrieval score (the best of their query heads)."""
    _, _, n_kv = _shape(model)
    check_shape("scores", detection.n_layers, detection.n_heads, model)
    return top_policy("retrieval", model, kv_head_scores(detection.scores().float(), n_kv), full_fraction, sink, window)


def random_policy(model, full_fraction: float, seed: int, sink: int = 4, window: int = 256) -> KVPolicy:
    """As many KV heads as `full_fraction` keep the whole cache, drawn at random (seeded)."""
    n_layers, n_heads, n_kv = _shape(model)
    pool = [KVHead(layer, kv) for layer in range(n_layers) for kv in range(n_kv)]
    full = random.Random(seed).sample(pool, n_full_heads(n_layers, n_kv, full_fraction))
    return KVPolicy(f"random-seed{seed}", n_layers, n_heads, n_kv, frozenset(full), sink, window)


def streaming_policy(model, full_fraction: float, sink: int = 4, window: int = 256) -> KVPolicy:
    """StreamingLLM: every head keeps the sink and a recent window, the window sized so that
    the cache keeps the bytes of a policy with `full_fraction` of its KV heads full."""
    n_layers, n_heads, n_kv = _shape(model)
    share = n_full_heads(n_layers, n_kv, full_fraction) / (n_layers * n_kv)
    return KVPolicy("streaming", n_layers, n_heads, n_kv, frozenset(), sink, window, share)


def razor_policy(model, scores: Float[Tensor, "layer head"], full_fraction: float, sink: int = 4, window: int = 256) -> KVPolicy:
    _, _, n_kv = _shape(model)
    return top_policy("razor", model, kv_head_scores(scores, n_kv), full_fraction, sink, window)


# --- the intervention and the experiment ---------------------------------------------------


CACHES = ("masked", "real")


@dataclass(frozen=True)
class KVCompression(Intervention):
    """The cache `policy` keeps (at prefill and decode, or decode only). `cache="real"` (the
    default): decoded through a head-wise cache that stores only those keys
    (`rh_lens.model.headwise`); `"masked"`: simulated, streaming heads see only their sink and
    window through -inf scores over the full cache, the same computation with nothing freed
    (`with KVCompression(policy, cache="masked")(model):` applies it to every forward pass
    inside the block)."""

    kind: ClassVar[str] = "kv_compression"
    policy: KVPolicy
    decode_only: bool = False
    cache: str = "real"

    def __post_init__(self):
        if self.cache not in CACHES:
            raise InputError(f"unknown cache {self.cache!r}; choose from {', '.join(CACHES)}")

    def __call__(self, model: HookedTransformer):
        if self.cache == "real":  # hooks alone cannot free keys: only rh_lens's decoding holds the head-wise cache
            raise InputError(
                "a real head-wise cache acts through rh_lens's decoding (answer_under, decode_prompts); "
                'for hooks on every forward pass use KVCompression(policy, cache="masked")'
            )
        return super().__call__(model)

    def hooks(self, model: HookedTransformer) -> list[Hook]:
        return compression_hooks(self.policy) if self.cache == "masked" else []

    def decoding(self, decoding: Decoding) -> Decoding:
        if self.cache == "masked":
            return decoding
        return replace(decoding, kv_policy=self.policy, kv_decode_only=self.decode_only)

    def check(self, model: HookedTransformer) -> None:
        check_shape("the KV policy's heads", self.policy.n_layers, self.policy.n_heads, model)
        if self.cache == "real":
            check_headwise(model, self.policy)

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "policy": self.policy.to_json(), "decode_only": self.decode_only, "cache": self.cache}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> KVCompression:
        return cls(KVPolicy.from_json(data["policy"]), data["decode_only"], data.get("cache", "masked"))  # older files: masked


class CompressionResult(InterventionResult):
    """The compression experiment's conditions: the full cache, then per full fraction each
    method (random KV heads: one condition per seed, one group); metadata `method`,
    `full_fraction`, `seed`, `kv_kept` (mean over trials of the bytes kept / the full cache)."""

    baseline: ClassVar[str] = "full"

    @property
    def sink(self) -> int:
        return self.settings["sink"]

    @property
    def window(self) -> int:
        return self.settings["window"]

    def comparison_pairs(self) -> list[tuple[str, str]]:
        """At each full fraction the retrieval policy against every other method, then every
        group against the full cache."""
        groups = self.groups()
        fractions = sorted({c.metadata["full_fraction"] for c in self.conditions if c.metadata["method"] == "retrieval"})
        pairs = [
            (f"retrieval-{f:g}", f"{method}-{f:g}")
            for f in fractions
            for method in ("random", "streaming", "razor")
            if f"{method}-{f:g}" in groups
        ]
        return pairs + super().comparison_pairs()

    def summary(self) -> list[dict[str, Any]]:
        """`InterventionResult.summary` plus the compression ratio (the fraction removed, as
        kvpress reports it)."""
        return [{**row, "compression_ratio": 1 - row["kv_kept"]} for row in super().summary()]


@dataclass(frozen=True, kw_only=True)
class CompressionOptions:
    """What a compression experiment runs (`rh-lens compress`'s options): at each of
    `fractions` of KV heads kept full, every ranking's policy, random KV heads for each of
    `seeds`; streaming heads keep `sink` + `window` tokens; `decode_only`: the prompt
    prefilled whole and compressed before the first decode step (else windowed from the first
    prompt token); `cache`: "real" (a head-wise cache that frees the bytes) or "masked" (the
    simulation over the full cache)."""

    fractions: tuple[float, ...] = (0.1, 0.25, 0.5)
    seeds: tuple[int, ...] = (0, 1)
    sink: int = 4
    window: int = 256
    decode_only: bool = False
    cache: str = "real"

    def __post_init__(self):
        if self.sink < 0 or self.window < 1:
            raise InputError(f"sink {self.sink} and window {self.window}: need sink >= 0 and window >= 1")
        if not self.fractions or not all(0 < f <= 1 for f in self.fractions):
            raise InputError(f"full fractions {list(self.fractions)}: each must be in (0, 1]")
        if self.cache not in ("real", "masked"):
            raise InputError(f"cache {self.cache!r}: choose real or masked")
        object.__setattr__(self, "fractions", tuple(self.fractions))
        object.__setattr__(self, "seeds", tuple(self.seeds))

    def settings(self) -> dict[str, Any]:
        """As a run records them (results files keep these keys)."""
        return {
            "fractions": list(self.fractions),
            "seeds": list(self.seeds),
            "sink": self.sink,
            "window": self.window,
            "decode_only": self.decode_only,
            "cache": self.cache,
        }

    @classmethod
    def from_settings(cls, settings: dict[str, Any]) -> CompressionOptions:
        """The options a run's recorded settings (`settings()`) were made from."""
        return cls(**{k: settings[k] for k in ("fractions", "seeds", "sink", "window", "decode_only", "cache")})


def compression_conditions(
    model,
    detection: DetectionResult,
    trials: Sequence[Trial],
    compression: CompressionOptions,
    razor: Float[Tensor, "layer head"] | None = None,
) -> list[Condition]:
    """The full cache, then per fraction the retrieval policy, random KV heads per seed,
    StreamingLLM at the same bytes, and RazorAttention's ranking (when `razor` scores are
    given); each with the share of the cache it keeps over these trials."""
    sink, window = compression.sink, compression.window
    conditions = [Condition("full", None, "full", {"method": "full", "full_fraction": 1.0, "kv_kept": 1.0})]
    for fraction in compression.fractions:
        policies = [("retrieval", None, retrieval_policy(model, detection, fraction, sink, window))]
        policies += [("random", seed, random_policy(model, fraction, seed, sink, window)) for seed in compression.seeds]
        policies.append(("streaming", None, streaming_policy(model, fraction, sink, window)))
        if razor is not None:
            policies.append(("razor", None, razor_policy(model, razor, fraction, sink, window)))
        for method, seed, policy in policies:
            group = f"{method}-{fraction:g}"
            metadata = {"method": method, "full_fraction": fraction} | ({"seed": seed} if seed is not None else {})
            name = group + (f"-seed{seed}" if seed is not None else "")
            kv = {"decode_only": compression.decode_only, "cache": compression.cache}
            conditions.append(kv_condition(model, trials, policy, name, group, metadata, **kv))
    return conditions


def kv_condition(
    model, trials: Sequence[Trial], policy: KVPolicy, name: str, group: str, metadata: dict[str, Any], *, decode_only, cache
) -> Condition:
    """Decoding under `policy`, with `kv_kept` in its metadata: the mean over these trials of
    the bytes it keeps / the full cache's."""
    cfg = model.cfg
    kept = [kv_bytes(policy, len(t.prompt_ids), cfg.d_head, cfg.dtype.itemsize, native_windows(model)) for t in trials]
    metadata = {**metadata, "kv_kept": float(np.mean([k / f for k, f in kept]))}
    return Condition(name, KVCompression(policy, decode_only, cache), group, metadata)


def compression_experiment(
    model,
    trials: Sequence[Trial],
    detection: DetectionResult,
    compression: CompressionOptions = CompressionOptions(),
    *,
    out_dir: str | Path | None = None,
    options: RunOptions = RunOptions(),
    settings: dict[str, Any] | None = None,
    executor=None,
) -> CompressionResult:
    """The NIAH grid under every condition of `compression_conditions`; each condition's trials
    saved (and resumed) under `<out_dir>/conditions/<name>/`, the result in
    `<out_dir>/compression.json`."""
    check_shape("scores", detection.n_layers, detection.n_heads, model)
    executor = executor or InProcess(model)
    razor = executor.call(razor_scores)
    return run_conditions(
        model,
        trials,
        compression_conditions(model, detection, trials, compression, razor),
        experiment="compression",
        out_dir=out_dir,
        options=options,
        settings={**(settings or {}), **compression.settings()},
        executor=executor,
        result_type=CompressionResult,
    )


# --- export -------------------------------------------------------------------------------


def export_duo_attention(policy: KVPolicy, out_dir: str | Path) -> list[Path]:
    """The split in DuoAttention's pattern format, which DuoAttention and kvpress's
    DuoAttentionPress read: `full_attention_heads.tsv` (one row per layer, one tab-separated
    column per KV head, 1 = full attention, 0 = streaming) and `config.json` with
    `sink_size` and `recent_size`."""
    out_dir = Path(out_dir)
    rows = [
        "\t".join("1" if (layer, kv) in policy.full else "0" for kv in range(policy.n_kv_heads))
        for layer in range(policy.n_layers)
    ]
    paths = [out_dir / "full_attention_heads.tsv", out_dir / "config.json"]
    write_atomic(paths[0], lambda f: f.write("\n".join(rows) + "\n"))
    write_json(paths[1], {"sink_size": policy.sink, "recent_size": policy.window})
    return paths
