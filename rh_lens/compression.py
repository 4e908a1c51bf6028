"""Retrieval-head-aware KV-cache compression: keep the whole cache only where heads fetch.

A `KVPolicy` says which key-value heads keep every key ("full") and which keep only the first
`sink` tokens (attention sinks) and a recent `window` ("streaming", as in StreamingLLM and
DuoAttention). It is applied through TransformerLens hooks: at `hook_attn_scores`, the keys a
streaming head does not keep get no attention (-inf), at prefill and decode, or at decode only
(as a cache compressed after prefill behaves). Key-value memory is per key-value head, so under
grouped-query attention a policy decides per KV head, and all query heads reading a KV head
follow it; a KV head's retrieval score is the best retrieval score of its query heads.

Rankings: retrieval scores of a detection run (`retrieval_policy`); random KV heads
(`random_policy`); every head streaming with a window sized to keep the same bytes
(StreamingLLM, `streaming_policy`); and RazorAttention's data-free ranking, echo and
induction heads found on a repeated random sequence (`razor_scores`, `razor_policy`).
`kv_bytes` is the exact account of the cache a policy keeps, as kvpress reports it.
"""

from __future__ import annotations

import random
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens import HookedTransformer

from .ablation import NiahRecord, outcome
from .detection import answer_trial
from .errors import InputError
from .generation import MAX_NEW_TOKENS
from .niah import Trial
from .results import DetectionResult, recall_grid, write_atomic, write_json
from .runs import InProcess, run_directory, run_trials

KVHead = tuple[int, int]  # (layer, key-value head)
METHODS = ("retrieval", "random", "streaming", "razor")


@dataclass(frozen=True)
class KVPolicy:
    """Which key-value heads keep the whole cache. A streaming KV head keeps the first `sink`
    tokens and the most recent `window` tokens; with `share` > 0 its window also grows by that
    fraction of the tokens between them (StreamingLLM sized to another policy's bytes)."""

    name: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    full: frozenset[KVHead]
    sink: int = 4
    window: int = 256
    share: float = 0.0

    @property
    def group(self) -> int:
        """Query heads per key-value head (query head h reads KV head h // group)."""
        return self.n_heads // self.n_kv_heads

    def streaming_heads(self, layer: int) -> list[int]:
        """The query heads of `layer` that read a streaming KV head."""
        return [h for h in range(self.n_heads) if (layer, h // self.group) not in self.full]

    def kept(self, tokens: int) -> int:
        """Tokens a streaming KV head keeps of a context of `tokens` (what the mask of
        `compression_hooks` lets a query at position tokens - 1 see)."""
        recent = self.window + int(self.share * max(0, tokens - self.sink - self.window))
        return min(tokens, self.sink + recent)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "full": sorted(list(h) for h in self.full)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "KVPolicy":
        return cls(**{**data, "full": frozenset(tuple(h) for h in data["full"])})


def kv_bytes(policy: KVPolicy, tokens: int, d_head: int, dtype_bytes: int) -> tuple[int, int]:
    """(bytes the policy keeps, bytes of the full cache) for a context of `tokens`: per KV
    head, tokens kept x 2 (keys and values) x d_head x bytes per value."""
    per_token = 2 * d_head * dtype_bytes
    n_total = policy.n_layers * policy.n_kv_heads
    n_full = len(policy.full)
    kept = (n_full * tokens + (n_total - n_full) * policy.kept(tokens)) * per_token
    return kept, n_total * tokens * per_token


def compression_hooks(policy: KVPolicy) -> list[tuple[str, Any]]:
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
    query = torch.arange(n_key - n_query, n_key, device=scores.device)[:, None]  # positions of this call's queries
    key = torch.arange(n_key, device=scores.device)[None]
    recent = policy.window + (policy.share * (query + 1 - policy.sink - policy.window).clamp(min=0)).floor()
    keep = (key < policy.sink) | (key > query - recent)
    scores[:, heads] = scores[:, heads].masked_fill(~keep, float("-inf"))
    return scores


# --- rankings ---------------------------------------------------------------------------


def kv_head_scores(head_scores: Float[Tensor, "layer head"], n_kv_heads: int) -> Float[Tensor, "layer kv_head"]:
    """Each KV head's score: the best score among the query heads that read it."""
    n_layers, n_heads = head_scores.shape
    return head_scores.reshape(n_layers, n_kv_heads, n_heads // n_kv_heads).amax(dim=-1)


def rank_kv_heads(scores: Float[Tensor, "layer kv_head"]) -> list[KVHead]:
    """KV heads by score, best first; ties in (layer, head) order."""
    heads = [(layer, kv) for layer in range(scores.shape[0]) for kv in range(scores.shape[1])]
    return sorted(heads, key=lambda h: (-float(scores[h]), h))


def n_full_heads(n_layers: int, n_kv_heads: int, full_fraction: float) -> int:
    if not 0 <= full_fraction <= 1:
        raise InputError(f"full fraction {full_fraction}: must be from 0 to 1")
    return round(full_fraction * n_layers * n_kv_heads)


def _shape(model) -> tuple[int, int, int]:
    cfg = model.cfg
    return cfg.n_layers, cfg.n_heads, cfg.n_key_value_heads or cfg.n_heads


def top_policy(name: str, model, scores: Float[Tensor, "layer kv_head"], full_fraction: float, sink: int, window: int) -> KVPolicy:
    """The best-scoring `full_fraction` of KV heads keep the whole cache."""
    n_layers, n_heads, n_kv = _shape(model)
    full = rank_kv_heads(scores)[: n_full_heads(n_layers, n_kv, full_fraction)]
    return KVPolicy(name, n_layers, n_heads, n_kv, frozenset(full), sink, window)


def retrieval_policy(model, detection: DetectionResult, full_fraction: float, sink: int = 4, window: int = 256) -> KVPolicy:
    """KV heads ranked by retrieval score (the best of their query heads)."""
    n_layers, n_heads, n_kv = _shape(model)
    if (detection.n_layers, detection.n_heads) != (n_layers, n_heads):
        raise InputError(f"scores are for {detection.n_layers} x {detection.n_heads} heads, the model has {n_layers} x {n_heads}")
    return top_policy("retrieval", model, kv_head_scores(detection.scores().float(), n_kv), full_fraction, sink, window)


def random_policy(model, full_fraction: float, seed: int, sink: int = 4, window: int = 256) -> KVPolicy:
    """As many KV heads as `full_fraction` keep the whole cache, drawn at random (seeded)."""
    n_layers, n_heads, n_kv = _shape(model)
    pool = [(layer, kv) for layer in range(n_layers) for kv in range(n_kv)]
    full = random.Random(seed).sample(pool, n_full_heads(n_layers, n_kv, full_fraction))
    return KVPolicy(f"random-seed{seed}", n_layers, n_heads, n_kv, frozenset(full), sink, window)


def streaming_policy(model, full_fraction: float, sink: int = 4, window: int = 256) -> KVPolicy:
    """StreamingLLM: every head keeps the sink and a recent window, the window sized so that
    the cache keeps the bytes of a policy with `full_fraction` of its KV heads full."""
    n_layers, n_heads, n_kv = _shape(model)
    share = n_full_heads(n_layers, n_kv, full_fraction) / (n_layers * n_kv)
    return KVPolicy("streaming", n_layers, n_heads, n_kv, frozenset(), sink, window, share)


@torch.inference_mode()
def repeat_attention(
    model: HookedTransformer, length: int = 256, seed: int = 0
) -> tuple[Float[Tensor, "layer head"], Float[Tensor, "layer head"]]:
    """On a random token sequence repeated twice, each head's mean attention (second copy) to
    the previous occurrence of the current token (echo) and to the token after it
    (induction): the classic probe of induction heads."""
    length = min(length, (model.cfg.n_ctx - 1) // 2)
    low = min(100, model.cfg.d_vocab // 10)  # away from the special tokens at the start of most vocabularies
    generator = torch.Generator().manual_seed(seed)
    if length <= model.cfg.d_vocab - 2 * low:  # distinct tokens: each occurs once per copy
        sequence = torch.randperm(model.cfg.d_vocab - 2 * low, generator=generator)[:length] + low
    else:
        sequence = torch.randint(low, model.cfg.d_vocab - low, (length,), generator=generator)
    tokens = torch.cat([sequence, sequence])[None].to(model.cfg.device)
    echo, induction = torch.zeros(model.cfg.n_layers, model.cfg.n_heads), torch.zeros(model.cfg.n_layers, model.cfg.n_heads)
    positions = torch.arange(length + 1, 2 * length, device=model.cfg.device)  # second copy, from its second token

    def score(pattern: Tensor, hook) -> None:  # [batch, head, query, key]
        rows = pattern[0][:, positions]  # [head, query, key]
        for out, offset in ((echo, 0), (induction, 1)):
            at = (positions - length + offset)[None, :, None].expand(rows.shape[0], -1, 1)
            out[hook.layer()] = rows.gather(-1, at).squeeze(-1).mean(dim=-1).float().cpu()

    model.run_with_hooks(tokens, fwd_hooks=[(lambda name: name.endswith("attn.hook_pattern"), score)], stop_at_layer=model.cfg.n_layers)
    return echo, induction


def razor_scores(model: HookedTransformer, length: int = 256, seed: int = 0) -> Float[Tensor, "layer head"]:
    """RazorAttention's data-free ranking: echo plus induction attention (`repeat_attention`)."""
    echo, induction = repeat_attention(model, length, seed)
    return echo + induction


def razor_policy(model, scores: Float[Tensor, "layer head"], full_fraction: float, sink: int = 4, window: int = 256) -> KVPolicy:
    _, _, n_kv = _shape(model)
    return top_policy("razor", model, kv_head_scores(scores, n_kv), full_fraction, sink, window)


# --- NIAH under a policy ------------------------------------------------------------------


def compressed_niah_trial(policy: KVPolicy, decode_only: bool, max_new_tokens: int, model: HookedTransformer, trial: Trial) -> NiahRecord:
    """One NIAH trial answered under `policy` (at prefill and decode, or decode only): a task
    an executor can ship to a worker."""
    hooks = compression_hooks(policy)
    with model.hooks(fwd_hooks=[] if decode_only else hooks):
        answer, _ = answer_trial(model, trial, max_new_tokens, record_attention=False, decode_hooks=hooks if decode_only else ())
    return NiahRecord(**vars(answer), outcome=outcome(answer.rouge_recall))


@dataclass
class CompressionCondition:
    """NIAH under one policy. `kv_kept`: mean over trials of the bytes kept / the full cache
    at the trial's prompt length."""

    method: str  # "full", or one of METHODS
    full_fraction: float
    seed: int | None
    policy: KVPolicy | None
    kv_kept: float
    records: list[NiahRecord] = field(default_factory=list)

    @property
    def name(self) -> str:
        if self.method == "full":
            return "full"
        return f"{self.method}-{self.full_fraction:g}" + (f"-seed{self.seed}" if self.seed is not None else "")


@dataclass
class CompressionResult:
    model: str
    sink: int
    window: int
    decode_only: bool
    conditions: list[CompressionCondition]
    settings: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> list[dict[str, Any]]:
        """Per (method, full fraction): KV kept, compression ratio (fraction removed, as kvpress
        reports it), mean ROUGE-1 recall (mean and spread over seeds), retrieved %."""
        rows = []
        for method, fraction in dict.fromkeys((c.method, c.full_fraction) for c in self.conditions):
            group = [c for c in self.conditions if (c.method, c.full_fraction) == (method, fraction)]
            per_seed = [float(np.mean([r.rouge_recall for r in c.records])) for c in group]
            records = [r for c in group for r in c.records]
            kept = float(np.mean([c.kv_kept for c in group]))
            rows.append({
                "method": method, "full_fraction": fraction, "kv_kept": kept, "compression_ratio": 1 - kept,
                "mean_recall": float(np.mean(per_seed)), "std_over_seeds": float(np.std(per_seed)) if len(group) > 1 else 0.0,
                "n_seeds": len(group), "success_rate": float(np.mean([r.success for r in records])),
            })  # fmt: skip
        return rows

    def recall_grid(self, method: str, fraction: float):
        return recall_grid([r for c in self.conditions if (c.method, c.full_fraction) == (method, fraction) for r in c.records])

    def to_json(self) -> dict[str, Any]:
        data = {"format": "rh_lens.compression/1", **asdict(self)}
        for condition, original in zip(data["conditions"], self.conditions):
            condition["policy"] = original.policy.to_json() if original.policy else None
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "CompressionResult":
        conditions = [
            CompressionCondition(
                c["method"], c["full_fraction"], c["seed"], KVPolicy.from_json(c["policy"]) if c["policy"] else None, c["kv_kept"],
                [NiahRecord.from_json(r) for r in c["records"]],
            )
            for c in data["conditions"]
        ]  # fmt: skip
        return cls(data["model"], data["sink"], data["window"], data["decode_only"], conditions, data.get("settings", {}))


def compression_policies(
    model, detection: DetectionResult, fractions: Sequence[float], seeds: Sequence[int], sink: int, window: int,
    razor: Float[Tensor, "layer head"] | None = None,
) -> list[tuple[str, float, int | None, KVPolicy | None]]:
    """(method, full fraction, seed, policy) of every condition: the full cache, then per
    fraction the retrieval policy, random KV heads per seed, StreamingLLM at the same bytes,
    and RazorAttention's ranking (when `razor` scores are given)."""
    conditions = [("full", 1.0, None, None)]
    for fraction in fractions:
        conditions.append(("retrieval", fraction, None, retrieval_policy(model, detection, fraction, sink, window)))
        conditions += [("random", fraction, seed, random_policy(model, fraction, seed, sink, window)) for seed in seeds]
        conditions.append(("streaming", fraction, None, streaming_policy(model, fraction, sink, window)))
        if razor is not None:
            conditions.append(("razor", fraction, None, razor_policy(model, razor, fraction, sink, window)))
    return conditions


def compression_experiment(
    model,
    trials: Sequence[Trial],
    detection: DetectionResult,
    fractions: Sequence[float] = (0.1, 0.25, 0.5),
    sink: int = 4,
    window: int = 256,
    seeds: Sequence[int] = (0, 1),
    decode_only: bool = False,
    out_dir: str | Path | None = None,
    resume: bool = False,
    settings: dict[str, Any] | None = None,
    max_new_tokens: int = MAX_NEW_TOKENS,
    progress: bool = True,
    executor=None,
) -> CompressionResult:
    """The NIAH grid under every condition of `compression_policies`; each condition's trials
    saved (and resumed) under `<out_dir>/conditions/<name>/`, the result in
    `<out_dir>/compression.json`."""
    if sink < 0 or window < 1:
        raise InputError(f"sink {sink} and window {window}: need sink >= 0 and window >= 1")
    executor = executor or InProcess(model)
    cfg = model.cfg
    settings = {
        **(settings or {}), "fractions": list(fractions), "seeds": list(seeds), "sink": sink, "window": window,
        "decode_only": decode_only, "max_new_tokens": max_new_tokens, "dtype": str(cfg.dtype).removeprefix("torch."),
    }  # fmt: skip
    dtype_bytes = torch.finfo(cfg.dtype).bits // 8
    conditions = []
    with run_directory(out_dir, resume) if out_dir is not None else nullcontext():
        razor = executor.call(razor_scores)
        for method, fraction, seed, policy in compression_policies(model, detection, fractions, seeds, sink, window, razor):
            kept = [kv_bytes(policy, len(t.prompt_ids), cfg.d_head, dtype_bytes) for t in trials] if policy else [(1, 1)]
            condition = CompressionCondition(method, fraction, seed, policy, float(np.mean([k / f for k, f in kept])))
            condition_settings = {**settings, "policy": policy.to_json() if policy else None}
            condition.records = run_trials(
                trials, partial(compressed_niah_trial, policy or _no_policy(model), decode_only, max_new_tokens), NiahRecord,
                executor, Path(out_dir) / "conditions" / condition.name if out_dir is not None else None, resume,
                condition_settings, condition.name, progress,
            )  # fmt: skip
            conditions.append(condition)
        result = CompressionResult(cfg.model_name, sink, window, decode_only, conditions, settings)
        if out_dir is not None:
            write_json(Path(out_dir) / "compression.json", result.to_json())
    return result


def _no_policy(model) -> KVPolicy:
    """Every KV head full: no hook at all."""
    n_layers, n_heads, n_kv = _shape(model)
    return KVPolicy("full", n_layers, n_heads, n_kv, frozenset((layer, kv) for layer in range(n_layers) for kv in range(n_kv)))


# --- export -------------------------------------------------------------------------------


def export_duo_attention(policy: KVPolicy, out_dir: str | Path) -> list[Path]:
    """The split in DuoAttention's pattern format, which DuoAttention and kvpress's
    DuoAttentionPress read: `full_attention_heads.tsv` (one row per layer, one tab-separated
    column per KV head, 1 = full attention, 0 = streaming) and `config.json` with
    `sink_size` and `recent_size`."""
    out_dir = Path(out_dir)
    rows = ["\t".join("1" if (layer, kv) in policy.full else "0" for kv in range(policy.n_kv_heads)) for layer in range(policy.n_layers)]
    paths = [out_dir / "full_attention_heads.tsv", out_dir / "config.json"]
    write_atomic(paths[0], lambda f: f.write("\n".join(rows) + "\n"))
    write_json(paths[1], {"sink_size": policy.sink, "recent_size": policy.window})
    return paths
