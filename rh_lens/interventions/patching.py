"""Activation patching on NIAH prompts: which heads carry the needle's answer.

A clean prompt holds the needle's answer; a corrupted prompt is the same prompt with another
answer of the same token length at the same positions. Copying one activation from one run
into the other and reading the answer's logit difference says how much of the retrieved
fact flows through that activation:
- denoising: clean activation into the corrupted run; effect = fraction of the clean
  behaviour it restores;
- noising: corrupted activation into the clean run; effect = fraction of the clean
  behaviour it destroys.
Both are 1 when the component alone carries the fact and 0 when it carries none of it.

Activations are named and set as in TransformerLens's `patching` module (its patch setters
do the copying); what this module adds is speed: the source activations are cached once,
patched runs are batched (one patch per batch element), each starts at the patched layer
from the cached residual stream, and only the final position is unembedded.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from jaxtyping import Float, Int
from scipy import stats
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer, patching
from transformer_lens.utilities import get_act_name

from rh_lens.detection.records import DetectionResult
from rh_lens.detection.trace import TracedTrial
from rh_lens.errors import InputError, PairError, TrialError
from rh_lens.heads import Head, all_heads, check_heads, heads_of
from rh_lens.model.generation import MAX_NEW_TOKENS, chunks, forward, greedy_decode
from rh_lens.model.tl_internals import fast_paths_enabled, frozen_prefix_cache, fused_attention, new_kv_cache, unembed_final
from rh_lens.tasks.data import Corpus, Question, load_haystack
from rh_lens.tasks.documents import build_document_trial
from rh_lens.tasks.needles import Needle
from rh_lens.tasks.niah import Trial, build_trial, corrupt_needle, tokenize_haystack

MAX_BATCH_TOKENS = 16384  # positions recomputed per batch of patched runs: bounds their activations at long contexts
KINDS = (
    "head_out",
    "pattern",
    "resid",
    "mlp_out",
)  # hook_z, hook_pattern per head; hook_resid_pre per position; hook_mlp_out per layer
DEFAULT_KINDS = ("head_out", "pattern", "resid")
DIRECTIONS = ("denoise", "noise")
POSITIONS = ("final", "all")

# Same-length alternatives for the built-in needles; the first that tokenises to the same
# number of tokens as the clean answer is used.
CORRUPTED_ANSWERS = {
    "the Amber Kestrel": [
        "the Crimson Kestrel",
        "the Velvet Kestrel",
        "the Silver Kestrel",
        "the Scarlet Osprey",
        "the Umber Kestrel",
    ],
    "purple otter seventeen": ["yellow badger twelve", "green walrus fourteen", "orange falcon eleven"],
    "in a green tin box under the kitchen stairs": [
        "in a blue tin box under the garden shed",
        "in a brown tin box under the attic stairs",
        "in a red tin box under the cellar stairs",
    ],
}


# --- paired prompts ------------------------------------------------------------------


@dataclass
class PatchingPair:
    """Clean and corrupted token ids of equal length that differ only inside the answer span.

    Both end with `lead_in`: the clean model's own response up to the answer, so the final
    position is where the model is about to emit the first answer token that differs.
    """

    clean: Trial
    corrupted: Trial
    lead_in: list[int] = field(default_factory=list)

    @property
    def clean_ids(self) -> Int[Tensor, " pos"]:
        return torch.tensor(self.clean.prompt_ids + self.lead_in)

    @property
    def corrupted_ids(self) -> Int[Tensor, " pos"]:
        return torch.tensor(self.corrupted.prompt_ids + self.lead_in)

    @property
    def first_difference(self) -> int:
        """Position of the first prompt token where the two answers differ."""
        return next(i for i, (a, b) in enumerate(zip(self.clean.prompt_ids, self.corrupted.prompt_ids)) if a != b)

    @property
    def clean_token(self) -> int:
        """The clean answer's first token that differs: the token the metric favours."""
        return self.clean.prompt_ids[self.first_difference]

    @property
    def corrupted_token(self) -> int:
        return self.corrupted.prompt_ids[self.first_difference]


def check_pair(clean: Trial, corrupted: Trial) -> None:
    """Refuse pairs that differ anywhere but in the answer span, or differ in length."""
    a, b = clean.prompt_ids, corrupted.prompt_ids
    n_clean = clean.answer_span[1] - clean.answer_span[0]
    n_corrupted = corrupted.answer_span[1] - corrupted.answer_span[0]
    if len(a) != len(b) or clean.answer_span != corrupted.answer_span:
        # (the haystack is cut to fit the needle, so prompts can match in length while the answers do not)
        raise PairError(
            f"clean and corrupted answers differ in token length: {clean.needle.real_needle!r} is {n_clean} "
            f"tokens here and {corrupted.needle.real_needle!r} is {n_corrupted} (prompts of {len(a)} and "
            f"{len(b)} tokens); choose a corrupted answer with the same number of tokens for this tokenizer"
        )
    start, end = clean.answer_span
    outside = [i for i in range(len(a)) if a[i] != b[i] and not start <= i < end]
    if outside:
        raise PairError(f"prompts differ outside the answer span, at positions {outside[:5]}")
    if a[start:end] == b[start:end]:
        raise PairError(f"the corrupted answer {corrupted.needle.real_needle!r} tokenises like the clean one")


def patching_pair(
    model: HookedTransformer,
    needle: Needle,
    haystack_ids: Sequence[int],
    context_length: int,
    depth: int,
    corrupted_answer: str | None = None,
    chat: bool | None = None,
    haystack: str = "haystack",
    lead_in: bool = True,
    max_new_tokens: int = MAX_NEW_TOKENS,
) -> PatchingPair:
    """Build the clean trial and its corrupted twin with the NIAH trial machinery.

    `corrupted_answer=None` tries the built-in alternatives for the built-in needles.
    With `lead_in`, the clean prompt is decoded greedily and the response up to the first
    differing answer token is appended to both prompts (if that token never comes, nothing is).
    """
    tokenizer = model.tokenizer
    candidates = [corrupted_answer] if corrupted_answer is not None else CORRUPTED_ANSWERS.get(needle.real_needle)
    if not candidates:
        raise PairError(f"no built-in corrupted answer for {needle.real_needle!r}: give one of the same token length")

    def trial(n: Needle) -> Trial:
        return build_trial(tokenizer, haystack_ids, n, context_length, depth, chat, model.cfg.n_ctx, haystack)

    return _pair(
        model, trial(needle), [lambda a=a: trial(corrupt_needle(needle, a)) for a in candidates], lead_in, max_new_tokens
    )


def document_patching_pair(
    model: HookedTransformer,
    corpus: Corpus,
    question: Question,
    context_length: int,
    depth: int,
    corrupted_answer: str,
    chat: bool | None = None,
    seed: int = 0,
    lead_in: bool = True,
    max_new_tokens: int = MAX_NEW_TOKENS,
) -> PatchingPair:
    """A real-document question's clean trial and its twin whose gold paragraph says
    `corrupted_answer` instead (same distractors, same depth): `patching_pair` for SQuAD and
    HotpotQA. The corrupted answer must have the clean one's token length."""

    def trial(answer: str | None) -> Trial:
        return build_document_trial(
            model.tokenizer, corpus, question, context_length, depth, chat, model.cfg.n_ctx, seed, replace_answer=answer
        )

    return _pair(model, trial(None), [lambda: trial(corrupted_answer)], lead_in, max_new_tokens)


def _pair(
    model: HookedTransformer, clean: Trial, corrupted: Sequence[Callable[[], Trial]], lead_in: bool, max_new_tokens: int
) -> PatchingPair:
    """The first corrupted trial that makes a valid pair with `clean`, and the lead-in."""
    errors = []
    for build in corrupted:
        try:
            pair = PatchingPair(clean, build())
            check_pair(pair.clean, pair.corrupted)
            break
        except (PairError, TrialError) as error:
            errors.append(str(error))
    else:
        raise PairError("; ".join(errors))
    if lead_in:
        response = greedy_decode(model, clean.prompt_ids, max_new_tokens, record_attention=False).tokens
        if pair.clean_token in response:
            pair.lead_in = response[: response.index(pair.clean_token)]
    return pair


# --- metric --------------------------------------------------------------------------

# A patching metric, as in TransformerLens's patching functions: a function of the logits,
# here those of the answer position, one value per batch element (one patched run each).
PatchingMetric = Callable[[Float[Tensor, "batch vocab"]], Float[Tensor, " batch"]]


def logit_diff_metric(pair: PatchingPair) -> PatchingMetric:
    """The clean answer token's logit minus the corrupted answer token's (the default)."""
    clean, corrupted = pair.clean_token, pair.corrupted_token

    def logit_diff(logits: Float[Tensor, "batch vocab"]) -> Float[Tensor, " batch"]:
        return logits[:, clean] - logits[:, corrupted]

    return logit_diff


def clean_logprob_metric(pair: PatchingPair) -> PatchingMetric:
    """Log-probability of the clean answer token."""
    clean = pair.clean_token

    def clean_logprob(logits: Float[Tensor, "batch vocab"]) -> Float[Tensor, " batch"]:
        return logits.float().log_softmax(dim=-1)[:, clean]

    return clean_logprob


def clean_prob_metric(pair: PatchingPair) -> PatchingMetric:
    """Probability of the clean answer token."""
    clean = pair.clean_token

    def clean_prob(logits: Float[Tensor, "batch vocab"]) -> Float[Tensor, " batch"]:
        return logits.float().softmax(dim=-1)[:, clean]

    return clean_prob


METRICS: dict[str, Callable[[PatchingPair], PatchingMetric]] = {
    "logit_diff": logit_diff_metric,
    "clean_logprob": clean_logprob_metric,
    "clean_prob": clean_prob_metric,
}


# --- cached runs and batched patching ----------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class PatchingOptions:
    """What `rh-lens patch` patches and how it measures it: `heads` (None: every head),
    `kinds` (of `KINDS`), `directions` (of `DIRECTIONS`), `positions` ("final" or "all"),
    `metric` (a name of `METRICS`), `tail` (prompt positions before the answer patched for
    "resid") and `batch_size` (patched runs per forward pass); as `activation_patching` takes them."""

    heads: tuple[Head, ...] | None = None
    kinds: tuple[str, ...] = DEFAULT_KINDS
    directions: tuple[str, ...] = DIRECTIONS
    positions: str = "final"
    metric: str = "logit_diff"
    tail: int = 24
    batch_size: int = 8

    def __post_init__(self):
        if self.metric not in METRICS:
            raise InputError(f"unknown metric {self.metric!r}; choose from {', '.join(METRICS)}")
        for name, value in (("heads", self.heads), ("kinds", self.kinds), ("directions", self.directions)):
            if value is not None:
                object.__setattr__(self, name, tuple(value))


@dataclass
class CachedRun:
    """One unpatched run: the activations a patch may copy from it or start from, and the
    logits at its final (answer) position. Every layer's hook_k and hook_v (all positions:
    a patched run attends to them), hook_resid_pre and hook_z from position `first` on (no
    patch starts earlier), hook_pattern and hook_mlp_out on request."""

    activations: dict[str, Tensor]
    final_logits: Float[Tensor, "1 vocab"]
    first: int = 0


PATTERN_BUDGET = 2 << 30  # bytes of full [head, query, key] patterns that "all"-position pattern patching may cache


@torch.inference_mode()
def cache_run(
    model: HookedTransformer,
    tokens: Int[Tensor, " pos"],
    patterns: str | None = None,
    first: int = 0,
    chunk_size: int | None = None,
    mlp: bool = False,
) -> CachedRun:
    """Run once, in chunks through a key-value cache as a long prompt must be, caching what
    patching needs. `patterns`: None, "final" (each pattern's final query row only: all a
    final-position patch reads) or "all" (whole patterns: short prompts only). `first`: the
    first position any patch touches; earlier residuals and head outputs are not kept."""
    n, n_heads = len(tokens), model.cfg.n_heads
    if patterns == "all" and model.cfg.n_layers * n_heads * n * n * 4 > PATTERN_BUDGET:
        raise InputError(
            f"patching patterns at all positions keeps every layer's [{n_heads} x {n} x {n}] pattern, more than "
            f"{PATTERN_BUDGET >> 30} GiB at {n} tokens; patch the final position (--positions final)"
        )
    parts: dict[str, list[Tensor]] = defaultdict(list)
    span = {"start": 0}  # the chunk being run

    def keep(act: Tensor, hook) -> None:
        start = span["start"]
        if hook.name.endswith("hook_pattern"):  # [batch, head, query, key]
            if patterns == "final" and start + act.size(2) == n:
                parts[hook.name] = [act[:, :, -1:].clone()]
            elif patterns == "all":
                if not parts[hook.name]:
                    parts[hook.name] = [act.new_zeros(act.size(0), n_heads, n, n)]
                parts[hook.name][0][:, :, start : start + act.size(2), : act.size(3)] = act
        elif hook.name.endswith(("hook_k", "hook_v")):
            parts[hook.name].append(act.clone())
        elif start + act.size(1) > first:  # hook_resid_pre, hook_z, hook_mlp_out: [batch, pos, ...]
            parts[hook.name].append(act[:, max(0, first - start) :].clone())

    names = (
        ("hook_resid_pre", "attn.hook_z", "attn.hook_k", "attn.hook_v")
        + (("attn.hook_pattern",) if patterns else ())
        + (("hook_mlp_out",) if mlp else ())
    )
    cache = new_kv_cache(model)  # TransformerLens's layout: the keys a frozen prefix cache is built from
    with model.hooks(fwd_hooks=[(lambda name: name.endswith(names), keep)]), fused_attention(model) as all_fused:
        for start, end in chunks(model, n, all_fused, chunk_size):
            span["start"] = start
            chunk = tokens[None, start:end].to(model.cfg.device)
            residual = forward(model, chunk, cache, stop_at_layer=model.cfg.n_layers)
    activations = {name: torch.cat(values, dim=1) if len(values) > 1 else values[0] for name, values in parts.items()}
    return CachedRun(activations, unembed_final(model, residual), first)


@dataclass(frozen=True)
class Patch:
    """Copy activation `name` (TransformerLens short name: "z", "pattern", "resid_pre") at
    `index` (layer first) from the source run, with a TransformerLens patch setter.
    `position` is the first position the patch touches (negative: from the end)."""

    name: str
    index: tuple
    setter: Callable
    position: int = 0

    @property
    def layer(self) -> int:
        return self.index[0]

    @property
    def hook_name(self) -> str:
        return get_act_name(self.name, self.layer)


def _window(name: str, run: CachedRun, start: int) -> Tensor:
    """A cached activation from position `start` on, matching a run that starts there."""
    act = run.activations[name]
    if name.endswith("hook_pattern"):  # [batch, head, query, key]; a final-row cache is one query already
        return act if act.size(2) == 1 else act[:, :, start:]
    return act[:, start - run.first :]


def first_position(groups: Sequence[Sequence[Patch]], n: int) -> int:
    """The first position any of the groups' patches touches (0 when fast paths are off:
    patched runs then start at the beginning)."""
    if not fast_paths_enabled():
        return 0
    return min((p.position % n for group in groups for p in group), default=n - 1)


def _shifted(patch: Patch, start: int) -> list:
    """The setter's index for a run that starts at position `start`."""
    if isinstance(patch.index[1], list):  # (layer, absolute positions): resid_pre, mlp_out at all positions
        return [patch.layer, [p - start for p in patch.index[1]]]
    return list(patch.index)  # head patches, and mlp_out at the final position, use position -1 or all positions


def _prefix_cache(model: HookedTransformer, base: CachedRun, start: int, batch: int):
    """The base run's keys and values before `start`, frozen: a patched run from `start` on
    attends to them exactly as the full run would."""
    if start == 0:
        return None
    layers = range(model.cfg.n_layers)
    keys = [base.activations[get_act_name("k", layer)][:, :start] for layer in layers]
    values = [base.activations[get_act_name("v", layer)][:, :start] for layer in layers]
    return frozen_prefix_cache(model, keys, values, batch)


@torch.inference_mode()
def run_patches(
    model: HookedTransformer,
    pair: PatchingPair,
    base: CachedRun,
    source: CachedRun,
    groups: Sequence[Sequence[Patch]],
    batch_size: int = 8,
    progress: bool = True,
    desc: str = "patching",
    metric: PatchingMetric | None = None,
) -> Float[Tensor, " group"]:
    """The metric (default: the pair's logit difference) of the base run with each group of
    patches applied together.

    Nothing before a patch's layer, nor before its first position, differs from the base
    run. So each patched run starts at that layer and position, from the base run's cached
    residual stream and keys/values: a patch at the answer position recomputes one token
    (with fast paths off, runs start at position 0 instead). Groups starting at the same
    layer are batched, one group per batch element."""
    metric = metric or logit_diff_metric(pair)
    if model.cfg.positional_embedding_type == "shortformer":
        raise InputError("shortformer models add positions at every layer; patching them is not supported")
    n = len(pair.clean_ids)
    layers = [min((p.layer for p in group), default=model.cfg.n_layers - 1) for group in groups]
    starts = [first_position([group], n) for group in groups]
    if min(starts, default=n) < max(base.first, source.first):
        raise InputError(f"patches start at position {min(starts)}, but the cached runs keep positions from {base.first} on")
    order = sorted(range(len(groups)), key=lambda g: (layers[g], starts[g]))
    batches, current = [], []
    for g in order:
        # One layer per batch; at most batch_size runs and MAX_BATCH_TOKENS recomputed positions.
        tokens = (len(current) + 1) * (n - min([starts[g]] + [starts[c] for c in current]))
        if current and (len(current) == batch_size or layers[current[0]] != layers[g] or tokens > MAX_BATCH_TOKENS):
            batches.append(current)
            current = []
        current.append(g)
    batches += [current] if current else []
    out = torch.empty(len(groups))
    with tqdm(total=len(groups), desc=desc, unit="run", disable=not progress) as bar:
        for batch in batches:
            layer = layers[batch[0]]
            start = min(starts[g] for g in batch)
            by_hook: dict[str, list[tuple[int, Callable, list]]] = defaultdict(list)
            for b, g in enumerate(batch):
                for patch in groups[g]:
                    by_hook[patch.hook_name].append((b, patch.setter, _shifted(patch, start)))
            hooks = [(name, _patch_hook(items, _window(name, source, start))) for name, items in by_hook.items()]
            # A copy per batch element: resid_pre patches write into it, never into the cache.
            residual = _window(get_act_name("resid_pre", layer), base, start).repeat(len(batch), 1, 1)
            cache = _prefix_cache(model, base, start, len(batch))
            with model.hooks(fwd_hooks=hooks), fused_attention(model):  # hooks first: patched patterns stay explicit
                residual = model(residual, start_at_layer=layer, stop_at_layer=model.cfg.n_layers, past_kv_cache=cache)
            out[batch] = metric(unembed_final(model, residual)).float().cpu()
            bar.update(len(batch))
    return out


def _patch_hook(items: list[tuple[int, Callable, list]], source: Tensor):
    def hook(act: Tensor, hook) -> Tensor:
        for b, setter, index in items:  # batch element b carries its own patch; the setter writes into the view
            setter(act[b : b + 1], index, source)
        return act

    return hook


# --- what to patch --------------------------------------------------------------------


# (kind, positions) -> TransformerLens activation, its patch setter, and the setter's index for (layer, head)
HEAD_PATCHES = {
    ("head_out", "final"): ("z", patching.layer_pos_head_vector_patch_setter, lambda layer, head: (layer, -1, head)),
    ("head_out", "all"): ("z", patching.layer_head_vector_patch_setter, lambda layer, head: (layer, head)),
    ("pattern", "final"): ("pattern", patching.layer_head_pos_pattern_patch_setter, lambda layer, head: (layer, head, -1)),
    ("pattern", "all"): ("pattern", patching.layer_head_pattern_patch_setter, lambda layer, head: (layer, head)),
}


def head_patches(heads: Sequence[Head], kind: str, positions: str = "final") -> list[list[Patch]]:
    """One single-patch group per head: its output (hook_z) or its attention pattern, at the
    final position (the answer position) or at every position."""
    if positions not in POSITIONS:
        raise InputError(f"positions must be one of {POSITIONS}, not {positions!r}")
    if (kind, positions) not in HEAD_PATCHES:
        raise InputError(f"unknown head patch kind {kind!r}")
    name, setter, index = HEAD_PATCHES[kind, positions]
    first = -1 if positions == "final" else 0
    return [[Patch(name, index(layer, head), setter, first)] for layer, head in heads_of(heads)]


def mlp_patches(n_layers: int, n_positions: int, positions: str = "final") -> list[list[Patch]]:
    """One group per layer: that layer's MLP output (hook_mlp_out), at the final position or
    at every position."""
    if positions not in POSITIONS:
        raise InputError(f"positions must be one of {POSITIONS}, not {positions!r}")
    where = -1 if positions == "final" else list(range(n_positions))
    return [
        [Patch("mlp_out", (layer, where), patching.layer_pos_patch_setter, -1 if positions == "final" else 0)]
        for layer in range(n_layers)
    ]


def resid_columns(pair: PatchingPair, tokenizer, tail: int = 24) -> list[dict[str, Any]]:
    """Positions of the residual-stream heatmap: each answer token from the first that
    differs, the context between needle and prompt end as one column, then each of the last
    `tail` tokens. Earlier positions are skipped: their residual is identical in both runs."""
    first, end = pair.first_difference, pair.clean.answer_span[1]
    clean, corrupted = pair.clean_ids.tolist(), pair.corrupted_ids.tolist()
    tail_start = max(end, len(clean) - tail)
    columns = [
        {"label": f"{tokenizer.decode([clean[p]])}/{tokenizer.decode([corrupted[p]])}".strip(), "positions": [p]}
        for p in range(first, end)
    ]
    if tail_start > end:
        columns.append({"label": f"[{tail_start - end} context tokens]", "positions": list(range(end, tail_start))})
    columns += [
        {"label": tokenizer.decode([clean[p]]).strip() or repr(tokenizer.decode([clean[p]])), "positions": [p]}
        for p in range(tail_start, len(clean))
    ]
    return columns


def resid_patches(n_layers: int, columns: Sequence[dict[str, Any]]) -> list[list[Patch]]:
    """One group per (layer, column): the residual stream entering the layer at those positions."""
    return [
        [Patch("resid_pre", (layer, list(column["positions"])), patching.layer_pos_patch_setter, min(column["positions"]))]
        for layer in range(n_layers)
        for column in columns
    ]


# --- the experiment --------------------------------------------------------------------


@dataclass
class PatchingResult:
    """Patching effects, 1 = the component alone carries the clean answer, 0 = none of it.

    `effects[kind][direction]` is a layer x head grid (None where a head was not patched)
    for "head_out" and "pattern", a layer x column grid for "resid", a layer x 1 grid for
    "mlp_out". Effects are the
    metric normalised between the corrupted run (0) and the clean run (1): the fraction of
    the difference a patch restores (denoising) or destroys (noising). `metric` names the
    metric; `clean_metric` and `corrupted_metric` are its unpatched values."""

    model: str
    n_layers: int
    n_heads: int
    clean_token: str
    corrupted_token: str
    metric: str
    clean_metric: float
    corrupted_metric: float
    heads: list[Head]
    effects: dict[str, dict[str, list[list[float | None]]]]
    resid_columns: list[dict[str, Any]] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)

    def effect(self, kind: str = "head_out", direction: str = "denoise") -> Float[Tensor, "layer column"]:
        if direction not in self.effects.get(kind, {}):
            raise InputError(f"no {kind} patching in the {direction} direction in this result")
        grid = self.effects[kind][direction]
        return torch.tensor([[np.nan if v is None else v for v in row] for row in grid], dtype=torch.float64)

    def ranking(self, kind: str = "head_out", direction: str = "denoise") -> list[tuple[int, int, float]]:
        """Patched heads by effect, largest first."""
        grid = self.effect(kind, direction)
        heads = [(layer, head, float(grid[layer, head])) for layer, head in self.heads]
        return sorted(heads, key=lambda h: (-h[2], h[0], h[1]))

    def to_json(self) -> dict[str, Any]:
        return {"format": "rh_lens.patching/2", **asdict(self), "heads": [str(h) for h in self.heads]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PatchingResult:
        data = {k: v for k, v in data.items() if k != "format"}
        if "clean_logit_diff" in data:  # rh_lens.patching/1: the logit difference was the only metric
            data["metric"] = "logit_diff"
            data["clean_metric"], data["corrupted_metric"] = data.pop("clean_logit_diff"), data.pop("corrupted_logit_diff")
        return cls(**{**data, "heads": heads_of(data["heads"])})


def activation_patching(
    model: HookedTransformer,
    pair: PatchingPair,
    heads: Sequence[Head] | None = None,
    kinds: Sequence[str] = DEFAULT_KINDS,
    directions: Sequence[str] = DIRECTIONS,
    positions: str = "final",
    tail: int = 24,
    batch_size: int = 8,
    metric: PatchingMetric | None = None,
    min_gap: float | None = None,
    progress: bool = True,
    settings: dict[str, Any] | None = None,
) -> PatchingResult:
    """Patch every head in `heads` (all heads if None) and, for "resid", every (layer,
    column) of the residual stream, in each direction. The clean and corrupted runs are
    cached once; every patched run is measured against them.

    `metric`: a function of the answer position's logits, one value per batch element (see
    `METRICS`); default the pair's logit difference, which makes the effects the normalised
    logit difference. The clean run must beat the corrupted one by more than `min_gap`
    (default 0.5 for the logit difference, 0 for any other metric)."""
    for name, values, allowed in (("kind", kinds, KINDS), ("direction", directions, DIRECTIONS)):
        unknown = set(values) - set(allowed)
        if unknown:
            raise InputError(f"unknown {name} {sorted(unknown)}; choose from {', '.join(allowed)}")
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    heads = heads_of(heads) if heads is not None else all_heads(n_layers, n_heads)
    check_heads(heads, n_layers, n_heads)
    if min_gap is None:
        min_gap = 0.5 if metric is None else 0.0
    metric = metric or logit_diff_metric(pair)
    metric_name = getattr(metric, "__name__", type(metric).__name__)
    columns = resid_columns(pair, model.tokenizer, tail) if "resid" in kinds else []
    if "mlp_out" in kinds and model.cfg.attn_only:
        raise InputError("this model is attention-only: it has no MLP outputs to patch")
    plan = {
        kind: resid_patches(n_layers, columns)
        if kind == "resid"
        else mlp_patches(n_layers, len(pair.clean_ids), positions)
        if kind == "mlp_out"
        else head_patches(heads, kind, positions)
        for kind in kinds
    }
    first = first_position([group for groups in plan.values() for group in groups], len(pair.clean_ids))
    patterns = positions if "pattern" in kinds else None
    mlp = "mlp_out" in kinds
    runs = {
        name: cache_run(model, ids, patterns, first, mlp=mlp)
        for name, ids in (("clean", pair.clean_ids), ("corrupted", pair.corrupted_ids))
    }
    clean_value, corrupted_value = (float(metric(runs[name].final_logits)[0]) for name in ("clean", "corrupted"))
    if not clean_value - corrupted_value > min_gap:
        raise PairError(
            f"the model barely tells the answers apart ({metric_name} {clean_value:.2f} clean vs "
            f"{corrupted_value:.2f} corrupted): nothing to patch; try another context length, depth or needle"
        )
    effects: dict[str, dict[str, list]] = {}
    for kind, groups in plan.items():
        for direction in directions:
            base, source = (runs["corrupted"], runs["clean"]) if direction == "denoise" else (runs["clean"], runs["corrupted"])
            measured = run_patches(model, pair, base, source, groups, batch_size, progress, f"{kind} {direction}", metric)
            recovered = (measured - corrupted_value) / (clean_value - corrupted_value)  # 1 = clean, 0 = corrupted
            effect = recovered if direction == "denoise" else 1 - recovered
            if kind == "resid":
                grid = effect.view(n_layers, len(columns)).tolist()
            elif kind == "mlp_out":
                grid = effect.view(n_layers, 1).tolist()
            else:
                grid = [[None] * n_heads for _ in range(n_layers)]
                for (layer, head), value in zip(heads, effect.tolist()):
                    grid[layer][head] = value
            effects.setdefault(kind, {})[direction] = grid
    tokenizer = model.tokenizer
    settings = {
        **(settings or {}),
        "context_length": pair.clean.context_length,
        "depth": pair.clean.depth,
        "needle": pair.clean.needle.needle,
        "answer": pair.clean.needle.real_needle,
        "corrupted_answer": pair.corrupted.needle.real_needle,
        "lead_in": tokenizer.decode(pair.lead_in),
        "prompt_tokens": len(pair.clean_ids),
        "positions": positions,
    }
    return PatchingResult(
        model.cfg.model_name,
        n_layers,
        n_heads,
        tokenizer.decode([pair.clean_token]),
        tokenizer.decode([pair.corrupted_token]),
        metric_name,
        clean_value,
        corrupted_value,
        heads,
        effects,
        columns,
        settings,
    )


def effect_vs_score(
    result: PatchingResult, detection: DetectionResult, kind: str = "head_out", direction: str = "denoise"
) -> dict[str, Any]:
    """Spearman correlation between each patched head's effect and its retrieval score, over
    all patched heads and over those that scored at all (most heads score 0 and sit at the
    noise floor of the effect, which can drown the rest)."""
    if (detection.n_layers, detection.n_heads) != (result.n_layers, result.n_heads):
        raise InputError(
            f"scores are for {detection.n_layers} x {detection.n_heads} heads, patching for {result.n_layers} x {result.n_heads}"
        )
    scores, grid = detection.scores(), result.effect(kind, direction)
    effect = [float(grid[l, h]) for l, h in result.heads]
    score = [float(scores[l, h]) for l, h in result.heads]

    def spearman(x: list[float], y: list[float]) -> tuple[float, float]:
        if len(set(x)) < 2 or len(set(y)) < 2:
            return float("nan"), float("nan")
        rho, p = stats.spearmanr(x, y)
        return float(rho), float(p)

    scored = [i for i, v in enumerate(score) if v > 0]
    rho, p = spearman(effect, score)
    rho_scored, p_scored = spearman([effect[i] for i in scored], [score[i] for i in scored])
    return {
        "kind": kind,
        "direction": direction,
        "spearman": rho,
        "p_value": p,
        "n_heads": len(effect),
        "spearman_scored": rho_scored,
        "p_value_scored": p_scored,
        "n_scored": len(scored),
        "heads": [str(h) for h in result.heads],
        "effect": effect,
        "score": score,
    }


# --- patching as a head-finding method (the atlas's `patching`) -----------------------------


def head_patching_scores(model: HookedTransformer, traced: Sequence[TracedTrial]) -> Float[Tensor, "trial layer head"]:
    """Each trial's head-output patching effect at the answer position (denoising, the
    normalised logit difference): a head-finding method over traced trials, as those of
    `rh_lens.detection.methods`. The corrupted twin of a trial is its needle with a built-in
    corrupted answer (`CORRUPTED_ANSWERS`) in the same haystack; a trial without one, whose
    rebuilt prompt is not the traced one, or whose answers the model barely tells apart gets
    NaN (not scored: left out of the map)."""
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    scores = torch.full((len(traced), n_layers, n_heads), float("nan"))
    for i, t in enumerate(traced):
        trial = t.trial
        try:
            haystack_ids = tokenize_haystack(model.tokenizer, load_haystack(trial.haystack), trial.context_length)
            pair = patching_pair(
                model, trial.needle, haystack_ids, trial.context_length, trial.depth, chat=trial.chat, haystack=trial.haystack
            )
            if pair.clean.prompt_ids != trial.prompt_ids:
                continue
            result = activation_patching(model, pair, kinds=("head_out",), directions=("denoise",), progress=False)
        except (PairError, InputError, TrialError):
            continue
        scores[i] = result.effect("head_out", "denoise")
    return scores
