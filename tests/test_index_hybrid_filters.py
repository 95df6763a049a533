"""Hybrid (BM25 + towers) and metadata-filtered search: against hand-computed fusion and brute-force filtered
exact search, on Flat, IVF and HNSW with tombstones; ``index add/remove`` keep both sides in step."""
from __future__ import annotations

import json

import numpy as np
import pytest

faiss = pytest.importorskip("faiss")
pytest.importorskip("bm25s")

from twotower.index.bm25 import BM25_DIR, BM25Index  # noqa: E402
from twotower.index.build import build_index  # noqa: E402
from twotower.index.config import EncodeConfig, IndexBuildConfig  # noqa: E402
from twotower.index.filters import FilterError, FilterMap, build_filter_table  # noqa: E402
from twotower.index.hybrid import fuse, normalise  # noqa: E402
from twotower.index.load import check_query_sides, load_index  # noqa: E402
from twotower.index.mutate import add_docs, remove_docs  # noqa: E402
from twotower.index.synthetic import TableEncoder, clustered_vectors  # noqa: E402
from twotower.retrieval.retriever import Retriever  # noqa: E402

ENC = EncodeConfig(progress=False)
WORDS = ["numpy", "sort", "array", "file", "open", "python", "list", "graph", "csv", "parse", "socket", "thread"]
PACKAGES = ["numpy", "scipy", "pandas", "django"]


def rows(ids: range) -> list[dict]:
    """Docs with words (for BM25) and metadata (for filters); the text ends with the row, for TableEncoder."""
    return [{"_id": f"d{i}", "text": f"{WORDS[i % 12]} {WORDS[(i * 7) % 12]} {WORDS[(i * 5 + 1) % 12]} {i}",
             "bucket": i % 100, "package": PACKAGES[i % 4], "tags": ["even" if i % 2 == 0 else "odd", "all"],
             **({"year": 2000 + i % 25} if i % 3 else {})} for i in ids]


class QueryEncoder(TableEncoder):
    """TableEncoder that also takes texts not ending in a row number (the retriever's warm-up): row 0."""

    def encode(self, texts, batch_size=64, show_progress=False):
        return self.table[[int(t.rsplit(" ", 1)[-1]) if t.rsplit(" ", 1)[-1].isdigit() else 0 for t in texts]]


def brute_force_filtered(xb: np.ndarray, xq: np.ndarray, k: int, allowed: np.ndarray) -> np.ndarray:
    """Exact top-k rows by inner product among the allowed rows (-1 padded)."""
    s = xq @ xb.T
    s[:, ~allowed] = -np.inf
    I = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return np.where(np.take_along_axis(s, I, 1) > -np.inf, I, -1)


# ---- fusion ---------------------------------------------------------------------------------------------
def test_rrf_and_weighted_equal_hand_computed_fusion() -> None:
    # two ranked lists of 2 queries; -1 = empty slot
    Id = np.array([[4, 2, 9], [1, 0, -1]])
    Dd = np.array([[0.9, 0.5, 0.1], [0.8, 0.8, 0.0]], np.float32)
    Ib = np.array([[2, 7, 4], [5, -1, -1]])
    Db = np.array([[12.0, 3.0, 1.0], [2.0, 0.0, 0.0]], np.float32)
    D, I = fuse([(Dd, Id), (Db, Ib)], 4, "rrf")
    r = lambda rank: 1 / (60 + rank)  # noqa: E731
    want = {4: r(1) + r(3), 2: r(2) + r(1), 9: r(3), 7: r(2)}
    order = sorted(want, key=lambda d: (-want[d], d))
    assert I[0].tolist() == order and np.allclose(D[0], [want[d] for d in order])
    want1 = {1: r(1), 5: r(1), 0: r(2)}  # ties go to the smaller row
    assert I[1].tolist() == [1, 5, 0, -1] and np.allclose(D[1, :3], [want1[1], want1[5], want1[0]])
    # weighted, minmax: dense 4 -> 1, 2 -> 0.5, 9 -> 0; bm25 2 -> 1, 7 -> 2/11, 4 -> 0; missing -> 0
    D, I = fuse([(Dd, Id), (Db, Ib)], 4, "weighted", [0.3, 0.7], "minmax")
    dn = {4: 1.0, 2: 0.5, 9: 0.0, 7: 0.0}
    bn = {2: 1.0, 7: 2 / 11, 4: 0.0, 9: 0.0}
    want = {d: 0.3 * dn[d] + 0.7 * bn[d] for d in dn}
    order = sorted(want, key=lambda d: (-want[d], d))
    assert I[0].tolist() == order and np.allclose(D[0], [want[d] for d in order])
    z = normalise(Db, Ib, "zscore")
    assert np.allclose(z[0], (Db[0] - Db[0].mean()) / Db[0].std()) and np.isnan(z[1, 1:]).all()


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    xb = clustered_vectors(1200, 16, seed=3)
    out = build_index(TableEncoder(xb), rows(range(1200)), tmp_path_factory.mktemp("h") / "idx",
                      IndexBuildConfig(factory="Flat"), ENC)
    remove_docs(out, [f"d{i}" for i in range(0, 1200, 37)])
    return out, xb


def test_hybrid_rrf_equals_hand_fusion_of_the_two_ranked_lists(built) -> None:
    out, xb = built
    r = Retriever(load_index(out, "cpu"), QueryEncoder(xb))
    queries = ["numpy sort csv 5", "socket thread 11", "parse file 600"]
    k, depth = 10, 3
    hits = r.search(queries, k=k, mode="hybrid", fusion="rrf", depth=depth)
    dense = r.search(queries, k=k * depth, mode="dense")
    lexical = r.search(queries, k=k * depth, mode="bm25")
    for q in range(len(queries)):
        score: dict[str, float] = {}
        for lst in (dense[q], lexical[q]):
            for rank, h in enumerate(lst, 1):
                score[h.id] = score.get(h.id, 0.0) + 1.0 / (60 + rank)
        row = {h.id: int(h.id[1:]) for lst in (dense[q], lexical[q]) for h in lst}
        want = sorted(score, key=lambda d: (-score[d], row[d]))[:k]
        assert [h.id for h in hits[q]] == want
        assert np.allclose([h.score for h in hits[q]], [score[d] for d in want])
    # bm25 mode: the dir's BM25 side ranks as a fresh bm25s index of the live docs' texts
    assert lexical[0] and all(h.score > 0 and any(w in h.text for w in ("numpy", "sort", "csv")) for h in lexical[0])


# ---- filtered search == brute-force filtered exact search --------------------------------------------
@pytest.mark.parametrize("factory,params", [("Flat", {}), ("IVF16,Flat", {"nprobe": 16}), ("IVF16,Flat", {"nprobe": 2}),
                                            ("HNSW16", {"ef_search": 64})])
def test_filtered_search_equals_brute_force_filtered_exact(tmp_path, factory, params) -> None:
    n = 2000
    xb = clustered_vectors(n, 16, n_clusters=20, seed=5)
    xq = clustered_vectors(30, 16, n_clusters=20, seed=6)
    out = build_index(TableEncoder(xb), rows(range(n)), tmp_path / "idx", IndexBuildConfig(factory=factory), ENC)
    removed = list(range(3, n, 11))
    remove_docs(out, [f"d{i}" for i in removed])
    index = load_index(out, "cpu")
    live = np.ones(n, bool)
    live[removed] = False
    bucket = np.arange(n) % 100
    year = np.where(np.arange(n) % 3 > 0, 2000 + np.arange(n) % 25, -1)
    cases = [({"bucket": {"$lt": 1}}, bucket < 1),  # 1%
             ({"bucket": {"$lt": 10}}, bucket < 10),  # 10%
             ({"bucket": {"$gte": 50}}, bucket >= 50),  # 50%
             ({"package": {"$in": ["numpy", "django"]}, "year": {"$gte": 2010, "$lt": 2020}},
              (np.arange(n) % 4 % 3 == 0) & (year >= 2010) & (year < 2020)),
             ({"tags": "even", "package": {"$ne": "pandas"}}, (np.arange(n) % 2 == 0) & (np.arange(n) % 4 != 2))]
    k = 10
    for flt, want_mask in cases:
        allowed = index.allowed(flt)
        np.testing.assert_array_equal(allowed, want_mask & live)
        _, I = index.search(xq, k, allowed=allowed, **params)
        gt = brute_force_filtered(xb, xq, k, want_mask & live)
        if factory == "HNSW16" or params.get("nprobe") == 2:  # approximate: the widened search, measured
            recall = np.mean([len(set(a[a >= 0]) & set(b[b >= 0])) / max((b >= 0).sum(), 1) for a, b in zip(I, gt)])
            assert recall >= 0.9, (flt, recall)  # nprobe 2 of 16 unfiltered: ~0.95
            assert allowed[I[I >= 0]].all()
        else:
            np.testing.assert_array_equal(I, gt, err_msg=str(flt))


def test_filtered_bm25_and_hybrid_return_only_allowed_live_rows(built) -> None:
    out, xb = built
    index = load_index(out, "cpu")
    r = Retriever(index, QueryEncoder(xb))
    flt = {"package": "scipy", "bucket": {"$lt": 50}}
    for mode in ("dense", "bm25", "hybrid"):
        hits = r.search(["numpy sort csv 5", "parse file 601"], k=20, mode=mode, filter=flt)
        assert any(hits)
        for h in (h for row in hits for h in row):
            assert h.metadata["package"] == "scipy" and h.metadata["bucket"] < 50 and int(h.id[1:]) % 37
    # bm25 under a filter == bm25 of the allowed rows, scored by hand from the unfiltered score vector
    bm = index.bm25
    s = bm.scores(bm.query_ids(["numpy sort csv"])[0])
    allowed = index.allowed(flt)
    D, I = bm.search(["numpy sort csv"], 15, allowed=allowed, excluded=index.removed)
    cand = np.flatnonzero(allowed & (s > 0))
    want = cand[np.lexsort((cand, -s[cand]))][:15]
    np.testing.assert_array_equal(I[0][: len(want)], want)


# ---- the filter language ------------------------------------------------------------------------------
def test_filter_operators_match_a_python_reference() -> None:
    meta = [{"n": i % 7, "s": f"v{i % 5}", "b": i % 2 == 0, "l": [f"t{i % 3}", "all"], "o": {"x": i % 4}}
            for i in range(60)] + [{}, {"n": None}, {"n": 2.5}]
    fm = FilterMap(build_filter_table(json.dumps(m) for m in meta), len(meta))

    def get(m, f):
        return m.get("o", {}).get("x") if f == "o.x" else m.get(f)

    def ref(m, f, op, v):
        x = get(m, f)
        vals = x if isinstance(x, list) else ([] if x is None else [x])
        same = [y for y in vals if type(y) is type(v) or (isinstance(y, (int, float)) and not isinstance(y, bool)
                                                          and isinstance(v, (int, float)) and not isinstance(v, bool))]
        if op == "$eq":
            return v in same
        if op == "$ne":
            return v not in same
        if op == "$in":
            return any(ref(m, f, "$eq", w) for w in v)
        if op == "$nin":
            return not any(ref(m, f, "$eq", w) for w in v)
        cmp = {"$gt": lambda a: a > v, "$gte": lambda a: a >= v, "$lt": lambda a: a < v, "$lte": lambda a: a <= v}[op]
        return any(cmp(y) for y in same)

    cases = [("n", "$eq", 3), ("n", "$eq", 2.5), ("n", "$ne", 3), ("n", "$gt", 3), ("n", "$gte", 3), ("n", "$lt", 2.5),
             ("n", "$lte", 2), ("n", "$in", [1, 2.5, 9]), ("n", "$nin", [0, 1]), ("s", "$eq", "v2"),
             ("s", "$gte", "v3"), ("s", "$in", ["v0", "v4", "zz"]), ("b", "$eq", True), ("b", "$ne", False),
             ("l", "$eq", "t1"), ("l", "$nin", ["t0"]), ("o.x", "$lt", 2), ("n", "$eq", "3")]
    for f, op, v in cases:
        got = fm.allowed({f: {op: v}})
        want = np.array([ref(m, f, op, v) for m in meta])
        np.testing.assert_array_equal(got, want, err_msg=f"{f} {op} {v}")
    both = fm.allowed({"n": {"$gte": 2, "$lt": 5}, "s": "v1"})
    np.testing.assert_array_equal(both, fm.allowed({"n": {"$gte": 2}}) & fm.allowed({"n": {"$lt": 5}})
                                  & fm.allowed({"s": {"$eq": "v1"}}))
    assert fm.allowed({}) is None and fm.allowed(None) is None


@pytest.mark.parametrize("flt,match", [
    ({"nope": 1}, r"unknown filter field 'nope': the index has fields b, l, n.*valid operators: \$eq"),
    ({"n": {"$like": 1}}, r"filter field 'n': unknown operator '\$like' \(valid operators: \$eq, \$ne, \$in"),
    ({"n": {"$in": 3}}, r"filter field 'n': \$in needs a list"),
    ({"b": {"$gt": True}}, r"filter field 'b': \$gt needs a number or a string"),
    ({"n": {"$eq": None}}, r"filter field 'n': \$eq needs a string, number or boolean, got null"),
    ({"n": {}}, r"filter field 'n': empty condition"),
    (["n"], r"filter must be a JSON object"),
])
def test_bad_filters_name_the_field_and_the_operators(flt, match) -> None:
    fm = FilterMap(build_filter_table([json.dumps({"n": 1, "b": True, "l": ["x"]})]), 1)
    with pytest.raises(FilterError, match=match):
        fm.allowed(flt)


# ---- add / remove keep the BM25 side and the filter map in step ---------------------------------------
def test_add_and_remove_keep_bm25_and_filter_map_in_step(tmp_path) -> None:
    xb = clustered_vectors(500, 8, seed=2)
    enc = TableEncoder(xb)
    out = build_index(enc, rows(range(300)), tmp_path / "idx", IndexBuildConfig(), ENC)
    extra = [{"_id": f"n{i}", "text": f"zebra quokka {i}", "package": "newpkg", "year": 2030} for i in range(300, 500)]
    assert add_docs(out, enc, extra, ENC) == 200
    remove_docs(out, ["d5", "n310", "n311"])
    index = load_index(out, "cpu")
    # the stored BM25 side == a fresh one over every row's text (extended, not rebuilt, by `index add`)
    texts = [r["text"] for r in rows(range(300))] + [r["text"] for r in extra]
    fresh = BM25Index.build(texts)
    assert index.bm25.ntotal == 500 and index.bm25.vocab == fresh.vocab
    for q in ["zebra numpy", "quokka sort csv", "thread"]:
        np.testing.assert_allclose(index.bm25.scores(index.bm25.query_ids([q])[0]),
                                   fresh.scores(fresh.query_ids([q])[0]), rtol=1e-6)
    r = Retriever(index, QueryEncoder(xb))
    got = {h.id for h in r.search("zebra quokka", k=300, mode="bm25")[0]}
    assert got == {f"n{i}" for i in range(300, 500)} - {"n310", "n311"}
    # the filter map covers the added rows and never yields a removed one
    allowed = index.allowed({"package": "newpkg"})
    assert allowed.sum() == 198 and not allowed[[310, 311]].any()
    assert index.allowed({"year": {"$gte": 2030}}).sum() == 198
    assert index.manifest["filters"]["fields"]["package"]["values"] == 5
    hits = r.search(["zebra 320"], k=5, mode="hybrid", filter={"year": 2030})[0]
    assert hits[0].id == "n320" and all(h.id.startswith("n") for h in hits)


def test_no_bm25_side_and_unknown_fields_are_refused_before_models_load(tmp_path) -> None:
    xb = clustered_vectors(50, 8, seed=2)
    out = build_index(TableEncoder(xb), rows(range(50)), tmp_path / "idx", IndexBuildConfig(bm25=False), ENC)
    assert not (out / BM25_DIR).exists()
    with pytest.raises(ValueError, match="has no BM25 side"):
        check_query_sides(out, "hybrid", None)
    with pytest.raises(FilterError, match="unknown filter field 'lang'.*package"):
        check_query_sides(out, None, {"lang": "py"})
    check_query_sides(out, "dense", {"package": "numpy"})
    r = Retriever(load_index(out, "cpu"), QueryEncoder(xb))
    with pytest.raises(ValueError, match="has no BM25 side"):
        r.search("numpy 3", mode="bm25")
    with pytest.raises(ValueError, match="needs the BM25 side"):
        IndexBuildConfig(bm25=False, default_mode="hybrid")


def test_gpu_paths_filter_alike_on_the_cpu() -> None:
    """The torch exact search (masking) and the over-fetch path of GPU clones, run on the CPU, equal brute force."""
    from twotower.index.faiss_utils import build_faiss, search_allowed_post
    from twotower.index.torch_search import TorchFlatSearcher

    xb = clustered_vectors(3000, 16, seed=8)
    xq = clustered_vectors(20, 16, seed=9)
    excluded = np.arange(0, 3000, 7)
    live = np.ones(3000, bool)
    live[excluded] = False
    for frac in (0.005, 0.1, 0.6):
        allowed = np.random.default_rng(1).random(3000) < frac
        gt = brute_force_filtered(xb, xq, 10, allowed & live)
        _, I = TorchFlatSearcher(xb, "cpu", excluded=excluded, max_scores=4096).search(xq, 10, allowed=allowed)
        np.testing.assert_array_equal(I, gt)
        ok = allowed & live
        _, I = search_allowed_post(build_faiss(xb, "Flat"), xq, 10, ok, int(ok.sum()))
        np.testing.assert_array_equal(I, gt)


def test_manifest_query_defaults_drive_searches_without_options(tmp_path) -> None:
    xb = clustered_vectors(200, 8, seed=4)
    cfg = IndexBuildConfig(default_mode="hybrid", default_fusion="weighted", default_alpha=0.8, default_norm="zscore")
    out = build_index(TableEncoder(xb), rows(range(200)), tmp_path / "idx", cfg, ENC)
    index = load_index(out, "cpu")
    assert index.manifest["query_defaults"] == {"mode": "hybrid", "fusion": "weighted", "alpha": 0.8, "norm": "zscore",
                                                "depth": 10}
    r = Retriever(index, QueryEncoder(xb))
    q = ["numpy sort csv 7", "thread 150"]
    explicit = r.search(q, k=5, mode="hybrid", fusion="weighted", alpha=0.8, norm="zscore")
    assert [[h.id for h in row] for row in r.search(q, k=5)] == [[h.id for h in row] for row in explicit]
    assert r.options().mode == "hybrid" and r.options(mode="dense").mode == "dense"
    # the whole value and the keyword shortcuts are the same fields; an explicit field beats the manifest's
    from twotower.index.query import QueryOptions

    whole = r.search(q, options=QueryOptions(k=5, mode="hybrid", fusion="weighted", alpha=0.8, norm="zscore"))
    assert [[(h.id, h.score) for h in row] for row in whole] == [[(h.id, h.score) for h in row] for row in explicit]
    rrf = r.search(q, k=5, options=QueryOptions(fusion="rrf"))
    assert [[h.id for h in row] for row in rrf] == [[h.id for h in row] for row in r.search(q, k=5, fusion="rrf")]
    assert r.options(QueryOptions(fusion="rrf"), alpha=0.1).fusion == "rrf" and r.options(alpha=0.1).alpha == 0.1
