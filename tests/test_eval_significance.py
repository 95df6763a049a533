"""eval.significance: the bootstrap CI and the paired randomization test on hand-computed cases, against a normal
approximation, and against ranx (``compare(stat_test="fisher")``, per-query ``evaluate``)."""
from __future__ import annotations

import numpy as np
import pytest

from twotower.common.metrics import per_query
from twotower.eval import significance as sig
from twotower.eval.significance import bootstrap_means, compare_to_reference, diff_of_gains, paired, randomization_p

ranx = pytest.importorskip("ranx")


def test_exact_randomization_p_on_hand_computed_cases() -> None:
    # 5 queries, every one +1: of the 2**5 sign assignments only all-plus and all-minus reach |mean| = 1.
    assert randomization_p(np.ones(5)) == pytest.approx(2 / 32)
    # +1, +1, -1: |mean| >= 1/3 for every assignment (a sum of three +-1 is never 0).
    assert randomization_p(np.array([1.0, 1.0, -1.0])) == 1.0
    # +2, +1, +1: signed sums 4, 2, 2, 0, 0, -2, -2, -4; only +++ and --- reach |sum| >= 4: 2 of 8.
    assert randomization_p(np.array([2.0, 1.0, 1.0])) == pytest.approx(2 / 8)
    assert randomization_p(np.zeros(4)) == 1.0  # identical systems: nothing is more extreme than nothing


def test_monte_carlo_p_counts_the_observed_assignment() -> None:
    # 50 queries all +1: no random sign assignment reaches it, so p = 1 / (n_resamples + 1), never 0.
    assert randomization_p(np.ones(50), n_resamples=999) == pytest.approx(1 / 1000)


def test_bootstrap_ci_on_hand_computed_cases() -> None:
    # A constant difference has a zero-width CI at that constant.
    s = paired(np.zeros(7), np.full(7, 0.25))
    assert (s["diff"], s["ci_low"], s["ci_high"]) == pytest.approx((0.25, 0.25, 0.25))
    assert sig.verdict(s) == "better"
    # Differences {0, 1}: resampled means 0, 1/2, 1 with probabilities 1/4, 1/2, 1/4, so the 2.5th and 97.5th
    # percentiles are exactly 0 and 1.
    s = paired(np.array([0.0, 0.0]), np.array([0.0, 1.0]))
    assert (s["diff"], s["ci_low"], s["ci_high"]) == (0.5, 0.0, 1.0)
    assert sig.verdict(s) == "no significant difference"
    assert s["p_value"] == 1.0  # |+-1/2| always reaches 1/2
    draws = bootstrap_means(np.array([0.0, 1.0]), n_resamples=20_000)
    assert np.mean(draws == 0.5) == pytest.approx(0.5, abs=0.02) and set(np.unique(draws)) == {0.0, 0.5, 1.0}


def test_bootstrap_ci_matches_the_normal_approximation_on_many_queries() -> None:
    rng = np.random.default_rng(3)
    a = rng.random(800)
    b = a + rng.normal(0.02, 0.2, 800)
    s = paired(a, b)
    d = b - a
    half = 1.96 * d.std(ddof=1) / np.sqrt(len(d))
    assert s["ci_low"] == pytest.approx(d.mean() - half, abs=0.003)
    assert s["ci_high"] == pytest.approx(d.mean() + half, abs=0.003)
    assert paired(a, b) == s  # seeded: the same numbers every run
    assert paired(b, a)["diff"] == pytest.approx(-s["diff"])


def test_resamples_in_chunks_cover_every_resample(monkeypatch) -> None:
    monkeypatch.setattr(sig, "_CHUNK_CELLS", 100)  # 100 cells / 30 queries: chunks of 3 resamples
    assert bootstrap_means(np.arange(30.0), n_resamples=1000).shape == (1000,)
    assert 0 < randomization_p(np.linspace(-1, 1, 30) + 0.1, n_resamples=1000) < 1


def test_refuses_unpaired_scores() -> None:
    with pytest.raises(ValueError, match="same queries"):
        paired(np.zeros(3), np.zeros(4))
    with pytest.raises(ValueError, match="non-empty"):
        bootstrap_means(np.zeros(0))


def test_difference_of_gains_between_suites() -> None:
    big, small = np.full(200, 0.3), np.full(300, 0.1)
    assert diff_of_gains(big, small) == pytest.approx({"diff": 0.2, "ci_low": 0.2, "ci_high": 0.2})
    rng = np.random.default_rng(0)
    same = diff_of_gains(rng.normal(0.05, 0.3, 200), rng.normal(0.05, 0.3, 200))
    assert sig.verdict(same) == "no significant difference"


def test_format_diff() -> None:
    assert sig.format_diff({"diff": 0.058, "ci_low": 0.0312, "ci_high": 0.0841}) == "+0.058, 95% CI +0.031..+0.084"


def _ranked_case(seed: int, nq: int = 120, n_docs: int = 200, k: int = 10):
    """Two systems' rankings: B finds the relevant doc more often than A (one relevant doc per query)."""
    rng = np.random.default_rng(seed)
    relevant = [{int(rng.integers(n_docs)): 1} for _ in range(nq)]
    runs = []
    for p_hit in (0.4, 0.55):
        I = np.empty((nq, k), dtype=np.int64)
        for q, rel in enumerate(relevant):
            doc = next(iter(rel))
            I[q] = rng.permutation(np.delete(np.arange(n_docs), doc))[:k]  # k distinct docs, the relevant one not
            if rng.random() < p_hit:
                I[q, rng.integers(k)] = doc  # found, at a random rank, with probability p_hit
        runs.append(I)
    return relevant, runs


def _ranx(I: np.ndarray, name: str):
    return ranx.Run({f"q{q:04d}": {f"d{d}": float(len(row) - r) for r, d in enumerate(row)} for q, row in enumerate(I)},
                    name=name)


@pytest.mark.parametrize("seed", [0, 1])
def test_per_query_scores_and_p_values_equal_ranx(seed: int) -> None:
    relevant, (Ia, Ib) = _ranked_case(seed)
    qrels = ranx.Qrels({f"q{q:04d}": {f"d{d}": g for d, g in rel.items()} for q, rel in enumerate(relevant)})
    metrics = ["recall@10", "ndcg@10"]
    ours = {n: per_query(I, relevant, metrics) for n, I in (("a", Ia), ("b", Ib))}
    for n, I in (("a", Ia), ("b", Ib)):
        ref = ranx.evaluate(qrels, _ranx(I, n), metrics, return_mean=False)
        for m in metrics:  # ranx orders queries by id: q0000, q0001, ...
            np.testing.assert_allclose(ours[n][m], ref[m], atol=1e-9)
    report = ranx.compare(qrels, [_ranx(Ia, "a"), _ranx(Ib, "b")], metrics, stat_test="fisher",
                          n_permutations=20_000, random_seed=42)
    systems = {"a": {"metrics": {}, "config": {"kind": "towers"}}, "b": {"metrics": {}, "config": {}}}
    table = compare_to_reference(systems, ours, metrics, reference="a", n_resamples=20_000)
    assert table["reference"] == "a" and list(table["rows"]) == ["b"]
    for m in metrics:
        ranx_p = report.comparisons["a", "b"][m]["p_value"]
        ours_p = table["rows"]["b"][m]["p_value"]
        # Two Monte Carlo estimates of the same p: within 4 standard errors of each other.
        se = np.sqrt(max(ranx_p * (1 - ranx_p), 1e-4) / 20_000)
        assert abs(ours_p - ranx_p) < 4 * np.sqrt(2) * se + 1e-3, (m, ours_p, ranx_p)
        assert table["rows"]["b"][m]["diff"] == pytest.approx(report.results["b"][m] - report.results["a"][m])


def test_default_reference_is_the_best_towers_row() -> None:
    systems = {"bm25": {"metrics": {"recall@10": 0.9}, "config": {"kind": "bm25"}},
               "t1": {"metrics": {"recall@10": 0.5}, "config": {"kind": "towers"}},
               "t2": {"metrics": {"recall@10": 0.7}, "config": {"kind": "towers"}}}
    scores = {n: {"recall@10": np.full(4, s["metrics"]["recall@10"])} for n, s in systems.items()}
    table = compare_to_reference(systems, scores, ["recall@10"])
    assert table["reference"] == "t2" and set(table["rows"]) == {"bm25", "t1"}
    assert table["rows"]["bm25"]["recall@10"]["diff"] == pytest.approx(0.2)  # row - reference
    del systems["t1"], systems["t2"]
    assert compare_to_reference(systems, scores, ["recall@10"])["rows"] == {}  # one row: nothing to compare


def test_many_pairs_in_one_pass_equal_each_pair_alone() -> None:
    """paired_many draws the same resampled queries for every column, so each column equals its own paired()."""
    rng = np.random.default_rng(1)
    A, B = rng.random((60, 3)), rng.random((60, 3))
    for j, stat in enumerate(sig.paired_many(A, B)):
        assert stat == pytest.approx(paired(A[:, j], B[:, j]), rel=1e-12)  # up to BLAS summation order


def test_a_difference_counts_only_when_the_ci_and_the_test_agree() -> None:
    assert sig.verdict({"diff": 0.1, "ci_low": 0.02, "ci_high": 0.2, "p_value": 0.01}) == "better"
    assert sig.verdict({"diff": -0.1, "ci_low": -0.2, "ci_high": -0.02, "p_value": 0.01}) == "worse"
    disagree = {"diff": 0.1, "ci_low": 0.02, "ci_high": 0.2, "p_value": 0.06}
    assert sig.verdict(disagree) == "no significant difference" and sig.why_not(disagree) == "p >= 0.05"
    crosses = {"diff": 0.01, "ci_low": -0.02, "ci_high": 0.04, "p_value": 0.5}
    assert sig.verdict(crosses) == "no significant difference" and sig.why_not(crosses) == "the CI crosses 0"
