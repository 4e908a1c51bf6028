"""Loading models as HookedTransformers, decoding them (with a full or a head-wise key-value cache),
and the one seam to TransformerLens internals."""

from rh_lens.model.generation import (
    MAX_NEW_TOKENS,
    Decoding,
    Generation,
    decode_conditions,
    decode_prompts,
    greedy_decode,
    prefill,
)
from rh_lens.model.headwise import HeadwiseLayer, KVPolicy, kv_bytes
from rh_lens.model.loading import CATALOGUE, DTYPES, ModelSpec, cache_dir, dtype_name, hf_directory, load_model, load_model_spec
from rh_lens.model.tl_internals import Hook, compress_kv_cache, headwise_kv_cache, kv_cache_bytes

__all__ = [
    "CATALOGUE",
    "DTYPES",
    "ModelSpec",
    "cache_dir",
    "dtype_name",
    "hf_directory",
    "load_model",
    "load_model_spec",
    "MAX_NEW_TOKENS",
    "Decoding",
    "Generation",
    "decode_prompts",
    "decode_conditions",
    "greedy_decode",
    "prefill",
    "Hook",
    "HeadwiseLayer",
    "KVPolicy",
    "kv_bytes",
    "headwise_kv_cache",
    "compress_kv_cache",
    "kv_cache_bytes",
]
