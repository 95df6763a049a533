"""Binary codes: one sign bit per dimension, searched by Hamming distance (faiss ``IndexBinaryFlat`` /
``IndexBinaryIVF``), 32x smaller than float32. Meant to be re-scored with the float vectors (``index.rescore``).

``BinarySignIndex`` wraps a faiss binary index behind the float interface the rest of ``index/`` uses
(``d``, ``ntotal``, ``is_trained``, ``train(xt)``, ``add(xb)``, ``search(xq, k)`` on float32 (n, d) arrays),
so build, add, merge and load need no binary branch. Factory strings are faiss's binary ones: ``BFlat``,
``BIVF{nlist}`` (d must be a multiple of 8). Scores are the SimHash estimate of the cosine,
``cos(pi * hamming / d)`` (Charikar 2002), so they sort like inner products; re-scoring replaces them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import faiss
import numpy as np

from twotower.index.topk import first_kept

BINARY_PREFIX = "B"  # faiss binary factory strings: BFlat, BIVF1024, BHNSW32, ...
BINARY_FOURCC = b"IB"  # the first bytes of every faiss binary index file (IBxF flat, IBwF IVF, IBHf HNSW)


def is_binary_factory(factory: str) -> bool:
    return factory.startswith(BINARY_PREFIX)


def pack_signs(x: np.ndarray) -> np.ndarray:
    """float (n, d) -> uint8 (n, d / 8): bit j of row i is ``x[i, j] > 0`` (sentence-transformers' ubinary)."""
    return np.packbits(np.asarray(x) > 0, axis=-1)


class BinarySignIndex:
    """A faiss binary index over the sign bits of float vectors, with the float index's interface."""

    def __init__(self, index: Any) -> None:
        self._owner = index  # the proxy that owns the C++ object: a downcast copy alone would leave it freed
        self.index = faiss.downcast_IndexBinary(index)
        self.d = int(self.index.d)  # bits = float dims

    @classmethod
    def from_factory(cls, factory: str, d: int) -> BinarySignIndex:
        if d % 8:
            raise ValueError(f"binary factory '{factory}' needs a dim that is a multiple of 8, got {d}")
        try:
            return cls(faiss.index_binary_factory(int(d), factory))
        except RuntimeError:
            raise ValueError(f"faiss rejected binary factory string '{factory}' for dim {d}; examples: BFlat, "
                             f"BIVF1024") from None

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    @property
    def is_trained(self) -> bool:
        return bool(self.index.is_trained)

    @property
    def nlist(self) -> int | None:
        return int(self.index.nlist) if isinstance(self.index, faiss.IndexBinaryIVF) else None

    def train(self, xt: np.ndarray) -> None:
        self.index.train(pack_signs(xt))

    def add(self, xb: np.ndarray) -> None:
        self.index.add(pack_signs(xb))

    def search(self, xq: np.ndarray, k: int, nprobe: int | None = None,
               excluded: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` by Hamming distance of the sign bits, ``excluded`` ids dropped.

        Returns:
            D float32 (nq, k) estimated cosines (-inf where fewer than k), I int64 (nq, k) (-1 there).
        """
        codes = pack_signs(xq)
        excluded = np.empty(0, np.int64) if excluded is None else excluded
        kk = int(min(max(self.ntotal, 1), k + len(excluded)))
        params = faiss.SearchParametersIVF(nprobe=int(nprobe)) if nprobe and self.nlist else None
        # faiss's binary IVF takes no IDSelector: fetch enough extra rows to drop the tombstones afterwards
        Dh, I = self.index.search(codes, kk, params=params) if params is not None else self.index.search(codes, kk)
        D = np.cos(np.pi * Dh.astype(np.float32) / self.d).astype(np.float32)
        if not len(excluded) and kk == k:
            return D, I
        keep = (I >= 0) & ~np.isin(I, excluded)
        return first_kept(D, I, keep, k)

    def write(self, path: str | Path) -> None:
        faiss.write_index_binary(self.index, str(path))

    def serialize(self) -> bytes:
        return faiss.serialize_index_binary(self.index).tobytes()


def is_binary_file(path: str | Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(2) == BINARY_FOURCC


def read_binary(path: str | Path) -> BinarySignIndex:
    return BinarySignIndex(faiss.read_index_binary(str(path)))
