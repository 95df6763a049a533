"""Is a difference between two systems real? Paired statistics over the queries both systems answered.

For two systems on the same queries, with per-query scores ``a`` (before / reference) and ``b`` (after / the
other system), the difference is ``mean(b - a)``. Two numbers say how far to trust it (Sakai, "Statistical
reform in information retrieval", SIGIR Forum 2014: report effect sizes with CIs, not p-values alone):

- a 95% **bootstrap confidence interval**: resample the queries with replacement ``n_resamples`` times and take
  the 2.5th and 97.5th percentiles of the resampled mean differences (percentile bootstrap, Efron 1979);
- a **paired randomization test** p-value (Fisher; Smucker et al., CIKM 2007, the test ranx's
  ``compare(stat_test="fisher")`` runs): under "the two systems are the same", each query's pair of scores is
  as likely swapped, i.e. each per-query difference as likely negated. p = the share of sign assignments whose
  ``|mean|`` reaches the observed one. With ``2**n <= n_resamples`` every assignment is enumerated (exact
  p); otherwise ``n_resamples`` random ones, counting the observed one too: ``(hits + 1) / (n + 1)``.

A difference counts (:func:`verdict`) only where the CI excludes 0 and p < 0.05: with few queries that differ,
the percentile bootstrap alone can exclude 0 where the exact test cannot.

Both are seeded and vectorised numpy: the query draws of a chunk of resamples become a (resamples, queries)
count matrix, and one matrix product gives every compared pair's resampled means at once; chunks keep memory
~50 MB whatever the query count.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

# The metrics every report gives a CI for (those the bench's k_max allows).
CI_METRICS = ("recall@10", "ndcg@10")
N_RESAMPLES = 10_000
LEVEL = 0.95
SEED = 0
_CHUNK_CELLS = 2_000_000  # resamples x queries drawn at once (int64 draws + float64 counts: ~50 MB)


def _chunks(n_resamples: int, n: int) -> list[int]:
    size = max(1, _CHUNK_CELLS // max(n, 1))
    return [min(size, n_resamples - i) for i in range(0, n_resamples, size)]


def _columns(d: np.ndarray) -> np.ndarray:
    """(n,) or (n, m) per-query values as (n, m) float64 columns (one column per compared pair)."""
    D = np.asarray(d, dtype=np.float64)
    D = D[:, None] if D.ndim == 1 else D
    if D.ndim != 2 or not len(D):
        raise ValueError(f"need a non-empty array of per-query values (n,) or (n, pairs), got shape {D.shape}")
    return D


def bootstrap_means(d: np.ndarray, n_resamples: int = N_RESAMPLES, seed: int = SEED) -> np.ndarray:
    """The bootstrap distribution of the mean: ``(n_resamples,)`` means of ``d`` (n,) resampled with replacement,
    or ``(n_resamples, m)`` for ``d`` (n, m), every column resampled with the same query draws (one pass)."""
    D = _columns(d)
    n = len(D)
    rng = np.random.default_rng(seed)
    out = []
    for m in _chunks(n_resamples, n):
        rows = rng.integers(0, n, size=(m, n)) + (np.arange(m) * n)[:, None]  # draw j of resample i, offset by i
        counts = np.bincount(rows.ravel(), minlength=m * n).reshape(m, n).astype(np.float64)  # (m, n) draws
        out.append(counts @ D / n)  # (m, pairs): one BLAS product for every column
    means = np.concatenate(out)
    return means[:, 0] if np.ndim(d) == 1 else means


def randomization_p(d: np.ndarray, n_resamples: int = N_RESAMPLES, seed: int = SEED) -> float | np.ndarray:
    """Two-sided paired randomization (sign-flip) test p-value of ``mean(d) != 0``, per column of ``d`` (n, m)
    (the same sign draws for all); exact when ``2**n <= n_resamples``."""
    D = _columns(d)
    n = len(D)
    # float noise never decides a tie: an assignment reaching |observed| up to rounding counts
    observed = np.abs(D.mean(0)) - 1e-12 * np.maximum(1.0, np.abs(D).max(0))
    if 2**n <= n_resamples:  # every sign assignment, the observed one included
        signs = ((np.arange(2**n)[:, None] >> np.arange(n)) & 1) * 2.0 - 1.0  # (2**n, n)
        p = np.mean(np.abs(signs @ D) / n >= observed, axis=0)
    else:
        rng = np.random.default_rng(seed)
        hits = np.zeros(D.shape[1])
        for m in _chunks(n_resamples, n):
            signs = rng.integers(0, 2, size=(m, n)).astype(np.float64) * 2.0 - 1.0
            hits += np.count_nonzero(np.abs(signs @ D) / n >= observed, axis=0)
        p = (hits + 1) / (n_resamples + 1)
    return float(p[0]) if np.ndim(d) == 1 else p


def paired_many(A: np.ndarray, B: np.ndarray, n_resamples: int = N_RESAMPLES, seed: int = SEED,
                level: float = LEVEL) -> list[dict[str, Any]]:
    """:func:`paired` for each column of A, B (n, m) at once: the same query draws serve every pair (one pass),
    so each result equals its column's own :func:`paired`."""
    if A.shape != B.shape:
        raise ValueError(f"paired scores must cover the same queries: shapes {A.shape} and {B.shape}")
    D = _columns(B - A)
    A, B = _columns(A), _columns(B)
    low, high = np.quantile(bootstrap_means(D, n_resamples, seed), [(1 - level) / 2, (1 + level) / 2], axis=0)
    p = randomization_p(D, n_resamples, seed)
    return [{"before": float(A[:, j].mean()), "after": float(B[:, j].mean()), "diff": float(D[:, j].mean()),
             "ci_low": float(low[j]), "ci_high": float(high[j]), "p_value": float(p[j]), "n": len(D), "level": level}
            for j in range(D.shape[1])]


def paired(a: np.ndarray, b: np.ndarray, n_resamples: int = N_RESAMPLES, seed: int = SEED,
           level: float = LEVEL) -> dict[str, Any]:
    """``b`` against ``a`` on the same queries: means, difference, its bootstrap CI and the randomization p.

    Args:
        a, b: (n,) per-query scores of the same queries in the same order (a = before / reference).

    Returns:
        ``{"before", "after", "diff", "ci_low", "ci_high", "p_value", "n", "level"}``.
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired scores must cover the same queries: shapes {a.shape} and {b.shape}")
    return paired_many(a[:, None], b[:, None], n_resamples, seed, level)[0]


def diff_of_gains(d1: np.ndarray, d2: np.ndarray, n_resamples: int = N_RESAMPLES, seed: int = SEED,
                  level: float = LEVEL) -> dict[str, float]:
    """Gain on one suite minus gain on another (independent query sets): ``mean(d1) - mean(d2)`` with the CI of
    two independent bootstraps subtracted resample by resample."""
    dist = bootstrap_means(d1, n_resamples, seed) - bootstrap_means(d2, n_resamples, seed + 1)
    low, high = np.quantile(dist, [(1 - level) / 2, (1 + level) / 2])
    return {"diff": float(np.mean(d1) - np.mean(d2)), "ci_low": float(low), "ci_high": float(high)}


def verdict(stat: Mapping[str, float]) -> str:
    """``"better"``, ``"worse"`` or ``"no significant difference"``. A difference counts only when its CI excludes 0
    and, where the stat has one, the randomization test agrees (p < 1 - level): on few queries the percentile
    bootstrap can exclude 0 where the exact test does not, and a difference inside the noise is never a win."""
    level = stat.get("level", LEVEL)
    if "p_value" in stat and stat["p_value"] >= 1 - level:
        return "no significant difference"
    if stat["ci_low"] > 0:
        return "better"
    if stat["ci_high"] < 0:
        return "worse"
    return "no significant difference"


def why_not(stat: Mapping[str, float]) -> str:
    """Why a difference is not significant: ``the CI crosses 0`` or ``p >= 0.05``."""
    return "the CI crosses 0" if stat["ci_low"] <= 0 <= stat["ci_high"] else \
        f"p >= {1 - stat.get('level', LEVEL):.2f}"


def format_diff(stat: Mapping[str, float]) -> str:
    """``+0.058, 95% CI +0.031..+0.084``."""
    level = round(100 * stat.get("level", LEVEL))
    return f"{stat['diff']:+.3f}, {level}% CI {stat['ci_low']:+.3f}..{stat['ci_high']:+.3f}"


def format_p(p: float) -> str:
    """p-values as a reader wants them: three decimals, or ``<0.001``."""
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def reference_row(systems: Mapping[str, Mapping[str, Any]], requested: str | None = None) -> str:
    """The row every other row is compared against: ``requested``, else the best trained-towers row by
    recall@10 (the report's question is how they compare), else the best row."""
    if requested is not None:
        return requested
    towers = [n for n, s in systems.items() if s.get("config", {}).get("kind") == "towers"] or list(systems)
    return max(towers, key=lambda n: systems[n]["metrics"].get("recall@10", 0.0))


def compare_to_reference(systems: Mapping[str, Mapping[str, Any]], scores: Mapping[str, Mapping[str, np.ndarray]],
                         metrics: list[str], reference: str | None = None, n_resamples: int = N_RESAMPLES,
                         seed: int = SEED) -> dict[str, Any]:
    """Every row against the reference row: :func:`paired` per metric with ``before`` = the reference, so
    ``diff`` = row - reference (``results.json["significance"]``).

    Args:
        systems: the bench's rows (their configs pick the default reference).
        scores: per row, ``{metric: (n,) per-query scores}`` on the same queries.
        metrics: the metrics to compare (those computed: ``--k-max 5`` has no recall@10).
    """
    ref = reference_row(systems, reference)
    pairs = [(name, m) for name in systems if name != ref for m in metrics]
    rows: dict[str, dict[str, Any]] = {name: {} for name in systems if name != ref}
    if pairs:  # every (row, metric) column in one pass over the same resampled queries; diff = row - reference
        A = np.stack([np.asarray(scores[ref][m], dtype=np.float64) for _, m in pairs], axis=1)
        B = np.stack([np.asarray(scores[name][m], dtype=np.float64) for name, m in pairs], axis=1)
        for (name, m), stat in zip(pairs, paired_many(A, B, n_resamples, seed, LEVEL)):
            rows[name][m] = stat
    return {"reference": ref, "metrics": metrics, "n_resamples": n_resamples, "seed": seed, "level": LEVEL,
            "ci": "percentile bootstrap over queries", "test": "paired randomization (sign-flip), two-sided",
            "rows": rows}
