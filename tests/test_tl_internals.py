"""rh_lens's one seam to TransformerLens internals (`rh_lens.model.tl_internals`): every fast path
against TransformerLens's own computation, and the version guard.

If a TransformerLens release breaks one of these, the fast path is wrong for that release:
fix `tl_internals.py` (or leave the version outside `VERIFIED_VERSIONS`, which switches the
fast paths off).
"""

from __future__ import annotations

import contextlib
import copy
import inspect

import pytest
import torch
from planted import NEEDLE, build_planted_model, build_tokenizer, haystack_text
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformer_lens import loading_from_pretrained as tl_loading

from rh_lens.detection.run import detect
from rh_lens.execution.options import RunOptions
from rh_lens.model import tl_internals
from rh_lens.model.generation import prefill
from rh_lens.model.loading import CATALOGUE
from rh_lens.model.tl_internals import (
    allowed_keys,
    fast_paths_enabled,
    frozen_prefix_cache,
    fused_attention,
    unembed_final,
    use_linear_layout,
)
from rh_lens.tasks.niah import build_trial, tokenize_haystack

planted = build_planted_model()
VOCAB = len(build_tokenizer())
trial = build_trial(planted.tokenizer, tokenize_haystack(planted.tokenizer, haystack_text(), 300), NEEDLE, 300, 50)
tokens = torch.tensor(trial.prompt_ids)


def random_model(**overrides) -> HookedTransformer:
    """Rotary, grouped-query attention, a sliding-window layer, gated MLPs, RMSNorm and a
    logit soft cap: the parts of real models the fast paths must get right."""
    torch.manual_seed(0)
    tokenizer = build_tokenizer()  # TransformerLens needs one to run with a key-value cache
    settings = dict(
        n_layers=2,
        d_model=64,
        d_head=16,
        n_heads=4,
        n_key_value_heads=2,
        d_mlp=96,
        d_vocab=len(tokenizer),
        n_ctx=512,
        act_fn="silu",
        gated_mlp=True,
        normalization_type="RMS",
        positional_embedding_type="rotary",
        use_local_attn=True,
        attn_types=["local", "global"],
        window_size=8,
        output_logits_soft_cap=30.0,
        init_weights=True,
        device="cpu",
    )
    model = HookedTransformer(HookedTransformerConfig(**{**settings, **overrides}), tokenizer=tokenizer)
    model.eval()
    return model


@pytest.fixture
def unverified_version(monkeypatch):
    """Pretend TransformerLens is a version the fast paths were not verified with."""
    monkeypatch.delenv("RH_LENS_FAST_PATHS", raising=False)
    monkeypatch.setattr(tl_internals, "transformer_lens_version", lambda: "4.0.0")


# --- fused attention ------------------------------------------------------------------


@pytest.mark.parametrize("build", [lambda: planted, random_model], ids=["planted", "rotary-gqa-window"])
def test_fused_prefill_fills_the_same_cache_as_explicit_attention(build):
    """The fast prefill's cache holds the keys TransformerLens would attend with: its own
    cached keys, rotated (a rotated-key cache), and the same values."""
    model = build()
    ids = tokens[:60] % model.cfg.d_vocab
    for chunk in (None, 16):  # one chunk (torch's causal kernel), and chunks past the 8-token window
        fused, explicit = prefill(model, ids, chunk, fused=True), prefill(model, ids, chunk, fused=False)
        for block, a, b in zip(model.blocks, fused.entries, explicit.entries):
            expected = block.attn.apply_rotary(b.past_keys, 0) if model.cfg.positional_embedding_type == "rotary" else b.past_keys
            torch.testing.assert_close(a.past_keys, expected)
            torch.testing.assert_close(a.past_values, b.past_values)


@torch.inference_mode()
def test_decoding_through_the_rotated_cache_matches_transformer_lens():
    """Prefill and ten decode steps, one layer explicit (a hook reads its pattern) and one
    fused: logits and recorded patterns as with TransformerLens's own forward and cache."""
    model = random_model()
    ids = torch.randint(0, VOCAB, (1, 70), generator=torch.Generator().manual_seed(4))
    runs = {}
    for fast in (True, False):
        patterns = []
        hooks = [("blocks.0.attn.hook_pattern", lambda p, hook, patterns=patterns: patterns.append(p.clone()))]
        cache = prefill(model, ids[0, :60], chunk_size=16, fused=fast)
        with model.hooks(fwd_hooks=hooks), fused_attention(model) if fast else contextlib.nullcontext():
            logits = [model(ids[:, t : t + 1], past_kv_cache=cache)[0, -1] for t in range(60, 70)]
        runs[fast] = torch.stack(logits), patterns
    torch.testing.assert_close(runs[True][0], runs[False][0], atol=1e-5, rtol=1e-5)
    for ours, theirs in zip(runs[True][1], runs[False][1]):
        assert ours.shape == theirs.shape  # [1, head, 1, keys so far]
        torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-5)


@torch.inference_mode()
def test_a_rotated_cache_grows_in_steps_and_refuses_transformer_lens_forward():
    model = random_model()
    cache = prefill(model, torch.arange(40) % VOCAB)
    entry = cache.entries[0]
    assert entry.rh_rotated and entry.rh_buffers[0].size(2) == 40 + tl_internals.CACHE_GROWTH
    with fused_attention(model):
        for t in range(tl_internals.CACHE_GROWTH + 5):
            model(torch.tensor([[t % VOCAB]]), past_kv_cache=cache)
    assert entry.past_keys.size(1) == 40 + tl_internals.CACHE_GROWTH + 5
    assert entry.past_keys.data_ptr() == entry.rh_buffers[0].data_ptr()  # a view of the buffer, grown once
    with pytest.raises(RuntimeError, match="holds rotated keys"):
        model(torch.tensor([[1]]), past_kv_cache=cache)  # outside fused_attention: TransformerLens's forward


@torch.inference_mode()
def test_fused_forward_matches_explicit_forward():
    model = random_model()
    ids = torch.randint(0, VOCAB, (1, 40), generator=torch.Generator().manual_seed(0))
    expected = model(ids)
    with fused_attention(model) as all_fused:
        assert all_fused
        actual = model(ids)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


def test_only_layers_with_pattern_hooks_compute_attention_explicitly(monkeypatch):
    calls = []
    for name in ("_sdpa", "_explicit"):
        real = getattr(tl_internals, name)
        monkeypatch.setattr(
            tl_internals, name, lambda attn, *a, real=real, name=name: calls.append((attn.layer_id, name)) or real(attn, *a)
        )
    seen = []
    with planted.hooks(fwd_hooks=[("blocks.1.attn.hook_pattern", lambda p, hook: seen.append(p.shape))]):
        with fused_attention(planted) as all_fused:
            assert not all_fused
        prefill(planted, tokens[:40], chunk_size=20)
    assert seen == [torch.Size([1, 4, 20, 20]), torch.Size([1, 4, 20, 40])]  # chunk by chunk, never [40, 40]
    assert calls == [(0, "_sdpa"), (1, "_explicit")] * 2
    assert "forward" not in vars(planted.blocks[0].attn)  # restored on exit


# --- weight layout ----------------------------------------------------------------------


@torch.inference_mode()
def test_linear_layout_changes_strides_not_results():
    model = random_model()
    relaid = use_linear_layout(copy.deepcopy(model))
    ids = torch.randint(0, VOCAB, (1, 30), generator=torch.Generator().manual_seed(1))
    assert torch.equal(relaid(ids), model(ids))  # bit for bit
    before, after = dict(model.named_parameters()), dict(relaid.named_parameters())
    assert before.keys() == after.keys()
    for name, param in before.items():
        assert torch.equal(param, after[name]) and param.shape == after[name].shape, name
    assert after["blocks.0.mlp.W_in"].stride() != before["blocks.0.mlp.W_in"].stride()
    assert after["unembed.W_U"].T.is_contiguous()


# --- key-value caches -------------------------------------------------------------------


@torch.inference_mode()
def test_frozen_prefix_cache_continues_like_the_full_run():
    model = random_model()
    ids = torch.randint(0, VOCAB, (1, 30), generator=torch.Generator().manual_seed(2))
    start = 20
    _, cache = model.run_with_cache(ids, names_filter=lambda name: name.endswith(("hook_k", "hook_v")))
    keys = [cache[f"blocks.{layer}.attn.hook_k"][:, :start] for layer in range(2)]
    values = [cache[f"blocks.{layer}.attn.hook_v"][:, :start] for layer in range(2)]
    prefix = frozen_prefix_cache(model, keys, values, batch_size=3)
    continued = model(ids[:, start:].expand(3, -1), past_kv_cache=prefix)
    full = model(ids)
    for b in range(3):
        torch.testing.assert_close(continued[b], full[0, start:], atol=1e-5, rtol=1e-5)
    assert all(entry.past_keys.size(1) == start for entry in prefix.entries)  # frozen: nothing appended


# --- around the last layer; masked keys ---------------------------------------------------


@torch.inference_mode()
def test_unembed_final_is_the_forward_passes_last_position():
    model = random_model()
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))
    residual = model(ids, stop_at_layer=model.cfg.n_layers)
    torch.testing.assert_close(unembed_final(model, residual), model(ids)[:, -1], atol=1e-6, rtol=0)


@torch.inference_mode()
def test_allowed_keys_are_causal_and_within_the_window():
    model = random_model()
    _, cache = model.run_with_cache(torch.arange(20)[None], names_filter=lambda name: name.endswith("hook_attn_scores"))
    i, j = torch.arange(20)[:, None], torch.arange(20)[None]
    local, full = allowed_keys(cache["blocks.0.attn.hook_attn_scores"]), allowed_keys(cache["blocks.1.attn.hook_attn_scores"])
    assert torch.equal(full[0, 0], j <= i)
    assert torch.equal(local[0, 0], (j <= i) & (j > i - 8))


# --- version guard and fallback -------------------------------------------------------------


def test_verified_version_enables_fast_paths(monkeypatch):
    monkeypatch.delenv("RH_LENS_FAST_PATHS", raising=False)
    assert tl_internals.version_verified()
    assert fast_paths_enabled()
    monkeypatch.setenv("RH_LENS_FAST_PATHS", "0")
    assert not fast_paths_enabled()


def test_unverified_version_falls_back_with_one_warning(unverified_version, monkeypatch):
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")  # Python's own rule: a warning once per place it is raised
        assert not fast_paths_enabled()
        assert not fast_paths_enabled()
        with fused_attention(planted) as all_fused:
            assert not all_fused and "forward" not in vars(planted.blocks[0].attn)
        model = random_model()
        strides = {name: p.stride() for name, p in model.named_parameters()}
        assert {name: p.stride() for name, p in use_linear_layout(model).named_parameters()} == strides
    fallback = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning) and "fast paths" in str(w.message)]
    assert len(fallback) == 1 and "verified with transformer-lens >=3.9,<3.10, not 4.0.0" in fallback[0]
    monkeypatch.setenv("RH_LENS_FAST_PATHS", "1")
    assert fast_paths_enabled()


def test_detection_without_fast_paths_is_identical(monkeypatch):
    trials = [
        build_trial(planted.tokenizer, tokenize_haystack(planted.tokenizer, haystack_text(), 300), NEEDLE, n, 50)
        for n in (260, 300)
    ]
    fast = detect(planted, trials, options=RunOptions(max_new_tokens=8, progress=False))
    monkeypatch.setenv("RH_LENS_FAST_PATHS", "0")
    plain = detect(planted, trials, options=RunOptions(max_new_tokens=8, progress=False))
    assert [t.generated_ids for t in plain.trials] == [t.generated_ids for t in fast.trials]
    assert [t.head_scores for t in plain.trials] == [t.head_scores for t in fast.trials]


def test_patching_without_fast_paths_is_the_same(monkeypatch):
    from rh_lens.interventions.patching import cache_run, head_patches, patching_pair, run_patches

    model = random_model()
    haystack = tokenize_haystack(model.tokenizer, haystack_text(), 300)
    pair = patching_pair(
        model, NEEDLE, haystack, 300, 50, corrupted_answer="echo delta charlie bravo alpha", chat=False, lead_in=False
    )
    clean, corrupted = cache_run(model, pair.clean_ids), cache_run(model, pair.corrupted_ids)
    groups = head_patches([(layer, head) for layer in range(2) for head in range(4)], "head_out", "final")
    fast = run_patches(model, pair, corrupted, clean, groups, progress=False)
    monkeypatch.setenv("RH_LENS_FAST_PATHS", "0")
    plain = run_patches(model, pair, corrupted, clean, groups, progress=False)
    torch.testing.assert_close(fast, plain, atol=1e-4, rtol=1e-4)


# --- loading ----------------------------------------------------------------------------


def test_supported_architectures_mirror_transformer_lens():
    """The hand list must stay a subset of what this TL version converts."""
    config_src = inspect.getsource(tl_loading.convert_hf_model_config)
    weights_src = inspect.getsource(tl_loading.get_pretrained_state_dict)
    for arch in tl_internals.CONFIG_DRIVEN_ARCHITECTURES:
        assert f'architecture == "{arch}"' in config_src, arch
    for arch in tl_internals.SUPPORTED_ARCHITECTURES:
        assert f'"{arch}"' in weights_src, arch
    for entry in CATALOGUE.values():
        assert entry.architecture in tl_internals.SUPPORTED_ARCHITECTURES


def test_neutral_link_avoids_trap_words_in_tmpdir(monkeypatch, tmp_path):
    trap = tmp_path / "llama-home"
    trap.mkdir()
    monkeypatch.setattr(tl_internals.tempfile, "gettempdir", lambda: str(trap))
    with contextlib.ExitStack() as stack:
        link = tl_internals._neutral_link(tmp_path, stack)
        assert link.is_symlink() and link.resolve() == tmp_path.resolve()
        assert "llama" not in str(link).lower() and "gemma" not in str(link).lower()
    assert not link.exists()


# --- real models --------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CATALOGUE))
@torch.inference_mode()
def test_real_fused_prefill_matches_explicit_forward(name, real_model, pydoc_words):
    """rh_lens prefills through fused SDPA attention (causal kernel for the first chunk,
    an explicit causal/sliding-window mask for later ones) into a rotated-key cache;
    decoding after it must agree with TransformerLens's explicit full forward."""
    model = real_model(name)
    ids = model.to_tokens(pydoc_words(600))[0, :700]
    full = model(ids[None])[0, -1]
    for chunk in (None, 256):  # one chunk; three chunks (gemma-3: past its 512-token window)
        cache = prefill(model, ids[:-1], chunk_size=chunk)
        with fused_attention(model):  # the rotated-key cache is continued by the fast path
            decoded = model(ids[None, -1:], past_kv_cache=cache)[0, -1]
        diff = (decoded - full).abs().max().item()
        print(f"\n[{name}] fused prefill (chunk {chunk}) + decode vs full forward: {diff:.2e}")
        assert diff < 1e-3
