"""Every index kind x every query option x add/remove, as ONE generated matrix against an exact reference.

Each feature has its own tests; this file tests the combinations nobody wrote a test for. The matrix is the
product of: the index kind (Flat, IVF, SQ, PQ, HNSW, binary, PQ re-scored, a Matryoshka ``--dim``, shards
served by the sharded router), the state (as built, or after ``index add`` and ``index remove``), and the
query options (mode dense/bm25/hybrid, fusion rrf/weighted, a filter or none, rescore default/off/4, k 1/10/50).

The reference is exact: synthetic vectors (``index.synthetic``) with a query table, so the true dense top-k
of the live, allowed rows is a numpy sort; BM25 and hybrid are compared with the Flat index's answer (the
same BM25 side, an exact dense side). Every cell must either answer with:

- only live rows that pass the filter, no duplicates, ranks 1..n, scores descending, as many hits as
  ``min(k, live allowed rows)`` (dense and hybrid);
- exact kinds (Flat, IVF at nprobe = nlist, any re-scored search): the exact top-k scores, and every dense
  score the true inner product of its doc; approximate kinds: recall@k above a floor;

or refuse with one ValueError naming the option, and only where the kind declares it unsupported (the
sharded router serves dense without filter or re-scoring; re-scoring needs kept vectors). The default run
takes a covering subset (every value of every option with every kind and state); ``-m slow`` the product.
"""
from __future__ import annotations

import itertools
import shutil
from typing import Any

import numpy as np
import pytest

pytest.importorskip("bm25s")

from twotower.index.build import build_index  # noqa: E402
from twotower.index.config import EncodeConfig, IndexBuildConfig, ShardConfig  # noqa: E402
from twotower.index.load import load_index  # noqa: E402
from twotower.index.mutate import add_docs, remove_docs  # noqa: E402
from twotower.index.shard import build_shard  # noqa: E402
from twotower.index.synthetic import TableEncoder, clustered_vectors  # noqa: E402
from twotower.retrieval.ray_serve import ShardedRetriever, ShardServer, ShardSet  # noqa: E402
from twotower.retrieval.retriever import Retriever  # noqa: E402

N, N_ADD, D, NQ = 400, 40, 32, 12
ENC = EncodeConfig(progress=False)
WORDS = ["numpy", "sort", "array", "file", "open", "python", "list", "graph", "csv", "parse", "socket", "thread"]
FILTER = {"bucket": {"$lt": 30}}
# kind -> (IndexBuildConfig kwargs, exact: scores must equal the true top-k; else the recall@k floor)
KINDS: dict[str, tuple[dict[str, Any], float | None]] = {
    "flat": ({"factory": "Flat", "keep_vectors": "none"}, None),
    "ivf": ({"factory": "IVF8,Flat", "nprobe": 8}, None),  # every list probed: exact
    "sq": ({"factory": "IVF8,SQ8", "nprobe": 8, "keep_vectors": "float32"}, 0.8),
    "pq": ({"factory": "PQ4", "rescore": 0, "keep_vectors": "float32"}, 0.3),
    "hnsw": ({"factory": "HNSW16", "ef_search": 64, "keep_vectors": "float32"}, 0.8),
    "binary": ({"factory": "BFlat", "keep_vectors": "float32"}, 0.2),
    "rescored": ({"factory": "PQ4", "rescore": 8}, 0.8),  # re-scored by default: recall of the PQ candidates
    "dim16": ({"factory": "Flat", "dim": 16, "keep_vectors": "float32"}, None),  # Matryoshka: queries cut too
    "sharded": ({}, None),  # 2 SHARD dirs searched exactly, merged by the router
}
STATES = ["built", "mutated"]
MODES = [("dense", None), ("bm25", None), ("hybrid", "rrf"), ("hybrid", "weighted")]
FILTERS = [None, FILTER]
RESCORES = [None, 0, 4]
KS = [1, 10, 50]


def rows(ids: range) -> list[dict]:
    """Docs with words (BM25) and metadata (the filter); the text ends with the row (TableEncoder)."""
    return [{"_id": f"d{i}", "text": f"{WORDS[i % 12]} {WORDS[(i * 7) % 12]} {WORDS[(i * 5 + 1) % 12]} {i}",
             "bucket": i % 100} for i in ids]


class QueryEncoder(TableEncoder):
    """Query ``"words j"`` encodes to row j of the query table (the retriever's warm-up: row 0)."""

    def encode(self, texts, batch_size=64, show_progress=False):
        last = [t.rsplit(" ", 1)[-1] for t in texts]
        return self.table[[int(x) if x.isdigit() else 0 for x in last]]


XB = clustered_vectors(N + N_ADD, D, n_clusters=20, seed=11)
XQ = clustered_vectors(NQ, D, n_clusters=20, seed=12)
QUERIES = [f"{WORDS[j % 12]} {WORDS[(j * 5) % 12]} {j}" for j in range(NQ)]
REMOVED = list(range(5, N, 9))  # ids removed in the mutated state (tombstones), some inside the filter


def live_mask(state: str) -> np.ndarray:
    live = np.zeros(N + N_ADD, bool)
    live[:N] = True
    if state == "mutated":
        live[N:] = True
        live[REMOVED] = False
    return live


def cut(x: np.ndarray, dim: int) -> np.ndarray:
    x = x[:, :dim]
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def retrievers(tmp_path_factory) -> dict[tuple[str, str], Retriever]:
    root = tmp_path_factory.mktemp("combinations")
    out: dict[tuple[str, str], Retriever] = {}
    for kind, (kwargs, _) in KINDS.items():
        if kind == "sharded":
            for i in range(2):
                build_shard(TableEncoder(XB), rows(range(N)), root / "shards", ShardConfig(i, 2), ENC)
            servers = [ShardServer(str(p)) for p in sorted((root / "shards").glob("shard-*"))]
            out[kind, "built"] = ShardedRetriever([s.search for s in servers], ShardSet.from_shards([root / "shards"]),
                                                  QueryEncoder(XQ))
            continue
        built = build_index(TableEncoder(XB), rows(range(N)), root / kind, IndexBuildConfig(**kwargs), ENC)
        out[kind, "built"] = Retriever(load_index(built, "cpu"), QueryEncoder(XQ))
        mutated = root / f"{kind}-mutated"
        shutil.copytree(built, mutated)
        add_docs(mutated, TableEncoder(XB), rows(range(N, N + N_ADD)), ENC)
        remove_docs(mutated, [f"d{i}" for i in REMOVED])
        out[kind, "mutated"] = Retriever(load_index(mutated, "cpu"), QueryEncoder(XQ))
    return out


def refusal(kind: str, opts: dict[str, Any], retriever: Retriever) -> str | None:
    """The option a kind declares unsupported for ``opts`` (the word its ValueError must name), or None."""
    if kind == "sharded":
        if opts["mode"] != "dense":
            return "mode"
        if opts["filter"]:
            return "filter"
        if opts["rescore"]:
            return "rescore"
    if opts["rescore"] and retriever.index.manifest.get("vectors") in (None, "none"):
        return "rescore"
    return None


def exact_dense(kind: str, state: str, flt: dict | None, k: int) -> tuple[np.ndarray, np.ndarray]:
    """True top-k (scores (nq, <=k), rows) of the live allowed docs, at the kind's dim."""
    dim = KINDS[kind][0].get("dim") or D
    xb, xq = cut(XB, dim), cut(XQ, dim)
    ok = live_mask(state if kind != "sharded" else "built")
    if flt:
        ok &= (np.arange(N + N_ADD) % 100) < 30
    s = xq @ xb.T
    s[:, ~ok] = -np.inf
    order = np.argsort(-s, axis=1, kind="stable")[:, : min(k, int(ok.sum()))]
    return np.take_along_axis(s, order, 1), order


def check_cell(retrievers, kind: str, state: str, mode: str, fusion: str | None, flt: dict | None,
               rescore: int | None, k: int) -> None:
    r = retrievers[kind, state]
    opts = {"mode": mode, "fusion": fusion, "filter": flt, "rescore": rescore}
    cell = f"{kind}/{state} mode={mode} fusion={fusion} filter={flt} rescore={rescore} k={k}"
    refused = refusal(kind, opts, r)
    try:
        hits = r.search(QUERIES, k=k, **opts)
    except ValueError as exc:
        assert refused and refused in str(exc) and "\n" not in str(exc), f"{cell}: refused: {exc}"
        return
    assert refused is None, f"{cell}: answered, but {refused} was expected to be refused"
    live = live_mask(state if kind != "sharded" else "built")
    want_scores, want_rows = exact_dense(kind, state, flt, k)
    recalls: list[float] = []  # approximate kinds: recall@k per query, floored on the mean
    for q, row in enumerate(hits):
        got = [int(h.id[1:]) for h in row]
        assert len(set(got)) == len(got), f"{cell}: duplicate hits {got}"
        assert all(live[g] for g in got), f"{cell}: a removed doc came back: {got}"
        assert not flt or all(h.metadata["bucket"] < 30 for h in row), f"{cell}: the filter let through {got}"
        assert [h.rank for h in row] == list(range(1, len(row) + 1)), f"{cell}: ranks {[h.rank for h in row]}"
        scores = [h.score for h in row]
        assert scores == sorted(scores, reverse=True), f"{cell}: scores not descending {scores}"
        if mode != "bm25":  # the dense side always finds k (BM25 only docs sharing a word)
            assert len(row) == want_rows.shape[1], f"{cell}: {len(row)} hits, {want_rows.shape[1]} expected"
        if mode != "dense":
            continue
        floor = KINDS[kind][1]
        rescored = bool(rescore) or (rescore is None and KINDS[kind][0].get("rescore", 0) > 0)
        if floor is None:  # re-scoring an approximate kind re-orders its candidates: exact scores, not the top-k
            np.testing.assert_allclose(scores, want_scores[q], atol=1e-4, err_msg=cell)
        else:
            recalls.append(len(set(got) & set(want_rows[q].tolist())) / max(len(got), 1))
        exact_scored = floor is None or rescored or kind in ("hnsw",)  # float vectors behind the score
        if exact_scored:
            dim = KINDS[kind][0].get("dim") or D
            true = cut(XQ, dim)[q] @ cut(XB, dim)[got].T
            np.testing.assert_allclose(scores, true, atol=1e-4, err_msg=f"{cell}: a score is not its doc's")
    if recalls and k >= 10:  # recall@1 of a compressed code is a coin flip by design: floored from k = 10
        off = kind == "rescored" and rescore == 0  # its re-scoring turned off: plain PQ codes
        floor = KINDS["pq" if off else kind][1]
        assert np.mean(recalls) >= floor, f"{cell}: mean recall@{k} {np.mean(recalls):.2f} < {floor}"
    if mode != "dense" and kind not in ("sharded", "dim16") and KINDS[kind][1] is None:
        ref = retrievers["flat", state].search(QUERIES, k=k, **{**opts, "rescore": None})  # the same fused answer
        assert [[h.id for h in row] for row in hits] == [[h.id for h in row] for row in ref], cell


def all_cells() -> list[tuple]:
    return [(kind, state, *mode, flt, rescore, k) for kind, state, mode, flt, rescore, k in
            itertools.product(KINDS, STATES, MODES, FILTERS, RESCORES, KS) if not (kind == "sharded" and
                                                                                   state == "mutated")]


def covering_cells() -> list[tuple]:
    """Every value of every option with every (kind, state), in 12 cells each (the longest option list is 4,
    so cycling the lists side by side pairs each value with several of the others)."""
    out = []
    for kind, state in itertools.product(KINDS, STATES):
        if kind == "sharded" and state == "mutated":
            continue
        for i in range(12):
            mode = MODES[i % len(MODES)]
            out.append((kind, state, *mode, FILTERS[(i // 4) % 2], RESCORES[i % 3], KS[(i // 2) % 3]))
    return out


def test_the_matrix_covers_every_value_of_every_option_with_every_kind():
    cells = covering_cells()
    for kind in KINDS:
        mine = [c for c in cells if c[0] == kind]
        for col, values in ((2, {m for m, _ in MODES}), (3, {f for _, f in MODES}), (5, set(RESCORES)), (6, set(KS))):
            assert {c[col] for c in mine} == values, (kind, col)
        assert {str(c[4]) for c in mine} == {str(f) for f in FILTERS}


def check_all(retrievers, cells: list[tuple]) -> None:
    """Every cell, then one report of every failing cell (a combination bug rarely comes alone)."""
    failed = []
    for cell in cells:
        try:
            check_cell(retrievers, *cell)
        except AssertionError as exc:
            failed.append(" ".join(str(exc).split())[:400])
        except Exception as exc:  # noqa: BLE001 (a crash in one cell is reported with the others)
            failed.append(f"{cell}: {type(exc).__name__}: {str(exc)[:200]}")
    assert not failed, f"{len(failed)} of {len(cells)} cells:\n" + "\n".join(failed)


def test_every_kind_with_every_query_option_and_add_remove(retrievers):
    check_all(retrievers, covering_cells())


@pytest.mark.slow
def test_the_whole_matrix(retrievers):
    check_all(retrievers, all_cells())


# ---- isolation: one shard's failure is named in the answer, not a 500 for everyone -----------------------
def test_one_failing_shard_is_named_and_the_others_still_answer(retrievers, tmp_path):
    """Fault injected at one shard call (its node gone: OSError): the HTTP answer is 200 with the other shard's
    hits and ``failed_shards`` naming it; every shard failing is a 503 naming them, never a 500."""
    from fastapi.testclient import TestClient

    from twotower.retrieval.config import ServeConfig
    from twotower.retrieval.server import create_app

    r = retrievers["sharded", "built"]
    good = list(r.shards)

    def gone(xq, k, nprobe):
        raise OSError("connection refused by the shard's node")

    config = ServeConfig(index="shards", device="cpu", reload_interval=0, max_wait_ms=0)
    try:
        with TestClient(create_app(config, r)) as client:
            r.shards = [good[0], gone]
            resp = client.post("/search", json={"queries": QUERIES[:3], "k": 10})
            assert resp.status_code == 200, resp.text
            body = resp.json()
            assert len(body["failed_shards"]) == 1 and body["failed_shards"][0].startswith("shard 1 (")
            assert "OSError: connection refused" in body["failed_shards"][0]
            rows = r.index.manifest["shards"][0]["rows"]
            for hits in body["results"]:  # shard 0's exact top-10 of its own rows
                assert len(hits) == 10 and all(rows[0] <= int(h["id"][1:]) < rows[1] for h in hits)
            r.shards = [gone, gone]
            resp = client.post("/search", json={"queries": QUERIES[:1]})
            assert resp.status_code == 503 and "every shard failed" in resp.json()["error"], resp.text
            assert "shard 0 (" in resp.json()["error"] and "shard 1 (" in resp.json()["error"]
            r.shards = good
            resp = client.post("/search", json={"queries": QUERIES[:1]})
            assert resp.status_code == 200 and "failed_shards" not in resp.json(), resp.text
    finally:
        r.shards = good
