"""A head-wise key-value cache: full KV heads keep every key, streaming KV heads only a few.

A `KVPolicy` says which key-value heads keep the whole cache ("full") and which keep only
the first `sink` tokens (attention sinks) and the most recent `window` ("streaming", as in
StreamingLLM and DuoAttention). Its rule, `KVPolicy.keeps`, is the one definition of what a
streaming head sees: the masking simulation (`rh_lens.interventions.compression`) applies it
as -inf scores over a full cache, and `HeadwiseLayer` stores only what it keeps:

- full KV heads: a buffer of every key, grown as keys arrive (as rh_lens's rotated-key cache);
- streaming KV heads: `sink` slots for the first tokens and a ring of the most recent ones,
  each slot with the prompt position of the key it holds (-1: empty), per row. Position p
  lives in slot p (p < sink) or sink + (p - sink) % ring, so a key is overwritten only by
  one `ring` positions later, which no query that could still see it reaches;
- a layer with its own sliding window (Gemma-3's local layers) keeps no key outside it:
  its full KV heads are a ring of that window, its streaming heads the policy's sink and
  window within it, so its bytes are those of the model's real cache.

Keys are stored already rotated (a key's rotation depends on its position only), so the
slots need no order: attention over them is exact, and a key's position is what a recorded
argmax reports. Under grouped-query attention, query head h reads KV head h // group, as
everywhere in rh_lens. This module is plain torch; `rh_lens.model.tl_internals` runs a
TransformerLens layer through it, and `rh_lens.kv` a `transformers` model.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor

from rh_lens.errors import InputError
from rh_lens.heads import KVHead

GROWTH = 256  # tokens a full KV head's buffer grows by beyond what it needs
QUERY_BLOCK = 512  # streaming heads' queries attended to at a time (their masks stay small)


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

    def __post_init__(self):
        if self.sink < 0 or self.window < 1:
            raise InputError(f"sink {self.sink} and window {self.window}: need sink >= 0 and window >= 1")
        if not 0 <= self.share <= 1:
            raise InputError(f"window share {self.share}: must be from 0 to 1")
        if self.n_kv_heads < 1 or self.n_heads % self.n_kv_heads:
            raise InputError(f"{self.n_heads} query heads cannot be grouped over {self.n_kv_heads} key-value heads")
        outside = [h for h in self.full if not (0 <= h[0] < self.n_layers and 0 <= h[1] < self.n_kv_heads)]
        if outside:
            raise InputError(f"full KV heads {sorted(outside)} lie outside {self.n_layers} layers x {self.n_kv_heads} KV heads")

    def check_shape(self, n_layers: int, n_heads: int, n_kv_heads: int) -> None:
        """Refuse a model of another shape (layers, query heads, KV heads)."""
        if (self.n_layers, self.n_heads, self.n_kv_heads) != (n_layers, n_heads, n_kv_heads):
            raise InputError(
                f"the KV policy is for {self.n_layers} layers x {self.n_heads} heads ({self.n_kv_heads} KV heads), "
                f"the model has {n_layers} x {n_heads} ({n_kv_heads} KV heads)"
            )

    @property
    def group(self) -> int:
        """Query heads per key-value head (query head h reads KV head h // group)."""
        return self.n_heads // self.n_kv_heads

    def full_kv_heads(self, layer: int) -> list[int]:
        return [kv for kv in range(self.n_kv_heads) if (layer, kv) in self.full]

    def streaming_heads(self, layer: int) -> list[int]:
        """The query heads of `layer` that read a streaming KV head."""
        return [h for h in range(self.n_heads) if (layer, h // self.group) not in self.full]

    def recent(self, query: Tensor) -> Tensor:
        """How many of the most recent keys a streaming head sees from `query` (positions)."""
        return self.window + (self.share * (query + 1 - self.sink - self.window).clamp(min=0)).floor().long()

    def keeps(self, key: Int[Tensor, ...], query: Int[Tensor, ...]) -> Bool[Tensor, ...]:
        """Whether a streaming head at position `query` sees the key at position `key`
        (broadcast): one of the first `sink`, or one of the `recent(query)` newest."""
        return (key < self.sink) | (key > query - self.recent(query))

    def kept(self, tokens: int) -> int:
        """Tokens a streaming KV head keeps of a context of `tokens` (what `keeps` lets a
        query at position tokens - 1 see)."""
        recent = self.window + int(self.share * max(0, tokens - self.sink - self.window))
        return min(tokens, self.sink + recent)

    def ring(self, tokens: int) -> int:
        """Recent slots a streaming KV head needs over a context of up to `tokens`."""
        return max(1, min(tokens, self.kept(tokens)) - min(self.sink, tokens))

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "full": sorted(list(h) for h in self.full)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> KVPolicy:
        return cls(**{**data, "full": frozenset(KVHead(*h) for h in data["full"])})


def ring_slots(policy: KVPolicy, tokens: int, native_window: int | None = None) -> tuple[tuple[int, int] | None, tuple[int, int]]:
    """(sink, ring) slots a layer's full KV heads (None: every key, no ring) and its
    streaming KV heads need for contexts of up to `tokens`. A layer with its own sliding
    window keeps no key outside it: its full heads are a ring of that window, and its
    streaming heads too when the policy's window is no smaller (the layer's window then
    hides everything else they would keep)."""
    streaming = (min(policy.sink, tokens), policy.ring(tokens))
    if native_window is None:
        return None, streaming
    native = (0, max(1, min(native_window, tokens)))
    if policy.window >= native_window:
        return native, native
    return native, (streaming[0], min(streaming[1], native[1]))


def kv_bytes(
    policy: KVPolicy, tokens: int, d_head: int, dtype_bytes: int, native_windows: Sequence[int | None] | None = None
) -> tuple[int, int]:
    """(bytes the policy keeps, bytes of the model's full cache) for a context of `tokens`:
    per KV head, tokens kept x 2 (keys and values) x d_head x bytes per value. A layer with
    its own sliding window (`native_windows`, per layer) holds at most that window in either
    cache. A prediction: `HeadwiseLayer.nbytes` measures what a cache holds."""
    windows = native_windows or [None] * policy.n_layers
    kept = whole = 0
    for layer, window in enumerate(windows):
        full_slots, streaming_slots = ring_slots(policy, tokens, window)
        n_full = len(policy.full_kv_heads(layer))
        every = tokens if window is None else min(tokens, window)
        kept += n_full * min(tokens, sum(full_slots or (tokens, 0))) + (policy.n_kv_heads - n_full) * min(
            tokens, sum(streaming_slots)
        )
        whole += policy.n_kv_heads * every
    per_token = 2 * d_head * dtype_bytes
    return kept * per_token, whole * per_token


def cache_bytes(
    policy: KVPolicy, tokens: int, d_head: int, dtype_bytes: int, native_windows: Sequence[int | None] | None = None
) -> int:
    """Bytes a head-wise cache of one row holds for a context of `tokens`: the keys and values
    `kv_bytes` counts, plus each ring slot's recorded position (8 bytes), every layer. Full
    heads' growth room (up to GROWTH tokens) and head indices (a few bytes) are not counted."""
    windows = native_windows or [None] * policy.n_layers
    slots = 0
    for layer, window in enumerate(windows):
        full_slots, streaming_slots = ring_slots(policy, tokens, window)
        has_full, has_streaming = bool(policy.full_kv_heads(layer)), len(policy.full_kv_heads(layer)) < policy.n_kv_heads
        if window is not None and streaming_slots == full_slots:  # one ring for every head (HeadwiseLayer)
            has_full, has_streaming = False, True
        slots += has_streaming * sum(streaming_slots) + (has_full * sum(full_slots) if full_slots else 0)
    return kv_bytes(policy, tokens, d_head, dtype_bytes, native_windows)[0] + 8 * slots


def storage_bytes(tensors: Sequence[Tensor]) -> int:
    """Bytes of the storages behind `tensors`, each storage counted once (what they hold in
    memory, views and growth room included)."""
    seen: dict[int, int] = {}
    for t in tensors:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


# --------------------------------------------------------------------------------------
# One layer's storage

KeepRule = Callable[[Tensor, Tensor], Tensor]  # (key positions, query positions) -> kept, broadcast


@dataclass
class Ring:
    """KV heads that keep `sink` first keys and a ring of `ring` recent ones, and what of
    them a query sees (`rule`, on top of causality). Head-major buffers."""

    kv_heads: list[int]
    sink: int
    ring: int
    rule: KeepRule
    keys: Float[Tensor, "batch kv slot d_head"]
    values: Float[Tensor, "batch kv slot d_head"]
    positions: Int[Tensor, "batch slot"]  # prompt position of each slot's key; -1: empty

    def slots_of(self, positions: Int[Tensor, "batch new"]) -> Int[Tensor, "batch new"]:
        return torch.where(positions < self.sink, positions, self.sink + (positions - self.sink) % self.ring)

    def write(self, keys: Tensor, values: Tensor, positions: Int[Tensor, "batch new"]) -> None:
        """Store new keys (head-major, these heads only) at their slots. Of a chunk longer
        than the ring only the sink and the last `ring` keys are written (each slot once)."""
        if positions.size(1) == 1:  # decoding: one key per row, written for all rows at once
            rows, slots = torch.arange(positions.size(0), device=positions.device), self.slots_of(positions[:, 0])
            self.keys[rows, :, slots], self.values[rows, :, slots] = keys[:, :, 0], values[:, :, 0]
            self.positions[rows, slots] = positions[:, 0]
            return
        newest = positions.max(dim=1, keepdim=True).values
        wanted = (positions < self.sink) | (positions > newest - self.ring)
        for row in range(positions.size(0)):
            columns = wanted[row].nonzero().squeeze(1)
            slots = self.slots_of(positions[row, columns])
            self.keys[row, :, slots] = keys[row, :, columns]
            self.values[row, :, slots] = values[row, :, columns]
            self.positions[row, slots] = positions[row, columns]

    def visible(self, key_positions: Int[Tensor, "batch key"], query_positions: Int[Tensor, "batch query"]) -> Tensor:
        """[batch, query, key]: filled, not after the query, and kept by the rule."""
        key, query = key_positions[:, None, :], query_positions[:, :, None]
        return (key >= 0) & (key <= query) & self.rule(key, query)

    def nbytes(self) -> int:
        return storage_bytes([self.keys, self.values, self.positions])


@dataclass
class Full:
    """KV heads that keep every key: a head-major buffer whose first `length` positions
    hold keys (rows of a batch are left-padded to one length, as in rh_lens's batches)."""

    kv_heads: list[int]
    keys: Float[Tensor, "batch kv capacity d_head"]
    values: Float[Tensor, "batch kv capacity d_head"]
    length: int = 0

    def append(self, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
        """Add new keys (head-major); return all keys and values so far, head-major views."""
        n_new = self.length + keys.size(2)
        if self.keys.size(2) < n_new:
            grown_k = keys.new_empty((*self.keys.shape[:2], n_new + GROWTH, self.keys.size(3)))
            grown_v = torch.empty_like(grown_k)
            grown_k[:, :, : self.length], grown_v[:, :, : self.length] = (
                self.keys[:, :, : self.length],
                self.values[:, :, : self.length],
            )
            self.keys, self.values = grown_k, grown_v
        self.keys[:, :, self.length : n_new], self.values[:, :, self.length : n_new] = keys, values
        self.length = n_new
        return self.keys[:, :, :n_new], self.values[:, :, :n_new]

    def nbytes(self) -> int:
        return storage_bytes([self.keys, self.values])


class HeadwiseLayer:
    """One attention layer's cache under `policy` (see the module docstring): at most one
    `Full` part (every key of the layer's full KV heads) and `Ring` parts for the rest.
    `native_window`: the layer's own sliding window (None: it attends to every key);
    `max_tokens`: the longest context it will hold (sizes a growing window's ring);
    `reserve`: positions the full part's buffers hold from the start."""

    def __init__(
        self,
        policy: KVPolicy,
        layer: int,
        *,
        batch: int,
        d_head: int,
        dtype: torch.dtype,
        device,
        max_tokens: int,
        native_window: int | None = None,
        reserve: int = 0,
    ):
        self.group, self._indices = policy.group, {}
        full, streaming = policy.full_kv_heads(layer), [kv for kv in range(policy.n_kv_heads) if (layer, kv) not in policy.full]

        def ring(kv_heads: list[int], sink: int, size: int, rule: KeepRule) -> Ring:
            shape = (batch, len(kv_heads), sink + size, d_head)
            positions = torch.full((batch, sink + size), -1, dtype=torch.long, device=device)
            keys = torch.zeros(shape, dtype=dtype, device=device)  # zeros: a masked slot times 0 must not be NaN
            return Ring(kv_heads, sink, size, rule, keys, torch.zeros_like(keys), positions)

        self.full: Full | None = None
        self.rings: list[Ring] = []
        full_slots, streaming_slots = ring_slots(policy, max_tokens, native_window)
        if native_window is None:
            if full:
                empty = torch.zeros((batch, len(full), reserve, d_head), dtype=dtype, device=device)
                self.full = Full(full, empty, empty.clone())
            if streaming:
                self.rings.append(ring(streaming, *streaming_slots, policy.keeps))
            return

        def in_window(key: Tensor, query: Tensor) -> Tensor:
            return key > query - native_window

        if streaming_slots == full_slots:  # the layer's window hides all its streaming heads would keep
            self.rings.append(ring(sorted(full + streaming), *full_slots, in_window))
            return
        if full:
            self.rings.append(ring(full, *full_slots, in_window))
        if streaming:
            self.rings.append(ring(streaming, *streaming_slots, lambda k, q: in_window(k, q) & policy.keeps(k, q)))

    def indices(self, kv_heads: Sequence[int], device) -> tuple[Tensor, Tensor]:
        """(these KV heads, the query heads that read them in order) as index tensors on
        `device`, made once (a decode step would otherwise copy them to a GPU per layer)."""
        key = (tuple(kv_heads), str(device))
        if key not in self._indices:
            query = [kv * self.group + j for kv in kv_heads for j in range(self.group)]
            self._indices[key] = torch.tensor(list(kv_heads), device=device), torch.tensor(query, device=device)
        return self._indices[key]

    def store(
        self,
        keys: Float[Tensor, "batch kv new d_head"],
        values: Float[Tensor, "batch kv new d_head"],
        positions: Int[Tensor, "batch new"],
    ) -> list[tuple[Tensor, Tensor, Tensor, Ring | None, Tensor | None]]:
        """Store a call's new keys (every KV head, head-major, rotated) at their prompt
        positions; return what its queries attend over, per part: (query heads, keys,
        values, the ring part or None for the full part, the keys' positions or None)."""
        parts = []
        if self.full is not None:
            kv, heads = self.indices(self.full.kv_heads, keys.device)
            all_keys, all_values = self.full.append(keys[:, kv], values[:, kv])
            parts.append((heads, all_keys, all_values, None, None))
        for part in self.rings:
            kv, heads = self.indices(part.kv_heads, keys.device)
            kept_keys, kept_values, kept_positions = ring_candidates(part, keys[:, kv], values[:, kv], positions)
            parts.append((heads, kept_keys, kept_values, part, kept_positions))
        return parts

    def compress(
        self,
        keys: Float[Tensor, "batch kv n d_head"],
        values: Float[Tensor, "batch kv n d_head"],
        positions: Int[Tensor, "batch n"] | None = None,
    ) -> None:
        """Fill an empty layer from every key of a prompt (head-major, every KV head; at
        positions 0..n-1 unless given): what the policy keeps of it (decode-only compression)."""
        if self.full is not None:
            kv, _ = self.indices(self.full.kv_heads, keys.device)
            self.full.append(keys[:, kv], values[:, kv])
        if positions is None:
            positions = torch.arange(keys.size(2), device=keys.device)[None].expand(keys.size(0), -1)
        for part in self.rings:
            kv, _ = self.indices(part.kv_heads, keys.device)
            part.write(keys[:, kv], values[:, kv], positions)

    def nbytes(self) -> int:
        """Bytes this layer holds (measured: storage sizes of keys, values, slot positions and
        head indices, growth room included)."""
        indices = storage_bytes([t for pair in self._indices.values() for t in pair]) if self._indices else 0
        return sum(p.nbytes() for p in self.rings) + (self.full.nbytes() if self.full is not None else 0) + indices

    def keep_rows(self, rows: Int[Tensor, " row"], drop: int = 0) -> None:
        """Keep only these rows, and drop the full part's first `drop` positions (padding)."""
        if self.full is not None:
            self.full.keys, self.full.values = self.full.keys[rows, :, drop:], self.full.values[rows, :, drop:]
            self.full.length -= drop
        for part in self.rings:
            part.keys, part.values, part.positions = part.keys[rows], part.values[rows], part.positions[rows]


def stack_rows(layers: Sequence[HeadwiseLayer], capacity: int) -> HeadwiseLayer:
    """One-row layers as one batch: full parts left-padded (zeros) to the longest, right
    aligned, with room for `capacity` positions; ring parts side by side (their slots carry
    each row's own positions, so they need no padding)."""
    first = layers[0]
    stacked = object.__new__(HeadwiseLayer)
    stacked.group, stacked.full, stacked._indices = first.group, None, {}
    if first.full is not None:
        n = max(layer.full.length for layer in layers)
        shape = (len(layers), first.full.keys.size(1), max(capacity, n), first.full.keys.size(3))
        keys, values = first.full.keys.new_zeros(shape), first.full.values.new_zeros(shape)
        for row, layer in enumerate(layers):
            own = layer.full.length
            keys[row, :, n - own : n] = layer.full.keys[0, :, :own]
            values[row, :, n - own : n] = layer.full.values[0, :, :own]
        stacked.full = Full(first.full.kv_heads, keys, values, n)
    stacked.rings = [
        Ring(
            part.kv_heads,
            part.sink,
            part.ring,
            part.rule,
            torch.cat([layer.rings[i].keys for layer in layers]),
            torch.cat([layer.rings[i].values for layer in layers]),
            torch.cat([layer.rings[i].positions for layer in layers]),
        )
        for i, part in enumerate(first.rings)
    ]
    return stacked


# --------------------------------------------------------------------------------------
# Attention over one ring part (the full part is ordinary causal attention)


def ring_candidates(
    part: Ring, keys: Tensor, values: Tensor, positions: Int[Tensor, "batch new"]
) -> tuple[Tensor, Tensor, Int[Tensor, "batch key"]]:
    """The keys, values and positions the new queries may attend to, and the new keys
    stored. One new key per row (decoding) is written first and read in place; a chunk is
    read next to the slots as they were (a long chunk overwrites slots its first queries
    still see), then written."""
    if keys.size(2) == 1:
        part.write(keys, values, positions)
        return part.keys, part.values, part.positions
    candidates = (torch.cat([part.keys, keys], 2), torch.cat([part.values, values], 2), torch.cat([part.positions, positions], 1))
    part.write(keys, values, positions)
    return candidates


def ring_attention(
    part: Ring,
    q: Float[Tensor, "batch head query d_head"],
    keys: Float[Tensor, "batch kv key d_head"],
    values: Float[Tensor, "batch kv key d_head"],
    key_positions: Int[Tensor, "batch key"],
    query_positions: Int[Tensor, "batch query"],
    scale: float,
) -> Float[Tensor, "batch head query d_head"]:
    """Fused attention of query heads over the keys their ring part keeps (a query always
    sees its own key, so no row is empty). QUERY_BLOCK queries at a time, each block over
    the keys some query of it sees: a long prefill's masks and scores stay small."""
    blocks = []
    for start in range(0, q.size(2), QUERY_BLOCK):
        positions = query_positions[:, start : start + QUERY_BLOCK]
        visible = part.visible(key_positions, positions)  # [batch, query, key]
        block_keys, block_values = keys, values
        if q.size(2) > QUERY_BLOCK:  # read only the keys this block sees
            needed = visible.any(dim=1).any(dim=0).nonzero().squeeze(1)
            block_keys, block_values, visible = keys[:, :, needed], values[:, :, needed], visible[:, :, needed]
        blocks.append(
            F.scaled_dot_product_attention(
                q[:, :, start : start + QUERY_BLOCK],
                block_keys,
                block_values,
                attn_mask=visible[:, None],
                scale=scale,
                enable_gqa=q.size(1) != keys.size(1),
            )
        )
    return blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=2)


def full_width_index(positions: Int[Tensor, "batch key"], padding: Int[Tensor, " batch"], width: int) -> Int[Tensor, "batch key"]:
    """Where each kept key sits among a full cache's `width` keys (rows left-padded by
    `padding`); `width` for an empty slot (a spare column, dropped)."""
    return torch.where(positions >= 0, positions + padding[:, None], width)


def scatter_scores(
    scores: Float[Tensor, "batch head query key"], index: Int[Tensor, "batch key"], width: int
) -> Float[Tensor, "batch head query width"]:
    """Scores over kept keys placed at their positions of a full cache, -inf elsewhere."""
    b, h, n, _ = scores.shape
    out = scores.new_full((b, h, n, width + 1), -math.inf)
    out.scatter_(3, index[:, None, None].expand(b, h, n, -1), scores)
    return out[..., :width]


def gather_pattern(
    pattern: Float[Tensor, "batch head query width"], index: Int[Tensor, "batch key"]
) -> Float[Tensor, "batch head query key"]:
    """A full-width attention pattern read back at the kept keys (0 for an empty slot)."""
    b, h, n, width = pattern.shape
    padded = torch.cat([pattern, pattern.new_zeros(b, h, n, 1)], dim=-1)
    return padded.gather(3, index[:, None, None].expand(b, h, n, -1))
