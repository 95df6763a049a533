"""common.metrics against ranx (the reference) on random runs with several graded relevant docs per query."""
from __future__ import annotations

import numpy as np
import pytest

from twotower.common.metrics import evaluate, map_at_k, mrr_at_k, ndcg_at_k, recall_at_k, recall_curve

ranx = pytest.importorskip("ranx")


def _random_case(seed: int, nq: int = 40, n_docs: int = 300, k: int = 100, pad_tail: bool = True):
    """Ranked ids I (nq, k) with -1 padding on some rows, graded qrels with 1-6 relevant docs per query."""
    rng = np.random.default_rng(seed)
    I = np.stack([rng.permutation(n_docs)[:k] for _ in range(nq)]).astype(np.int64)
    relevant = []
    for q in range(nq):
        n_rel = int(rng.integers(1, 7))
        # Mix relevant docs that are ranked (to score) with some that are not retrieved at all.
        ranked = rng.choice(I[q, :30], size=min(n_rel, 3), replace=False)
        extra = rng.choice(n_docs, size=n_rel, replace=False)
        docs = list(dict.fromkeys([*ranked.tolist(), *extra.tolist()]))[:n_rel]
        relevant.append({int(d): int(rng.integers(1, 4)) for d in docs})
    if pad_tail:  # faiss returns -1 when fewer than k results exist
        for q in range(0, nq, 7):
            I[q, rng.integers(5, k):] = -1
    return I, relevant


def _to_ranx(I: np.ndarray, relevant) -> tuple[ranx.Qrels, ranx.Run]:
    qrels = {f"q{q}": {f"d{d}": g for d, g in rel.items()} for q, rel in enumerate(relevant)}
    # Strictly decreasing scores: ranx re-sorts by score, ties would reorder.
    run = {f"q{q}": {f"d{d}": float(I.shape[1] - r) for r, d in enumerate(row) if d >= 0} for q, row in enumerate(I)}
    return ranx.Qrels(qrels), ranx.Run(run)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_equal_ranx(seed: int) -> None:
    I, relevant = _random_case(seed)
    qrels, run = _to_ranx(I, relevant)
    names = ["recall@1", "recall@5", "recall@10", "recall@20", "recall@100", "mrr@10", "ndcg@10", "map@100"]
    # ranx "ndcg" is Jarvelin's linear gain (rel / log2(rank+1)), the trec_eval ndcg_cut convention.
    ref = ranx.evaluate(qrels, run, names, make_comparable=True)
    ours = evaluate(I, relevant)
    assert set(ours) == set(names)
    for name in names:
        assert ours[name] == pytest.approx(ref[name], abs=1e-9), name


def test_single_functions_match_ranx_at_other_cutoffs() -> None:
    I, relevant = _random_case(5, pad_tail=False)
    qrels, run = _to_ranx(I, relevant)
    for k in (3, 50):
        ref = ranx.evaluate(qrels, run, [f"recall@{k}", f"mrr@{k}", f"ndcg@{k}", f"map@{k}"])
        assert recall_at_k(I, relevant, k) == pytest.approx(ref[f"recall@{k}"], abs=1e-9)
        assert mrr_at_k(I, relevant, k) == pytest.approx(ref[f"mrr@{k}"], abs=1e-9)
        assert ndcg_at_k(I, relevant, k) == pytest.approx(ref[f"ndcg@{k}"], abs=1e-9)
        assert map_at_k(I, relevant, k) == pytest.approx(ref[f"map@{k}"], abs=1e-9)


def test_hand_computed_example() -> None:
    # q0: relevant {7: 2, 9: 1}; ranked 3, 7, 5, 9.  q1: relevant {1: 1}; ranked 1 first.
    I = np.array([[3, 7, 5, 9], [1, 2, 3, -1]])
    relevant = [{7: 2, 9: 1}, {1: 1}]
    assert recall_at_k(I, relevant, 1) == pytest.approx((0 + 1) / 2)
    assert recall_at_k(I, relevant, 4) == pytest.approx(1.0)
    assert mrr_at_k(I, relevant, 10) == pytest.approx((1 / 2 + 1) / 2)
    dcg0 = 2 / np.log2(3) + 1 / np.log2(5)
    idcg0 = 2 / np.log2(2) + 1 / np.log2(3)
    assert ndcg_at_k(I, relevant, 10) == pytest.approx((dcg0 / idcg0 + 1) / 2)
    assert map_at_k(I, relevant, 100) == pytest.approx(((1 / 2 + 2 / 4) / 2 + 1) / 2)


def test_bad_shapes_raise() -> None:
    with pytest.raises(ValueError, match="qrels rows"):
        recall_at_k(np.zeros((2, 3), dtype=np.int64), [{0: 1}], 3)
    with pytest.raises(ValueError, match="must be"):
        recall_at_k(np.zeros(3, dtype=np.int64), [{0: 1}], 3)


def test_recall_curve_is_recall_at_every_k() -> None:
    I, relevant = _random_case(3, k=30)
    curve = recall_curve(I, relevant, 40)
    assert curve.shape == (40,)
    for k in (1, 2, 7, 30):
        assert curve[k - 1] == pytest.approx(recall_at_k(I, relevant, k))
    assert np.all(np.diff(curve) >= 0) and curve[39] == curve[29]
