"""Using retrieval heads: a key-value cache that keeps the whole context only for them.

`HeadwiseCache` runs in plain `transformers` (`model.generate(ids, cache=cache)`);
rh_lens's own decoding takes the same policy through `Decoding(kv_policy=...)` and
`rh-lens compress --cache real`. Head maps: `policy_from_head_map`.
"""

from rh_lens.kv.budget import KVBudget
from rh_lens.kv.head_maps import HeadMap, head_map_scores, policy_from_head_map, read_duo_attention
from rh_lens.kv.hf_cache import ATTENTION, MODES, SUPPORTED_MODEL_TYPES, HeadwiseCache, HeadwiseCacheLayer, headwise_attention
from rh_lens.model.headwise import KVPolicy, cache_bytes, kv_bytes

__all__ = [
    "ATTENTION",
    "MODES",
    "SUPPORTED_MODEL_TYPES",
    "HeadMap",
    "HeadwiseCache",
    "HeadwiseCacheLayer",
    "KVBudget",
    "KVPolicy",
    "cache_bytes",
    "head_map_scores",
    "headwise_attention",
    "kv_bytes",
    "policy_from_head_map",
    "read_duo_attention",
]
