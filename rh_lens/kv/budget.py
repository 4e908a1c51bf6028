"""A fixed total size for a head-wise cache, as kvpress's users set one: the budget picks how
many KV heads keep the whole context, or how long the streaming heads' window is.

    budget = KVBudget(context=32_000, bytes=200 * 2**20)   # or tokens=...: keys kept, all heads
    cache = HeadwiseCache.from_head_map("results.json", model, budget=budget, full_fraction=None)

Sizes are those of one row over a context of `context` tokens: bytes as `cache_bytes` counts
them (keys, values and each ring slot's position, every layer), tokens as keys kept summed over
every layer's KV heads (kvpress's compression ratio r is tokens = (1 - r) x context x layers x
KV heads). Both grow with the context only through the full heads, so a budget holds for any
context up to `context`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from rh_lens.errors import InputError
from rh_lens.heads import KVHead
from rh_lens.model.headwise import KVPolicy, cache_bytes, kv_bytes


@dataclass(frozen=True)
class KVBudget:
    """At most `bytes` (or `tokens` kept) for a context of `context` tokens; give one of them."""

    context: int
    bytes: int | None = None
    tokens: int | None = None

    def __post_init__(self):
        if (self.bytes is None) == (self.tokens is None):
            raise InputError("a KV budget is in bytes or in tokens: give exactly one")
        if self.context < 1 or (self.bytes or self.tokens) < 1:
            raise InputError(f"KV budget {self}: context and size must be positive")

    def size(self, policy: KVPolicy, d_head: int, dtype_bytes: int, native_windows: Sequence[int | None] | None) -> int:
        """What `policy` takes of this budget (in its unit) over the budget's context."""
        if self.bytes is not None:
            return cache_bytes(policy, self.context, d_head, dtype_bytes, native_windows)
        return kv_bytes(policy, self.context, d_head, dtype_bytes, native_windows)[0] // (2 * d_head * dtype_bytes)

    def fit(
        self,
        policy: KVPolicy,
        ranking: Sequence[KVHead] | None,
        d_head: int,
        dtype_bytes: int,
        native_windows: Sequence[int | None] | None = None,
    ) -> KVPolicy:
        """The largest policy within the budget: with a `ranking` (best first), the most of its
        heads full at `policy`'s window; without, `policy`'s full heads at the longest window."""
        limit = self.bytes if self.bytes is not None else self.tokens

        def fits(candidate: KVPolicy) -> bool:
            return self.size(candidate, d_head, dtype_bytes, native_windows) <= limit

        if ranking is not None:
            candidates = [replace(policy, full=frozenset(ranking[:n])) for n in range(len(ranking) + 1)]
            fitting = [c for c in candidates if fits(c)]  # sizes grow with n: the last that fits
            if not fitting:
                raise InputError(f"{self} is less than every KV head's sink + window ({policy.sink} + {policy.window})")
            return replace(fitting[-1], name=f"{policy.name}-budget")
        low, high = 1, max(1, self.context - policy.sink)
        if not fits(replace(policy, window=low)):
            raise InputError(f"{self} is less than the full heads plus a window of 1 for every other head")
        while low < high:  # the longest window that fits (sizes grow with the window)
            middle = (low + high + 1) // 2
            low, high = (middle, high) if fits(replace(policy, window=middle)) else (low, middle - 1)
        return replace(policy, name=f"{policy.name}-budget", window=low)
