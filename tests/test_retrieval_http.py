"""HTTP service: a real uvicorn server on a free loopback port, and TestClient for the error table."""
from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.conftest import QUERIES, build_tiny_index

httpx = pytest.importorskip("httpx")


@pytest.fixture(scope="module")
def retriever(_tiny_models, tmp_path_factory):
    from twotower.retrieval.retriever import Retriever

    _, index_dir = build_tiny_index(tmp_path_factory.mktemp("http"), _tiny_models["bert"])
    return Retriever.load(index_dir, device="cpu")


@pytest.fixture(scope="module")
def server_url(retriever) -> Iterator[str]:
    """uvicorn in a thread on a socket bound to 127.0.0.1:0 (no port race); stopped in teardown."""
    import uvicorn

    from twotower.retrieval.config import ServeConfig
    from twotower.retrieval.server import create_app

    # A long wait so the concurrent test's requests surely meet in one batch.
    config = ServeConfig(index="", max_wait_ms=50.0, max_batch=64)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(config, retriever), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start within 30 s"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()
        assert not thread.is_alive(), "uvicorn did not stop"


def _ids(results: list[list[dict]]) -> list[list[str]]:
    return [[h["id"] for h in row] for row in results]


def test_health_and_info(server_url, retriever) -> None:
    health = httpx.get(f"{server_url}/health", timeout=10).json()
    assert health["status"] == "ok" and health["ntotal"] == 60
    info = httpx.get(f"{server_url}/info", timeout=10).json()
    assert info["index"] == json.loads(json.dumps(retriever.index.manifest))
    assert info["towers"]["fingerprint"] == retriever.towers_meta["fingerprint"]
    assert info["serve"]["max_k"] == 1000 and info["dim"] == 32
    openapi = httpx.get(f"{server_url}/openapi.json", timeout=10).json()
    assert "/search" in openapi["paths"]
    assert httpx.get(f"{server_url}/docs", timeout=10).status_code == 200


def test_search_equals_retriever(server_url, retriever) -> None:
    r = httpx.post(f"{server_url}/search", json={"queries": QUERIES, "k": 4}, timeout=30)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["took_ms"] >= 0
    expected = retriever.search(QUERIES, k=4)
    assert _ids(body["results"]) == [[h.id for h in row] for row in expected]
    hit, ref = body["results"][0][0], expected[0][0]
    assert hit["score"] == pytest.approx(ref.score, abs=1e-5)
    assert {**hit, "score": 0} == {**ref.to_dict(), "score": 0}
    assert set(hit) == {"id", "score", "text", "title", "metadata", "rank"}


def test_concurrent_requests_are_batched_and_equal_serial(server_url, retriever) -> None:
    queries = [f"{QUERIES[i % len(QUERIES)]} {i}" for i in range(24)]
    ks = [3 + i % 3 for i in range(24)]  # mixed k inside one batch
    serial = [[h.id for h in retriever.search(q, k=k)[0]] for q, k in zip(queries, ks)]
    before = httpx.get(f"{server_url}/health", timeout=10).json()
    barrier = threading.Barrier(len(queries))

    def call(i: int) -> list[str]:
        with httpx.Client(timeout=30) as client:
            barrier.wait(10)
            r = client.post(f"{server_url}/search", json={"queries": [queries[i]], "k": ks[i]})
            assert r.status_code == 200, r.text
            return _ids(r.json()["results"])[0]

    with ThreadPoolExecutor(len(queries)) as pool:
        got = list(pool.map(call, range(len(queries))))
    assert got == serial
    after = httpx.get(f"{server_url}/health", timeout=10).json()
    batches = after["batches"] - before["batches"]
    assert after["queries"] - before["queries"] == len(queries)
    assert batches < len(queries), f"no micro-batching: {batches} batches for {len(queries)} requests"


# ---- error table (TestClient): each limit answers 422 with a message naming the field ----------------
@pytest.fixture(scope="module")
def client(retriever):
    from fastapi.testclient import TestClient

    from twotower.retrieval.config import ServeConfig
    from twotower.retrieval.server import create_app

    config = ServeConfig(index="", max_queries=4, max_query_chars=50, max_k=20, max_wait_ms=0.0)
    with TestClient(create_app(config, retriever)) as c:
        yield c


BAD_REQUESTS = [
    ({"queries": []}, "queries", "queries is empty"),
    ({"queries": [""]}, "queries.0", "query 0 is empty"),
    ({"queries": ["ok", "   "]}, "queries.1", "query 1 is empty"),
    ({"queries": ["a", "b", "c", "d", "e"]}, "queries", "too many queries: 5 > max_queries 4"),
    ({"queries": ["x" * 51]}, "queries.0", "too long: 51 chars > max_query_chars 50"),
    ({"queries": ["ok"], "k": 0}, "k", "between 1 and 20 (the cap), got 0"),
    ({"queries": ["ok"], "k": -5}, "k", "got -5"),
    ({"queries": ["ok"], "k": 21}, "k", "between 1 and 20 (the cap), got 21"),
    ({"queries": ["ok"], "k": "10"}, "k", "valid integer"),
    ({"queries": ["ok"], "k": 2.5}, "k", "valid integer"),
    ({"queries": ["ok"], "k": None}, "k", "valid integer"),
    ({"queries": ["ok"], "nprobe": 0}, "nprobe", "nprobe must be a positive integer"),
    ({"queries": "just a string"}, "queries", "valid list"),
    ({"queries": [1, "ok"]}, "queries.0", "valid string"),
    ({"queries": [["nested"]]}, "queries.0", "valid string"),
    ({"queries": None}, "queries", "valid list"),
    ({}, "queries", "Field required"),
    ({"query": ["typo"]}, "query", "Extra inputs are not permitted"),
    (["ok"], "body", "valid dictionary"),
    (b'{"queries": ["unterminated', "body", "JSON decode error"),
    (b"", "body", "Field required"),
    (b'{"queries": ["ok", "\\ud800 lone surrogate"]}', "queries.1", "lone UTF-16 surrogate"),
    ({"queries": ["ok"], "filter": {"lang": "py"}}, "filter",
     "unknown filter field 'lang': the index has fields source"),
    ({"queries": ["ok"], "filter": {"source": {"$like": "x"}}}, "filter",
     "unknown operator '$like' (valid operators: $eq"),
    ({"queries": ["ok"], "filter": {"source": {"$in": "src-1"}}}, "filter", "$in needs a list"),
    ({"queries": ["ok"], "filter": ["source"]}, "filter", "valid dictionary"),
    ({"queries": ["ok"], "mode": "sparse"}, "mode", "'dense', 'bm25' or 'hybrid'"),
    ({"queries": ["ok"], "fusion": "max"}, "fusion", "'rrf' or 'weighted'"),
    ({"queries": ["ok"], "alpha": 1.5}, "alpha", "alpha must be a number between 0 and 1"),
    ({"queries": ["ok"], "depth": 0}, "depth", "depth must be an integer between 1 and 100"),
    ({"queries": ["ok"], "rescore": 1001}, "rescore", "rescore must be an integer between 0 and 1000"),
]


@pytest.mark.parametrize("body, field, message", BAD_REQUESTS, ids=[str(i) for i in range(len(BAD_REQUESTS))])
def test_error_table(client, body, field, message) -> None:
    if isinstance(body, bytes):
        r = client.post("/search", content=body, headers={"content-type": "application/json"})
    else:
        r = client.post("/search", json=body)
    assert r.status_code == 422, r.text
    payload = r.json()
    assert message in payload["error"], payload
    assert f"body.{field}" in payload["error"] or field == "body", payload
    # FastAPI-style detail, without the ``input`` echo (a huge body is not sent back).
    assert payload["detail"] and all(set(d) == {"loc", "msg", "type"} for d in payload["detail"])
    # The server is still up and answers a valid request right after.
    ok = client.post("/search", json={"queries": ["sort a list"], "k": 2})
    assert ok.status_code == 200 and len(ok.json()["results"][0]) == 2


def test_oversized_and_unknown_length_bodies_refused_unread(client) -> None:
    big = json.dumps({"queries": ["x" * 9000]}).encode()  # over 4 * (12 * 50 + 8) + 4096 bytes
    r = client.post("/search", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and "over max_body_bytes 6528" in r.json()["error"]
    r = client.post("/search", content=iter([b'{"queries": ["ok"]}']), headers={"content-type": "application/json"})
    assert r.status_code == 411 and "Content-Length" in r.json()["error"]
    assert client.post("/search", json={"queries": ["sort a list"], "k": 2}).status_code == 200


def test_overloaded_queue_answers_503(retriever) -> None:
    import asyncio

    from twotower.retrieval.batcher import MicroBatcher, Overloaded

    async def scenario() -> None:
        batcher = MicroBatcher(retriever, max_batch=1, max_wait_ms=0, max_queue=1)
        batcher._thread = threading.current_thread()  # "started", but nothing drains the queue
        first = asyncio.ensure_future(batcher.search(["a"], 3))
        await asyncio.sleep(0)
        with pytest.raises(Overloaded, match="server busy: 1 requests already queued"):
            await batcher.search(["b"], 3)
        first.cancel()

    asyncio.run(scenario())


def test_serve_parser_builds_config() -> None:
    from twotower import cli as twotower_cli
    from twotower.common.cliargs import dataclass_from_args
    from twotower.retrieval.config import ServeConfig

    args = twotower_cli.build_parser().parse_args(
        ["serve", "--index", "IDX", "--port", "9001", "--max-batch", "8", "--max-wait-ms", "0.5", "--max-k", "50"])
    config = dataclass_from_args(ServeConfig, args)
    assert (config.index, config.port, config.max_batch, config.max_wait_ms, config.max_k) == ("IDX", 9001, 8, 0.5, 50)
    assert config.host == "127.0.0.1"


def test_mode_and_filter_over_http(client, retriever) -> None:
    """The HTTP fields reach Retriever.search; the mode defaults to the manifest's (dense here)."""
    for body in ({"mode": "hybrid", "fusion": "weighted", "alpha": 0.3, "filter": {"source": "src-1"}},
                 {"mode": "bm25", "filter": {"source": {"$in": ["src-2", "src-3"]}}}, {}):
        r = client.post("/search", json={"queries": ["sort a list", "thread lock queue"], "k": 5, **body})
        assert r.status_code == 200, r.text
        got = [[h["id"] for h in row] for row in r.json()["results"]]
        opts = {k: v for k, v in body.items()}
        want = retriever.search(["sort a list", "thread lock queue"], k=5, **opts)
        assert got == [[h.id for h in row] for row in want]
        if "filter" in body:
            allowed = body["filter"]["source"]
            allowed = allowed["$in"] if isinstance(allowed, dict) else [allowed]
            assert all(h["metadata"]["source"] in allowed for row in r.json()["results"] for h in row)
