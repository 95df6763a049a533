"""Fusing two ranked lists (dense towers + BM25) into one: array in, array out, faiss-style ``(D, I)``.

- ``rrf``: reciprocal rank fusion (Cormack, Clarke & Buettcher, SIGIR 2009): ``score(d) = sum over lists of
  1 / (rrf_k + rank(d))``, rank from 1, ``rrf_k = 60``; a doc missing from a list gets nothing from it. Scores
  are ignored, so the two sides need no common scale (sentence-transformers' ``reciprocal_rank_fusion``).
- ``weighted``: convex combination ``alpha * dense + (1 - alpha) * bm25`` of per-query normalised scores
  (``minmax`` to [0, 1], or ``zscore``); a doc missing from one list gets that list's lowest normalised score
  of the query (0 for minmax). ``alpha = 1`` is dense only, ``0`` BM25 only.

Both take each side's top ``k * depth`` candidates (``-1`` = empty slot) and return the top ``k``; ties go to
the smaller row, so the result is deterministic. :func:`hybrid_rank` is that rule, the one the Retriever and
``twotower bench`` both run.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from twotower.index.query import FUSIONS, NORMS, check_choice

if TYPE_CHECKING:
    from twotower.index.query import QueryOptions

Ranking = tuple[np.ndarray, np.ndarray]  # faiss-style (D, I), best first, -1 = empty slot

RRF_K = 60


def normalise(D: np.ndarray, I: np.ndarray, norm: str) -> np.ndarray:
    """Per-query normalised scores of the valid slots (``I >= 0``); invalid slots come back as NaN."""
    check_choice("norm", norm, NORMS)
    valid = I >= 0
    x = np.where(valid, D.astype(np.float64), np.nan)
    with np.errstate(all="ignore"):
        if norm == "minmax":
            lo, hi = np.nanmin(x, 1, keepdims=True), np.nanmax(x, 1, keepdims=True)
            span = hi - lo
            out = np.where(span > 0, (x - lo) / np.where(span > 0, span, 1.0), 1.0)  # one distinct score: all 1
        else:
            mu, sd = np.nanmean(x, 1, keepdims=True), np.nanstd(x, 1, keepdims=True)
            out = np.where(sd > 0, (x - mu) / np.where(sd > 0, sd, 1.0), 0.0)
    return np.where(valid, out, np.nan)


def fuse(lists: list[tuple[np.ndarray, np.ndarray]], k: int, fusion: str = "rrf", weights: list[float] | None = None,
         norm: str = "minmax", rrf_k: int = RRF_K) -> tuple[np.ndarray, np.ndarray]:
    """Fuse ranked lists ``[(D1, I1), (D2, I2), ...]`` (each (nq, n_i), best first) into the top ``k``.

    Args:
        fusion: ``rrf`` or ``weighted``; weights: one per list for ``weighted`` (default equal).
        norm: ``minmax`` | ``zscore`` (``weighted`` only).

    Returns:
        D float32 (nq, k) fused scores (descending), I int64 (nq, k) rows, ``-1`` where fewer than k rows.
    """
    check_choice("fusion", fusion, FUSIONS)
    nq = lists[0][1].shape[0]
    weights = weights if weights is not None else [1.0 / len(lists)] * len(lists)
    prepared = []
    for (D, I), w in zip(lists, weights):
        I = np.asarray(I, np.int64)
        if fusion == "rrf":
            s = 1.0 / (rrf_k + np.arange(1, I.shape[1] + 1, dtype=np.float64))[None, :].repeat(nq, 0)
            floor = np.zeros((nq, 1))
        else:
            s = normalise(np.asarray(D), I, norm)
            floor = np.nan_to_num(np.nanmin(np.where(I >= 0, s, np.inf), 1, keepdims=True), posinf=0.0) if \
                I.size else np.zeros((nq, 1))
        prepared.append((I, s, floor, float(w)))
    Do = np.zeros((nq, k), np.float32)
    Io = np.full((nq, k), -1, np.int64)
    for q in range(nq):
        rows = np.unique(np.concatenate([I[q][I[q] >= 0] for I, _, _, _ in prepared]))
        if not len(rows):
            continue
        total = np.zeros(len(rows))
        for I, s, floor, w in prepared:
            valid = I[q] >= 0
            got = np.full(len(rows), floor[q, 0] if fusion == "weighted" else 0.0)
            pos = np.searchsorted(rows, I[q][valid])
            got[pos] = s[q][valid]  # a row listed twice keeps its last (worse) slot; lists never repeat rows
            total += (w if fusion == "weighted" else 1.0) * got
        order = np.lexsort((rows, -total))[:k]
        Do[q, :len(order)], Io[q, :len(order)] = total[order], rows[order]
    return Do, Io


def candidates_per_side(k: int, depth: int, ntotal: int) -> int:
    """How many candidates each side of a hybrid search fetches: ``k * depth``, at most the corpus."""
    return min(k * depth, max(ntotal, 1))


def hybrid_rank(dense: Callable[[int], Ranking], bm25: Callable[[int], Ranking], k: int, ntotal: int,
                opts: QueryOptions) -> Ranking:
    """Hybrid ranking: fetch ``k * opts.depth`` candidates per side, then fuse them into the top ``k``.

    Args:
        dense, bm25: ``n -> (D, I)``, each side's top ``n`` (the index's searches, or the bench's cached runs).
        ntotal: docs in the corpus (caps the candidates).
        opts: resolved :class:`~twotower.index.query.QueryOptions` (fusion, alpha, norm, depth).
    """
    n = candidates_per_side(k, opts.depth, ntotal)
    bm25_side = bm25(n)
    return fuse([dense(n), bm25_side], k, opts.fusion, [opts.alpha, 1.0 - opts.alpha], opts.norm)
