"""Retriever: same answers as a direct faiss search with the same tower, right doc rows, thread safety."""
from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import QUERIES, build_tiny_index, make_corpus


@pytest.fixture(scope="module")
def built(_tiny_models, tmp_path_factory) -> tuple[Path, Path]:
    return build_tiny_index(tmp_path_factory.mktemp("retrieval"), _tiny_models["bert"])


@pytest.fixture(scope="module")
def retriever(built):
    from twotower.retrieval.retriever import Retriever

    towers, index_dir = built
    return Retriever.load(index_dir, device="cpu")


def test_results_equal_direct_faiss_search(built, retriever) -> None:
    import faiss

    from twotower.towers.model import Tower

    towers, index_dir = built
    tower = Tower.load(towers / "query_tower")
    xq = tower.encode(QUERIES)
    index = faiss.read_index(str(index_dir / "index.faiss"))
    D, I = index.search(xq, 5)
    corpus = make_corpus()
    results = retriever.search(QUERIES, k=5)
    assert len(results) == len(QUERIES)
    for q, hits in enumerate(results):
        assert [h.id for h in hits] == [corpus[i]["_id"] for i in I[q]]
        np.testing.assert_allclose([h.score for h in hits], D[q], rtol=1e-5, atol=1e-5)
        assert [h.rank for h in hits] == [1, 2, 3, 4, 5]


def test_hits_carry_texts_titles_metadata(retriever) -> None:
    by_id = {d["_id"]: d for d in make_corpus()}
    for hits in retriever.search(QUERIES, k=60):
        assert len(hits) == 60 and len({h.id for h in hits}) == 60  # every doc exactly once
        assert all(a.score >= b.score for a, b in zip(hits, hits[1:]))
        for h in hits:
            doc = by_id[h.id]
            assert h.text == doc["text"]
            assert h.title == doc["title"]
            assert h.metadata.get("source") == doc["source"]
            json.dumps(h.to_dict())  # JSON-ready


def test_str_query_gives_one_list_and_matches_batch(retriever) -> None:
    single = retriever.search(QUERIES[2], k=3)
    assert len(single) == 1
    assert [h.id for h in single[0]] == [h.id for h in retriever.search(QUERIES, k=3)[2]]


def test_search_vectors_equals_search(retriever) -> None:
    xq = retriever.encode(QUERIES)
    assert xq.shape == (len(QUERIES), retriever.dim) and xq.dtype == np.float32
    by_text = retriever.search(QUERIES, k=4)
    by_vec = retriever.search_vectors(xq, k=4)
    assert [[h.id for h in r] for r in by_vec] == [[h.id for h in r] for r in by_text]
    assert [h.id for h in retriever.search_vectors(xq[1], k=4)[0]] == [h.id for h in by_text[1]]
    with pytest.raises(ValueError, match=r"shape \(nq, 32\)"):
        retriever.search_vectors(np.zeros((2, 7), np.float32), k=3)


@pytest.mark.parametrize("k, match", [(0, "got 0"), (-3, "got -3"), (1001, "1000 .the cap.*got 1001"),
                                      (2.5, "integer"), (True, "integer")])
def test_k_validation_names_value_and_cap(retriever, k, match) -> None:
    with pytest.raises(ValueError, match=match):
        retriever.search("sort a list", k=k)


@pytest.mark.parametrize("queries, match", [([""], "query 0 is empty"), (["ok", "  "], "query 1 is empty"),
                                            (["ok", 3], "query 1 must be a str"),
                                            (["ok", "\ud800x"], "query 1 .*lone UTF-16 surrogate")])
def test_bad_queries_rejected(retriever, queries, match) -> None:
    with pytest.raises(ValueError, match=match):
        retriever.search(queries, k=3)


def test_threads_get_the_same_answers_as_serial_calls(retriever) -> None:
    queries = [QUERIES[i % len(QUERIES)] + f" {i}" for i in range(20)]
    serial = [[(h.id, h.score) for h in retriever.search(q, k=7)[0]] for q in queries]
    errors: list[BaseException] = []
    got: dict[tuple[int, int], list] = {}

    def worker(t: int) -> None:
        try:
            for i, q in enumerate(queries):
                got[t, i] = [(h.id, h.score) for h in retriever.search(q, k=7)[0]]
        except BaseException as exc:  # noqa: BLE001 - surfaced by the assert below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert not errors, errors
    for (t, i), hits in got.items():
        assert [h[0] for h in hits] == [s[0] for s in serial[i]]
        np.testing.assert_allclose([h[1] for h in hits], [s[1] for s in serial[i]], rtol=1e-5, atol=1e-6)
    assert len(got) == 8 * 20


def test_fingerprint_mismatch_refused(built, _tiny_models, tmp_path) -> None:
    from twotower.retrieval.retriever import Retriever
    from twotower.towers.model import TwoTower

    _, index_dir = built
    other = tmp_path / "other-towers"
    model = TwoTower.from_base(str(_tiny_models["bert"]), shared=False)
    with __import__("torch").no_grad():
        for p in model.result_tower.parameters():
            p.add_(0.01)  # different weights: a different vector space
    model.save(other)
    with pytest.raises(ValueError, match="fingerprint"):
        Retriever.load(index_dir, towers_dir=other, device="cpu")


def test_towers_taken_from_manifest(built, retriever) -> None:
    towers, _ = built
    assert Path(retriever.towers_meta["path"]).resolve() == towers.resolve()
    info = retriever.info()
    assert info["ntotal"] == 60 and info["dim"] == 32 and "fingerprint" in info["towers"]


def test_k_above_ntotal_returns_every_doc_once(retriever) -> None:
    hits = retriever.search("sort a list", k=100)[0]  # faiss pads with -1 beyond the 60 docs
    assert len(hits) == 60 and [h.rank for h in hits] == list(range(1, 61))


def test_ivf_nprobe_passes_through(_tiny_models, tmp_path, retriever) -> None:
    from twotower.retrieval.retriever import Retriever

    _, ivf_dir = build_tiny_index(tmp_path, _tiny_models["bert"], factory="IVF4,Flat")
    ivf = Retriever.load(ivf_dir, device="cpu")
    exact = [[h.id for h in row] for row in retriever.search(QUERIES, k=5)]
    # Visiting all 4 lists is an exhaustive search: the same hits as the Flat index.
    assert [[h.id for h in row] for row in ivf.search(QUERIES, k=5, nprobe=4)] == exact
    one_list = ivf.search(QUERIES, k=60, nprobe=1)
    assert all(len(row) < 60 for row in one_list)  # one list holds only part of the corpus
    with pytest.raises(ValueError, match="nprobe must be a positive integer"):
        ivf.search("x", k=3, nprobe=0)


def test_bf16_precision_close_to_fp32(built, retriever) -> None:
    from twotower.retrieval.retriever import Retriever

    _, index_dir = built
    with pytest.raises(ValueError, match="unknown precision 'int4': choose fp32, bf16, fp16"):
        Retriever.load(index_dir, device="cpu", precision="int4")
    fast = Retriever(retriever.index, retriever.tower, precision="bf16")
    np.testing.assert_allclose(fast.encode(QUERIES), retriever.encode(QUERIES), atol=2e-2)
    assert fast.info()["precision"] == "bf16"


def test_doctable_chunked_take_equals_combined() -> None:
    import datasets

    from twotower.retrieval.doctable import DocTable

    # Five record batches of 7 rows, like a memory-mapped doc store cut into chunks.
    parts = [datasets.Dataset.from_dict({"id": [f"d{c * 7 + i}" for i in range(7)],
                                         "text": [f"text {c * 7 + i}" for i in range(7)],
                                         "title": [""] * 7, "metadata": ["{}"] * 7}) for c in range(5)]
    docs = datasets.concatenate_datasets(parts)
    rows = np.array([34, 0, 17, 17, 3, 29, 8, 7], dtype=np.int64)
    chunked, combined = DocTable(docs, max_in_memory_bytes=0), DocTable(docs)
    assert not chunked.in_memory and combined.in_memory
    assert chunked.take(rows) == combined.take(rows)
    assert combined.take(rows)["id"] == [f"d{r}" for r in rows]
    assert chunked.take(np.array([], np.int64))["id"] == []
    with pytest.raises(IndexError, match="doc row 35 out of range"):
        chunked.take(np.array([35]))
