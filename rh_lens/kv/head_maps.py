"""Head maps a head-wise cache is built from: which KV heads keep the whole cache.

`policy_from_head_map` reads any of
- a `KVPolicy` (as it is);
- head scores: an rh_lens detection results file or `DetectionResult`, or the reference
  implementation's published `{"L-H": [trial scores]}` file; a KV head scores the best of its
  query heads, and the best `full_fraction` of KV heads keep everything;
- DuoAttention's `full_attention_heads.tsv` (one row per layer, one column per KV head, a
  gate value per head; `rh_lens.interventions.compression.export_duo_attention` writes it):
  the best `full_fraction` by gate value, or with `full_fraction=None` the heads whose gate
  passes 0.5.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from rh_lens.detection.records import DetectionResult, load_results
from rh_lens.errors import InputError
from rh_lens.heads import KVHead
from rh_lens.interventions.compression import kv_head_scores, top_policy_for_shape
from rh_lens.model.headwise import KVPolicy

HeadMap = KVPolicy | DetectionResult | str | Path
DUO_THRESHOLD = 0.5


def read_duo_attention(path: str | Path) -> np.ndarray:
    """DuoAttention's gate values, [layer, kv_head]."""
    try:
        values = np.loadtxt(path, delimiter="\t", ndmin=2)
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: not a DuoAttention pattern file (tab-separated numbers, a row per layer): {e}") from None
    return values


def policy_from_head_map(
    head_map: HeadMap,
    n_layers: int,
    n_heads: int,
    n_kv_heads: int,
    *,
    full_fraction: float | None = 0.25,
    sink: int = 4,
    window: int = 256,
) -> KVPolicy:
    """The `KVPolicy` a head map gives a model of this shape (see the module docstring)."""
    shape = (n_layers, n_heads, n_kv_heads)
    if isinstance(head_map, KVPolicy):
        head_map.check_shape(*shape)
        return head_map
    name, scores = head_map_scores(head_map, shape)
    if full_fraction is None:
        if name != "duo-attention":
            raise InputError("head scores rank the KV heads: give full_fraction, the share of them kept full")
        full = frozenset(KVHead(int(layer), int(kv)) for layer, kv in zip(*np.nonzero(scores.numpy() > DUO_THRESHOLD)))
        return KVPolicy(name, n_layers, n_heads, n_kv_heads, full, sink, window)
    return top_policy_for_shape(name, shape, scores, full_fraction, sink, window)


def head_map_scores(head_map: str | Path | DetectionResult, shape: tuple[int, int, int]) -> tuple[str, torch.Tensor]:
    """(name, [layer, kv_head] scores, higher keeps the whole cache first) of a head map that
    ranks heads: DuoAttention's gate values, or head scores (a KV head: the best of its
    query heads)."""
    n_layers, n_heads, n_kv_heads = shape
    if isinstance(head_map, (str, Path)) and Path(head_map).suffix == ".tsv":
        gates = read_duo_attention(head_map)
        if gates.shape != (n_layers, n_kv_heads):
            raise InputError(
                f"{head_map}: gates for {gates.shape[0]} layers x {gates.shape[1]} KV heads, the model has {n_layers} x {n_kv_heads}"
            )
        return "duo-attention", torch.as_tensor(gates)
    detection = head_map if isinstance(head_map, DetectionResult) else load_results(head_map)
    if (detection.n_layers, detection.n_heads) != (n_layers, n_heads):
        raise InputError(
            f"head scores for {detection.n_layers} x {detection.n_heads} heads, the model has {n_layers} x {n_heads}"
        )
    return "retrieval", kv_head_scores(detection.scores().float(), n_kv_heads)
