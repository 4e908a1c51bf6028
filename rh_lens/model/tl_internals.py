"""Everything rh_lens relies on inside TransformerLens, in one file.

The rest of rh_lens uses TransformerLens's public surface only: `HookedTransformer`, its
forward arguments (`past_kv_cache`, `start_at_layer`, `stop_at_layer`), hook points and
`model.hooks`, and the `patching` setters. What goes past that lives here:

1. Building a `HookedTransformer` from a local Hugging Face directory (`hooked_from_hf_dir`):
   TransformerLens's by-name config lookups, its path-string architecture detection and its
   hard-coded Gemma configs are worked around.
2. Weights re-strided into the layout `F.linear` reads (`use_linear_layout`).
3. Fast attention (`fused_attention`): `attn.forward` swapped for the same computation,
   through torch's `scaled_dot_product_attention` where no hook reads the scores or
   pattern, and through a cache of already-rotated keys when decoding.
4. Key-value caches: a fresh one (`new_kv_cache`, optionally with rotated keys), cut back
   to a prefix (`truncate_kv_cache`), rows decoded together (`padded_kv_cache`, `copy_row`,
   `keep_rows`), a frozen prefix cache filled from cached keys and values
   (`frozen_prefix_cache`), for patched runs that start mid-prompt, and a head-wise cache
   that keeps only what a `KVPolicy` keeps (`headwise_kv_cache`, `compress_kv_cache`,
   `stack_kv_caches`; the storage is `rh_lens.model.headwise`'s); `kv_cache_bytes` measures
   any of them.
5. What TransformerLens computes around the last layer (`unembed_final`) and how it marks
   keys a query may not see in `hook_attn_scores` (`allowed_keys`).

Version guard: all of it was verified against the TransformerLens versions in
`VERIFIED_RANGE`; `tests/test_tl_internals.py` checks each fast path against
TransformerLens's own computation. With any other version, the fast paths (2-4) switch
off with one warning and rh_lens runs TransformerLens's own computation: slower, same
results. `RH_LENS_FAST_PATHS=0` switches them off anywhere, `=1` forces them on. Loading
(1) has no plain-TransformerLens equivalent for local directories; on an unverified
version it is attempted, and a failure says which versions are known to work.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import tempfile
import warnings
from collections.abc import Sequence
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from types import MethodType

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float
from packaging.specifiers import SpecifierSet
from torch import Tensor
from transformer_lens import HookedTransformer, TransformerLensKeyValueCache
from transformer_lens import loading_from_pretrained as tl_loading
from transformer_lens.hook_points import HookFunction
from transformer_lens.utilities.activation_functions import apply_softcap

from rh_lens.errors import InputError, ModelLoadError
from rh_lens.model.headwise import (
    HeadwiseLayer,
    KVPolicy,
    full_width_index,
    gather_pattern,
    ring_attention,
    scatter_scores,
    stack_rows,
    storage_bytes,
)

# A TransformerLens forward hook as `model.hooks(fwd_hooks=...)` takes it: (hook point name, function).
Hook = tuple[str, HookFunction]

VERIFIED_RANGE = ">=3.9,<3.10"  # TransformerLens versions the fast paths and loading were verified with
VERIFIED_VERSIONS = SpecifierSet(VERIFIED_RANGE)

# --------------------------------------------------------------------------------------
# Version guard


@lru_cache(maxsize=1)
def transformer_lens_version() -> str:
    return importlib.metadata.version("transformer-lens")


def version_verified() -> bool:
    return VERIFIED_VERSIONS.contains(transformer_lens_version(), prereleases=True)


def fast_paths_enabled() -> bool:
    """Whether the fast paths run: on for verified TransformerLens versions, off (with a
    warning, which Python's default filter shows once) for others; RH_LENS_FAST_PATHS=0/1
    overrides."""
    setting = os.environ.get("RH_LENS_FAST_PATHS", "auto").strip().lower()
    if setting in ("0", "off", "false", "no"):
        return False
    if setting in ("1", "on", "true", "yes"):
        return True
    if version_verified():
        return True
    # stacklevel 1: one place of warning, so the default filter shows it once per process
    warnings.warn(
        f"rh_lens's fast paths were verified with transformer-lens {VERIFIED_RANGE}, not "
        f"{transformer_lens_version()}: using TransformerLens's own computation (slower, same "
        f"results); RH_LENS_FAST_PATHS=1 forces them on",
        RuntimeWarning,
        stacklevel=1,
    )
    return False


# --------------------------------------------------------------------------------------
# 1. HookedTransformer from a local Hugging Face directory

# Architectures whose TransformerLens config is derived from the HF config.json
# (the `architecture == "..."` branches of convert_hf_model_config in TL 3.9),
# restricted to decoder-only language models HookedTransformer can run.
CONFIG_DRIVEN_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "MixtralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "PhiForCausalLM",
    "Phi3ForCausalLM",
    "GPT2LMHeadModel",
    "GPTNeoForCausalLM",
    "GPTNeoXForCausalLM",
    "GPTJForCausalLM",
    "OPTForCausalLM",
    "BloomForCausalLM",
    "ApertusForCausalLM",
    "GptOssForCausalLM",
    "OlmoeForCausalLM",
    "Olmo3ForCausalLM",
)
# TL hard-codes Gemma configs by official model name, so a Gemma directory is
# matched to the official name whose hard-coded config equals its config.json.
GEMMA_ARCHITECTURES = ("GemmaForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM")
SUPPORTED_ARCHITECTURES = CONFIG_DRIVEN_ARCHITECTURES + GEMMA_ARCHITECTURES

# convert_hf_model_config picks the architecture from these words in the path
# string before it reads config.json.
_PATH_TRAP_WORDS = ("llama", "gemma")


def is_official_name(name: str) -> bool:
    """Whether TransformerLens knows `name` as one of its official (hub) model names."""
    try:
        tl_loading.get_official_model_name(name)
        return True
    except ValueError:
        return False


def from_pretrained_official(name: str, device: str, dtype: torch.dtype, checkpoint: int | None = None) -> HookedTransformer:
    """An official TransformerLens model from the hub, without weight processing; at a
    training step (`checkpoint`, TransformerLens's `checkpoint_value`) when given."""
    extra = {"checkpoint_value": checkpoint} if checkpoint is not None else {}
    with warnings.catch_warnings():  # "HookedTransformer is deprecated": we chose it on purpose
        warnings.simplefilter("ignore", DeprecationWarning)
        return use_linear_layout(HookedTransformer.from_pretrained_no_processing(name, device=device, dtype=dtype, **extra))


def official_config(name: str, device: str, dtype: torch.dtype):
    """An official TransformerLens model's config and tokenizer, without its weights."""
    from transformers import AutoTokenizer

    cfg = tl_loading.get_pretrained_model_config(name, device=device, dtype=dtype)
    return cfg, AutoTokenizer.from_pretrained(cfg.tokenizer_name)


def _hf_value(hf_config, name: str, default=None):
    try:
        return getattr(hf_config, name, default)
    except Exception:  # transformers>=5.15 raises on some per-layer fields
        return default


def _rope(hf_config, layer_type: str) -> tuple[float | None, float]:
    """(rope theta, linear scaling factor) for a layer type. transformers 5 nests rope
    settings per layer type in `rope_parameters`; older configs use flat fields."""
    params = _hf_value(hf_config, "rope_parameters") or _hf_value(hf_config, "rope_scaling") or {}
    if isinstance(params.get(layer_type), dict):
        params = params[layer_type]
    theta = params.get("rope_theta")
    if theta is None:
        flat = "rope_local_base_freq" if layer_type == "sliding_attention" else "rope_theta"
        theta = _hf_value(hf_config, flat) or _hf_value(hf_config, "rope_theta")
    kind = params.get("rope_type") or params.get("type") or "default"
    factor = float(params.get("factor", 1.0)) if kind == "linear" else 1.0
    return theta, factor


def _gemma_mismatches(tl_cfg: dict, hf_config) -> list[str]:
    """Fields where TL's hard-coded config for an official Gemma name disagrees with
    this directory's config.json (empty: the official name describes this model)."""
    head_dim = _hf_value(hf_config, "head_dim") or (hf_config.hidden_size // hf_config.num_attention_heads)
    pairs = [
        ("d_model", hf_config.hidden_size),
        ("n_layers", hf_config.num_hidden_layers),
        ("n_heads", hf_config.num_attention_heads),
        ("d_mlp", hf_config.intermediate_size),
        ("d_vocab", hf_config.vocab_size),
        ("d_head", head_dim),
        ("n_key_value_heads", _hf_value(hf_config, "num_key_value_heads")),
    ]
    if tl_cfg.get("use_local_attn"):
        pairs.append(("window_size", _hf_value(hf_config, "sliding_window")))
        layer_types = _hf_value(hf_config, "layer_types")
        if layer_types:
            local = {"sliding_attention": "local", "full_attention": "global"}
            pairs.append(("attn_types", [local.get(t, t) for t in layer_types]))
    mismatches = [
        f"{key} differs" if isinstance(value, list) else f"{key}={tl_cfg.get(key)} vs {value}"
        for key, value in pairs
        if value is not None and tl_cfg.get(key) != value
    ]
    # Numbers TL takes from elsewhere (defaults, or a differently named field).
    global_rope, local_rope = _rope(hf_config, "full_attention"), _rope(hf_config, "sliding_attention")
    floats = [
        ("rotary_base", tl_cfg.get("rotary_base", 10000), global_rope[0]),
        ("rotary_scaling_factor", tl_cfg.get("rotary_scaling_factor", 1.0), global_rope[1]),
        (
            "attn_scale",
            tl_cfg.get("attn_scale", head_dim**0.5),
            (_hf_value(hf_config, "query_pre_attn_scalar") or head_dim) ** 0.5,
        ),
        ("attn_scores_soft_cap", tl_cfg.get("attn_scores_soft_cap", -1.0), _hf_value(hf_config, "attn_logit_softcapping")),
        ("output_logits_soft_cap", tl_cfg.get("output_logits_soft_cap", -1.0), _hf_value(hf_config, "final_logit_softcapping")),
    ]
    if tl_cfg.get("rotary_base_local") is not None:
        floats.append(("rotary_base_local", tl_cfg["rotary_base_local"], local_rope[0]))
    for key, tl_value, hf_value in floats:
        tl_value = None if tl_value is None or tl_value <= 0 else float(tl_value)  # <= 0: off
        hf_value = None if hf_value is None or hf_value <= 0 else float(hf_value)
        if tl_value != hf_value and not (tl_value and hf_value and abs(tl_value - hf_value) <= 1e-6 * abs(hf_value)):
            mismatches.append(f"{key}={tl_value} vs {hf_value}")
    return mismatches


def _gemma_official_name(architecture: str, hf_config) -> str:
    """TL builds Gemma configs only from official names (by name, never fetching), so
    find the official name whose hard-coded config matches this directory's."""
    near_misses = []
    for name in tl_loading.OFFICIAL_MODEL_NAMES:
        if "gemma" not in name.lower():
            continue
        try:
            tl_cfg = tl_loading.convert_hf_model_config(name)
        except Exception:  # a branch that would need the hub; not one we can match offline
            continue
        if tl_cfg.get("original_architecture") != architecture:
            continue
        mismatches = _gemma_mismatches(tl_cfg, hf_config)
        if not mismatches:
            return name
        near_misses.append((len(mismatches), name, mismatches))
    hint = ""
    if near_misses:
        _, name, mismatches = min(near_misses)
        hint = f" (closest: {name}, differs in {'; '.join(mismatches)})"
    raise ModelLoadError(
        f"TransformerLens hard-codes {architecture} configs by official model name and none "
        f"matches this model's config.json{hint}; only the official Gemma sizes can be converted"
    )


def _neutral_link(hf_dir: Path, stack: contextlib.ExitStack, spare_dir: Path | None = None) -> Path:
    """A symlink to `hf_dir` whose path has no 'llama'/'gemma' in it: TL's
    convert_hf_model_config picks the architecture from those words in the path
    string before it reads config.json."""
    for parent in (tempfile.gettempdir(), "/tmp", str(spare_dir or "")):
        if not parent or any(w in parent.lower() for w in _PATH_TRAP_WORDS) or not os.path.isdir(parent):
            continue
        for _ in range(5):
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="rh_lens_", dir=parent))
            link = Path(tmp) / "model"
            if not any(w in str(link).lower() for w in _PATH_TRAP_WORDS):
                link.symlink_to(hf_dir.resolve(), target_is_directory=True)
                return link
    raise ModelLoadError(
        "every temporary directory path contains 'llama' or 'gemma', which misleads "
        "TransformerLens; set TMPDIR to a directory whose path has neither"
    )


def _check_convertible(hf_dir: Path, config: dict) -> str:
    """The architecture of a local HF directory, if TransformerLens can convert it."""
    architecture = (config.get("architectures") or [None])[0]
    if "quantization_config" in config:
        method = config["quantization_config"].get("quant_method", "unknown")
        raise ModelLoadError(
            f"{hf_dir} holds a {method}-quantized checkpoint, which TransformerLens cannot "
            f"convert; pass the .gguf file or a dequantized float checkpoint instead"
        )
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise ModelLoadError(
            f"{hf_dir} holds a {architecture or 'model without architectures in config.json'}, "
            f"which TransformerLens {transformer_lens_version()} cannot convert; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    return architecture


def _tokenizer(hf_dir: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(hf_dir)
    except (OSError, ValueError) as e:
        raise ModelLoadError(
            f"{hf_dir} has no tokenizer transformers can load ({str(e).strip().splitlines()[0]}); "
            f"save one there with tokenizer.save_pretrained"
        ) from e


@contextmanager
def _converting(hf_dir: Path, architecture: str, hf_config, spare_dir: Path | None):
    """The name TransformerLens converts this directory by (held while converting), and a
    clear error when an unverified TransformerLens version fails at it."""
    try:
        with contextlib.ExitStack() as stack:
            if architecture in GEMMA_ARCHITECTURES:
                yield _gemma_official_name(architecture, hf_config)
            else:
                yield str(_neutral_link(hf_dir, stack, spare_dir))
    except ModelLoadError:
        raise
    except Exception as e:
        if version_verified():
            raise  # a bug, or a model this version cannot convert: keep the traceback
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ModelLoadError(
            f"TransformerLens {transformer_lens_version()} could not convert {hf_dir} ({first_line}); "
            f"rh_lens loads local models with transformer-lens {VERIFIED_RANGE}"
        ) from e


def _tl_config(tl_name: str, hf_config, device: str, dtype: torch.dtype, model_name: str, hf_dir: Path):
    # The model's whole context: TransformerLens caps some hard-coded configs (Gemma 3: 8192
    # of 32768) to keep its rotary tables small; they grow on demand anyway.
    n_ctx = _hf_value(hf_config, "max_position_embeddings")
    with _quiet_context_warning():
        cfg = tl_loading.get_pretrained_model_config(
            tl_name,
            hf_cfg=hf_config.to_dict(),
            fold_ln=False,
            device=device,
            dtype=dtype,
            n_ctx=n_ctx if isinstance(n_ctx, int) and n_ctx > 0 else None,
        )
    cfg.model_name = model_name
    cfg.tokenizer_name = str(hf_dir)
    return cfg


@contextmanager
def _quiet_context_warning():
    """TransformerLens warns that a context longer than its hard-coded default was not
    trained on; here the length is the model's own config.json's."""
    import logging

    class Quiet(logging.Filter):
        def filter(self, record):
            return "larger than this model's default context length" not in record.getMessage()

    quiet, root = Quiet(), logging.getLogger()
    root.addFilter(quiet)
    try:
        yield
    finally:
        root.removeFilter(quiet)


def config_from_hf_dir(
    hf_dir: Path, config: dict, device: str, dtype: torch.dtype, model_name: str, spare_dir: Path | None = None
):
    """The HookedTransformerConfig and tokenizer `hooked_from_hf_dir` would build, without
    loading any weight."""
    from transformers import AutoConfig

    architecture = _check_convertible(hf_dir, config)
    tokenizer = _tokenizer(hf_dir)
    hf_config = AutoConfig.from_pretrained(hf_dir)
    with _converting(hf_dir, architecture, hf_config, spare_dir) as tl_name:
        return _tl_config(tl_name, hf_config, device, dtype, model_name, hf_dir), tokenizer


def hooked_from_hf_dir(
    hf_dir: Path, config: dict, device: str, dtype: torch.dtype, model_name: str, spare_dir: Path | None = None
) -> HookedTransformer:
    """Build a HookedTransformer from a local HF directory (its parsed `config.json` given)
    the way from_pretrained does, minus its by-name lookups (which fail for local paths and
    unknown names) and minus any weight processing (the model's raw computation,
    comparable to HF). `spare_dir`: a directory for a symlink if every temp dir's path
    holds a trap word."""
    from transformers import AutoModelForCausalLM

    architecture = _check_convertible(hf_dir, config)
    tokenizer = _tokenizer(hf_dir)
    try:
        hf_model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype)
    except Exception as e:  # truncated or missing weights surface as anything from transformers/safetensors
        first_line = (str(e).strip().splitlines() or [""])[0]
        raise ModelLoadError(f"cannot load the weights in {hf_dir} ({type(e).__name__}: {first_line})") from e
    hf_model.eval()
    for param in hf_model.parameters():
        param.requires_grad = False
    with _converting(hf_dir, architecture, hf_model.config, spare_dir) as tl_name:
        cfg = _tl_config(tl_name, hf_model.config, device, dtype, model_name, hf_dir)
        state_dict = tl_loading.get_pretrained_state_dict(tl_name, cfg, hf_model, dtype=dtype)
    del hf_model

    with warnings.catch_warnings():  # "HookedTransformer is deprecated": we chose it on purpose
        warnings.simplefilter("ignore", DeprecationWarning)
        model = HookedTransformer(cfg, tokenizer, move_to_device=False)
    model.load_and_process_state_dict(
        state_dict,
        fold_ln=False,
        center_writing_weights=False,
        center_unembed=False,
        fold_value_biases=False,
        refactor_factored_attn_matrices=False,
    )
    model.move_model_modules_to_device()
    model.eval()
    return use_linear_layout(model)


# --------------------------------------------------------------------------------------
# 2. Weights in the layout F.linear reads


def use_linear_layout(model: HookedTransformer) -> HookedTransformer:
    """Store each weight in the memory layout its matmul reads, so that TransformerLens's
    per-call `.T.contiguous()` / rearrange copies become no-ops.

    TransformerLens 3.9 copies every MLP, unembedding and attention weight into
    `F.linear`'s layout on every forward: for one-token decoding that copy costs more
    than the matmul itself. Parameters keep their TransformerLens shapes and values
    (`W_Q` is still [head, d_model, d_head]); only their strides change, so every hook,
    analysis and result is unchanged, bit for bit. A no-op when fast paths are off.
    """
    if not fast_paths_enabled():
        return model

    def relayout(module, name: str, order: tuple[int, ...]) -> None:
        weight = getattr(module, name, None)
        if not isinstance(weight, torch.nn.Parameter):
            return
        inverse = tuple(order.index(i) for i in range(weight.dim()))
        stored = weight.data.permute(order).contiguous().permute(inverse)
        setattr(module, name, torch.nn.Parameter(stored, requires_grad=weight.requires_grad))

    with torch.no_grad():
        for block in model.blocks:
            for name in ("W_Q", "W_K", "W_V", "_W_K", "_W_V"):  # read as (head d_head) d_model
                relayout(block.attn, name, (0, 2, 1))
            relayout(block.attn, "W_O", (2, 0, 1))  # read as d_model (head d_head)
            if not model.cfg.attn_only:
                for name in ("W_gate", "W_in", "W_out"):  # read as W.T
                    relayout(block.mlp, name, (1, 0))
        relayout(model.unembed, "W_U", (1, 0))
    return model


# --------------------------------------------------------------------------------------
# 3. Fast attention: fused where nobody listens, a rotated-key cache for decoding


def _fast_supported(attn) -> bool:
    """Whether the attention forwards below compute exactly what TransformerLens would."""
    cfg = attn.cfg
    return (
        cfg.positional_embedding_type in ("rotary", "standard", "shortformer")
        and not (cfg.attn_scores_soft_cap is not None and cfg.attn_scores_soft_cap > 0)
        and not cfg.use_attention_sinks
        and not cfg.use_logn_attn
        and not cfg.use_dynamic_ntk_rope  # rescales every cached key's rotation as the context grows
        and not cfg.use_attn_result
        and cfg.clip_qkv is None
        and not cfg.load_in_4bit
        and cfg.original_architecture not in ("OlmoeForCausalLM", "Olmo2ForCausalLM", "Olmo3ForCausalLM")
        and (getattr(attn, "_attention_dir_override", None) or cfg.attention_dir) == "causal"
    )


def _listened(attn) -> bool:
    """Whether a hook reads (or edits) this layer's scores or pattern: then they must exist."""
    return attn.hook_attn_scores.has_hooks() or attn.hook_pattern.has_hooks()


def _attention_forward(
    attn,
    query_input,
    key_input,
    value_input,
    past_kv_cache_entry=None,
    additive_attention_mask=None,
    attention_mask=None,
    position_bias=None,
):
    """TransformerLens's attention forward, computed faster where that changes nothing:
    - with a rotated-key cache (see `new_kv_cache`): keys are rotated once, when cached,
      instead of all of them at every call; grouped-query heads read their key-value head
      without copies; fused SDPA unless a hook listens to the scores or pattern;
    - otherwise, fused SDPA when nobody listens, else TransformerLens's own forward."""
    entry = past_kv_cache_entry
    if additive_attention_mask is not None or position_bias is not None:
        return attn._tl_forward(
            query_input, key_input, value_input, entry, additive_attention_mask, attention_mask, position_bias
        )
    if entry is not None and getattr(entry, "rh_headwise", None) is not None:
        return _headwise_forward(attn, query_input, key_input, value_input, entry, attention_mask)
    if entry is not None and getattr(entry, "rh_rotated", False):
        return _rotated_cache_forward(attn, query_input, key_input, value_input, entry, attention_mask)
    if _listened(attn):
        return attn._tl_forward(
            query_input, key_input, value_input, entry, additive_attention_mask, attention_mask, position_bias
        )
    return _sdpa_forward(attn, query_input, key_input, value_input, entry, attention_mask)


def _first_key(attn, offset: int, attention_mask) -> int:
    """The first key any query of this call may see: a sliding-window layer sees none before
    its window, so they are never read (with padding, every key is kept)."""
    if attn.attn_type != "local" or (attention_mask is not None and not bool(attention_mask.all())):
        return 0
    return max(0, offset - attn.cfg.window_size + 1)


def _causal_mask(attn, q: Tensor, first: int, n_keys: int, offset: int, attention_mask) -> tuple[Tensor | None, bool]:
    """(mask, is_causal) for SDPA over keys [first, n_keys), as TransformerLens's
    apply_causal_mask combines causality, a sliding window and padding."""
    padded = attention_mask is not None and not bool(attention_mask.all())
    if offset == 0 and not padded and attn.attn_type != "local":
        return None, True  # plain causal attention: torch's fastest kernel
    queries = torch.arange(offset, offset + q.size(1), device=q.device)[:, None]
    keys = torch.arange(first, n_keys, device=q.device)[None]
    mask = keys <= queries
    if attn.attn_type == "local":
        mask = mask & (keys > queries - attn.cfg.window_size)
    mask = mask[None, None]  # [1, 1, query, key]
    if padded:
        mask = mask & attention_mask.bool()[:, None, None, first:].to(q.device)
    return mask, False


def _sdpa(attn, q, k, v, offset: int, attention_mask) -> Tensor:
    """softmax(q k^T / scale + mask) v through torch's fused kernels: [batch, query, head, d_head].

    A chunk after the first (queries offset.. over keys 0..) of a full-attention layer needs
    no mask: one query sees every key before it; on the CPU it is computed as attention over
    the earlier keys plus causal attention within the chunk, merged by their log-sum-exps
    (the causal pass's work, and no [query, key] mask); on a GPU through torch's lower-right
    causal bias."""
    scale, padded = 1.0 / attn.attn_scale, attention_mask is not None and not bool(attention_mask.all())
    if offset > 0 and attn.attn_type != "local" and not padded:
        if q.size(1) == 1:  # decoding: every cached key is visible
            return _fused(q, k, v, scale, mask=None, causal=False)
        if q.device.type == "cpu" and _CPU_LSE is not None:
            return _prefix_then_chunk(q, k, v, offset, scale)
        if q.device.type == "cuda":
            from torch.nn.attention.bias import causal_lower_right

            return _fused(q, k, v, scale, mask=causal_lower_right(q.size(1), k.size(1)), causal=False)
    first = _first_key(attn, offset, attention_mask)
    mask, causal = _causal_mask(attn, q, first, k.size(1), offset, attention_mask)
    return _fused(q, k[:, first:], v[:, first:], scale, mask, causal)


def _fused(q, k, v, scale: float, mask, causal: bool) -> Tensor:
    z = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        attn_mask=mask,
        is_causal=causal,
        scale=scale,
        enable_gqa=q.size(2) != k.size(2),
    )  # [batch, head, query, d_head]
    return z.transpose(1, 2)


# torch's CPU flash-attention kernel, which also returns each query's log-sum-exp (a private op).
_CPU_LSE = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _prefix_then_chunk(q, k, v, offset: int, scale: float) -> Tensor:
    """Causal attention of a chunk (positions offset..) over all keys so far, as two fused
    passes: every query over the keys before the chunk (no mask; grouped-query heads read
    their key-value head in place), then causal within the chunk; merged exactly by the two
    log-sum-exps. [batch, query, head, d_head]."""
    b, c, h, d = q.shape
    g = k.size(2)
    r = h // g
    heads_first = q.transpose(1, 2)  # [batch, head, query, d]
    prefix, prefix_lse = _CPU_LSE(
        heads_first.reshape(b, g, r * c, d),
        k[:, :offset].transpose(1, 2),
        v[:, :offset].transpose(1, 2),
        0.0,
        False,
        attn_mask=None,
        scale=scale,
    )[:2]
    own_k = k[:, offset:].transpose(1, 2).repeat_interleave(r, dim=1)  # the chunk's own keys only: small
    own_v = v[:, offset:].transpose(1, 2).repeat_interleave(r, dim=1)
    own, own_lse = _CPU_LSE(heads_first, own_k, own_v, 0.0, True, attn_mask=None, scale=scale)[:2]
    prefix, prefix_lse = prefix.reshape(b, h, c, d), prefix_lse.reshape(b, h, c, 1)
    top = torch.maximum(prefix_lse, own_lse[..., None])
    w_prefix, w_own = (prefix_lse - top).exp(), (own_lse[..., None] - top).exp()
    z = (prefix.float() * w_prefix + own.float() * w_own) / (w_prefix + w_own)
    return z.to(q.dtype).transpose(1, 2)


def _explicit(attn, q, k, v, offset: int, attention_mask) -> Tensor:
    """TransformerLens's explicit attention (scores, causal mask, hook_attn_scores, softmax,
    hook_pattern, z), with each grouped-query head reading its key-value head in place of
    TransformerLens's repeat_interleave copies (query head i reads key-value head
    i // (n_heads / n_kv_heads), as there), and a sliding-window layer reading only the keys
    in its window: the others get TransformerLens's -inf anyway, so hooks still see
    [batch, head, query, every key]."""
    b, n_q, h, d = q.shape
    g, n_k = k.size(2), k.size(1)
    r, first = h // g, _first_key(attn, offset, attention_mask)
    scores = torch.einsum("bqgrd,bkgd->bgrqk", q.reshape(b, n_q, g, r, d), k[:, first:]).reshape(b, h, n_q, n_k - first)
    scores = scores / attn.attn_scale
    if first:
        scores = torch.cat([scores.new_full((b, h, n_q, first), float("-inf")), scores], dim=-1)
    scores = attn.hook_attn_scores(attn.apply_causal_mask(scores, offset, attention_mask))
    pattern = F.softmax(scores, dim=-1)
    pattern = torch.where(torch.isnan(pattern), torch.zeros_like(pattern), pattern)
    pattern = attn.hook_pattern(pattern).to(device=v.device, dtype=v.dtype)  # [batch, head, query, key]
    window = pattern[..., first:].reshape(b, g, r, n_q, n_k - first)
    return torch.einsum("bgrqk,bkgd->bqgrd", window, v[:, first:]).reshape(b, n_q, h, d)


def _project(attn, z: Tensor) -> Tensor:
    """hook_z, then the output projection as TransformerLens computes it."""
    z = attn.hook_z(z)  # [batch, query, head, d_head]
    w_o = attn.W_O.permute(2, 0, 1).reshape(attn.cfg.d_model, -1)  # d_model (head d_head)
    return F.linear(z.reshape(z.shape[0], z.shape[1], -1).to(w_o.dtype), w_o, attn.b_O)


def _sdpa_forward(attn, query_input, key_input, value_input, entry, attention_mask):
    """TransformerLens's forward (TransformerLens's own cache layout: unrotated keys) with
    scores, mask, softmax and pattern fused into SDPA. Only when nobody listens to them."""
    q, k, v = attn.calculate_qkv_matrices(query_input, key_input, value_input)
    offset = 0
    if entry is not None:
        offset = entry.past_keys.size(1)
        k, v = entry.append(k, v)
    if attn.cfg.positional_embedding_type == "rotary":
        q = attn.hook_rot_q(attn.apply_rotary(q, offset, attention_mask))
        k = attn.hook_rot_k(attn.apply_rotary(k, 0, attention_mask))
    return _project(attn, _sdpa(attn, q, k, v, offset, attention_mask))


def _rotated_cache_forward(attn, query_input, key_input, value_input, entry, attention_mask):
    """Attention through a cache that holds keys already rotated. Rotating a key depends
    only on its position, so rotating each new key once gives the very keys that
    TransformerLens re-rotates at every call; hook_rot_k still sees all of them."""
    q, k, v = attn.calculate_qkv_matrices(query_input, key_input, value_input)
    offset = entry.past_keys.size(1)
    if attn.cfg.positional_embedding_type == "rotary":
        q = attn.hook_rot_q(attn.apply_rotary(q, offset, attention_mask))
        k = attn.apply_rotary(k, offset, attention_mask)
    keys, values = _store(entry, k, v)
    if attn.cfg.positional_embedding_type == "rotary":
        keys = attn.hook_rot_k(keys)
    attend = _explicit if _listened(attn) else _sdpa
    return _project(attn, attend(attn, q, keys, values, offset, attention_mask))


def _headwise_forward(attn, query_input, key_input, value_input, entry, attention_mask):
    """Attention through a head-wise cache (`headwise_kv_cache`): full KV heads over every
    key (as `_rotated_cache_forward`), streaming KV heads over the keys their ring keeps.
    Fused unless a hook listens; then the scores and pattern hooks see every key of the
    context, -inf / 0 where a streaming head keeps none, as under the masking simulation.
    hook_rot_k sees the new keys only: the others are stored rotated, or gone."""
    layer: HeadwiseLayer = entry.rh_headwise
    q, k, v = attn.calculate_qkv_matrices(query_input, key_input, value_input)  # [batch, new, head, d_head]
    b, n, h, d = q.shape
    offset = entry.past_keys.size(1)
    width = offset + n
    if attn.cfg.positional_embedding_type == "rotary":
        q = attn.hook_rot_q(attn.apply_rotary(q, offset, attention_mask))
        k = attn.hook_rot_k(attn.apply_rotary(k, offset, attention_mask))
    if attention_mask is None:
        positions = torch.arange(offset, width, device=q.device)[None].expand(b, -1)
        padding = torch.zeros(b, dtype=torch.long, device=q.device)
    else:
        real = attention_mask.to(q.device).long().cumsum(-1)
        positions, padding = real[:, offset:] - 1, width - real[:, -1]  # prompt positions of the new keys; left padding
    entry.past_keys = entry.past_values = _placeholder(q, width, entry.past_keys.size(2))
    new_k, new_v = k.transpose(1, 2), v.transpose(1, 2)  # head-major [batch, kv_head, new, d_head]
    parts = layer.store(new_k, new_v, positions)
    z = q.new_empty(b, n, h, d)
    if not _listened(attn):
        for heads, keys, values, ring, key_positions in parts:
            if ring is None:
                z[:, :, heads] = _sdpa(attn, q[:, :, heads], keys.transpose(1, 2), values.transpose(1, 2), offset, attention_mask)
            else:
                own = ring_attention(
                    ring, q[:, :, heads].transpose(1, 2), keys, values, key_positions, positions, 1.0 / attn.attn_scale
                )
                z[:, :, heads] = own.transpose(1, 2)
        return _project(attn, z)
    scores, indices = q.new_full((b, h, n, width), float("-inf")), []
    for heads, keys, _, ring, key_positions in parts:
        g = keys.size(1)
        own = torch.einsum("bqgrd,bgkd->bgrqk", q[:, :, heads].reshape(b, n, g, -1, d), keys).reshape(b, len(heads), n, -1)
        own = own / attn.attn_scale
        if ring is None:
            scores[:, heads] = attn.apply_causal_mask(own, offset, attention_mask)
            indices.append(None)
        else:
            indices.append(full_width_index(key_positions, padding, width))
            visible = ring.visible(key_positions, positions)
            scores[:, heads] = scatter_scores(own.masked_fill(~visible[:, None], float("-inf")), indices[-1], width)
    pattern = F.softmax(attn.hook_attn_scores(scores), dim=-1)
    pattern = torch.where(torch.isnan(pattern), torch.zeros_like(pattern), pattern)
    pattern = attn.hook_pattern(pattern).to(dtype=v.dtype)  # [batch, head, query, key]
    for (heads, keys, values, _, _), index in zip(parts, indices):
        weights = pattern[:, heads] if index is None else gather_pattern(pattern[:, heads], index)
        g = keys.size(1)
        z[:, :, heads] = torch.einsum("bgrqk,bgkd->bqgrd", weights.reshape(b, g, -1, n, weights.size(-1)), values).reshape(
            b, n, -1, d
        )
    return _project(attn, z)


def _placeholder(like: Tensor, length: int, kv_heads: int, batch: int | None = None) -> Tensor:
    """A [batch, length, kv_head, d_head] tensor of no memory (stride 0): what TransformerLens
    reads of a head-wise cache entry, its shape (positions so far)."""
    return like.new_zeros(()).expand(batch or like.size(0), length, kv_heads, like.size(-1))


@contextmanager
def fused_attention(model: HookedTransformer):
    """Within this context every supported attention layer runs `_attention_forward`:
    fused SDPA while no hook reads its scores or pattern (several times faster on long
    prompts, and no [heads, query, key] matrix at all), TransformerLens's explicit attention
    when one does (decided at each call), and the rotated-key cache fast path for caches
    made by `new_kv_cache(..., rotated=True)`. Yields whether every layer is fused now
    (never, when fast paths are off: then nothing is swapped)."""
    swapped = []
    if fast_paths_enabled():
        for block in model.blocks:
            attn = block.attn
            if _fast_supported(attn) and "forward" not in vars(attn):
                attn._tl_forward = attn.forward
                attn.forward = MethodType(_attention_forward, attn)
                swapped.append(attn)
    try:
        yield len(swapped) == len(model.blocks) and not any(_listened(a) for a in swapped)
    finally:
        for attn in swapped:
            del attn.forward, attn._tl_forward


# --------------------------------------------------------------------------------------
# 4. Key-value caches

CACHE_GROWTH = 256  # tokens a rotated-key cache grows by beyond what it needs (one copy per 256 decode steps)


def new_kv_cache(model: HookedTransformer, batch_size: int = 1, rotated: bool = False) -> TransformerLensKeyValueCache:
    """An empty TransformerLens key-value cache for `model`.

    `rotated=True` (only with fast paths on): layers `fused_attention` supports store their
    keys already rotated, in buffers grown in steps of CACHE_GROWTH tokens rather than one
    concatenation per call. Such a cache must be continued inside `fused_attention` (as
    rh_lens's prefill and decoding do); TransformerLens's own forward refuses it, rather
    than rotate its keys twice."""
    cache = TransformerLensKeyValueCache.init_cache(model.cfg, model.cfg.device, batch_size=batch_size)
    if rotated and fast_paths_enabled():
        for block, entry in zip(model.blocks, cache.entries):
            if _fast_supported(block.attn):
                entry.rh_rotated = True
                entry.append = _refuse_rotated
    return cache


def _refuse_rotated(*args, **kwargs):
    raise RuntimeError(
        "this key-value cache holds rotated keys (rh_lens's fast decoding): continue it inside "
        "rh_lens.model.tl_internals.fused_attention(model), or make it with new_kv_cache(model)"
    )


def _store(entry, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """Append new keys and values to a rotated-key cache entry; return all of them (views).

    The buffers are head-major, [batch, kv_head, position, d_head], and the entry's keys a
    [batch, position, kv_head, d_head] view of them (TransformerLens's layout): attention
    then reads each head's keys as one block, in place, for one row or many (a batch-major
    buffer longer than its keys is a view that batched matrix products copy whole)."""
    n_old, n_new = entry.past_keys.size(1), entry.past_keys.size(1) + k.size(1)
    buffer_k, buffer_v = getattr(entry, "rh_buffers", (None, None))
    if buffer_k is None or buffer_k.size(2) < n_new:
        shape = (k.size(0), k.size(2), n_new + CACHE_GROWTH, k.size(3))
        grown_k, grown_v = k.new_empty(shape), v.new_empty(shape)
        grown_k[:, :, :n_old], grown_v[:, :, :n_old] = entry.past_keys.transpose(1, 2), entry.past_values.transpose(1, 2)
        buffer_k, buffer_v = entry.rh_buffers = grown_k, grown_v
    buffer_k[:, :, n_old:n_new], buffer_v[:, :, n_old:n_new] = k.transpose(1, 2), v.transpose(1, 2)
    entry.past_keys, entry.past_values = _keys_view(buffer_k, n_new), _keys_view(buffer_v, n_new)
    return entry.past_keys, entry.past_values


def _keys_view(buffer: Tensor, n: int) -> Tensor:
    """The first n positions of a head-major buffer, in TransformerLens's [batch, position, kv_head, d_head] layout."""
    return buffer[:, :, :n].transpose(1, 2)


def truncate_kv_cache(cache: TransformerLensKeyValueCache, length: int) -> None:
    """Forget every position from `length` on: the cache then holds what a run of the first
    `length` tokens left. A rotated-key cache keeps its buffers, and the next keys overwrite
    the forgotten ones in place."""
    for entry in cache.entries:
        if getattr(entry, "rh_headwise", None) is not None:
            raise InputError("a head-wise cache cannot be cut back: the keys it dropped are gone")
        entry.past_keys, entry.past_values = entry.past_keys[:, :length], entry.past_values[:, :length]
    cache.previous_attention_mask = cache.previous_attention_mask[:, :length]


def padded_kv_cache(
    model: HookedTransformer, lengths: Sequence[int], capacity: int, rotated: bool = False
) -> TransformerLensKeyValueCache:
    """An empty cache for rows of these lengths decoded together, left-padded to the longest
    (N tokens): row b's keys go to [N - lengths[b], N) (`copy_row`); its attention mask is 0
    over the padding, so no query sees it and TransformerLens counts positions from the
    row's first real token. Padding keys and values are zeros (a masked key has weight 0,
    and 0 x garbage could be NaN). `capacity`: positions to allocate for a rotated-key cache
    (N plus the tokens to be decoded), so decoding appends without a copy."""
    n, rows = max(lengths), len(lengths)
    cache = new_kv_cache(model, rows, rotated)
    for entry in cache.entries:
        rotated_entry = getattr(entry, "rh_rotated", False)
        kv_heads, d_head = entry.past_keys.shape[2:]
        shape = (rows, kv_heads, max(capacity, n) if rotated_entry else n, d_head)  # head-major, as `_store`'s
        keys, values = entry.past_keys.new_zeros(shape), entry.past_values.new_zeros(shape)
        if rotated_entry:
            entry.rh_buffers = keys, values
        entry.past_keys, entry.past_values = _keys_view(keys, n), _keys_view(values, n)
    cache.previous_attention_mask = _left_padding_mask(lengths, cache.previous_attention_mask.device)
    return cache


def _left_padding_mask(lengths: Sequence[int], device) -> Tensor:
    """[row, max(lengths)]: 1 over each row's last `length` positions, 0 over its padding."""
    n = max(lengths)
    mask = torch.zeros(len(lengths), n, dtype=torch.int, device=device)
    for row, length in enumerate(lengths):
        mask[row, n - length :] = 1
    return mask


def copy_row(cache: TransformerLensKeyValueCache, row: int, source: TransformerLensKeyValueCache) -> None:
    """Copy a one-row cache's keys and values into `row` of a padded cache, right-aligned."""
    for entry, own in zip(cache.entries, source.entries):
        n, length = entry.past_keys.size(1), own.past_keys.size(1)
        entry.past_keys[row, n - length :] = own.past_keys[0]
        entry.past_values[row, n - length :] = own.past_values[0]


def keep_rows(cache: TransformerLensKeyValueCache, rows: Tensor, drop: int = 0) -> None:
    """Keep only these rows of a padded cache (decoding of the others has ended), and drop
    its first `drop` positions (padding in every row kept)."""
    for entry in cache.entries:
        n = entry.past_keys.size(1) - drop
        buffers = getattr(entry, "rh_buffers", None)
        if getattr(entry, "rh_headwise", None) is not None:
            entry.rh_headwise.keep_rows(rows, drop)
            keys = values = entry.past_keys[rows, drop:]  # the placeholder, of the new shape
        elif buffers is not None:
            entry.rh_buffers = tuple(buffer[rows, :, drop:] for buffer in buffers)
            keys, values = (_keys_view(buffer, n) for buffer in entry.rh_buffers)
        else:
            keys, values = entry.past_keys[rows, drop:], entry.past_values[rows, drop:]
        entry.past_keys, entry.past_values = keys, values
    cache.previous_attention_mask = cache.previous_attention_mask[rows, drop:]


USE_MASKED = 'simulate it instead: --cache masked, or KVCompression(policy, cache="masked")'


def check_headwise(model: HookedTransformer, policy: KVPolicy) -> None:
    """Refuse a policy for another architecture, or a model a head-wise cache cannot run."""
    cfg = model.cfg
    policy.check_shape(cfg.n_layers, cfg.n_heads, cfg.n_key_value_heads or cfg.n_heads)
    if not fast_paths_enabled():
        raise InputError(
            "a head-wise cache runs through rh_lens's fast attention paths, which are off here "
            f"(transformer-lens {transformer_lens_version()}, or RH_LENS_FAST_PATHS=0); {USE_MASKED}"
        )
    unsupported = sorted({cfg.original_architecture or "?" for b in model.blocks if not _fast_supported(b.attn)})
    if unsupported:
        raise InputError(
            f"a head-wise cache does not support this model's attention ({', '.join(unsupported)}: soft-capped "
            f"scores, attention sinks or another variant rh_lens's fast paths leave to TransformerLens); {USE_MASKED}"
        )


def native_windows(model: HookedTransformer) -> list[int | None]:
    """Each layer's own sliding window (TransformerLens's local attention), None for a layer
    that attends to every key."""
    return [model.cfg.window_size if block.attn.attn_type == "local" else None for block in model.blocks]


def headwise_kv_cache(
    model: HookedTransformer, policy: KVPolicy, max_tokens: int, batch_size: int = 1
) -> TransformerLensKeyValueCache:
    """An empty cache that keeps only what `policy` keeps (see `rh_lens.model.headwise`),
    for contexts of up to `max_tokens`. Continue it inside `fused_attention` (rh_lens's
    prefill and decoding do); TransformerLens's own forward refuses it."""
    check_headwise(model, policy)
    cfg = model.cfg
    cache = TransformerLensKeyValueCache.init_cache(cfg, cfg.device, batch_size=batch_size)
    for layer, (native, entry) in enumerate(zip(native_windows(model), cache.entries)):
        entry.rh_headwise = HeadwiseLayer(
            policy,
            layer,
            batch=batch_size,
            d_head=cfg.d_head,
            dtype=cfg.dtype,
            device=cfg.device,
            max_tokens=max_tokens,
            native_window=native,
        )
        entry.append = _refuse_rotated
    return cache


def compress_kv_cache(
    model: HookedTransformer, full: TransformerLensKeyValueCache, policy: KVPolicy, max_tokens: int
) -> TransformerLensKeyValueCache:
    """What `policy` keeps of a one-prompt cache filled with every key (a rotated-key cache,
    as rh_lens's prefill makes): a new head-wise cache; `full` is left as it was."""
    cache = headwise_kv_cache(model, policy, max_tokens)
    for entry, source in zip(cache.entries, full.entries):
        if not getattr(source, "rh_rotated", False):
            raise InputError("only a cache of rotated keys (rh_lens's prefill) can be compressed")
        keys, values = source.past_keys.transpose(1, 2), source.past_values.transpose(1, 2)  # head-major
        entry.rh_headwise.compress(keys, values)
        entry.past_keys = entry.past_values = _placeholder(source.past_keys, keys.size(2), keys.size(1))
    cache.previous_attention_mask = full.previous_attention_mask.clone()
    return cache


def stack_kv_caches(
    model: HookedTransformer, caches: Sequence[TransformerLensKeyValueCache], capacity: int
) -> TransformerLensKeyValueCache:
    """One-prompt head-wise caches as one batch, left-padded as `padded_kv_cache`'s rows
    (its attention mask 0 over the padding); room for `capacity` positions."""
    lengths = [c.entries[0].past_keys.size(1) for c in caches]
    cache = TransformerLensKeyValueCache.init_cache(model.cfg, model.cfg.device, batch_size=len(caches))
    for layer, entry in enumerate(cache.entries):
        own = [c.entries[layer] for c in caches]
        entry.rh_headwise = stack_rows([e.rh_headwise for e in own], capacity)
        entry.past_keys = entry.past_values = _placeholder(own[0].past_keys, max(lengths), own[0].past_keys.size(2), len(caches))
        entry.append = _refuse_rotated
    cache.previous_attention_mask = _left_padding_mask(lengths, cache.previous_attention_mask.device)
    return cache


def kv_cache_bytes(cache: TransformerLensKeyValueCache) -> int:
    """Bytes the cache's key and value tensors hold (storage sizes, each counted once)."""
    headwise = [e.rh_headwise.nbytes() for e in cache.entries if getattr(e, "rh_headwise", None) is not None]
    tensors = [t for e in cache.entries if getattr(e, "rh_headwise", None) is None for t in (e.past_keys, e.past_values)]
    tensors += [t for e in cache.entries for t in getattr(e, "rh_buffers", ())]
    return sum(headwise) + storage_bytes(tensors)


def frozen_prefix_cache(
    model: HookedTransformer,
    keys: list[Float[Tensor, "1 prefix kv_head d_head"]],
    values: list[Float[Tensor, "1 prefix kv_head d_head"]],
    batch_size: int,
) -> TransformerLensKeyValueCache:
    """A frozen cache holding each layer's keys and values of a prefix (from a cached run's
    hook_k / hook_v: TransformerLens's layout, unrotated), shared by `batch_size` runs: a run
    fed the positions after the prefix attends to them exactly as the full run would, and
    leaves the cache unchanged."""
    cache = new_kv_cache(model, batch_size)
    for entry, k, v in zip(cache.entries, keys, values):
        entry.past_keys = k.expand(batch_size, -1, -1, -1)
        entry.past_values = v.expand(batch_size, -1, -1, -1)
    cache.previous_attention_mask = torch.ones(batch_size, keys[0].size(1), dtype=torch.int, device=model.cfg.device)
    cache.freeze()
    return cache


# --------------------------------------------------------------------------------------
# 5. Around the last layer; masked keys


def unembed_residual(model: HookedTransformer, residual: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos vocab"]:
    """Logits from the residual stream after the last layer, as TransformerLens's forward
    computes them (final norm, unembedding, logit soft cap): pass only the positions whose
    logits are read, and the vocabulary projection of the others is never computed."""
    if model.cfg.normalization_type is not None:
        residual = model.ln_final(residual)
    return apply_softcap(model.unembed(residual), model.cfg.output_logits_soft_cap)


def unembed_final(model: HookedTransformer, residual: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch vocab"]:
    """Logits of the final position (see `unembed_residual`)."""
    return unembed_residual(model, residual[:, -1:])[:, -1]


def allowed_keys(attn_scores: Float[Tensor, "... query key"]) -> Bool[Tensor, "... query key"]:
    """Keys a query may attend to, read off `hook_attn_scores`: TransformerLens writes -inf
    (its IGNORE value) where the causal mask, a sliding window or padding forbid it."""
    return ~torch.isneginf(attn_scores)
