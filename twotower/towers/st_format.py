"""The sentence-transformers module files of a tower dir: written beside the Hugging Face model files so
``SentenceTransformer(dir)`` loads a tower as is, and read back by ``Tower.load``.

Layout (sentence-transformers' own): ``modules.json`` lists ``0`` Transformer (the HF dir itself),
``1_Pooling/config.json``, optional ``2_Dense/`` (the projection) and ``3_Normalize``;
``sentence_bert_config.json`` holds the max sequence length and ``config_sentence_transformers.json`` the
pair's instruction prompts (``prompts``: ``query`` and ``document``) with this tower's own as
``default_prompt_name``, so ``SentenceTransformer(tower_dir).encode(texts)`` applies it as twotower does.

The TOWERS dir itself is one sentence-transformers model too (:func:`write_router_files`): a ``Router`` whose
``query`` route is the query tower's modules and whose ``document`` route is the result tower's, read in
place from ``query_tower/`` and ``result_tower/`` (no copy of the weights).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from twotower.common.atomic import write_bytes_atomic
from twotower.common.jsonl import dumps_strict
from twotower.common.schemas import STModule, STPoolingConfig, STTransformerConfig, read_json_file

# sentence-transformers Pooling config key for each of our pooling modes.
ST_POOLING_KEYS = {
    "mean": "pooling_mode_mean_tokens",
    "cls": "pooling_mode_cls_token",
    "last": "pooling_mode_lasttoken",
    "max": "pooling_mode_max_tokens",
}
REQUIRED_FILES = ("config.json", "modules.json", "1_Pooling/config.json", "sentence_bert_config.json")
ST_CONFIG = "config_sentence_transformers.json"
# twotower's tower sides -> sentence-transformers' task / prompt names (encode_query, encode_document).
ST_SIDE_NAMES = {"query": "query", "result": "document"}
# The module paths every sentence-transformers release resolves (3.x natively, 6.x through its import aliases;
# Router needs >= 5).
_ST = "sentence_transformers.models."
ST_MODULE_TYPES = {"transformer": _ST + "Transformer", "pooling": _ST + "Pooling", "dense": _ST + "Dense",
                   "normalize": _ST + "Normalize", "router": _ST + "Router", "static": _ST + "StaticEmbedding"}


@dataclass
class STConfig:
    """What the sentence-transformers files say about a tower (everything but the encoder weights)."""

    pooling: str
    max_length: int
    normalize: bool
    proj: dict[str, torch.Tensor] | None  # {"weight": (dim, hidden), "bias": (dim,)} or None
    prompt: str = ""  # prepended to every text this tower encodes


def write_json(path: Path, obj: Any) -> None:
    """``obj`` as strict JSON at ``path``, through ``common.atomic`` like every write."""
    write_bytes_atomic(path, (dumps_strict(obj, indent=2, sort_keys=True) + "\n").encode())


def st_config(prompts: dict[str, str], default_prompt_name: str | None, normalize: bool) -> dict[str, Any]:
    """``config_sentence_transformers.json``: prompts, default prompt, similarity (cosine for unit vectors)."""
    return {"model_type": "SentenceTransformer", "prompts": dict(prompts), "default_prompt_name": default_prompt_name,
            "similarity_fn_name": "cosine" if normalize else "dot"}


def write_st_files(path: Path, hidden: int, pooling: str, max_length: int, normalize: bool,
                   proj: torch.nn.Linear | None, prompts: dict[str, str] | None = None,
                   default_prompt_name: str | None = None) -> None:
    """Write the module files for a tower whose HF model files are (or will be) in ``path``.

    Args:
        prompts: the pair's prompts by sentence-transformers name (``query``, ``document``).
        default_prompt_name: this tower's own prompt among them (applied by a plain ``encode``).
    """
    modules = [{"idx": 0, "name": "0", "path": "", "type": ST_MODULE_TYPES["transformer"]}]
    pooling_cfg = {"word_embedding_dimension": hidden, "pooling_mode_mean_sqrt_len_tokens": False,
                   "pooling_mode_weightedmean_tokens": False, "include_prompt": True}
    pooling_cfg.update({key: mode == pooling for mode, key in ST_POOLING_KEYS.items()})
    write_json(path / "1_Pooling" / "config.json", pooling_cfg)
    modules.append({"idx": 1, "name": "1", "path": "1_Pooling", "type": ST_MODULE_TYPES["pooling"]})
    if proj is not None:
        write_json(path / "2_Dense" / "config.json", {
            "in_features": hidden, "out_features": proj.out_features, "bias": True,
            "activation_function": "torch.nn.modules.linear.Identity"})
        save_file({"linear.weight": proj.weight.detach().cpu().contiguous(),
                   "linear.bias": proj.bias.detach().cpu().contiguous()},
                  path / "2_Dense" / "model.safetensors")
        modules.append({"idx": 2, "name": "2", "path": "2_Dense", "type": ST_MODULE_TYPES["dense"]})
    if normalize:
        (path / "3_Normalize").mkdir(exist_ok=True)
        modules.append({"idx": len(modules), "name": str(len(modules)), "path": "3_Normalize",
                        "type": ST_MODULE_TYPES["normalize"]})
    write_json(path / "modules.json", modules)
    write_json(path / "sentence_bert_config.json", {"max_seq_length": max_length, "do_lower_case": False})
    write_json(path / ST_CONFIG, st_config(prompts or {}, default_prompt_name, normalize))


def write_router_files(root: Path, towers: dict[str, Path], prompts: dict[str, str], normalize: bool) -> None:
    """Make the TOWERS dir ``root`` one ``SentenceTransformer``: a Router over its two tower dirs.

    Args:
        towers: sentence-transformers route name (``query``, ``document``) -> tower dir inside ``root``,
            each already holding its module files (:func:`write_st_files`).
        prompts: route name -> prompt (``encode_query`` / ``encode_document`` apply them).
    """
    types: dict[str, str] = {}
    structure: dict[str, list[str]] = {}
    for route, tower_dir in towers.items():
        rel = tower_dir.relative_to(root).as_posix()
        structure[route] = []
        for module in json.loads((tower_dir / "modules.json").read_text()):
            module_id = f"{rel}/{module['path']}" if module["path"] else rel
            types[module_id] = module["type"]
            structure[route].append(module_id)
    write_json(root / "router_config.json", {
        "types": types, "structure": structure,
        "parameters": {"default_route": "document", "allow_empty_key": True, "route_mappings": {}}})
    write_json(root / "modules.json", [{"idx": 0, "name": "0", "path": "", "type": ST_MODULE_TYPES["router"]}])
    write_json(root / ST_CONFIG, st_config(prompts, None, normalize))


def read_st_files(path: Path) -> STConfig:
    """Check a tower dir's files and read its pooling, max length, normalisation and projection.

    Raises:
        FileNotFoundError: a required file or the safetensors weights are missing.
        ValueError: no supported pooling mode is set.
    """
    for required in REQUIRED_FILES:
        if not (path / required).exists():
            raise FileNotFoundError(f"tower dir '{path}' is missing {required} (expected a twotower tower dir)")
    if not any(path.glob("*.safetensors")):
        raise FileNotFoundError(f"tower dir '{path}' has no .safetensors weights")
    pooling_cfg = read_json_file(path / "1_Pooling" / "config.json", STPoolingConfig)
    pooling = next((m for m, key in ST_POOLING_KEYS.items() if pooling_cfg.get(key)), None)
    if pooling is None:
        raise ValueError(f"{path / '1_Pooling' / 'config.json'}: no supported pooling mode set "
                         f"(choose one of {', '.join(ST_POOLING_KEYS.values())})")
    paths = {m["path"] for m in read_json_file(path / "modules.json", list[STModule])}
    max_length = read_json_file(path / "sentence_bert_config.json", STTransformerConfig)["max_seq_length"]
    proj = None
    if "2_Dense" in paths:
        dense = load_file(path / "2_Dense" / "model.safetensors")
        proj = {"weight": dense["linear.weight"], "bias": dense["linear.bias"]}
    return STConfig(pooling, max_length, "3_Normalize" in paths, proj, read_default_prompt(path))


def read_default_prompt(path: Path) -> str:
    """The tower's own prompt (its ``default_prompt_name`` among the exported prompts); towers saved before
    prompts existed have none."""
    if not (path / ST_CONFIG).exists():
        return ""
    cfg = json.loads((path / ST_CONFIG).read_text())
    return (cfg.get("prompts") or {}).get(cfg.get("default_prompt_name") or "", "") or ""


def weights_fingerprint(module: torch.nn.Module) -> str:
    """sha256 over a module's weights (sorted names, raw bytes), 16 hex digits: identifies a vector space."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]
