"""A head atlas: every head-finding method on the same trials, judged by what masking its
heads does on trials none of them saw.

1. Maps: the detection trials are decoded once (`trace_trials`) and every method scores
   every head on them (`rh_lens.detection.methods`, and activation patching, opt-in:
   `ATLAS_METHODS`); each map is a `DetectionResult`, saved
   as `<out>/maps/<method>.json` (what `ablate --scores`, `compare` and `show` read).
2. Agreement: for every pair of maps, Spearman and top-K overlap, with bootstrap intervals
   over the trials, paired where both maps count the same trials (`compare(..., paired=True)`).
3. Effect, on the evaluation trials: no masking; each method's top-K heads masked, K at each
   of `head_fractions` of all heads, against K random heads (seeds); and each method's ranking
   as a KV policy keeping `full_fraction` of the KV heads whole (the best of their query
   heads, as `compress` ranks them), against random KV heads and StreamingLLM at the same
   bytes. A head set two methods share runs once. Every condition's trials are saved as they
   finish under `<out>/conditions/`, so an interrupted atlas resumes (`RunOptions.resume`).
   Every recall carries its 95% interval over the evaluation trials, and every comparison a
   table invites (each method against random heads and against the retrieval score, at each
   K and as a KV policy) a paired test on the same trials (`rh_lens.uncertainty`).
`atlas.json` holds all of it as plain data; `Atlas.table()` is one row per method.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from transformer_lens import HookedTransformer

from rh_lens.analysis.analyses import compare
from rh_lens.detection.methods import METHODS
from rh_lens.detection.methods.base import head_map
from rh_lens.detection.records import DetectionResult, load_results, rank_heads, save_results
from rh_lens.detection.trace import trace_trials
from rh_lens.errors import InputError
from rh_lens.execution.files import read_json, write_json
from rh_lens.execution.options import RunOptions
from rh_lens.execution.runs import run_directory
from rh_lens.heads import Head
from rh_lens.interventions.base import Condition, InterventionResult, run_conditions
from rh_lens.interventions.compression import (
    kv_condition,
    kv_head_scores,
    random_policy,
    streaming_policy,
    top_policy,
)
from rh_lens.interventions.masking import HeadMask, random_heads
from rh_lens.interventions.patching import head_patching_scores
from rh_lens.tasks.niah import Trial

FORMAT = "rh_lens.atlas/1"
# The detection layer's methods, and activation patching (built on interventions): each
# `trial_scores(model, traced) -> [trial, layer, head]`.
ATLAS_METHODS = {**METHODS, "patching": head_patching_scores}
# opt-in: learned gates train (a forward and a backward pass per step); patching runs two
# full forward passes and a patched tail per head and trial
OPT_IN_METHODS = ("duo-gates", "patching")
DEFAULT_METHODS = tuple(m for m in ATLAS_METHODS if m not in OPT_IN_METHODS)


@dataclass(frozen=True, kw_only=True)
class AtlasOptions:
    """What an atlas computes. `methods`: names of `rh_lens.detection.methods.METHODS`;
    `head_fractions`: K for masking, as fractions of all heads; `random_seeds`: random-K
    draws (and random KV-head draws); `full_fraction`, `sink`, `window`, `kv_decode_only`:
    the KV policy (`compress`'s options); `masking`: how a head is masked (`ablate --method`);
    `top_k`, `resamples`: the agreement's top-K overlap (None: the largest K masked) and
    bootstrap resamples."""

    methods: tuple[str, ...] = DEFAULT_METHODS
    head_fractions: tuple[float, ...] = (0.02, 0.05, 0.10)
    random_seeds: int = 3
    full_fraction: float = 0.25
    sink: int = 4
    window: int = 128
    kv_decode_only: bool = True
    masking: str = "uniform"
    top_k: int | None = None
    resamples: int = 1000

    def __post_init__(self):
        unknown = [m for m in self.methods if m not in ATLAS_METHODS]
        if unknown or not self.methods:
            raise InputError(f"unknown method {unknown[0]!r}: choose from {', '.join(ATLAS_METHODS)}" if unknown else "no method")
        if not all(0 < f <= 1 for f in self.head_fractions) or not 0 < self.full_fraction <= 1:
            raise InputError("head fractions and the full fraction must be in (0, 1]")
        if self.random_seeds < 1 or (self.top_k is not None and self.top_k < 1) or self.resamples < 0:
            raise InputError("random_seeds and top_k must be >= 1, resamples >= 0")

    def ks(self, n_layers: int, n_heads: int) -> list[int]:
        """The K of each head fraction (at least 1), smallest first, each once."""
        return sorted({max(1, round(f * n_layers * n_heads)) for f in self.head_fractions})


@dataclass
class Atlas:
    """One model's atlas (see the module docstring). `maps`: method -> [layer][head] scores;
    `agreement`: one row per pair of methods; `masking`: rows of (method or "none" /
    "random", k, mean_recall, std_over_seeds, retained, success_rate, their intervals and
    n_trials); `kv`: rows of (method or "full" / "random" / "streaming", full_fraction,
    kv_kept, mean_recall, ...); `tests`: paired tests, each naming the methods on either side."""

    model: str
    n_layers: int
    n_heads: int
    methods: list[str]
    ks: list[int]
    maps: dict[str, list[list[float]]]
    agreement: list[dict[str, Any]]
    masking: list[dict[str, Any]]
    kv: list[dict[str, Any]]
    settings: dict[str, Any] = field(default_factory=dict)
    tests: list[dict[str, Any]] = field(default_factory=list)  # paired tests (absent from atlases before them)

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, **asdict(self)}

    @classmethod
    def from_json(cls, data: dict[str, Any], source: str = "atlas") -> Atlas:
        """An atlas from `to_json`'s dict; keys it does not know (e.g. a results file's "set") are ignored."""
        if data.get("format") != FORMAT:
            raise InputError(f"{source}: not an rh_lens atlas (format {data.get('format')!r})")
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    @classmethod
    def load(cls, path: str | Path) -> Atlas:
        return cls.from_json(read_json(path), str(path))

    def top_heads(self, method: str, k: int) -> list[Head]:
        """The method's top `k` heads, as its masking condition chose them."""
        return [Head(layer, head) for layer, head, _ in rank_heads(self.maps[method], k)]

    def recall(self, method: str, k: int) -> float | None:
        return self._masking_row(method, k).get("mean_recall")

    def recall_interval(self, method: str, k: int) -> tuple[float, float] | None:
        return self._masking_row(method, k).get("recall_interval")

    def _masking_row(self, method: str, k: int) -> dict[str, Any]:
        return next((r for r in self.masking if r["method"] == method and r["k"] == k), {})

    def table(self) -> list[dict[str, Any]]:
        """Per method: Spearman with every other method, recall with its top-K masked at each
        K, and recall (and what it kept of the full cache's right answers) under its KV policy,
        with the fraction of the cache that policy keeps (it varies by method where layers
        differ, e.g. Gemma-3's sliding-window layers hold at most their window)."""
        kv = {r["method"]: r for r in self.kv}
        rows = []
        for m in self.methods:
            spearman = {}
            for r in self.agreement:
                if m in (r["a"], r["b"]):
                    spearman[r["b"] if r["a"] == m else r["a"]] = r["spearman"]
            rows.append(
                {
                    "method": m,
                    "spearman": spearman,
                    "recall_masked": {k: self.recall(m, k) for k in self.ks},
                    "recall_masked_interval": {k: self.recall_interval(m, k) for k in self.ks},
                    "kv_recall": kv.get(m, {}).get("mean_recall"),
                    "kv_recall_interval": kv.get(m, {}).get("recall_interval"),
                    "kv_retained": kv.get(m, {}).get("retained"),
                    "kv_kept": kv.get(m, {}).get("kv_kept"),
                }
            )
        return rows


def _ranking(result: DetectionResult) -> list[Head]:
    return [Head(layer, head) for layer, head, _ in result.ranking()]


def method_maps(
    model: HookedTransformer, trials: Sequence[Trial], methods: Sequence[str], out_dir: Path, options: RunOptions
) -> dict[str, DetectionResult]:
    """Every method's map on the detection trials, from one traced decoding; a resumed atlas
    reads back the maps `<out_dir>/maps/` has and computes only the others."""
    paths = {m: out_dir / "maps" / f"{m}.json" for m in methods}
    maps = {m: load_results(p) for m, p in paths.items() if options.resume and p.exists()}
    missing = [m for m in methods if m not in maps]
    if missing:
        traced = trace_trials(model, trials, options)
        for m in missing:
            maps[m] = head_map(m, ATLAS_METHODS[m], model, traced)
            save_results(maps[m], paths[m])
    return {m: maps[m] for m in methods}


def atlas_conditions(
    model: HookedTransformer,
    maps: dict[str, DetectionResult],
    trials: Sequence[Trial],
    ks: Sequence[int],
    options: AtlasOptions,
) -> list[Condition]:
    """The masking and KV conditions of the effect step (a head set shared by several methods
    is one condition, its metadata `methods` naming them all). "none" is also the full cache."""
    cfg = model.cfg
    conditions = [Condition("none", None, "none", {"kind": "none", "method": "none", "k": 0})]
    seeds = range(options.random_seeds)
    for k in ks:
        by_heads: dict[frozenset, Condition] = {}
        for m, result in maps.items():
            heads = _ranking(result)[:k]
            shared = by_heads.get(frozenset(heads))
            if shared is not None:
                shared.metadata["methods"].append(m)
                continue
            mask = HeadMask(heads, options.masking)
            by_heads[frozenset(heads)] = Condition(f"top-{k}-{m}", mask, f"top-{k}-{m}", {"kind": "top", "k": k, "methods": [m]})
        conditions += by_heads.values()
        for seed in seeds:
            heads = random_heads(cfg.n_layers, cfg.n_heads, k, (), seed)
            meta = {"kind": "random", "method": "random", "k": k, "seed": seed}
            conditions.append(Condition(f"random-{k}-seed{seed}", HeadMask(heads, options.masking), f"random-{k}", meta))
    kv = {"decode_only": options.kv_decode_only, "cache": "real"}
    fraction, sink, window = options.full_fraction, options.sink, options.window
    n_kv = cfg.n_key_value_heads or cfg.n_heads
    by_policy: dict[frozenset, Condition] = {}
    for m, result in maps.items():
        policy = top_policy(m, model, kv_head_scores(result.scores().float(), n_kv), fraction, sink, window)
        if policy.full in by_policy:
            by_policy[policy.full].metadata["methods"].append(m)
            continue
        meta = {"kind": "kv", "methods": [m], "full_fraction": fraction}
        by_policy[policy.full] = kv_condition(model, trials, policy, f"kv-{m}", f"kv-{m}", meta, **kv)
    conditions += by_policy.values()
    for seed in seeds:
        policy = random_policy(model, fraction, seed, sink, window)
        meta = {"kind": "kv", "method": "random", "full_fraction": fraction, "seed": seed}
        conditions.append(kv_condition(model, trials, policy, f"kv-random-seed{seed}", "kv-random", meta, **kv))
    policy = streaming_policy(model, fraction, sink, window)
    meta = {"kind": "kv", "method": "streaming", "full_fraction": fraction}
    conditions.append(kv_condition(model, trials, policy, "kv-streaming", "kv-streaming", meta, **kv))
    return conditions


def _rows(result: InterventionResult, kv: bool) -> list[dict[str, Any]]:
    """One row per method (a shared head set's row repeated for each method that chose it),
    the masking rows or the KV rows, both led by "none" (for KV: "full", the whole cache)."""
    keep = ("k", "full_fraction", "kv_kept", "mean_recall", "recall_interval", "std_over_seeds", "n_seeds", "n_trials")
    keep += ("success_rate", "success_interval", "retained", "retained_interval")
    rows = []
    for row in result.summary():
        if row["kind"] == "none":
            row = row | ({"method": "full", "full_fraction": 1.0, "kv_kept": 1.0} if kv else {})
        elif (row["kind"] == "kv") != kv:
            continue
        for m in row.get("methods") or [row["method"]]:
            rows.append({"method": m, **{key: row[key] for key in keep if key in row}})
    return rows


def effects(evaluation: InterventionResult, ks: Sequence[int]) -> dict[str, list[dict[str, Any]]]:
    """The atlas's `masking`, `kv` and `tests` from its evaluation result (`<out>/evaluation.json`,
    every trial's record): how an atlas written before intervals and tests gets them."""
    return {"masking": _rows(evaluation, kv=False), "kv": _rows(evaluation, kv=True), "tests": _tests(evaluation, ks)}


def _tests(result: InterventionResult, ks: Sequence[int]) -> list[dict[str, Any]]:
    """Paired tests on the evaluation trials: at each K every method's masking against random-K
    and against the retrieval score's, and every KV policy against random KV heads,
    StreamingLLM and the retrieval score's policy. A head set several methods share is one
    group: its test names all of them."""
    groups = result.groups()
    methods = {g: c[0].metadata.get("methods") or [c[0].metadata.get("method")] for g, c in groups.items()}

    def chosen_by(method: str, prefix: str) -> str | None:
        return next((g for g in groups if g.startswith(prefix) and method in methods[g]), None)

    pairs = []
    for k in ks:
        tops = [g for g in groups if g.startswith(f"top-{k}-")]
        retrieval = chosen_by("retrieval", f"top-{k}-")
        pairs += [("masking", k, g, f"random-{k}") for g in tops if f"random-{k}" in groups]
        pairs += [("masking", k, g, retrieval) for g in tops if retrieval not in (None, g)]
    policies = [g for g in groups if g.startswith("kv-") and g not in ("kv-random", "kv-streaming")]
    retrieval = chosen_by("retrieval", "kv-")
    for g in policies:
        pairs += [("kv", None, g, other) for other in ("kv-random", "kv-streaming") if other in groups]
        pairs += [("kv", None, g, retrieval)] if retrieval not in (None, g) else []
    return [
        {"kind": kind, "k": k, "a_methods": methods[a], "b_methods": methods[b], **result.paired(a, b).to_json()}
        for kind, k, a, b in pairs
    ]


def map_agreement(maps: dict[str, DetectionResult], top_k: int, resamples: int) -> list[dict[str, Any]]:
    rows = []
    for a, b in itertools.combinations(maps, 2):
        # paired resamples where both maps count the same trials (a method may leave some out)
        paired = [t.key for t in maps[a].successful] == [t.key for t in maps[b].successful]
        counted = maps[a].successful and maps[b].successful  # a map may count no trial (nothing to resample)
        c = compare(maps[a], maps[b], top_k=top_k, resamples=resamples if counted else 0, paired=paired)
        iv = c.intervals or {}
        rows.append(
            {
                "a": a,
                "b": b,
                "spearman": c.spearman,
                "spearman_interval": iv.get("spearman"),
                "top_k": c.top_k,
                "top_k_overlap": c.top_k_overlap,
                "top_k_interval": iv.get("top_k_overlap"),
                "paired": paired,
            }
        )
    return rows


def build_atlas(
    model: HookedTransformer,
    detection_trials: Sequence[Trial],
    evaluation_trials: Sequence[Trial],
    out_dir: str | Path,
    *,
    options: AtlasOptions = AtlasOptions(),
    run: RunOptions = RunOptions(),
    settings: dict[str, Any] | None = None,
) -> Atlas:
    """The atlas of `model`: maps on `detection_trials`, effects on `evaluation_trials` (see
    the module docstring), written to `<out_dir>/atlas.json`. `run`: how trials run (resume,
    progress, decoding); `settings`: recorded with the result (e.g. the two grids)."""
    if not detection_trials or not evaluation_trials:
        raise InputError("an atlas needs detection trials and evaluation trials")
    out = Path(out_dir)
    cfg = model.cfg
    ks = options.ks(cfg.n_layers, cfg.n_heads)
    as_json = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(options).items()}
    settings = {**(settings or {}), "options": as_json, "ks": ks}
    with run_directory(out, run.resume, run.overwrite):
        maps = method_maps(model, detection_trials, options.methods, out, run)
        agreement = map_agreement(maps, options.top_k or max(ks), options.resamples)
        conditions = atlas_conditions(model, maps, evaluation_trials, ks, options)
        result = run_conditions(model, evaluation_trials, conditions, experiment="evaluation", out_dir=out, options=run)
        atlas = Atlas(
            model=cfg.model_name,
            n_layers=cfg.n_layers,
            n_heads=cfg.n_heads,
            methods=list(options.methods),
            ks=ks,
            maps={m: r.scores().tolist() for m, r in maps.items()},
            agreement=agreement,
            settings=settings,
            **effects(result, ks),
        )
        write_json(out / "atlas.json", atlas.to_json())
    return atlas
