"""``serve --shards --engine ray``: Ray Serve over 3 shards (a deployment each + a router) answers exactly as one
merged Flat index served in process, with the same error table, /health and /info. One local 2-CPU Ray and one
deployment for the module (starting them costs seconds)."""
from __future__ import annotations

import json
import logging
import os
import socket
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray")
httpx = pytest.importorskip("httpx")

from tests.conftest import WORDS, make_corpus  # noqa: E402
from tests.test_retrieval_http import BAD_REQUESTS  # noqa: E402
from twotower.index.config import EncodeConfig, IndexBuildConfig, ShardConfig  # noqa: E402
from twotower.index.merge import merge_shards  # noqa: E402
from twotower.index.shard import build_shard  # noqa: E402
from twotower.retrieval.config import RayServeConfig, ServeConfig  # noqa: E402
from twotower.retrieval.ray_serve import ShardedRetriever, ShardServer, ShardSet, deploy, merge_topk  # noqa: E402
from twotower.retrieval.retriever import Hit, Retriever  # noqa: E402
from twotower.towers.inference import result_encoder  # noqa: E402
from twotower.towers.model import TwoTower  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
N_DOCS = 300
LIMITS = dict(max_queries=4, max_query_chars=50, max_k=20, max_wait_ms=0.0)


def queries(n: int = 50) -> list[str]:
    rng = np.random.default_rng(5)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(2, 6)))) for _ in range(n)]


@pytest.fixture(scope="module")
def built(tmp_path_factory, _tiny_models) -> dict[str, Path]:
    """TOWERS (tiny random BERT), 3 SHARD dirs of a 300-doc corpus, and the INDEX merged from them."""
    root = tmp_path_factory.mktemp("ray_serve")
    towers = root / "towers"
    TwoTower.from_base(str(_tiny_models["bert"]), shared=False, query_max_length=32, result_max_length=64).save(towers)
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(d) + "\n" for d in make_corpus(N_DOCS, seed=2)))
    encoder = result_encoder(TwoTower.load(towers), "cpu")
    for i in range(3):
        build_shard(encoder, corpus, root / "shards", ShardConfig(i, 3), EncodeConfig(progress=False),
                    towers_dir=towers)
    merged = merge_shards([root / "shards"], root / "merged", IndexBuildConfig(factory="Flat"))
    return {"towers": towers, "shards": root / "shards", "merged": merged}


@pytest.fixture(scope="module")
def local_client(built):
    """Today's in-process server over the merged index: the reference."""
    from fastapi.testclient import TestClient

    from twotower.retrieval.server import create_app

    retriever = Retriever.load(built["merged"], built["towers"], device="cpu")
    with TestClient(create_app(ServeConfig(index=str(built["merged"]), reload_interval=0, **LIMITS), retriever)) as c:
        yield c


@pytest.fixture(scope="module")
def ray_url(built) -> str:
    """The 3 shards deployed on Ray Serve (a local Ray with 2 CPUs) behind the router, on a free port."""
    from ray import serve

    os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = ServeConfig(host="127.0.0.1", port=port, device="cpu", **LIMITS)
    try:
        deploy(config, RayServeConfig(engine="ray", shards=[str(built["shards"])]))
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def test_sharded_search_equals_the_merged_index(ray_url, local_client):
    qs = queries(50)
    batches = [qs[i:i + 4] for i in range(0, len(qs), 4)]  # max_queries 4: 13 requests, sent concurrently
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda b: httpx.post(f"{ray_url}/search", json={"queries": b, "k": 10}, timeout=60),
                            batches))
    for batch, r in zip(batches, got):
        want = local_client.post("/search", json={"queries": batch, "k": 10})
        assert r.status_code == want.status_code == 200, r.text
        assert r.json()["results"] == want.json()["results"]  # ids, scores, texts, metadata, ranks: all equal
    # k larger than a shard's top-k overlap, and the cap
    for k in (1, 20):
        r = httpx.post(f"{ray_url}/search", json={"queries": qs[:3], "k": k}, timeout=60)
        assert r.json()["results"] == local_client.post("/search", json={"queries": qs[:3], "k": k}).json()["results"]


@pytest.mark.parametrize("body, field, message", BAD_REQUESTS, ids=[str(i) for i in range(len(BAD_REQUESTS))])
def test_error_table_is_the_same(ray_url, local_client, body, field, message):
    kwargs = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) \
        else {"json": body}
    r = httpx.post(f"{ray_url}/search", timeout=30, **kwargs)
    want = local_client.post("/search", **kwargs)
    if isinstance(body, dict) and (isinstance(body.get("filter"), dict) or body.get("mode") in ("bm25", "hybrid")):
        # shards hold vectors and docs only: a filter or a BM25 mode is one 422 naming --engine ray
        assert r.status_code == want.status_code == 422 and "--engine ray" in r.json()["error"], r.text
        return
    assert r.status_code == want.status_code == 422 and message in r.json()["error"]
    assert r.json() == want.json()


def test_body_limits_health_and_info(ray_url, local_client, built):
    big = json.dumps({"queries": ["x" * 9000]}).encode()
    r = httpx.post(f"{ray_url}/search", content=big, headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 413 and r.json() == local_client.post(
        "/search", content=big, headers={"content-type": "application/json"}).json()
    health = httpx.get(f"{ray_url}/health", timeout=30).json()
    want = local_client.get("/health").json()
    assert health["status"] == "ok" and health["ntotal"] == N_DOCS and set(health) == set(want)
    info = httpx.get(f"{ray_url}/info", timeout=30).json()
    assert info["ntotal"] == N_DOCS and info["dim"] == 32 and set(info) == set(local_client.get("/info").json())
    assert [s["rows"] for s in info["index"]["shards"]] == [[0, 100], [100, 200], [200, 300]]
    assert info["index"]["fingerprint"] == info["towers"]["fingerprint"]


def test_merge_topk_breaks_ties_by_row_and_renumbers_ranks():
    def part(scores, rows):
        D, R = np.array([scores], np.float32), np.array([rows], np.int64)
        hits = [[Hit(f"d{r}", float(s), "", rank=j + 1) for j, (s, r) in enumerate(zip(scores, rows)) if r >= 0]]
        return D, R, hits

    merged = merge_topk([part([0.9, 0.5], [7, 8]), part([0.9, 0.7], [3, -1]), part([0.95, 0.1], [20, 21])], 4)
    assert [(h.id, h.rank) for h in merged[0]] == [("d20", 1), ("d3", 2), ("d7", 3), ("d8", 4)]


def test_sharded_retriever_without_ray_equals_merged(built):
    """The same fan-out and merge with in-process shard servers (what each deployment runs)."""
    servers = [ShardServer(str(p)) for p in sorted(built["shards"].glob("shard-*"))]
    local = Retriever.load(built["merged"], built["towers"], device="cpu")
    sharded = ShardedRetriever([s.search for s in servers], ShardSet.from_shards([built["shards"]]), local.tower)
    qs = queries(20)
    assert [[h.to_dict() for h in row] for row in sharded.search(qs, k=15)] == \
        [[h.to_dict() for h in row] for row in local.search(qs, k=15)]
