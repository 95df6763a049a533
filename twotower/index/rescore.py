"""Exact re-scoring of compact-index candidates with float vectors kept on disk (``vectors.npy``).

A compact index (IVF-PQ, SQ8/SQ4, HNSW-SQ, sign bits) finds ``k * N`` candidates per query from codes that fit
in RAM; their float vectors, memory-mapped from ``vectors.npy`` (float32 or float16, ``np.load(mmap_mode='r')``,
never pickled), give each candidate its exact inner product, and the best ``k`` of those are returned: faiss
``IndexRefineFlat``, sentence-transformers ``semantic_search_faiss(rescore=True, rescore_multiplier=N)``, Qdrant
oversampling. Only the candidate rows are read, so RAM holds the codes and the OS page cache what it likes.
When ``k * N`` covers every live doc the result is exact search (the test of this module).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

VECTOR_DTYPES = ("float32", "float16")
QUERY_BLOCK = 256  # most queries re-scored at once
GATHER_FLOATS = 1 << 22  # and at most this many floats (16 MiB) in the gathered (block, k*N, d) candidates


def open_vectors(path: str | Path, n: int, d: int) -> np.ndarray:
    """``vectors.npy`` memory-mapped read-only, checked to be (n, d) float32/float16.

    Raises:
        ValueError: naming the file, when its shape or dtype disagrees (or it is no .npy file).
    """
    try:
        vectors = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as exc:
        raise ValueError(f"{path}: not a readable .npy array ({exc}); rebuild the index") from None
    if vectors.shape != (n, d) or vectors.dtype.name not in VECTOR_DTYPES:
        raise ValueError(f"{path}: holds {vectors.dtype.name} {vectors.shape}, expected float32 or float16 "
                         f"({n}, {d}) (one row per index row); rebuild the index")
    return vectors


def rescore(xq: np.ndarray, I: np.ndarray, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Re-rank candidate ids by their exact inner product with the queries.

    Args:
        xq: queries float32 (nq, d).
        I: candidate ids int64 (nq, kk), -1 = no candidate (kk >= k usually; duplicates are not expected).
        vectors: (n, d) float32/float16, row i = doc row i (a memmap: only candidate rows are read).
        k: results per query.

    Returns:
        D float32 (nq, k) exact scores (descending), I int64 (nq, k); -inf / -1 where fewer than k candidates.
    """
    nq, kk = I.shape
    Do = np.full((nq, k), -np.inf, np.float32)
    Io = np.full((nq, k), -1, np.int64)
    if nq == 0 or kk == 0:
        return Do, Io
    step = max(1, min(QUERY_BLOCK, GATHER_FLOATS // (kk * xq.shape[1])))
    for start in range(0, nq, step):
        block = I[start : start + step]  # (b, kk)
        valid = block >= 0
        rows, inverse = np.unique(block[valid], return_inverse=True)  # sorted: the memmap reads in file order
        gathered = np.asarray(vectors[rows], dtype=np.float32)  # (u, d)
        pos = np.zeros(block.shape, np.int64)
        pos[valid] = inverse
        cand = gathered[pos] if len(rows) else np.zeros((*block.shape, xq.shape[1]), np.float32)  # (b, kk, d)
        scores = np.matmul(cand, xq[start : start + step, :, None])[..., 0]  # (b, kk, d) @ (b, d, 1) -> (b, kk)
        scores[~valid] = -np.inf
        top = min(k, kk)
        part = (np.argpartition(-scores, top - 1, axis=1)[:, :top] if top < kk
                else np.tile(np.arange(kk), (len(block), 1)))
        part_scores = np.take_along_axis(scores, part, 1)
        order = np.argsort(-part_scores, axis=1, kind="stable")
        best = np.take_along_axis(part, order, 1)  # (b, top)
        D = np.take_along_axis(scores, best, 1)
        ids = np.take_along_axis(block, best, 1)
        ids[~np.isfinite(D)] = -1
        Do[start : start + len(block), :top] = D
        Io[start : start + len(block), :top] = ids
    return Do, Io
