"""twotower: train a query tower and a result tower on (query, result) pairs, index a corpus with FAISS, search it,
serve it, and benchmark it against a raw LLM, an off-the-shelf encoder and BM25.

The public API (docs/api.md) is small and imported lazily, so ``import twotower`` and ``twotower --help`` load no
torch or faiss::

    from twotower import TwoTower, Retriever, build_index, run_bench

Every stage also imports as ``twotower.<stage>``: ``twotower.towers``, ``twotower.index``, ``twotower.retrieval``,
``twotower.eval`` and ``twotower.common`` (the plumbing they share).
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> the module that defines it (imported on first use: torch/faiss load only when asked for)
_PUBLIC: dict[str, str] = {
    "TwoTower": "twotower.towers.model",
    "Tower": "twotower.towers.model",
    "TrainConfig": "twotower.towers.config",
    "train": "twotower.towers.train",
    "build_index": "twotower.index.build",
    "IndexBuildConfig": "twotower.index.config",
    "Retriever": "twotower.retrieval.retriever",
    "Hit": "twotower.retrieval.retriever",
    "QueryOptions": "twotower.index.query",
    "run_bench": "twotower.eval.bench",
    "BenchConfig": "twotower.eval.config",
}

__all__ = [*_PUBLIC, "__version__"]


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'twotower' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value  # later lookups skip this hook
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
