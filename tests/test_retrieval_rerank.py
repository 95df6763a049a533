"""Rerank at search time: QueryOptions reranker/rerank through the Retriever (dense and hybrid), the CLI, and the
HTTP surface (rerank only: a client never names a dir to load)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from tests.conftest import QUERIES, build_tiny_index
from twotower import cli as twotower_cli
from twotower.index.corpus import doc_text
from twotower.index.query import QueryOptions, surface_fields


@pytest.fixture
def tiny(tiny_bert_dir, tmp_path):
    from twotower.towers.reranker import Reranker

    towers, index = build_tiny_index(tmp_path, tiny_bert_dir, n_docs=40)
    reranker = tmp_path / "reranker"
    Reranker.from_base(tiny_bert_dir, 48, device="cpu", seed=2).save(reranker, {"base": "tiny"})
    return towers, index, reranker


def test_retriever_reranks_the_first_stage_top_n(tiny):
    from twotower.retrieval.retriever import Retriever
    from twotower.towers.reranker import Reranker

    towers, index, reranker = tiny
    r = Retriever.load(index, towers, device="cpu")
    first = r.search(QUERIES, k=10)
    reranked = r.search(QUERIES, k=5, reranker=str(reranker), rerank=10)
    model = Reranker.load(reranker, "cpu")
    for q, hits, top in zip(QUERIES, first, reranked):
        texts = [doc_text(h.title or "", h.text) for h in hits]  # title + text, as indexed
        scores = model.score([q] * len(texts), texts)
        order = np.argsort(-scores, kind="stable")[:5]
        assert [h.id for h in top] == [hits[i].id for i in order]  # the top 10 reordered by the cross-encoder
        np.testing.assert_allclose([h.score for h in top], scores[order], rtol=1e-5, atol=1e-6)
    # hybrid first stage, rerank fewer than k: hits past N keep the first stage's order
    hybrid = r.search(QUERIES[:2], k=6, mode="hybrid")
    mixed = r.search(QUERIES[:2], k=6, mode="hybrid", reranker=str(reranker), rerank=3)
    for a, b in zip(hybrid, mixed):
        assert {h.id for h in a[:3]} == {h.id for h in b[:3]} and [h.id for h in a[3:]] == [h.id for h in b[3:]]
    assert r.search(QUERIES[:1], k=4, reranker=str(reranker), rerank=0) == r.search(QUERIES[:1], k=4)


def test_bad_rerank_options_are_refused_before_a_model_loads(tiny, tiny_bert_dir):
    from twotower.retrieval.retriever import Retriever

    towers, index, _ = tiny
    r = Retriever.load(index, towers, device="cpu")
    with pytest.raises(ValueError, match="rerank 5 needs a reranker"):
        r.search("sort a list", rerank=5)
    with pytest.raises(ValueError, match="not a one-label cross-encoder"):
        r.search("sort a list", rerank=5, reranker=str(tiny_bert_dir))
    with pytest.raises(ValueError, match="rerank must be an integer between 0 and 1000"):
        QueryOptions(rerank=5000)
    assert "rerank" in {f.name for f in surface_fields("http")}
    assert "reranker" not in {f.name for f in surface_fields("http")}, "a client never names a dir to load"


def test_search_cli_reranks(tiny, capsys):
    towers, index, reranker = tiny
    argv = ["search", "--index", str(index), "--towers", str(towers), "--device", "cpu", "-k", "3", "--json",
            "--reranker", str(reranker), "--rerank", "10", "sort a list"]
    assert twotower_cli.main(argv) == 0
    out = capsys.readouterr().out
    assert len(json.loads(out.strip().splitlines()[0])["hits"]) == 3
    assert twotower_cli.main(argv[:-5] + ["--rerank", "10", "sort a list"]) == 2
    assert "needs a reranker" in capsys.readouterr().err


def test_http_rerank_uses_the_manifest_reranker(tiny_bert_dir, tmp_path):
    from fastapi.testclient import TestClient

    from tests.conftest import make_corpus
    from twotower.index.build import build_index
    from twotower.index.config import IndexBuildConfig
    from twotower.retrieval.config import ServeConfig
    from twotower.retrieval.retriever import Retriever
    from twotower.retrieval.server import create_app
    from twotower.towers.inference import result_encoder
    from twotower.towers.model import TwoTower
    from twotower.towers.reranker import Reranker

    towers, reranker = tmp_path / "towers", tmp_path / "reranker"
    TwoTower.from_base(str(tiny_bert_dir), query_max_length=32, result_max_length=64).save(towers)
    Reranker.from_base(tiny_bert_dir, 48, device="cpu", seed=2).save(reranker, {"base": "tiny"})
    index = build_index(result_encoder(TwoTower.load(towers)), make_corpus(40), tmp_path / "index",
                        IndexBuildConfig(factory="Flat", default_reranker=str(reranker)), towers_dir=towers)
    r = Retriever.load(index, towers, device="cpu")
    want = [[h.id for h in hits] for hits in r.search(QUERIES[:2], k=3, rerank=10)]
    plain = [[h.id for h in hits] for hits in r.search(QUERIES[:2], k=3)]
    assert want != plain, "the rerank changes the top 3 (else this test could not tell)"
    with TestClient(create_app(ServeConfig(index="", max_wait_ms=0.0), r)) as c:
        got = c.post("/search", json={"queries": QUERIES[:2], "k": 3, "rerank": 10}).json()
        base = c.post("/search", json={"queries": QUERIES[:2], "k": 3}).json()
    assert [[h["id"] for h in hits] for hits in got["results"]] == want
    assert [[h["id"] for h in hits] for hits in base["results"]] == plain
