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

Both are seeded and vectorised numpy; resamples go in chunks, so memory stays ~32 MB whatever the query count.
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
_CHUNK_CELLS = 4_000_000  # resamples x queries drawn at once (int64: 32 MB)


def _chunks(n_resamples: int, n: int) -> list[int]:
    size = max(1, _CHUNK_CELLS // max(n, 1))
    return [min(size, n_resamples - i) for i in range(0, n_resamples, size)]


def bootstrap_means(d: np.ndarray, n_resamples: int = N_RESAMPLES, seed: int = SEED) -> np.ndarray:
    """(n_resamples,) means of ``d`` resampled with replacement (the bootstrap distribution of its mean)."""
    d = np.asarray(d, dtype=np.float64)
    if d.ndim != 1 or not len(d):
        raise ValueError(f"need a non-empty 1-D array of per-query values, got shape {d.shape}")
    rng = np.random.default_rng(seed)
    return np.concatenate([d[rng.integers(0, len(d), size=(m, len(d)))].mean(1) for m in _chunks(n_resamples, len(d))])


def randomization_p(d: np.ndarray, n_resamples: int = N_RESAMPLES, seed: int = SEED) -> float:
    """Two-sided paired randomization (sign-flip) test p-value of ``mean(d) != 0``; exact when ``2**n`` fits."""
    d = np.asarray(d, dtype=np.float64)
    n = len(d)
    observed = abs(d.mean()) - 1e-12 * max(1.0, float(np.abs(d).max()))  # float noise never decides a tie
    if 2**n <= n_resamples:  # every sign assignment, the observed one included
        signs = ((np.arange(2**n)[:, None] >> np.arange(n)) & 1) * 2.0 - 1.0  # (2**n, n)
        return float(np.mean(np.abs(signs @ d) / n >= observed))
    rng = np.random.default_rng(seed)
    hits = 0
    for m in _chunks(n_resamples, n):
        signs = rng.integers(0, 2, size=(m, n)) * 2.0 - 1.0
        hits += int(np.count_nonzero(np.abs(signs @ d) / n >= observed))
    return (hits + 1) / (n_resamples + 1)


def paired(a: np.ndarray, b: np.ndarray, n_resamples: int = N_RESAMPLES, seed: int = SEED,
           level: float = LEVEL) -> dict[str, Any]:
    """``b`` against ``a`` on the same queries: means, difference, its bootstrap CI and the randomization p.

    Args:
        a, b: (n,) per-query scores of the same queries in the same order (a = before / reference).

    Returns:
        ``{"before", "after", "diff", "ci_low", "ci_high", "p_value", "n", "level"}``.
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired scores must cover the same queries: shapes {a.shape} and {b.shape}")
    d = b - a
    low, high = np.quantile(bootstrap_means(d, n_resamples, seed), [(1 - level) / 2, (1 + level) / 2])
    return {"before": float(a.mean()), "after": float(b.mean()), "diff": float(d.mean()), "ci_low": float(low),
            "ci_high": float(high), "p_value": randomization_p(d, n_resamples, seed), "n": int(len(d)),
            "level": level}


def diff_of_gains(d1: np.ndarray, d2: np.ndarray, n_resamples: int = N_RESAMPLES, seed: int = SEED,
                  level: float = LEVEL) -> dict[str, float]:
    """Gain on one suite minus gain on another (independent query sets): ``mean(d1) - mean(d2)`` with the CI of
    two independent bootstraps subtracted resample by resample."""
    dist = bootstrap_means(d1, n_resamples, seed) - bootstrap_means(d2, n_resamples, seed + 1)
    low, high = np.quantile(dist, [(1 - level) / 2, (1 + level) / 2])
    return {"diff": float(np.mean(d1) - np.mean(d2)), "ci_low": float(low), "ci_high": float(high)}


def verdict(stat: Mapping[str, float]) -> str:
    """``"better"``, ``"worse"`` or ``"no significant difference"``: only a CI that excludes 0 is a difference."""
    if stat["ci_low"] > 0:
        return "better"
    if stat["ci_high"] < 0:
        return "worse"
    return "no significant difference"


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
    rows = {name: {m: paired(scores[ref][m], scores[name][m], n_resamples, seed) for m in metrics}  # row - ref
            for name in systems if name != ref}
    return {"reference": ref, "metrics": metrics, "n_resamples": n_resamples, "seed": seed, "level": LEVEL,
            "ci": "percentile bootstrap over queries", "test": "paired randomization (sign-flip), two-sided",
            "rows": rows}
