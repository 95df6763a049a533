"""Synthetic normalised vectors with realistic structure, for tests and ``scripts/bench_index.py``.

Uniform random vectors in 384 dims are unrealistically hard for ANN search (every point is nearly equally
far from every other). Text embeddings have a low intrinsic dimension and form topical clusters, so these
vectors are drawn from a Gaussian mixture in a ``latent``-dim space, mapped to ``d`` dims by a fixed random
linear map, plus a little isotropic noise, then L2-normalised (the faiss ``SyntheticDataset`` idea).
"""
from __future__ import annotations

import hashlib

import numpy as np

from twotower.common.metrics import recall_at_k


def clustered_vectors(n: int, d: int, n_clusters: int = 100, latent: int = 32, spread: float = 0.6,
                      noise: float = 0.05, seed: int = 0, chunk: int = 262_144) -> np.ndarray:
    """``n`` unit vectors (n, d) float32, deterministic for a given (n, d, ..., seed).

    Args:
        n_clusters: topics; each point is ``center + spread * N(0, I)`` in the latent space.
        latent: intrinsic dimension (the random map lifts it to ``d``).
        noise: isotropic noise added in ``d`` dims (relative to a unit vector).
    """
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((n_clusters, latent)).astype(np.float32)
    lift = (rng.standard_normal((latent, d)) / np.sqrt(latent)).astype(np.float32)
    out = np.empty((n, d), np.float32)
    for start in range(0, n, chunk):  # bounded temporaries for n in the millions
        m = min(chunk, n - start)
        z = centers[rng.integers(0, n_clusters, m)] + spread * rng.standard_normal((m, latent), dtype=np.float32)
        x = z @ lift  # (m, d)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        x += (noise / np.sqrt(d)) * rng.standard_normal((m, d), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        out[start : start + m] = x
    return out


def brute_force(xb: np.ndarray, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-k with numpy: D (nq, k) descending, I (nq, k) — the ground truth."""
    scores = xq @ xb.T  # (nq, n)
    k = min(k, xb.shape[0])
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(scores, part, 1), axis=1, kind="stable")
    I = np.take_along_axis(part, order, 1).astype(np.int64)
    return np.take_along_axis(scores, I, 1), I


def ann_recall(I: np.ndarray, gt: np.ndarray, k: int) -> float:
    """recall@k of ``I`` against exact top-k ids ``gt`` (the faiss benchmark "k-recall@k")."""
    return recall_at_k(I, [{int(j): 1.0 for j in row[:k] if j >= 0} for row in gt], k)


class TableEncoder:
    """A fake Encoder for tests and benchmarks: the text ``"... <i>"`` encodes to ``table[i]``.

    It makes index tests exact (the vectors are known) where the model is irrelevant, and can be told to
    fail after ``fail_after`` texts to simulate a build killed half way.
    """

    def __init__(self, table: np.ndarray, fail_after: int | None = None) -> None:
        self.table = np.asarray(table, np.float32)
        self.dim = int(self.table.shape[1])
        self.fail_after = fail_after
        self.encoded: list[str] = []  # every text seen, in call order

    def encode(self, texts: list[str], batch_size: int = 64, show_progress: bool = False) -> np.ndarray:
        if self.fail_after is not None and len(self.encoded) + len(texts) > self.fail_after:
            raise RuntimeError(f"TableEncoder: simulated crash after {len(self.encoded)} texts")
        self.encoded += list(texts)
        return self.table[[int(t.rsplit(" ", 1)[-1]) for t in texts]]

    def fingerprint(self) -> str:
        return hashlib.sha256(self.table.tobytes()).hexdigest()[:16]
