"""Post-filtering of faiss results: keep each query's first ``k`` hits that pass a mask.

Used wherever faiss cannot filter inside the search (tombstones on binary indexes, filters on GPU clones and
index classes without ``IDSelector`` support): the search over-fetches, then this compacts the kept hits.
"""
from __future__ import annotations

import numpy as np


def first_kept(D: np.ndarray, I: np.ndarray, keep: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``k`` hits per row of ``(D, I)`` (nq, kk) where ``keep`` (bool (nq, kk)) is set, in order;
    rows with fewer are padded with ``-inf`` / ``-1`` as faiss pads."""
    Do = np.full((len(D), k), -np.inf, np.float32)
    Io = np.full((len(D), k), -1, np.int64)
    for q in range(len(D)):
        row = np.flatnonzero(keep[q])[:k]
        Do[q, : len(row)], Io[q, : len(row)] = D[q, row], I[q, row]
    return Do, Io
