"""The bench system ``towers+rerank[:LABEL]=TOWERS:RERANKER[:N]``: the towers' exact top N of each query, reordered
by a cross-encoder (a RERANKER dir from ``twotower train-reranker``); ranks past N keep the towers' order.

The towers' vectors are shared with a plain ``towers=`` system over the same dir (encoded once per bench), so the
``towers`` and ``towers+rerank`` rows differ only by the second stage. The timing records the reranker's seconds
and its milliseconds per query (all of a bench's pairs are scored in batches; ``scripts/bench_rerank.py`` measures
the per-request latency a search adds).
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from twotower.towers.reranker import Reranker, check_reranker_dir

DEFAULT_RERANK = 20  # candidates reranked per query when the spec gives no N (the search default)
CHUNK = 64  # queries per progress step


def parse_rerank_value(part: str, value: str | None) -> tuple[str, str, int]:
    """``TOWERS:RERANKER[:N]`` -> (towers dir, reranker dir, N)."""
    pieces = (value or "").split(":")
    n = DEFAULT_RERANK
    if len(pieces) == 3 and pieces[2].strip().isdigit():
        n = int(pieces[2])
        pieces = pieces[:2]
    if len(pieces) != 2 or not all(p.strip() for p in pieces):
        raise ValueError(f"'{part}': towers+rerank needs TOWERS:RERANKER[:N], e.g. "
                         f"towers+rerank=runs/demo/towers:runs/demo/reranker:20")
    if n < 1:
        raise ValueError(f"'{part}': the number of candidates to rerank must be >= 1, got {n}")
    return pieces[0].strip(), pieces[1].strip(), n


class RerankSystem:
    """A :class:`~eval.systems.TowersSystem` and a cross-encoder over its top ``rerank`` candidates."""

    dense = True
    rerank = True

    def __init__(self, label: str, towers: Any, reranker: str, rerank: int, device: str = "cpu") -> None:
        self.label, self.inner, self.n, self.device = label, towers, rerank, device
        self.path = Path(reranker)
        self.max_length = check_reranker_dir(self.path)  # a dir that does not fit fails before anything loads
        self._model: Reranker | None = None

    @property
    def rows(self) -> list[str]:
        return [self.label]

    @property
    def dense_key(self) -> tuple[str, str]:
        return self.inner.dense_key

    @property
    def model(self) -> Reranker:
        if self._model is None:
            self._model = Reranker.load(self.path, self.device)
        return self._model

    def encode_queries(self, texts: Sequence[str], batch_size: int, show_progress: bool) -> dict[str, np.ndarray]:
        return {self.label: self.inner.encode_queries(texts, batch_size, show_progress)[self.inner.label]}

    def encode_docs(self, texts: Sequence[str], batch_size: int, show_progress: bool) -> dict[str, np.ndarray]:
        return {self.label: self.inner.encode_docs(texts, batch_size, show_progress)[self.inner.label]}

    def rerank_ids(self, queries: Sequence[str], docs: Sequence[str], I: np.ndarray, batch_size: int,
                   show_progress: bool) -> tuple[np.ndarray, float]:
        """(nq, k) ids with each row's first N reordered by the cross-encoder (-1 padding stays last); seconds."""
        n = min(self.n, I.shape[1])
        out = I.copy()
        model = self.model
        t0 = time.perf_counter()
        for start in tqdm(range(0, len(queries), CHUNK), desc=f"rerank top-{n}", unit="chunk",
                          disable=not show_progress):
            rows = range(start, min(start + CHUNK, len(queries)))
            heads = [[int(j) for j in I[q, :n] if j >= 0] for q in rows]
            ranked = model.rerank([queries[q] for q in rows], [[docs[j] for j in h] for h in heads], batch_size)
            for q, head, (order, _) in zip(rows, heads, ranked):
                out[q, :len(head)] = np.asarray(head)[order]
        return out, time.perf_counter() - t0

    def config(self) -> dict[str, dict[str, Any]]:
        inner = next(iter(self.inner.config().values()))
        meta = self._model.meta if self._model is not None else {}
        return {self.label: {"kind": "towers+rerank", "towers": f"{inner['path']} ({inner.get('fingerprint')})",
                             "reranker": str(self.path), "rerank": self.n, "max_length": self.max_length,
                             "reranker_fingerprint": meta.get("fingerprint"), "reranker_base": meta.get("base")}}
