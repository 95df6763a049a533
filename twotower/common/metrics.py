"""Retrieval metrics as pure numpy functions (faiss ``benchs`` style: ranked ids in, numbers out).

Every function takes ``I`` (nq, k) ranked doc indices (``-1`` = no result, as faiss returns) and
``relevant``: per query a ``dict[int, float]`` of relevant doc index -> graded relevance (> 0 counts as
relevant). Several relevant docs per query are supported. Conventions follow ``pytrec_eval``/TREC
(``recall_k`` = relevant found in top-k / all relevant; ``ndcg_cut`` with exponential-free linear gains
``rel / log2(rank + 1)``; ``map_cut``; ``recip_rank`` cut at k). Queries with no relevant doc are skipped.

One computation serves every caller: :func:`per_query` gives each metric per query (the bench keeps these for
its confidence intervals), and the means (:func:`evaluate`, :func:`recall_at_k`, ...) are taken from it.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

Qrels = Sequence[Mapping[int, float]]

RECALL_KS = (1, 5, 10, 20, 100)
# Every metric a report may show, in report order; a bench reports those whose cut-off <= its k_max.
REPORT_METRICS = (*(f"recall@{k}" for k in RECALL_KS), "mrr@10", "ndcg@10", "map@100")
KINDS = ("recall", "mrr", "ndcg", "map")


def _check(I: np.ndarray, relevant: Qrels) -> None:
    if I.ndim != 2:
        raise ValueError(f"I must be (nq, k), got shape {I.shape}")
    if len(relevant) != I.shape[0]:
        raise ValueError(f"{len(relevant)} qrels rows for {I.shape[0]} queries")


def parse_metric(name: str) -> tuple[str, int]:
    """``"ndcg@10"`` -> ``("ndcg", 10)``; a ValueError names the valid forms."""
    kind, _, k = name.partition("@")
    if kind not in KINDS or not k.isdigit() or int(k) < 1:
        raise ValueError(f"unknown metric '{name}': write {'|'.join(KINDS)}@K with K >= 1, e.g. ndcg@10")
    return kind, int(k)


def metric_names(k_max: int) -> list[str]:
    """The report metrics a run of ``k_max`` results per query can compute (cut-off <= k_max)."""
    return [m for m in REPORT_METRICS if parse_metric(m)[1] <= k_max]


def positive_mask(relevant: Qrels) -> np.ndarray:
    """(nq,) bool: the queries with at least one relevant doc (grade > 0); the others have no metric."""
    return np.array([any(v > 0 for v in rel.values()) for rel in relevant], dtype=bool)


def _hits(I: np.ndarray, relevant: Qrels, k: int) -> np.ndarray:
    """(nq, k) float matrix of graded relevance of each ranked doc (0 where not relevant)."""
    k = min(k, I.shape[1])
    out = np.zeros((I.shape[0], k), dtype=np.float64)
    for q, rel in enumerate(relevant):
        for r, doc in enumerate(I[q, :k]):
            out[q, r] = max(rel.get(int(doc), 0.0), 0.0) if doc >= 0 else 0.0
    return out


def per_query(I: np.ndarray, relevant: Qrels, names: Sequence[str]) -> dict[str, np.ndarray]:
    """Each metric of ``names`` per query, over the queries with a relevant doc (``positive_mask``), in order.

    Returns:
        ``{name: float64 (n_valid,)}``; ``n_valid`` is the same for every metric, so rows of two systems on
        the same queries pair up for a paired test.
    """
    _check(I, relevant)
    kinds = [parse_metric(n) for n in names]
    valid = positive_mask(relevant)
    rel = [r for r, v in zip(relevant, valid) if v]
    gains = _hits(I[valid], rel, max((k for _, k in kinds), default=1))  # (nv, k)
    hits = gains > 0
    n_rel = np.array([sum(1 for v in r.values() if v > 0) for r in rel], dtype=np.float64)
    out: dict[str, np.ndarray] = {}
    for name, (kind, k) in zip(names, kinds):
        h, g = hits[:, :k], gains[:, :k]
        if kind == "recall":
            out[name] = h.sum(1) / n_rel
        elif kind == "mrr":
            out[name] = np.where(h.any(1), 1.0 / (h.argmax(1) + 1), 0.0)
        elif kind == "ndcg":
            dcg = (g / np.log2(np.arange(2, g.shape[1] + 2))).sum(1)
            ideal = [sorted((v for v in r.values() if v > 0), reverse=True)[:k] for r in rel]
            idcg = np.array([sum(x / np.log2(i + 2) for i, x in enumerate(row)) for row in ideal])
            out[name] = dcg / idcg
        else:  # map: trec_eval map_cut divides by all relevant docs
            precision = np.cumsum(h, 1) / np.arange(1, h.shape[1] + 1)
            out[name] = (precision * h).sum(1) / n_rel
    return out


def _mean(I: np.ndarray, relevant: Qrels, name: str) -> float:
    values = per_query(I, relevant, [name])[name]
    return float(values.mean()) if len(values) else 0.0


def recall_at_k(I: np.ndarray, relevant: Qrels, k: int) -> float:
    """Mean over queries of (#relevant in top k) / (#relevant)."""
    return _mean(I, relevant, f"recall@{k}")


def mrr_at_k(I: np.ndarray, relevant: Qrels, k: int = 10) -> float:
    """Mean reciprocal rank of the first relevant doc within the top k (0 if none)."""
    return _mean(I, relevant, f"mrr@{k}")


def ndcg_at_k(I: np.ndarray, relevant: Qrels, k: int = 10) -> float:
    """nDCG@k with linear gains (trec_eval ``ndcg_cut``)."""
    return _mean(I, relevant, f"ndcg@{k}")


def map_at_k(I: np.ndarray, relevant: Qrels, k: int = 100) -> float:
    """Mean average precision cut at k (trec_eval ``map_cut``: divide by all relevant docs)."""
    return _mean(I, relevant, f"map@{k}")


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


def evaluate(I: np.ndarray, relevant: Qrels, names: Sequence[str] = REPORT_METRICS) -> dict[str, float]:
    """Means of ``names`` (default: every report metric, recall@{1,5,10,20,100}, MRR@10, nDCG@10, MAP@100)."""
    return {n: float(v.mean()) if len(v) else 0.0 for n, v in per_query(I, relevant, names).items()}
