"""Query time: the query tower encodes, the INDEX searches, hits come back with their doc rows.

``Retriever`` is the facade applications call (ColBERT's ``Searcher``): load once, then
``search(queries, k)`` from any number of threads. Many queries cost one encode and one faiss search;
doc rows for all hits come from one batched Arrow take (see ``retrieval.doctable``).
"""
from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from twotower.common.device import check_device, check_precision, resolve_device
from twotower.common.encoder import TruncatedEncoder
from twotower.common.text import is_blank
from twotower.index.corpus import doc_text
from twotower.index.hybrid import hybrid_rank
from twotower.index.load import load_index
from twotower.index.query import QueryOptions, check_k
from twotower.index.store import read_manifest, recorded_towers_dir
from twotower.retrieval.config import DEFAULT_MAX_K
from twotower.retrieval.doctable import DocTable
from twotower.towers.inference import TowerEncoder
from twotower.towers.model import Tower, check_query_tower, load_tower, read_towers_meta, tower_kind
from twotower.towers.onnx import onnx_copy
from twotower.towers.reranker import Reranker, check_reranker_dir
from twotower.towers.static import StaticTower

# query encoding: full precision, torch.autocast to bf16/fp16, or the float32 encoder in ONNX Runtime (CPU)
PRECISIONS = ("fp32", "bf16", "fp16", "onnx")


class ShardsFailed(RuntimeError):
    """Every shard of a sharded search failed (the message names each and why): 503, not a 500."""


class PartialRow(list):
    """One query's hits when some shards failed: the hits of the shards that answered, and ``failed``, one line
    per failed shard (the answer names them: ``failed_shards``)."""

    def __init__(self, hits: list[Hit], failed: list[str]) -> None:
        super().__init__(hits)
        self.failed = failed


@dataclass(slots=True)
class Hit:
    """One ranked result. ``rank`` starts at 1; ``score`` is the inner product (cosine for unit vectors)."""

    id: str
    score: float
    text: str
    title: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)
    rank: int = 0

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (``dataclasses.asdict`` deep-copies; this does not)."""
        return {"id": self.id, "score": self.score, "text": self.text, "title": self.title,
                "metadata": self.metadata, "rank": self.rank}


def check_retrieval_precision(precision: str) -> str:
    """``precision`` if it is one of :data:`PRECISIONS` (checked before any model loads)."""
    return check_precision(precision, PRECISIONS)


def query_dim(index: Any, tower_dim: int) -> int | None:
    """The dim queries are truncated to for ``index`` (None: the tower's own), or ValueError for a mismatch.

    An index built with ``--dim D`` (Matryoshka) records ``truncate_dim`` = D in its manifest; the query
    vectors are then cut to D and re-normalised. Any other dim difference is a different model.
    """
    dim = int(index.dim)
    truncate = (getattr(index, "manifest", None) or {}).get("truncate_dim")
    if dim == tower_dim and not truncate:
        return None
    if truncate and int(truncate) == dim and dim < tower_dim:
        return dim
    if truncate and dim > tower_dim:
        raise ValueError(f"index dim {dim} (--dim) is larger than the query tower's dim {tower_dim}: the towers "
                         f"and the index belong to different models")
    raise ValueError(f"query tower dim {tower_dim} != index dim {dim}"
                     + (f" (truncated to {truncate})" if truncate else " and the index records no truncation (--dim)")
                     + ": the towers and the index belong to different models")


def check_queries(queries: str | Sequence[str]) -> list[str]:
    """A str becomes a one-element list; every query must be a non-blank str."""
    if isinstance(queries, str):
        queries = [queries]
    if not isinstance(queries, Sequence):
        raise ValueError(f"queries must be a str or a list of str, got {type(queries).__name__}")
    for i, q in enumerate(queries):
        if not isinstance(q, str):
            raise ValueError(f"query {i} must be a str, got {type(q).__name__}")
        if is_blank(q):
            raise ValueError(f"query {i} is empty (no visible character)")
        if not is_encodable(q):
            raise ValueError(f"query {i} is not valid text: it holds a lone UTF-16 surrogate")
    return list(queries)


def is_encodable(text: str) -> bool:
    """False for strings with lone surrogates (e.g. JSON ``"\\ud800"``), which the tokenizer cannot take."""
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True



def load_query_tower(towers_dir: str | Path, meta: dict[str, Any], device: str, precision: str,
                     query_max_length: int | None = None, allow_mixed_towers: bool = False) -> Any:
    """The query tower of ``towers_dir`` (``meta``: its twotower.json) for query-time encoding: on ``device``,
    at the inference query length (``query_max_length``, else twotower.json's ``inference_query_max_length``),
    as an ONNX Runtime copy for ``precision`` onnx. The one place ``Retriever.load`` and the Ray router load it.
    Only the query tower: the result tower is what built the index and is not needed here. Its weights must be
    the ones twotower.json records for the run (``towers.model.check_query_tower``) unless ``allow_mixed_towers``."""
    check_retrieval_precision(precision)
    check_device(device)
    tower_device = "cpu" if precision == "onnx" and device == "auto" else str(resolve_device(device))
    kind = tower_kind(meta, "query")
    if precision == "onnx" and kind != "transformer":
        raise ValueError(f"precision 'onnx' speeds up a transformer; the query tower of {towers_dir} is {kind} "
                         "(a table lookup): use fp32")
    tower = load_tower(Path(towers_dir) / "query_tower", kind)
    check_query_tower(towers_dir, meta, tower, allow_mixed_towers)
    tower = tower.to(tower_device)
    tower.max_length = query_max_length or meta.get("inference_query_max_length") or tower.max_length
    if precision == "onnx":
        if tower_device != "cpu":
            raise ValueError(f"precision 'onnx' runs the query tower on the CPU; got device '{device}' "
                             "(use --device cpu, or bf16/fp16 on a GPU)")
        tower = onnx_copy(tower)
    return tower


class Retriever:
    """Query tower + loaded INDEX. Thread-safe: call ``search`` from as many threads as you like.

    Args:
        index: a ``index.load.LoadedIndex``.
        tower: the query ``towers.model.Tower`` (already on its device; wrapped in the
            ``towers.inference.TowerEncoder`` every stage encodes through), or any encoder-protocol object
            (``dim``, ``encode(texts, batch_size)``), used as is.
        towers_meta: the TOWERS dir's ``twotower.json`` (reported by ``info``).
        max_k: the cap on ``k``.
        batch_size: encode batch size for long query lists.
        precision: ``fp32``, or ``bf16``/``fp16`` autocast for the query tower; ``onnx`` for a tower made by
            ``towers.onnx.onnx_copy`` (float32).
    """

    def __init__(self, index: Any, tower: Any, towers_meta: dict[str, Any] | None = None,
                 max_k: int = DEFAULT_MAX_K, batch_size: int = 64, precision: str = "fp32") -> None:
        check_retrieval_precision(precision)
        self.truncate_dim = query_dim(index, int(tower.dim))
        self.index = index
        if isinstance(tower, (Tower, StaticTower)):
            autocast = "fp32" if precision == "onnx" else precision
            self.encoder: Any = TowerEncoder(tower, str(tower.device), autocast)
            self.tower = tower
        else:
            self.encoder = self.tower = tower
        if self.truncate_dim:  # a Matryoshka index: queries are cut to its dim and re-normalised, as its docs were
            self.encoder = TruncatedEncoder(self.encoder, self.truncate_dim)
        self.towers_meta = towers_meta or {}
        self.max_k = max_k
        self.batch_size = batch_size
        self.precision = precision
        self._rerankers: dict[str, Reranker] = {}  # RERANKER dir -> its cross-encoder, loaded on first use
        # A sharded index (retrieval.ray_serve) has no docs here: its shards return their hits themselves.
        self.docs = DocTable(index.docs) if getattr(index, "docs", None) is not None else None
        # No lock on the query path: torch inference and faiss CPU search are re-entrant for reads. The one
        # shared mutable state is the fast tokenizer's Rust-side truncation setting, which a concurrent
        # change could hit ("Already borrowed"); this tower's tokenizer is private to the retriever and
        # always called with the same settings, and this warm-up call sets them before any thread runs.
        self.encode(["warm-up"])

    @classmethod
    def load(cls, index_dir: str | Path, towers_dir: str | Path | None = None, device: str = "auto",
             max_k: int = DEFAULT_MAX_K, batch_size: int = 64, precision: str = "fp32",
             query_max_length: int | None = None, allow_mixed_towers: bool = False) -> Retriever:
        """Load an INDEX dir and the query tower of its TOWERS dir (``allow_mixed_towers``: accept a query tower
        whose weights are not the ones recorded for the run).

        Args:
            index_dir: output of ``twotower index build``.
            towers_dir: TOWERS dir; default: the one recorded in the index manifest.
            device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (query tower and, where supported, the index).
            max_k: the cap on ``k``.
            batch_size: encode batch size.
            precision: ``fp32``; ``bf16`` encodes several times faster on CPUs with AVX512-BF16/AMX and on
                GPUs (cosine error ~2e-5 vs fp32); ``fp16`` for GPUs without bf16; ``onnx``: float32 results,
                the query encoder in ONNX Runtime on the CPU (~1.5-1.8x torch fp32 there; extra ``.[onnx]``).
            query_max_length: tokens per query; default the TOWERS dir's inference length
                (``inference_query_max_length`` in twotower.json, as ``towers.inference.tower_encoder``).

        Raises:
            ValueError: the towers' fingerprint differs from the index's (vectors from another model),
                or the index records no towers dir and none was given.
        """
        check_retrieval_precision(precision)  # a bad name fails before the load
        check_device(device)
        tower_device = "cpu" if precision == "onnx" and device == "auto" else str(resolve_device(device))
        # Towers first (a moved TOWERS dir is named before anything loads), then the index.
        towers_dir = Path(towers_dir) if towers_dir is not None else recorded_towers_dir(index_dir,
                                                                                          read_manifest(index_dir))
        meta = read_towers_meta(towers_dir)
        # The index picks its own GPU path under "auto" (faiss-gpu, torch exact search, or the CPU index).
        index = load_index(index_dir, device="auto" if device == "auto" else tower_device.split(":")[0])
        fingerprint = meta.get("fingerprint")
        if not fingerprint:
            raise ValueError(f"{towers_dir / 'twotower.json'} has no fingerprint: cannot check it matches "
                             f"index '{index_dir}'")
        index.check_fingerprint(fingerprint)
        if meta.get("dim"):
            query_dim(index, int(meta["dim"]))  # a dim mismatch is named before the tower loads
        tower = load_query_tower(towers_dir, meta, device, precision, query_max_length, allow_mixed_towers)
        return cls(index, tower, towers_meta={**meta, "path": str(towers_dir)}, max_k=max_k,
                   batch_size=batch_size, precision=precision)

    def with_index(self, index: Any) -> Retriever:
        """This retriever's query encoder (shared, not reloaded) over another version of its INDEX dir: what
        ``serve`` swaps in when the dir changes. The caller checks the fingerprint."""
        if query_dim(index, int(self.tower.dim)) != self.truncate_dim:
            raise ValueError(f"index '{index.path}' has dim {index.dim} (truncated from "
                             f"{index.manifest.get('towers_dim')}: {index.manifest.get('truncate_dim')}), the index "
                             f"being served {self.dim}; restart the server for the new dim")
        new = copy.copy(self)  # no warm-up encode: the shared tokenizer may be in use by the serving thread
        new.index, new.docs = index, DocTable(index.docs)
        return new

    # ---- properties -------------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        return int(self.index.dim)

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def info(self) -> dict[str, Any]:
        """Index manifest + towers meta (no weights): what ``GET /info`` returns."""
        return {"index": self.index.manifest, "towers": self.towers_meta, "max_k": self.max_k,
                "device": str(getattr(self.encoder, "device", "cpu")), "precision": self.precision,
                "ntotal": self.ntotal, "dim": self.dim}

    # ---- query time -------------------------------------------------------------------------------
    def encode(self, queries: str | Sequence[str]) -> np.ndarray:
        """Query vectors: float32 (nq, dim), input order, L2-normalised when the tower normalises."""
        return self.encoder.encode(check_queries(queries), batch_size=self.batch_size)

    def options(self, options: QueryOptions | None = None, **fields: Any) -> QueryOptions:
        """``options`` (default: all None) with ``fields`` (QueryOptions' names, None = not given) applied, every
        None that has a default taken from the manifest's ``query_defaults`` (``index build --default-*``), and
        checked against this index.

        Raises:
            ValueError: a bad choice or number (``index.query.QueryOptionError``); ``index.filters.FilterError``
                (a ValueError) for a filter on an unknown field or with a bad operator (naming the field and the
                valid operators); a mode this index cannot serve (no BM25 side); a rescore factor for an index
                that keeps no vectors.
        """
        if fields.get("k") is not None:  # named with this retriever's cap, before QueryOptions' absolute one
            check_k(fields["k"], self.max_k)
        opts = (options or QueryOptions()).replace(**fields).resolve(self.index.manifest.get("query_defaults"))
        check_k(opts.k, self.max_k)
        self.check_rescore(opts.rescore)
        if opts.mode != "dense":
            _ = self.index.bm25  # raises when the index has no BM25 side
        self.index.allowed(opts.filter)  # raises on a bad filter
        if opts.rerank and not opts.reranker:
            raise ValueError(f"rerank {opts.rerank} needs a reranker: give --reranker DIR (or index build "
                             f"--default-reranker DIR)")
        if opts.rerank and opts.reranker not in self._rerankers:
            check_reranker_dir(opts.reranker)  # a dir that does not fit is refused before it loads
        return opts

    def search(self, queries: str | Sequence[str], k: int | None = None, options: QueryOptions | None = None,
               **fields: Any) -> list[list[Hit]]:
        """Top-``k`` hits per query (one encode + one faiss search for all of them).

        Args:
            queries: one query or a list; a str gives a one-element result list.
            k: hits per query, 1..``max_k`` (None: ``options.k``, 10 by default).
            options: how to rank (``index.query.QueryOptions``: mode dense | bm25 | hybrid, fusion, alpha, norm,
                depth, filter, rescore, nprobe); a None field takes the index manifest's default.
            fields: keyword shortcuts for the same fields, e.g. ``search(qs, k=5, mode="hybrid",
                filter={"package": "numpy"})`` (see ``index.filters`` for the filter operators).

        Returns:
            One list of ``Hit`` per query, best first (fewer than k when fewer docs match). ``score`` is the
            cosine (dense), the BM25 score (bm25) or the fused score (hybrid).
        """
        queries = check_queries(queries)
        opts = self.options(options, k=k, **fields)
        if not queries:
            return []
        xq = self.encode(queries) if opts.mode != "bm25" else None
        return self.search_encoded(queries, xq, opts)

    def search_encoded(self, queries: Sequence[str], xq: np.ndarray | None, opts: QueryOptions) -> list[list[Hit]]:
        """Hits for checked ``queries`` whose vectors ``xq`` (nq, dim) are already encoded (None for bm25 mode),
        under resolved ``opts`` (:meth:`options`): the one search path of ``search`` and the micro-batcher."""
        if not (opts.rerank and opts.reranker and queries):
            return self.hits_from(*self.rank(queries, xq, opts))
        D, I = self.rank(queries, xq, dataclasses.replace(opts, k=min(max(opts.k, opts.rerank), self.ntotal)))
        return self.hits_from(*self.rerank(queries, D, I, opts))

    def reranker(self, path: str) -> Reranker:
        """The cross-encoder of a RERANKER dir, loaded once (checked first) on the query tower's device."""
        if path not in self._rerankers:
            device = str(getattr(self.encoder, "device", "cpu"))
            self._rerankers[path] = Reranker.load(path, device)
        return self._rerankers[path]

    def rerank(self, queries: Sequence[str], D: np.ndarray, I: np.ndarray, opts: QueryOptions
               ) -> tuple[np.ndarray, np.ndarray]:
        """The first ``opts.rerank`` candidates of each row of ``(D, I)`` (nq, m) reordered by ``opts.reranker``
        (their scores become its logits), cut to ``opts.k``; one batched scoring for all queries."""
        assert opts.reranker is not None and opts.rerank, "rerank only with a reranker and a count"
        n = min(opts.rerank, I.shape[1])
        heads = [[int(j) for j in row[:n] if j >= 0] for row in I]
        rows = np.array([j for h in heads for j in h], dtype=np.int64)
        texts = self.docs.take(rows, ("text", "title"))
        doc_texts = [doc_text(t or "", x or "") for t, x in zip(texts["title"], texts["text"])]  # as indexed
        at, candidates = 0, []
        for h in heads:
            candidates.append(doc_texts[at:at + len(h)])
            at += len(h)
        ranked = self.reranker(opts.reranker).rerank(queries, candidates, self.batch_size)
        D, I = D.copy(), I.copy()
        for q, (h, (order, scores)) in enumerate(zip(heads, ranked)):
            I[q, :len(h)] = np.asarray(h, dtype=np.int64)[order]
            D[q, :len(h)] = scores
        return D[:, :opts.k], I[:, :opts.k]

    def rank(self, queries: Sequence[str], xq: np.ndarray | None, opts: QueryOptions
             ) -> tuple[np.ndarray, np.ndarray]:
        """faiss-style ``(D, I)`` (nq, k) of a search under resolved ``opts`` (see :meth:`search`)."""
        allowed = self.index.allowed(opts.filter)

        def dense(n: int) -> tuple[np.ndarray, np.ndarray]:
            return self.index.search(np.ascontiguousarray(xq), n, nprobe=opts.nprobe, allowed=allowed,
                                     rescore=opts.rescore)

        def bm25(n: int) -> tuple[np.ndarray, np.ndarray]:
            return self.index.bm25.search(queries, n, allowed=allowed, excluded=self.index.removed)

        if opts.mode == "dense":
            return dense(opts.k)
        if opts.mode == "bm25":
            return bm25(opts.k)
        return hybrid_rank(dense, bm25, opts.k, self.ntotal, opts)

    def check_rescore(self, rescore: int | None) -> int | None:
        """``rescore`` (already range-checked by QueryOptions) or None; > 0 needs an index that keeps its
        vectors."""
        return None if rescore is None else self.index.check_rescore(int(rescore))

    def search_vectors(self, xq: np.ndarray, k: int | None = None, options: QueryOptions | None = None,
                       **fields: Any) -> list[list[Hit]]:
        """Dense hits for query vectors ``xq`` float32 (nq, dim) (or (dim,) for one query; already truncated to
        the index's dim for a Matryoshka index), under ``options`` / ``fields`` as :meth:`search` (the mode is
        dense: there is no text)."""
        if k is not None:
            check_k(k, self.max_k)
        opts = self.options((options or QueryOptions()).replace(k=k, **fields).replace(mode="dense"))
        xq = np.asarray(xq, dtype=np.float32)
        if xq.ndim == 1:
            xq = xq[None, :]
        if xq.ndim != 2 or xq.shape[1] != self.dim:
            raise ValueError(f"xq must have shape (nq, {self.dim}), got {tuple(xq.shape)}")
        if xq.shape[0] == 0:
            return []
        return self.search_encoded([], np.ascontiguousarray(xq), opts)

    def hits_from(self, D: np.ndarray, I: np.ndarray) -> list[list[Hit]]:
        """Turn faiss output (D float32 (nq, k), I int64 (nq, k), -1 = none) into ``Hit`` lists."""
        return hits_from(self.docs, D, I)


def hits_from(docs: DocTable, D: np.ndarray, I: np.ndarray) -> list[list[Hit]]:
    """``Hit`` lists from faiss output (D float32 (nq, k), I int64 (nq, k) rows of ``docs``, -1 = none)."""
    nq, k = I.shape
    valid = I >= 0
    if valid.all():  # every slot filled (the usual case): no masking, ranks repeat 1..k
        rows, scores, ranks, counts = I.ravel(), D.ravel().tolist(), list(range(1, k + 1)) * nq, [k] * nq
    else:
        rows, scores = I[valid], D[valid].tolist()
        ranks = np.cumsum(valid, axis=1)[valid].tolist()  # 1-based rank of each hit within its query
        counts = valid.sum(1).tolist()
    cols = docs.take(rows)  # one batched take for every hit of every query
    # Metadata is stored as JSON text; the common empty case costs no parse (and a fresh dict per hit).
    hits = [Hit(i, s, t, ti or "", {} if not m or m == "{}" else json.loads(m), r)
            for i, s, t, ti, m, r in zip(cols["id"], scores, cols["text"], cols["title"], cols["metadata"], ranks)]
    out: list[list[Hit]] = []
    start = 0
    for n in counts:
        out.append(hits[start: start + n])
        start += n
    return out
