"""Greedy decoding through the TransformerLens key-value cache, recording where each head looks.

Memory stays linear in the context. The prompt is prefilled in chunks; layers that no
hook reads run through fused SDPA attention (no score matrix at all), the others through
explicit attention, whose scores are [heads, chunk, context]. The cache keeps keys
already rotated (see `rh_lens.model.tl_internals`), so a decode step does not rotate every cached
key again. While decoding, the layers whose pattern is recorded are explicit, and only the
newest query's attention row is read, reduced to its argmax on the spot, on the model's
device. Any hooks a caller has put on the model (ablations, patches) stay in force
throughout.

A grid decodes many prompts (`decode_prompts`), and three kinds of work are shared between
them without changing any prompt's result:
- prefixes: prompts of one haystack share their first tokens, so each is prefilled from the
  cache of the one before, cut back to what they share (`PrefixCache`, in `prefix_order`);
- decode steps: `batch_size` prompts are decoded together, left-padded to the longest; a
  padded row's attention mask hides its padding, its positions count from its first real
  token (TransformerLens's own handling of padding), its recorded argmaxes are prompt
  positions, and `key_positions` tells position-dependent hooks where each row starts;
  each prompt is still prefilled alone: only decode steps are batched;
- conditions: several interventions that read the prompt unchanged and act only once
  decoding starts (a decode-time head mask, a KV policy applied after prefill, none) decode
  each prompt from one prefill, and those without a KV policy in one batch, each row under
  its own condition's hooks (`decode_conditions`, `RowGroups`).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from contextvars import ContextVar
from dataclasses import dataclass
from functools import partial
from typing import Protocol

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer, TransformerLensKeyValueCache

from rh_lens.errors import InputError
from rh_lens.model.headwise import KVPolicy
from rh_lens.model.tl_internals import (
    Hook,
    compress_kv_cache,
    copy_row,
    fused_attention,
    headwise_kv_cache,
    keep_rows,
    new_kv_cache,
    padded_kv_cache,
    stack_kv_caches,
    truncate_kv_cache,
)

MAX_NEW_TOKENS = 50
# Prefill chunks. Layers with explicit attention hold [heads, chunk, context] scores: at most
# PREFILL_CHUNK rows, fewer once they would pass SCORES_BUDGET. Fused layers hold no scores; a
# chunk is then bounded by its activations through one layer (ACTIVATION_BUDGET) and, in a
# model with sliding windows, by its [chunk, chunk + window] mask (MASK_BUDGET). Later chunks
# of full-attention layers need no mask (see tl_internals._sdpa).
PREFILL_CHUNK = 512
SCORES_BUDGET = 256 << 20
ACTIVATION_BUDGET = 256 << 20
MASK_BUDGET = 256 << 20
MIN_CHUNK = 64


def _bytes(model: HookedTransformer) -> int:
    return model.cfg.dtype.itemsize


def explicit_chunk(model: HookedTransformer, context: int) -> int:
    """Prefill chunk for layers with explicit attention: PREFILL_CHUNK query rows, fewer
    when [heads, chunk, context] scores would pass SCORES_BUDGET."""
    row_bytes = model.cfg.n_heads * max(context, 1) * _bytes(model)
    return max(16, min(PREFILL_CHUNK, SCORES_BUDGET // row_bytes))


def fused_chunk(model: HookedTransformer) -> int:
    """Rows of a fused prefill chunk: the activations of one layer (residual stream, q, k, v
    and their rotations, MLP hidden states) within ACTIVATION_BUDGET; with sliding windows,
    the [chunk, chunk + window] mask (and SDPA's float copy of it) within MASK_BUDGET."""
    cfg, size = model.cfg, _bytes(model)
    per_token = size * (6 * cfg.d_model + 5 * cfg.n_heads * cfg.d_head + 4 * (cfg.d_mlp or cfg.d_model))
    rows = ACTIVATION_BUDGET // per_token
    if cfg.use_local_attn:
        window, cells = cfg.window_size or 0, MASK_BUDGET // (1 + size)
        rows = min(rows, int((-window + (window * window + 4 * cells) ** 0.5) / 2))  # rows x (rows + window) <= cells
    return max(MIN_CHUNK, rows)


def chunks(
    model: HookedTransformer, context: int, all_fused: bool, chunk_size: int | None = None, start: int = 0
) -> list[tuple[int, int]]:
    """[start, end) of each prefill chunk of a `context`-token prompt whose first `start`
    tokens are in the cache already."""
    size = chunk_size or (fused_chunk(model) if all_fused else explicit_chunk(model, context))
    return [(begin, min(context, begin + size)) for begin in range(start, context, size)]


@dataclass
class Generation:
    """Tokens emitted by greedy decoding, and per step the key each head attended to most
    (a prompt position). `seconds`: the prompt's own prefill plus its share of the decode
    steps it took part in (rows decoded together share each step's time)."""

    tokens: list[int]
    argmax_keys: Int[Tensor, "step layer head"] | None
    seconds: float | None = None
    observed: dict[str, Tensor] | None = None  # what the `StepObserver`s kept, per step


class StepObserver(Protocol):
    """Something more to read at each decode step than where each head looks (e.g. how much
    attention its top keys get, what its output writes toward the emitted token). Its `hooks`
    run at decode steps after the caller's; `begin` starts each batch of `n_rows` prompts;
    `after_step` gets the tokens the live rows just emitted (`rows`: which of the batch's
    prompts each live row is; `padding`: each live row's left padding, so key positions
    minus it are prompt positions); `finish` hands over what it kept for one prompt."""

    hooks: Sequence[Hook]

    def begin(self, n_rows: int) -> None: ...

    def after_step(self, emitted: Int[Tensor, " row"], rows: list[int], padding: Int[Tensor, " row"]) -> None: ...

    def finish(self, row: int) -> dict[str, Tensor]: ...


@dataclass(frozen=True, kw_only=True)
class Decoding:
    """How prompts are decoded. `max_new_tokens`: budget per prompt; `chunk_size`: prefill
    chunk (None: sized by `chunks`); `batch_size`: prompts decoded together (None:
    `default_batch_size`); `share_prefix`: prefill each prompt from the key-value cache of
    the previous one, cut back to the tokens they share (see `PrefixCache`). `kv_policy`:
    decode through a head-wise cache that keeps only what the policy keeps (None: every
    key); its streaming heads windowed from the first prompt token on, or with
    `kv_decode_only` the prompt prefilled whole (through the prefix cache) and compressed
    before the first decode step. A windowed prefill shares no prefix: what a prompt's
    ring forgets, the next prompt cannot take back. `one_line`: an answer ends with its
    first line (the reference's rule for NIAH answers); False: only at EOS or the end of
    the turn (a worked chain of thought runs over several lines). `merge_conditions`: where
    several conditions decode from one prefill (`decode_conditions`), decode all of them in
    one batch, each condition's hooks acting on its own rows (False: one condition after
    another, each a batch of its own)."""

    max_new_tokens: int = MAX_NEW_TOKENS
    chunk_size: int | None = None
    batch_size: int | None = None
    share_prefix: bool = True
    kv_policy: KVPolicy | None = None
    kv_decode_only: bool = False
    one_line: bool = True
    merge_conditions: bool = True

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise InputError(f"max new tokens {self.max_new_tokens}: must be at least 1")
        if self.chunk_size is not None and self.chunk_size < 1:
            raise InputError(f"chunk size {self.chunk_size}: must be at least 1 token")
        if self.batch_size is not None and self.batch_size < 1:
            raise InputError(f"batch size {self.batch_size}: must be at least 1")


SEQUENTIAL = Decoding(batch_size=1, share_prefix=False)  # one prompt at a time, each from an empty cache
# Rows decoded together by default: on a GPU a decode step of one row leaves the chip idle;
# on a CPU a step is bound by reading the weights, which a batch reads once. Bounded by
# BATCH_BUDGET for the rows' key-value caches.
DEFAULT_BATCH = {"cpu": 8, "cuda": 16}
BATCH_BUDGET = {"cpu": 4 << 30, "cuda": 16 << 30}


def default_batch_size(model: HookedTransformer, longest_prompt: int, max_new_tokens: int = MAX_NEW_TOKENS) -> int:
    """Rows to decode together: DEFAULT_BATCH for the device, fewer when their key-value
    caches (at the longest prompt plus the decoding budget) would pass BATCH_BUDGET."""
    kind = torch.device(model.cfg.device).type
    return max(1, min(DEFAULT_BATCH.get(kind, 8), rows_in_budget(model, longest_prompt + max_new_tokens)))


def rows_in_budget(model: HookedTransformer, positions: int) -> int:
    """How many rows of `positions` cached keys and values fit in BATCH_BUDGET."""
    cfg = model.cfg
    per_row = 2 * cfg.n_layers * (cfg.n_key_value_heads or cfg.n_heads) * cfg.d_head * _bytes(model) * positions
    return max(1, BATCH_BUDGET.get(torch.device(cfg.device).type, 4 << 30) // max(per_row, 1))


@torch.no_grad()  # outside inference mode a caller would otherwise keep every chunk's autograd graph
def prefill(
    model: HookedTransformer, tokens: Int[Tensor, " pos"], chunk_size: int | None = None, fused: bool = True
) -> TransformerLensKeyValueCache:
    """Run `tokens` through the model in chunks, filling and returning a key-value cache.
    The prefill records nothing, so it runs with fused attention unless `fused=False`.
    chunk_size=None: chunks sized by `chunks` (bounded memory at any context length)."""
    if chunk_size is not None and chunk_size < 1:
        raise InputError(f"chunk size {chunk_size}: must be at least 1 token")
    cache = new_kv_cache(model, rotated=fused)  # continue it inside fused_attention (greedy_decode does)
    _extend(model, cache, tokens, 0, chunk_size, fused)
    return cache


def _extend(model: HookedTransformer, cache, tokens: Int[Tensor, " pos"], start: int, chunk_size: int | None, fused: bool = True):
    """Run tokens[start:] through the model into a cache holding the first `start` tokens."""
    with fused_attention(model) if fused else nullcontext(False) as all_fused:
        for begin, end in chunks(model, len(tokens), all_fused, chunk_size, start):
            # stop_at_layer=n_layers skips the unembedding: prefill needs no logits.
            forward(model, tokens[None, begin:end], cache, stop_at_layer=model.cfg.n_layers)


class PrefixCache:
    """One key-value cache carried from prompt to prompt. Prompts of one haystack share
    their first tokens (the chat template and the haystack up to the first inserted
    sentence), so each prompt is prefilled from the cache of the previous one cut back to
    the tokens the two share; only the rest is computed. The cache holds one prompt at a
    time: memory is that of one prompt's prefill, whatever the number of prompts. Its
    content depends on the hooks in force, so it lives as long as one run of prompts under
    the same hooks (one call of `decode_prompts`). `share=False`: every prompt from an
    empty cache."""

    def __init__(self, model: HookedTransformer, chunk_size: int | None = None, share: bool = True):
        self.model, self.chunk_size, self.share = model, chunk_size, share
        self.cache: TransformerLensKeyValueCache | None = None
        self.tokens: list[int] = []
        self.reused = self.computed = 0  # prompt tokens taken from the cache / run through the model

    def prefill(self, tokens: Int[Tensor, " pos"]) -> TransformerLensKeyValueCache:
        """The cache filled with `tokens` (valid until the next call)."""
        ids = tokens.tolist()
        shared = _common_prefix(self.tokens, ids) if self.share and self.cache is not None else 0
        if shared == 0:
            self.cache = new_kv_cache(self.model, rotated=True)
        else:
            truncate_kv_cache(self.cache, shared)
        _extend(self.model, self.cache, tokens, shared, self.chunk_size)
        self.tokens = ids
        self.reused, self.computed = self.reused + shared, self.computed + len(ids) - shared
        return self.cache


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


def prefix_order(prompts: Sequence[Sequence[int]]) -> list[int]:
    """Indices of `prompts` in lexicographic order of their token ids: the depth-first order
    of their prefix tree, in which each prompt shares with the one before it the longest
    prefix possible (so a `PrefixCache` computes each node of the tree once)."""
    return sorted(range(len(prompts)), key=lambda i: list(prompts[i]))


# Left padding of the rows of the decode step now running (None: no padding). Hooks whose rule
# depends on positions read it through `key_positions`.
_LEFT_PADDING: ContextVar[Tensor | None] = ContextVar("rh_lens_left_padding", default=None)


def key_positions(n_keys: int, device) -> Int[Tensor, "batch key"]:
    """The prompt position of each key of the forward pass now running: its index, less
    its row's left padding when several prompts are decoded together (padding keys get
    negative positions; they are masked out anyway). [1, key] when no row is padded."""
    keys = torch.arange(n_keys, device=device)[None]
    padding = _LEFT_PADDING.get()
    return keys if padding is None else keys - padding.to(device)[:, None]


def forward(model: HookedTransformer, tokens: Int[Tensor, "batch pos"], cache, **kwargs):
    """One forward pass through a key-value cache, every token attended to. The attention
    mask is given: left to TransformerLens, it is derived from the tokenizer's pad token,
    and a chunk that happens to end in that token (SmolLM2's pad token is its chat
    template's <|im_end|>) would have it masked out as padding."""
    return model(tokens, past_kv_cache=cache, attention_mask=torch.ones_like(tokens), **kwargs)


def _eos_ids(model: HookedTransformer) -> set[int]:
    tokenizer = model.tokenizer
    if tokenizer is None:  # a model without a tokenizer (a benchmark's random weights) never stops early
        return set()
    ids = {tokenizer.eos_token_id}
    # Chat models end a turn with their own token (<|im_end|>, <end_of_turn>, ...).
    for name in ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|endoftext|>"):
        token_id = tokenizer.convert_tokens_to_ids(name)
        if isinstance(token_id, int) and token_id != tokenizer.unk_token_id:
            ids.add(token_id)
    return ids - {None}


def newest_row_argmax(pattern: Float[Tensor, "batch head query key"]) -> Int[Tensor, "batch head"]:
    """The key each head attends to most from the newest query position (top-1, first on ties)."""
    return pattern[:, :, -1].argmax(dim=-1)


def _ends_answer(model: HookedTransformer, token: int, eos_ids: set[int], one_line: bool = True) -> bool:
    # NIAH answers are one line. The reference stops only at its newline token ('<0x0A>', or
    # id 144); we stop at any token whose text holds a newline, and at EOS/end of turn,
    # after which the reference would go on to 50 tokens (see rh_lens.detection.scoring).
    if token in eos_ids:
        return True
    return one_line and model.tokenizer is not None and "\n" in model.tokenizer.decode([token])


@torch.inference_mode()
def greedy_decode(
    model: HookedTransformer,
    prompt_ids: list[int] | Int[Tensor, " pos"],
    max_new_tokens: int = MAX_NEW_TOKENS,
    record_attention: bool = True,
    chunk_size: int | None = None,
    decode_hooks: Sequence[Hook] = (),
) -> Generation:
    """Greedy decoding of one prompt in the reference's order: prefill the prompt minus its
    last token, then feed one token per step, stopping at the end of the answer's line. At
    step t the model is fed token t-1 and emits w_t; if `record_attention`, the argmax over
    keys of every query head's attention row at that step is recorded alongside w_t.
    `decode_hooks` (TransformerLens (name, hook) pairs) are active during the decode steps
    only, e.g. a decode-time head ablation. Many prompts: `decode_prompts`."""
    decoding = Decoding(max_new_tokens=max_new_tokens, chunk_size=chunk_size, batch_size=1, share_prefix=False)
    ((_, generation),) = decode_prompts(model, [prompt_ids], decoding, record_attention, decode_hooks)
    return generation


@torch.inference_mode()
def decode_prompts(
    model: HookedTransformer,
    prompts: Sequence[list[int] | Int[Tensor, " pos"]],
    decoding: Decoding = Decoding(),
    record_attention: bool = True,
    decode_hooks: Sequence[Hook] = (),
    observers: Sequence[StepObserver] = (),
) -> Iterator[tuple[int, Generation]]:
    """Greedy decoding of many prompts (each as `greedy_decode` decodes one), yielding
    (index, generation) as each prompt's answer ends. Prompts are taken in the order given,
    `decoding.batch_size` at a time: each is prefilled alone (through a `PrefixCache` when
    `decoding.share_prefix`; pass them in `prefix_order` to share the most), then the batch
    is decoded together, left-padded to its longest prompt; a row whose answer has ended
    leaves the batch at once. Hooks on the model act on every row; `key_positions` gives
    them each key's position in its own prompt. `observers` read more at each decode step
    (see `StepObserver`); what they keep is each generation's `observed`."""
    prompts = [torch.as_tensor(p, dtype=torch.long, device=model.cfg.device) for p in prompts]
    if not prompts:
        return
    if any(len(p) < 1 for p in prompts):
        raise InputError("an empty prompt: nothing to decode from")
    batch_size = decoding.batch_size or default_batch_size(model, max(len(p) for p in prompts), decoding.max_new_tokens)
    share = decoding.share_prefix and (decoding.kv_policy is None or decoding.kv_decode_only)
    prefixes = PrefixCache(model, decoding.chunk_size, share)
    for start in range(0, len(prompts), batch_size):
        batch = range(start, min(len(prompts), start + batch_size))
        yield from _decode_batch(
            model, [prompts[i] for i in batch], list(batch), prefixes, decoding, record_attention, decode_hooks, observers
        )


@torch.inference_mode()
def decode_conditions(
    model: HookedTransformer,
    prompts: Sequence[list[int] | Int[Tensor, " pos"]],
    conditions: Sequence[tuple[Decoding, Sequence[Hook]]],
    wanted: Sequence[Sequence[int]] | None = None,
    record_attention: bool = False,
) -> Iterator[tuple[int, int, Generation]]:
    """Each prompt decoded under several conditions that read it unchanged, from one prefill:
    `conditions` are (decoding, decode hooks) pairs whose prompt is prefilled by the model as
    it is (no hooks at prefill, a KV policy only with `kv_decode_only`); they differ only in
    what they do once decoding starts. Prompts are taken `batch_size` at a time (the first
    condition's; None: `default_batch_size`) in the order given (pass them in `prefix_order`:
    each is prefilled from the one before, as `decode_prompts` does); each prompt of a batch
    is prefilled once and kept (`PrefilledPrompts`), then the conditions decode the prompts
    that `wanted[i]` (default: all) gives them. Conditions with the same decoding and no KV
    policy decode together, each row under its own condition's hooks (`RowGroups`), as many
    rows at a time as BATCH_BUDGET holds; the others (and all with `merge_conditions` off)
    one condition after another, as `decode_prompts` decodes a batch.
    Yields (prompt index, condition index, generation), in the order answers end; each
    generation is the one `decode_prompts` gives that prompt under that condition alone, and
    the first to come for a prompt carries its prefill's seconds. Memory: a batch's prompts'
    caches, kept, and the rows being decoded."""
    if not conditions:
        raise InputError("no conditions to decode under")
    chunk_sizes = {decoding.chunk_size for decoding, _ in conditions}
    if len(chunk_sizes) > 1:
        raise InputError(f"conditions sharing a prefill must share its chunk size, got {sorted(map(str, chunk_sizes))}")
    for decoding, _ in conditions:
        if decoding.kv_policy is not None and not decoding.kv_decode_only:
            raise InputError("a windowed KV policy prefills the prompt itself: it cannot share another condition's prefill")
    prompts = [torch.as_tensor(p, dtype=torch.long, device=model.cfg.device) for p in prompts]
    if any(len(p) < 1 for p in prompts):
        raise InputError("an empty prompt: nothing to decode from")
    if not prompts:
        return
    budget = max(decoding.max_new_tokens for decoding, _ in conditions)
    batch_size = conditions[0][0].batch_size or default_batch_size(model, max(len(p) for p in prompts), budget)
    prefixes = PrefixCache(model, chunk_sizes.pop())
    for start in range(0, len(prompts), batch_size):
        batch = range(start, min(len(prompts), start + batch_size))
        prefilled = PrefilledPrompts(model, prefixes, [prompts[i][:-1] for i in batch], budget)
        for group in _decoded_together(conditions):
            decoding = conditions[group[0]][0]
            rows = [(i, c) for i in batch for c in group if wanted is None or c in wanted[i]]
            at_once = max(len(batch), rows_in_budget(model, max(len(prompts[i]) for i in batch) + budget))
            for first in range(0, len(rows), at_once):
                part = rows[first : first + at_once]
                groups = RowGroups([c for _, c in part], {c: conditions[c][1] for c in group}, model.cfg.device)
                for (i, c), generation in _decode_batch(
                    model, [prompts[i] for i, _ in part], part, prefilled, decoding, record_attention, (), row_groups=groups
                ):
                    generation.seconds += prefilled.seconds.pop(i - start, 0.0)
                    yield i, c, generation


def _decoded_together(conditions: Sequence[tuple[Decoding, Sequence[Hook]]]) -> list[list[int]]:
    """The conditions (by index) that decode in one batch: those with the same decoding and
    no KV policy (a KV policy gives each condition caches of its own shape)."""
    groups: dict[object, list[int]] = {}
    for c, (decoding, _) in enumerate(conditions):
        alone = decoding.kv_policy is not None or not decoding.merge_conditions
        groups.setdefault(("alone", c) if alone else decoding, []).append(c)
    return list(groups.values())


class RowGroups:
    """Hooks that act on some rows of a batch only, so that rows decoded under different
    conditions share each decode step: row j belongs to condition `labels[j]`, and each
    condition's `hooks` see only its rows' activations (batch first, as at every
    TransformerLens hook point) and, through `key_positions`, only their padding. What a hook
    returns (or changes in place) is written back to its rows. `keep(index)` follows the
    batch when rows leave it."""

    def __init__(self, labels: Sequence[int], hooks: dict[int, Sequence[Hook]], device):
        self.labels = torch.tensor(labels, device=device)
        self.condition_hooks = hooks
        self._index_rows()

    def _index_rows(self) -> None:
        self.rows = {c: (self.labels == c).nonzero().flatten() for c in self.condition_hooks}

    def keep(self, index: Int[Tensor, " row"]) -> None:
        self.labels = self.labels[index]
        self._index_rows()

    @property
    def hooks(self) -> list[Hook]:
        return [(name, partial(self._on_rows, c, fn)) for c, hooks in self.condition_hooks.items() for name, fn in hooks]

    def _on_rows(self, condition: int, fn, activation: Tensor, hook) -> Tensor:
        rows = self.rows[condition]
        if len(rows) == 0:
            return activation
        if len(rows) == activation.size(0):  # every row is this condition's
            changed = fn(activation, hook)
            return activation if changed is None else changed
        padding = _LEFT_PADDING.get()
        token = _LEFT_PADDING.set(None if padding is None else padding[rows])
        try:
            part = activation[rows]  # a copy: written back below
            changed = fn(part, hook)
        finally:
            _LEFT_PADDING.reset(token)
        activation[rows] = part if changed is None else changed
        return activation


class PrefilledPrompts:
    """A batch of prompts prefilled once each (through `prefixes`, in the order given) and
    kept, each in its own one-row cache with room for `budget` decoded tokens. It stands in
    for the `PrefixCache` of `_decode_batch`: `prefill(tokens)` hands back the kept cache of
    that prompt, cut back to it (a one-row decode writes past the prompt, in place), so any
    number of conditions decode from it. `seconds[j]`: the j-th prompt's prefill time."""

    def __init__(self, model: HookedTransformer, prefixes: PrefixCache, prompts: Sequence[Tensor], budget: int):
        self.caches: dict[tuple[int, ...], TransformerLensKeyValueCache] = {}
        self.seconds: dict[int, float] = {}
        for j, tokens in enumerate(prompts):
            started = time.perf_counter()
            key = tuple(tokens.tolist())
            if key not in self.caches:
                kept = padded_kv_cache(model, [len(tokens)], len(tokens) + budget, rotated=True)
                copy_row(kept, 0, prefixes.prefill(tokens))
                self.caches[key] = kept
            self.seconds[j] = time.perf_counter() - started

    def prefill(self, tokens: Int[Tensor, " pos"]) -> TransformerLensKeyValueCache:
        cache = self.caches[tuple(tokens.tolist())]
        truncate_kv_cache(cache, len(tokens))
        return cache


def _headwise_rows(model, prompts, prefixes: PrefixCache | PrefilledPrompts, decoding: Decoding, prefill_seconds: list[float]):
    """Each prompt's head-wise cache (windowed prefill, or full prefill then compression),
    as one batch when there are several."""
    policy, capacity = decoding.kv_policy, max(len(p) for p in prompts) - 1 + decoding.max_new_tokens
    rows = []
    for prompt in prompts:
        started = time.perf_counter()
        if decoding.kv_decode_only:
            rows.append(compress_kv_cache(model, prefixes.prefill(prompt[:-1]), policy, capacity))
        else:
            rows.append(headwise_kv_cache(model, policy, capacity))
            _extend(model, rows[-1], prompt[:-1], 0, decoding.chunk_size)
        prefill_seconds.append(time.perf_counter() - started)
    return rows[0] if len(rows) == 1 else stack_kv_caches(model, rows, capacity)


def _decode_batch(
    model,
    prompts,
    indices,
    prefixes: PrefixCache | PrefilledPrompts,
    decoding: Decoding,
    record_attention,
    decode_hooks,
    observers=(),
    row_groups: RowGroups | None = None,
):
    """Prefill each prompt, then decode them all together (see `decode_prompts`); with
    `row_groups`, each row under its own condition's hooks (see `decode_conditions`)."""
    prefill_seconds = []
    if decoding.kv_policy is not None:
        cache = _headwise_rows(model, prompts, prefixes, decoding, prefill_seconds)
    elif len(prompts) == 1:  # decoded in the prefix cache itself: decoding writes only past the prompt
        started = time.perf_counter()
        cache = prefixes.prefill(prompts[0][:-1])
        prefill_seconds.append(time.perf_counter() - started)
    else:
        lengths = [len(p) - 1 for p in prompts]
        cache = padded_kv_cache(model, lengths, max(lengths) + decoding.max_new_tokens, rotated=True)
        for row, prompt in enumerate(prompts):
            started = time.perf_counter()
            copy_row(cache, row, prefixes.prefill(prompt[:-1]))
            prefill_seconds.append(time.perf_counter() - started)
    padding = cache.previous_attention_mask.size(1) - torch.tensor([len(p) - 1 for p in prompts], device=model.cfg.device)
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    # Where each head looks stays on the model's device: one transfer per prompt, not per layer.
    step_argmax = torch.empty(n_layers, len(prompts), n_heads, dtype=torch.long, device=model.cfg.device)

    def record(pattern: Tensor, hook) -> None:  # pattern: [batch, head, query, key]
        step_argmax[hook.layer(), : pattern.size(0)] = newest_row_argmax(pattern)

    hooks = list(decode_hooks) + (row_groups.hooks if row_groups is not None else [])
    if record_attention:  # after the caller's hooks, so it sees the pattern they leave
        hooks.append((lambda name: name.endswith("attn.hook_pattern"), record))
    for observer in observers:
        observer.begin(len(prompts))
        hooks.extend(observer.hooks)
    eos_ids = _eos_ids(model)
    rows = list(range(len(prompts)))  # the prompts still decoding, by their place in `prompts`
    tokens: list[list[int]] = [[] for _ in prompts]
    argmaxes: list[list[Tensor]] = [[] for _ in prompts]
    decode_seconds = [0.0] * len(prompts)
    fed = torch.stack([p[-1:] for p in prompts])  # [batch, 1]
    with model.hooks(fwd_hooks=hooks), fused_attention(model):
        for _ in range(decoding.max_new_tokens):
            started = time.perf_counter()
            padded = _LEFT_PADDING.set(padding if bool(padding.any()) else None)
            try:
                logits = forward(model, fed, cache)
            finally:
                _LEFT_PADDING.reset(padded)
            emitted_ids = logits[:, -1].argmax(dim=-1)
            for observer in observers:
                observer.after_step(emitted_ids, rows, padding)
            emitted = emitted_ids.tolist()  # the one host synchronisation of a step
            if record_attention:
                positions = step_argmax[:, : len(rows)] - padding[None, :, None]  # prompt positions
            ended = []
            for j, (row, token) in enumerate(zip(rows, emitted)):
                tokens[row].append(token)
                if record_attention:
                    argmaxes[row].append(positions[:, j])
                if _ends_answer(model, token, eos_ids, decoding.one_line) or len(tokens[row]) == decoding.max_new_tokens:
                    ended.append(j)
            step = (time.perf_counter() - started) / len(rows)
            for row in rows:
                decode_seconds[row] += step
            for j in ended:
                row = rows[j]
                argmax_keys = torch.stack(argmaxes[row]).cpu() if record_attention else None
                observed = {key: value for o in observers for key, value in o.finish(row).items()} if observers else None
                seconds = prefill_seconds[row] + decode_seconds[row]
                yield indices[row], Generation(tokens[row], argmax_keys, seconds, observed)
            if len(ended) == len(rows):
                return
            if ended:  # the rows whose answer ended leave the batch, and padding no row needs goes
                keep = [j for j in range(len(rows)) if j not in set(ended)]
                rows = [rows[j] for j in keep]
                keep_index = torch.tensor(keep, device=model.cfg.device)
                padding = padding[keep_index]
                drop = int(padding.min())
                keep_rows(cache, keep_index, drop)
                padding = padding - drop
                if row_groups is not None:
                    row_groups.keep(keep_index)
                emitted = [emitted[j] for j in keep]
            fed = torch.tensor(emitted, device=model.cfg.device)[:, None]
