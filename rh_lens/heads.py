"""Attention heads: one type (and one for key-value heads), one text form.

A head is `Head(layer, head)`, a named tuple (so `(12, 3)` works wherever a head is
expected), written "12-3" everywhere: command-line arguments, JSON keys and values, figure
labels and printed tables. "12-3" is also the key format of the reference implementation's
published score files, so those read as they are.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import NamedTuple

from rh_lens.errors import InputError

_HEAD_TEXT = re.compile(r"\s*(\d+)\s*[-.]\s*(\d+)\s*")  # "12-3"; "12.3" (older rh_lens) is read too


class Head(NamedTuple):
    layer: int
    head: int

    def __str__(self) -> str:
        return f"{self.layer}-{self.head}"

    @classmethod
    def parse(cls, text: str) -> Head:
        """'12-3' -> Head(12, 3)."""
        match = _HEAD_TEXT.fullmatch(str(text))
        if not match:
            raise InputError(f"a head is LAYER-HEAD, e.g. 12-3; got {text!r}")
        return cls(int(match[1]), int(match[2]))

    @classmethod
    def coerce(cls, value: Head | str | Iterable[int]) -> Head:
        """A head from its text form or a (layer, head) pair (JSON stores either)."""
        if isinstance(value, str):
            return cls.parse(value)
        layer, head = value
        return cls(int(layer), int(head))


class KVHead(NamedTuple):
    """A key-value head: under grouped-query attention several query heads read one."""

    layer: int
    kv_head: int

    def __str__(self) -> str:
        return f"{self.layer}-{self.kv_head}"


def heads_of(values: Iterable) -> list[Head]:
    """`Head.coerce` over a list."""
    return [Head.coerce(v) for v in values]


def check_heads(heads: Iterable[Head], n_layers: int, n_heads: int) -> None:
    """Refuse heads that a model of n_layers x n_heads does not have."""
    bad = [str(h) for h in heads if not (0 <= h[0] < n_layers and 0 <= h[1] < n_heads)]
    if bad:
        raise InputError(f"heads {', '.join(bad)} do not exist in a model of {n_layers} layers x {n_heads} heads")


def all_heads(n_layers: int, n_heads: int) -> list[Head]:
    return [Head(layer, head) for layer in range(n_layers) for head in range(n_heads)]


def heads_by_layer(heads: Iterable) -> dict[int, list[int]]:
    """Layer -> the indices of its heads among `heads`, in the order given (one hook per layer)."""
    layers: dict[int, list[int]] = {}
    for layer, head in heads_of(heads):
        layers.setdefault(layer, []).append(head)
    return layers
