"""A head-wise key-value cache for plain `transformers` models.

    from rh_lens.kv import HeadwiseCache
    model = AutoModelForCausalLM.from_pretrained(name)           # Llama, Qwen2, Mistral, Gemma-3
    cache = HeadwiseCache.from_head_map("head_scores.json", model, full_fraction=0.25, sink=4, window=256)
    out = model.generate(ids, cache=cache, max_new_tokens=50, prefill_chunk_size=1024)

Two modes (`MODES`): "windowed", streaming heads see sink + window from the first prompt
token, so a prompt prefilled in chunks gives the same tokens and the prefill's memory stays
bounded by a chunk; "decode-only", the prompt (in one call) attends over every key and each
layer keeps only what the policy keeps of it once written. A `KVBudget` (bytes or tokens)
can size the policy instead of a fraction of full heads.

Built on transformers' two extension points: `HeadwiseCache` is a `Cache` whose layers
(`HeadwiseCacheLayer`, one `rh_lens.model.headwise.HeadwiseLayer` each) store full KV heads
whole and streaming KV heads as sink + ring; an attention function registered with
`AttentionInterface` as ATTENTION ("rh_lens_headwise") attends over what each layer keeps
(`from_head_map` switches the model to it). A layer's `update` stores the new keys and
hands the attention function, attached to the keys it returns, the parts to attend over;
the keys a streaming head forgets are freed as the ring overwrites them.

Rows of a batch must not be padded (streaming heads count their sink from each row's first
token); a model outside SUPPORTED_MODEL_TYPES, or with soft-capped attention scores, is
refused rather than run on a full cache.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, Cache
from transformers.cache_utils import CacheLayerMixin
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from rh_lens.errors import InputError
from rh_lens.interventions.compression import rank_kv_heads
from rh_lens.kv.budget import KVBudget
from rh_lens.kv.head_maps import HeadMap, head_map_scores, policy_from_head_map
from rh_lens.model.headwise import GROWTH, HeadwiseLayer, KVPolicy, ring_attention

ATTENTION = "rh_lens_headwise"
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "gemma3_text")
MODES = ("windowed", "decode-only")
CHUNK_HINT = 4096  # a windowed prefill longer than this in one call is pointed to prefill_chunk_size


def model_shape(config) -> tuple[int, int, int]:
    """(layers, query heads, KV heads) of a transformers config."""
    config = getattr(config, "text_config", None) or config
    n_heads = config.num_attention_heads
    return config.num_hidden_layers, n_heads, getattr(config, "num_key_value_heads", None) or n_heads


def native_windows(config) -> list[int | None]:
    """Each layer's own sliding window (None: it attends to every key)."""
    config = getattr(config, "text_config", None) or config
    window = getattr(config, "sliding_window", None)
    # Without layer types (Mistral), a sliding window applies to every layer.
    types = getattr(config, "layer_types", None) or ["sliding_attention"] * config.num_hidden_layers
    return [window if kind == "sliding_attention" and window else None for kind in types]


def check_model(config) -> None:
    config = getattr(config, "text_config", None) or config
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise InputError(
            f"a head-wise cache supports {', '.join(SUPPORTED_MODEL_TYPES)} models, not {config.model_type!r} "
            "(its attention was not checked against the masking simulation)"
        )
    if getattr(config, "attn_logit_softcapping", None):
        raise InputError("a head-wise cache does not support soft-capped attention scores")


class HeadwiseCacheLayer(CacheLayerMixin):
    """One layer of a `HeadwiseCache`: a `HeadwiseLayer`, made at the first update (when
    batch size, dtype and device are known)."""

    is_sliding = False
    is_compileable = False

    def __init__(self, policy: KVPolicy, layer: int, max_tokens: int, native_window: int | None = None, mode: str = "windowed"):
        super().__init__()
        self.policy, self.layer, self.max_tokens, self.native_window = policy, layer, max_tokens, native_window
        self.mode = mode
        self.storage: HeadwiseLayer | None = None
        self.seen = 0  # tokens of the sequence so far
        self.decoded = False  # a one-token step has run (decode-only: the prompt is in)
        self.siblings: list[HeadwiseCacheLayer] = []  # the cache's layers, made together

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Make this layer's storage, and every other layer's of the cache: one after another
        before the prompt's activations, rather than each between them (a CPU allocator would
        otherwise keep the activations' freed memory beside the cache, and the peak grows)."""
        for layer in self.siblings or [self]:
            if not layer.is_initialized:
                layer.make_storage(key_states)

    def make_storage(self, key_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.storage = HeadwiseLayer(
            self.policy,
            self.layer,
            batch=key_states.size(0),
            d_head=key_states.size(-1),
            dtype=key_states.dtype,
            device=key_states.device,
            max_tokens=self.max_tokens,
            native_window=self.native_window,
            reserve=key_states.size(2) + GROWTH,
        )
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Store new keys ([batch, kv_head, new, d_head], rotated); return them, carrying the
        parts the attention function reads."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        b, _, n, _ = key_states.shape
        positions = torch.arange(self.seen, self.seen + n, device=key_states.device)[None].expand(b, -1)
        if self.mode == "decode-only" and n > 1 and not self.decoded:
            # The prompt attends over every key it brings; the layer keeps what the policy
            # keeps of them, so the cache never holds more than one layer's full KV extra.
            if self.seen:
                raise InputError("a decode-only head-wise cache prefills the prompt whole: do not split it (prefill_chunk_size)")
            self.storage.compress(key_states, value_states, positions)
            # None: the keys and values attention is given. (The parts hang on the keys: holding
            # them here too would be a reference cycle, every layer's prompt keys kept until
            # Python's cycle collector ran.)
            parts = [(self.all_heads(key_states.device), None, None, None, None, positions)]
        else:
            if self.mode == "windowed" and self.layer == 0 and not self.seen and n > CHUNK_HINT:
                warnings.warn(
                    f"a {n}-token prompt prefilled in one call holds every layer's activations for all of it; "
                    "generate(..., prefill_chunk_size=1024) gives the same tokens with a far lower memory peak",
                    stacklevel=2,
                )
            parts = self.storage.store(key_states, value_states, positions)
            parts = [(heads, keys, values, ring, kept, positions) for heads, keys, values, ring, kept in parts]
        self.decoded |= n == 1
        self.seen += n
        key_states.rh_headwise_parts = parts
        return key_states, value_states

    def all_heads(self, device) -> torch.Tensor:
        return self.storage.indices(range(self.policy.n_kv_heads), device)[1]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0  # the full heads' keys: every one so far

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def nbytes(self) -> int:
        return self.storage.nbytes() if self.storage is not None else 0

    def reset(self) -> None:
        self.storage, self.seen, self.decoded, self.is_initialized = None, 0, False, False


class HeadwiseCache(Cache):
    """A `transformers` cache that keeps what a `KVPolicy` keeps, per KV head. `mode`:
    "windowed" (streaming heads see only sink + window from the first prompt token; prefill
    in chunks with `generate(..., prefill_chunk_size=N)` to bound prefill memory too) or
    "decode-only" (the prompt, given whole, attends over every key; each layer keeps what the
    policy keeps of it as soon as it is written, and decoding is windowed)."""

    def __init__(self, policy: KVPolicy, config, max_tokens: int | None = None, mode: str = "windowed"):
        check_model(config)
        policy.check_shape(*model_shape(config))
        if mode not in MODES:
            raise InputError(f"head-wise cache mode {mode!r}: one of {', '.join(MODES)}")
        text = getattr(config, "text_config", None) or config
        max_tokens = max_tokens or getattr(text, "max_position_embeddings", None) or 1 << 20
        if policy.sink + policy.window > max_tokens:
            raise InputError(f"sink {policy.sink} + window {policy.window} is more than the context ({max_tokens} tokens)")
        layers = [HeadwiseCacheLayer(policy, i, max_tokens, w, mode) for i, w in enumerate(native_windows(config))]
        super().__init__(layers=layers)
        for layer in layers:
            layer.siblings = layers
        self.policy, self.mode = policy, mode

    @classmethod
    def from_head_map(
        cls,
        head_map: HeadMap,
        model,
        *,
        full_fraction: float | None = 0.25,
        sink: int = 4,
        window: int = 256,
        max_tokens: int | None = None,
        mode: str = "windowed",
        budget: KVBudget | None = None,
    ) -> HeadwiseCache:
        """A cache from a head map (see `policy_from_head_map`) for `model` (a transformers
        model, switched to the head-wise attention function; or its config, for a model
        loaded with `attn_implementation=ATTENTION`). With a `budget`, the head map's best
        heads are kept full as far as it allows (`full_fraction=None`), or, when the full heads
        are set (a `KVPolicy`, or a `full_fraction`), the window is as long as it allows."""
        config = getattr(model, "config", model)
        check_model(config)
        shape = model_shape(config)
        if budget is None:
            policy = policy_from_head_map(head_map, *shape, full_fraction=full_fraction, sink=sink, window=window)
        else:
            policy = budget_policy(head_map, config, getattr(model, "dtype", None), budget, full_fraction, sink, window)
        if hasattr(model, "set_attn_implementation"):
            model.set_attn_implementation(ATTENTION)
        elif getattr(config, "_attn_implementation", None) != ATTENTION:
            raise InputError(f"load the model with attn_implementation={ATTENTION!r} (or pass the model itself)")
        return cls(policy, config, max_tokens, mode)

    def nbytes(self) -> int:
        """Bytes the cache's tensors hold (measured: storage sizes)."""
        return sum(layer.nbytes() for layer in self.layers)


def budget_policy(head_map: HeadMap, config, dtype, budget: KVBudget, full_fraction, sink: int, window: int) -> KVPolicy:
    """The policy `HeadwiseCache.from_head_map` fits to `budget` (see there)."""
    shape = model_shape(config)
    text = getattr(config, "text_config", None) or config
    d_head = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    dtype = dtype or getattr(text, "dtype", None) or torch.float32
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    ranking = None
    if isinstance(head_map, KVPolicy) or full_fraction is not None:
        policy = policy_from_head_map(head_map, *shape, full_fraction=full_fraction, sink=sink, window=window)
    else:
        name, scores = head_map_scores(head_map, shape)
        policy, ranking = KVPolicy(name, *shape, frozenset(), sink, window), rank_kv_heads(scores)
    return budget.fit(policy, ranking, d_head, dtype.itemsize, native_windows(config))


def headwise_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, softcap=None, **kwargs):
    """transformers attention over a `HeadwiseCache` layer's parts: full KV heads by SDPA
    with the model's own mask, streaming KV heads over their kept keys. [batch, query, head,
    d_head] and no weights."""
    parts = getattr(key, "rh_headwise_parts", None)
    if parts is None:
        raise InputError(f"attn_implementation={ATTENTION!r} needs a HeadwiseCache (model(..., cache=HeadwiseCache...))")
    if softcap:
        raise InputError("a head-wise cache does not support soft-capped attention scores")
    b, h, n, d = query.shape
    scale = scaling if scaling is not None else d**-0.5
    parts = [
        (heads, key if keys is None else keys, value if values is None else values, *rest) for heads, keys, values, *rest in parts
    ]
    if len(parts) == 1 and parts[0][0].numel() == h:  # one part for every head, in order: no copies
        _, keys, values, ring, key_positions, query_positions = parts[0]
        if ring is None:
            out = _full_attention(query, keys, values, attention_mask, scale)
        else:
            out = ring_attention(ring, query, keys, values, key_positions, query_positions, scale)
        return out.transpose(1, 2).contiguous(), None
    out = query.new_empty(b, h, n, d)
    for heads, keys, values, ring, key_positions, query_positions in parts:
        q = query[:, heads]
        if ring is None:
            out[:, heads] = _full_attention(q, keys, values, attention_mask, scale)
        else:
            out[:, heads] = ring_attention(ring, q, keys, values, key_positions, query_positions, scale)
    return out.transpose(1, 2).contiguous(), None


def _full_attention(q, keys, values, attention_mask, scale):
    n, k = q.size(2), keys.size(2)
    if attention_mask is not None:
        mask = attention_mask[:, :, :, :k]
        if n == 1 and not bool((mask if mask.dtype == torch.bool else mask == 0).all()):
            raise InputError("a head-wise cache does not support padded rows (give rows of one length)")
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale, enable_gqa=True)
    if n == 1 or n == k:
        return F.scaled_dot_product_attention(q, keys, values, is_causal=n > 1, scale=scale, enable_gqa=True)
    causal = torch.ones(n, k, dtype=torch.bool, device=q.device).tril(k - n)
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=causal, scale=scale, enable_gqa=True)


AttentionInterface.register(ATTENTION, headwise_attention)
AttentionMaskInterface.register(ATTENTION, sdpa_mask)
