"""Retrieval metrics as pure numpy functions (faiss ``benchs`` style: ranked ids in, numbers out).

Every function takes ``I`` (nq, k) ranked doc indices (``-1`` = no result, as faiss returns) and
``relevant``: per query a ``dict[int, float]`` of relevant doc index -> graded relevance (> 0 counts as
relevant). Several relevant docs per query are supported. Conventions follow ``pytrec_eval``/TREC
(``recall_k`` = relevant found in top-k / all relevant; ``ndcg_cut`` with exponential-free linear gains
``rel / log2(rank + 1)``; ``map_cut``; ``recip_rank`` cut at k). Queries with no relevant doc are skipped.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

Qrels = Sequence[Mapping[int, float]]


def _check(I: np.ndarray, relevant: Qrels) -> None:
    if I.ndim != 2:
        raise ValueError(f"I must be (nq, k), got shape {I.shape}")
    if len(relevant) != I.shape[0]:
        raise ValueError(f"{len(relevant)} qrels rows for {I.shape[0]} queries")


def _hits(I: np.ndarray, relevant: Qrels, k: int) -> np.ndarray:
    """(nq, k) float matrix of graded relevance of each ranked doc (0 where not relevant)."""
    k = min(k, I.shape[1])
    out = np.zeros((I.shape[0], k), dtype=np.float64)
    for q, rel in enumerate(relevant):
        for r, doc in enumerate(I[q, :k]):
            out[q, r] = max(rel.get(int(doc), 0.0), 0.0) if doc >= 0 else 0.0
    return out


def _valid(relevant: Qrels) -> np.ndarray:
    return np.array([any(v > 0 for v in rel.values()) for rel in relevant], dtype=bool)


def recall_at_k(I: np.ndarray, relevant: Qrels, k: int) -> float:
    """Mean over queries of (#relevant in top k) / (#relevant)."""
    _check(I, relevant)
    hits = _hits(I, relevant, k) > 0
    n_rel = np.array([sum(1 for v in rel.values() if v > 0) for rel in relevant], dtype=np.float64)
    valid = n_rel > 0
    if not valid.any():
        return 0.0
    return float((hits.sum(1)[valid] / n_rel[valid]).mean())


def mrr_at_k(I: np.ndarray, relevant: Qrels, k: int = 10) -> float:
    """Mean reciprocal rank of the first relevant doc within the top k (0 if none)."""
    _check(I, relevant)
    hits = _hits(I, relevant, k) > 0
    first = np.where(hits.any(1), hits.argmax(1) + 1, np.inf)
    valid = _valid(relevant)
    return float((1.0 / first)[valid].mean()) if valid.any() else 0.0


def ndcg_at_k(I: np.ndarray, relevant: Qrels, k: int = 10) -> float:
    """nDCG@k with linear gains (trec_eval ``ndcg_cut``)."""
    _check(I, relevant)
    gains = _hits(I, relevant, k)
    discounts = 1.0 / np.log2(np.arange(2, gains.shape[1] + 2))
    dcg = (gains * discounts).sum(1)
    idcg = np.zeros(len(relevant))
    for q, rel in enumerate(relevant):
        ideal = sorted((v for v in rel.values() if v > 0), reverse=True)[:k]
        idcg[q] = sum(g / np.log2(r + 2) for r, g in enumerate(ideal))
    valid = idcg > 0
    return float((dcg[valid] / idcg[valid]).mean()) if valid.any() else 0.0


def map_at_k(I: np.ndarray, relevant: Qrels, k: int = 100) -> float:
    """Mean average precision cut at k (trec_eval ``map_cut``: divide by all relevant docs)."""
    _check(I, relevant)
    hits = _hits(I, relevant, k) > 0
    precision = np.cumsum(hits, 1) / np.arange(1, hits.shape[1] + 1)
    n_rel = np.array([sum(1 for v in rel.values() if v > 0) for rel in relevant], dtype=np.float64)
    valid = n_rel > 0
    ap = (precision * hits).sum(1)[valid] / n_rel[valid]
    return float(ap.mean()) if valid.any() else 0.0


def recall_curve(I: np.ndarray, relevant: Qrels, k_max: int = 100) -> np.ndarray:
    """recall@k for every k = 1..k_max in one pass (for recall@k plots).

    Returns:
        float64 (k_max,), entry k-1 = ``recall_at_k(I, relevant, k)``; flat beyond ``I.shape[1]``.
    """
    _check(I, relevant)
    hits = _hits(I, relevant, k_max) > 0  # (nq, min(k_max, k))
    n_rel = np.array([sum(1 for v in rel.values() if v > 0) for rel in relevant], dtype=np.float64)
    valid = n_rel > 0
    curve = np.zeros(k_max)
    if valid.any():
        found = np.cumsum(hits, 1)[valid] / n_rel[valid, None]  # (nv, k)
        curve[: found.shape[1]] = found.mean(0)
        curve[found.shape[1]:] = curve[found.shape[1] - 1] if found.shape[1] else 0.0
    return curve


RECALL_KS = (1, 5, 10, 20, 100)


def evaluate(I: np.ndarray, relevant: Qrels, recall_ks: Sequence[int] = RECALL_KS) -> dict[str, float]:
    """All report metrics: recall@{1,5,10,20,100}, MRR@10, nDCG@10, MAP@100."""
    out = {f"recall@{k}": recall_at_k(I, relevant, k) for k in recall_ks}
    out["mrr@10"] = mrr_at_k(I, relevant, 10)
    out["ndcg@10"] = ndcg_at_k(I, relevant, 10)
    out["map@100"] = map_at_k(I, relevant, 100)
    return out
