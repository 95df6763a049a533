"""The systems a bench compares, parsed from ``--systems`` and loaded lazily.

Grammar (comma-separated, ``--systems`` may also repeat)::

    towers=DIR | towers:LABEL=DIR         trained towers (query tower for queries, result tower for docs; the
                                          query tower a transformer or a static table, docs/static.md)
    raw-llm[=MODEL[:POOL+POOL...]]        a decoder LLM used as is; MODEL = smollm2 (default), gemma3 or a
                                          causal-LM dir; POOL in last, mean, logits (default: all three)
    minilm                                the untrained sentence encoder the towers start from
    bm25                                  lexical baseline (bm25s)
    hybrid[:LABEL]=DIR[:rrf+weighted]     towers DIR fused with bm25 (``index.hybrid``): one row per fusion,
                                          LABEL-rrf and LABEL-weighted (default: both)
    hybrid-minilm[=rrf+weighted]          the untrained MiniLM fused with bm25, the same way
    towers+rerank[:LABEL]=TOWERS:RERANKER[:N]  the towers' top N (20) reordered by a cross-encoder
                                          (``twotower train-reranker``; ``eval.rerank``)

Each system may carry a label (``NAME:LABEL[=VALUE]``); labels must be unique. A dense system returns
``{row: (n, d) float32}`` from ``encode_queries``/``encode_docs`` (raw-llm has one row per pooling);
every row then goes through the same faiss Flat index -> search -> metrics path.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from twotower.common.device import autocast_dtype, precision_of
from twotower.eval.bm25 import BM25Retriever
from twotower.eval.config import BenchConfig
from twotower.eval.raw_llm import LLM_POOLINGS, RawLLMEncoder, check_llm_poolings
from twotower.eval.rerank import RerankSystem, parse_rerank_value
from twotower.index.query import FUSIONS, QueryOptions, check_choice
from twotower.towers.bases import resolve_base
from twotower.towers.inference import TowerEncoder, tower_encoder
from twotower.towers.llm import is_decoder_dir
from twotower.towers.model import Tower, TwoTower, read_towers_meta, tower_kind

SYSTEM_NAMES = ("towers", "raw-llm", "minilm", "bm25", "hybrid", "hybrid-minilm", "towers+rerank")


@dataclass(frozen=True)
class SystemSpec:
    """One parsed ``--systems`` item."""

    kind: str
    label: str
    value: str | None = None
    poolings: tuple[str, ...] = field(default=())
    reranker: str | None = None  # towers+rerank: the RERANKER dir ...
    rerank: int = 0  # ... and how many of the towers' candidates it reorders


def parse_systems(specs: str | Sequence[str]) -> list[SystemSpec]:
    """Parse ``towers=DIR,raw-llm=smollm2:last+mean,minilm,bm25`` (or a list of such strings).

    Raises:
        ValueError: unknown system name, missing/extra value, bad pooling, duplicate label.
    """
    items = [specs] if isinstance(specs, str) else list(specs)
    parts = [p.strip() for item in items for p in item.split(",") if p.strip()]
    if not parts:
        raise ValueError(f"no systems given: choose from {', '.join(SYSTEM_NAMES)}")
    out: list[SystemSpec] = []
    for part in parts:
        head, eq, value = part.partition("=")
        kind, colon, label = head.partition(":")
        if kind not in SYSTEM_NAMES:
            raise ValueError(f"unknown system '{kind}' in '{part}': choose {', '.join(SYSTEM_NAMES)}")
        if colon and not label:
            raise ValueError(f"empty label in '{part}': write {kind}:LABEL{'=...' if eq else ''}")
        value = value.strip() if eq else None
        if eq and not value:
            raise ValueError(f"empty value in '{part}'")
        poolings: tuple[str, ...] = ()
        reranker, rerank = None, 0
        if kind == "towers+rerank":
            value, reranker, rerank = parse_rerank_value(part, value)
            default_label = kind
        elif kind == "towers":
            if value is None:
                raise ValueError(f"'{part}': towers needs a directory, e.g. towers=runs/demo/towers")
            default_label = "towers"
        elif kind == "raw-llm":
            value = value or "smollm2"
            model, sep, pools = value.rpartition(":")
            if sep and "/" not in pools:  # MODEL:last+mean (a path's own colons stay in MODEL)
                value, poolings = model, check_llm_poolings(pools.split("+"))
            else:
                poolings = LLM_POOLINGS
            default_label = f"raw-llm-{Path(value).name}"
        elif kind in ("hybrid", "hybrid-minilm"):
            if kind == "hybrid" and value is None:
                raise ValueError(f"'{part}': hybrid needs a towers directory, e.g. hybrid=runs/demo/towers")
            fusions = ""
            if kind == "hybrid-minilm":
                value, fusions = None, value or ""
            elif value is not None:
                path, sep, tail = value.rpartition(":")
                if sep and "/" not in tail and all(f in FUSIONS for f in tail.split("+")):
                    value, fusions = path, tail
            poolings = tuple(check_choice("fusion", f, FUSIONS) for f in fusions.split("+")) if fusions else FUSIONS
            default_label = kind
        else:
            if value is not None:
                raise ValueError(f"'{part}': {kind} takes no value (write just '{kind}')")
            default_label = kind
        out.append(SystemSpec(kind, label or default_label, value, poolings, reranker, rerank))
    labels = [s.label for s in out]
    dupes = sorted({lab for lab in labels if labels.count(lab) > 1})
    if dupes:
        raise ValueError(f"duplicate system label(s) {', '.join(dupes)}: name them, e.g. towers:a=DIR1,towers:b=DIR2")
    return out


class TowersSystem:
    """Trained towers: query tower encodes queries, result tower encodes docs (each with its prompt). Towers on
    a decoder-LLM base encode in ``llm_precision`` (bf16 where native), others in the device's default."""

    dense = True

    def __init__(self, spec: SystemSpec, device: str = "cpu", llm_precision: str = "auto",
                 max_lengths: tuple[int | None, int | None] = (None, None)) -> None:
        self.label = spec.label
        self.max_lengths = dict(zip(("query", "result"), max_lengths))  # None: the TOWERS dir's inference lengths
        self.path = Path(spec.value or "")
        self.meta = read_towers_meta(self.path)  # fails fast (clear error) before any model loads
        self.device = device
        decoder = is_decoder_dir(self.path / "result_tower")
        self.precision = precision_of(autocast_dtype(llm_precision, device, decoder=True)) if decoder else "auto"
        self._model: Any = None

    @property
    def rows(self) -> list[str]:
        return [self.label]

    @property
    def dense_key(self) -> tuple[str, str]:
        """Identity of the vectors (a hybrid system over the same towers reuses them in the bench)."""
        return ("towers", str(self.path.resolve()))

    def _encoder(self, side: str) -> TowerEncoder:
        if self._model is None:
            self._model = TwoTower.load(self.path)
        return tower_encoder(self._model, side, self.device, self.precision, self.max_lengths[side])

    def encode_queries(self, texts: Sequence[str], batch_size: int, show_progress: bool) -> dict[str, np.ndarray]:
        return {self.label: self._encoder("query").encode(texts, batch_size, show_progress)}

    def encode_docs(self, texts: Sequence[str], batch_size: int, show_progress: bool) -> dict[str, np.ndarray]:
        return {self.label: self._encoder("result").encode(texts, batch_size, show_progress)}

    def config(self) -> dict[str, dict[str, Any]]:
        m = self.meta
        return {self.label: {"kind": "towers", "path": str(self.path), "base": m.get("base"),
                             "pooling": m.get("pooling"), "shared": m.get("shared"), "dim": m.get("dim"),
                             "query_max_length": self._length(m, "query"),
                             "result_max_length": self._length(m, "result"),
                             "train_query_max_length": m.get("query_max_length"),
                             "train_result_max_length": m.get("result_max_length"), "fingerprint": m.get("fingerprint"),
                             "query_prompt": m.get("query_prompt"), "result_prompt": m.get("result_prompt"),
                             "precision": self.precision, "train_config": m.get("train_config"),
                             "tower_kinds": {side: tower_kind(m, side) for side in ("query", "result")}}}

    def _length(self, meta: dict[str, Any], side: str) -> int | None:
        """Tokens this system encodes ``side`` with: the override, the recorded inference length, or (TOWERS
        dirs from before inference lengths) the training one."""
        return self.max_lengths[side] or meta.get(f"inference_{side}_max_length") or meta.get(f"{side}_max_length")


class MiniLMSystem:
    """The untrained all-MiniLM-L6-v2 (mean pooling + L2 norm = sentence-transformers), one tower for both sides."""

    dense = True

    def __init__(self, spec: SystemSpec, device: str = "cpu", query_max_length: int = 64,
                 doc_max_length: int = 256) -> None:
        self.label = spec.label
        self.device = device
        self.query_max_length = query_max_length
        self.doc_max_length = doc_max_length
        self._tower: Any = None

    @property
    def rows(self) -> list[str]:
        return [self.label]

    @property
    def dense_key(self) -> tuple[str, str]:
        return ("minilm", "")

    def _encode(self, texts: Sequence[str], max_length: int, batch_size: int, show_progress: bool) -> np.ndarray:
        if self._tower is None:
            self._tower = Tower.from_base(resolve_base("minilm"), pooling="mean")
        return TowerEncoder(self._tower, self.device, max_length=max_length).encode(texts, batch_size, show_progress)

    def encode_queries(self, texts: Sequence[str], batch_size: int, show_progress: bool) -> dict[str, np.ndarray]:
        return {self.label: self._encode(texts, self.query_max_length, batch_size, show_progress)}

    def encode_docs(self, texts: Sequence[str], batch_size: int, show_progress: bool) -> dict[str, np.ndarray]:
        return {self.label: self._encode(texts, self.doc_max_length, batch_size, show_progress)}

    def config(self) -> dict[str, dict[str, Any]]:
        return {self.label: {"kind": "minilm", "base": "minilm (all-MiniLM-L6-v2, untrained)", "pooling": "mean",
                             "normalize": True, "query_max_length": self.query_max_length,
                             "result_max_length": self.doc_max_length}}


class RawLLMSystem:
    """A decoder LLM used as is; one report row per pooling, all computed in one forward pass."""

    dense = True

    def __init__(self, spec: SystemSpec, device: str = "cpu", query_max_length: int = 64, doc_max_length: int = 256,
                 prompt: str | None = "promptEOL", llm_batch_size: int = 16, precision: str = "auto") -> None:
        self.label = spec.label
        self.poolings = spec.poolings or LLM_POOLINGS
        self.query_max_length = query_max_length
        self.encoder = RawLLMEncoder(spec.value or "smollm2", pooling=self.poolings[0], prompt=prompt,
                                     max_length=doc_max_length, batch_size=llm_batch_size, device=device,
                                     precision=precision)

    @property
    def rows(self) -> list[str]:
        return [f"{self.label}-{p}" for p in self.poolings]

    def _encode(self, texts: Sequence[str], max_length: int, show_progress: bool) -> dict[str, np.ndarray]:
        # The LLM keeps its own (smaller) batch size: its activations are much larger than a MiniLM's.
        out = self.encoder.encode_all_poolings(texts, self.poolings, show_progress=show_progress,
                                               max_length=max_length)
        return {f"{self.label}-{p}": v for p, v in out.items()}

    def encode_queries(self, texts: Sequence[str], batch_size: int, show_progress: bool) -> dict[str, np.ndarray]:
        return self._encode(texts, self.query_max_length, show_progress)

    def encode_docs(self, texts: Sequence[str], batch_size: int, show_progress: bool) -> dict[str, np.ndarray]:
        return self._encode(texts, self.encoder.max_length, show_progress)

    def config(self) -> dict[str, dict[str, Any]]:
        base = self.encoder.config()
        base["query_max_length"] = self.query_max_length
        base["result_max_length"] = base.pop("max_length")
        return {f"{self.label}-{p}": {"kind": "raw-llm", **base, "pooling": p} for p in self.poolings}


class BM25System:
    """Lexical baseline: not dense, searched by :class:`eval.bm25.BM25Retriever` directly."""

    dense = False

    def __init__(self, spec: SystemSpec) -> None:
        self.label = spec.label
        self.retriever = BM25Retriever()

    @property
    def rows(self) -> list[str]:
        return [self.label]

    def config(self) -> dict[str, dict[str, Any]]:
        return {self.label: {"kind": "bm25", **self.retriever.config()}}


class HybridSystem:
    """A dense system (towers or MiniLM) and BM25 fused (``index.hybrid``): each side's top ``k * depth``
    candidates, one report row per fusion (``LABEL-rrf``, ``LABEL-weighted``). The bench reuses the vectors and
    BM25 rankings of the same encoder / corpus when the plain systems run too."""

    dense = True
    hybrid = True

    def __init__(self, spec: SystemSpec, dense: TowersSystem | MiniLMSystem, options: QueryOptions) -> None:
        self.label = spec.label
        self.inner = dense
        self.fusions = spec.poolings or FUSIONS
        self.options = options  # resolved: alpha, norm, depth, k (= k_max); the fusion is each row's
        self.retriever = BM25Retriever()

    def row_options(self) -> dict[str, QueryOptions]:
        """Each report row's query options (one row per fusion)."""
        return {f"{self.label}-{f}": self.options.replace(fusion=f) for f in self.fusions}

    @property
    def rows(self) -> list[str]:
        return [f"{self.label}-{f}" for f in self.fusions]

    @property
    def dense_key(self) -> tuple[str, str]:
        """Which plain system's vectors these are (the bench encodes once for both)."""
        return self.inner.dense_key

    def encode_queries(self, texts: Sequence[str], batch_size: int, show_progress: bool) -> dict[str, np.ndarray]:
        return self.inner.encode_queries(texts, batch_size, show_progress)

    def encode_docs(self, texts: Sequence[str], batch_size: int, show_progress: bool) -> dict[str, np.ndarray]:
        return self.inner.encode_docs(texts, batch_size, show_progress)

    def config(self) -> dict[str, dict[str, Any]]:
        inner = next(iter(self.inner.config().values()))
        dense = f"towers {inner['path']} ({inner.get('fingerprint')})" if inner["kind"] == "towers" else inner["base"]
        bm25 = self.retriever.config()
        out = {}
        for row, o in self.row_options().items():
            fusion = {"fusion": o.fusion, "rrf_k": 60} if o.fusion == "rrf" else \
                {"fusion": o.fusion, "alpha": o.alpha, "norm": o.norm}
            out[row] = {"kind": "hybrid", **fusion, "depth": o.depth, "dense": dense,
                        "bm25": f"bm25s {bm25['version']} {bm25['method']} k1={bm25['k1']} b={bm25['b']}"}
        return out


System = TowersSystem | MiniLMSystem | RawLLMSystem | BM25System | HybridSystem | RerankSystem


def build_systems(specs: Sequence[SystemSpec], config: BenchConfig, device: str = "cpu") -> list[System]:
    """Instantiate parsed specs (cheap: models load on first encode) with the bench's settings: ``llm_precision``
    for the decoder LLMs (raw-llm, and towers on an LLM base); the ``--hybrid-*`` query options for the hybrid
    systems; ``towers_*_max_length`` overrides the trained towers' recorded inference lengths; ``device``: the
    resolved ``config.device``."""
    c = config
    prompt = None if c.prompt in (None, "none") else c.prompt
    towers_max_lengths = (c.towers_query_max_length, c.towers_result_max_length)
    query_max_length, doc_max_length, llm_precision = c.query_max_length, c.doc_max_length, c.llm_precision
    systems: list[System] = []
    for spec in specs:
        if spec.kind == "towers":
            systems.append(TowersSystem(spec, device, llm_precision, towers_max_lengths))
        elif spec.kind == "towers+rerank":
            assert spec.reranker is not None, "parse_systems gives towers+rerank its reranker"
            inner_towers = TowersSystem(SystemSpec("towers", spec.label, spec.value), device, llm_precision,
                                        towers_max_lengths)
            systems.append(RerankSystem(spec.label, inner_towers, spec.reranker, spec.rerank, device))
        elif spec.kind == "minilm":
            systems.append(MiniLMSystem(spec, device, query_max_length, doc_max_length))
        elif spec.kind == "raw-llm":
            systems.append(RawLLMSystem(spec, device, query_max_length, doc_max_length, prompt, c.llm_batch_size,
                                        llm_precision))
        elif spec.kind == "bm25":
            systems.append(BM25System(spec))
        elif spec.kind in ("hybrid", "hybrid-minilm"):
            inner_spec = SystemSpec(spec.kind.removeprefix("hybrid-") if spec.value is None else "towers",
                                    spec.label, spec.value)
            inner: TowersSystem | MiniLMSystem = TowersSystem(inner_spec, device, llm_precision, towers_max_lengths) \
                if spec.value is not None else MiniLMSystem(inner_spec, device, query_max_length, doc_max_length)
            systems.append(HybridSystem(spec, inner, c.hybrid_options()))
        else:
            raise AssertionError(f"parse_systems let through unknown kind {spec.kind!r}")
    return systems
