"""A running server sees index changes (``retrieval.reload``): a real ``twotower serve`` process finds a doc
added by ``twotower index add`` and loses one removed by ``index remove``; requests in flight during the swaps
all succeed; a version that cannot be loaded leaves the old one serving."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.conftest import build_tiny_index
from twotower import cli as twotower_cli

httpx = pytest.importorskip("httpx")
ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}
TIMEOUT = 120  # seconds for a server to start or see a change, on the loaded 2-core box


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ids(url: str, query: str = "number") -> set[str]:
    r = httpx.post(f"{url}/search", json={"queries": [query], "k": 1000}, timeout=30)
    assert r.status_code == 200, r.text
    return {h["id"] for h in r.json()["results"][0]}


def wait_for(condition, what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        assert time.monotonic() < deadline, f"not within {TIMEOUT} s: {what}"
        time.sleep(0.1)


def test_serve_process_finds_an_added_doc_and_loses_a_removed_one(_tiny_models, tmp_path):
    towers, idx = build_tiny_index(tmp_path, _tiny_models["bert"], n_docs=20)
    port = free_port()
    log = (tmp_path / "serve.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "twotower.cli", "serve", "--index", str(idx), "--port", str(port),
                             "--device", "cpu", "--reload-interval", "0.2", "--log-level", "warning"],
                            env=ENV, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        def up() -> bool:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            try:
                return httpx.get(f"{url}/health", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        wait_for(up, "the server answers /health")
        assert "fresh-doc" not in ids(url) and httpx.get(f"{url}/health").json()["generation"] == 1
        new = tmp_path / "new.jsonl"
        new.write_text(json.dumps({"_id": "fresh-doc", "text": "a doc that was not there before"}) + "\n")
        assert twotower_cli.main(["index", "add", str(idx), "--corpus", str(new), "--device", "cpu",
                                  "--no-progress"]) == 0
        wait_for(lambda: "fresh-doc" in ids(url), "the added doc is found over HTTP")
        health = httpx.get(f"{url}/health").json()
        assert health["generation"] == 2 and health["ntotal"] == 21 and health["reloads"] == 1
        assert twotower_cli.main(["index", "remove", str(idx), "--ids", "fresh-doc", "doc-0"]) == 0
        wait_for(lambda: not {"fresh-doc", "doc-0"} & ids(url), "the removed docs are gone over HTTP")
        assert httpx.get(f"{url}/health").json()["generation"] == 3
        assert "now serving generation 3" in (tmp_path / "serve.log").read_text()
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


@pytest.fixture
def served(_tiny_models, tmp_path):
    """An in-process uvicorn on a free port serving a tiny index that the test changes underneath it."""
    import uvicorn

    from twotower.retrieval.config import ServeConfig
    from twotower.retrieval.server import create_app

    towers, idx = build_tiny_index(tmp_path, _tiny_models["bert"], n_docs=20)
    config = ServeConfig(index=str(idx), device="cpu", reload_interval=0.05, max_wait_ms=1.0)
    app = create_app(config)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    wait_for(lambda: server.started, "uvicorn starts")
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", idx, towers, app
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()


def test_requests_during_swaps_all_succeed(served, tmp_path):
    from twotower.index.mutate import add_docs, remove_docs
    from twotower.towers.inference import result_encoder
    from twotower.towers.model import TwoTower

    url, idx, towers, app = served
    encoder = result_encoder(TwoTower.load(towers), "cpu")
    stop = threading.Event()

    def client() -> list[int]:
        statuses = []
        with httpx.Client(timeout=60) as c:
            while not stop.is_set():
                statuses.append(c.post(f"{url}/search", json={"queries": ["sort a list", "open"], "k": 5})
                                .status_code)
        return statuses

    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(client) for _ in range(4)]
        for round_ in range(3):  # three versions published while the clients keep searching
            add_docs(idx, encoder, [{"_id": f"r{round_}", "text": f"round {round_} doc"}])
            remove_docs(idx, [f"doc-{round_}"])
            gen = 3 + 2 * round_
            wait_for(lambda g=gen: app.state.retriever.index.manifest["generation"] == g, f"generation {gen} served")
        stop.set()
        statuses = [s for f in futures for s in f.result()]
    assert statuses and set(statuses) == {200}, {s: statuses.count(s) for s in set(statuses)}
    assert {"r0", "r1", "r2"} <= ids(url) and not {"doc-0", "doc-1", "doc-2"} & ids(url)


def test_a_broken_version_keeps_the_old_one_serving(served, capsys):
    url, idx, _, app = served
    before = ids(url)
    from twotower.common.atomic import atomic_dir

    with atomic_dir(idx) as tmp:  # a new version whose manifest disagrees with its faiss file
        for f in idx.iterdir():
            (shutil.copytree if f.is_dir() else shutil.copy2)(f, tmp / f.name)
        manifest = json.loads((tmp / "manifest.json").read_text())
        (tmp / "manifest.json").write_text(json.dumps({**manifest, "ntotal": 7, "generation": 9}))
    wait_for(lambda: app.state.watcher.failed is not None, "the watcher tried the broken version")
    assert ids(url) == before and httpx.get(f"{url}/health").json()["generation"] == 1
    assert "not reloading" in capsys.readouterr().err


def test_a_server_of_a_symlinked_index_follows_the_swapped_link(_tiny_models, tmp_path):
    from twotower.retrieval.batcher import MicroBatcher
    from twotower.retrieval.config import ServeConfig
    from twotower.retrieval.reload import IndexWatcher
    from twotower.retrieval.retriever import Retriever

    towers, built = build_tiny_index(tmp_path, _tiny_models["bert"], n_docs=10)
    shutil.move(built, tmp_path / "index-v1")
    current = tmp_path / "current"
    current.symlink_to("index-v1")
    config = ServeConfig(index=str(current), device="cpu")
    batcher = MicroBatcher(Retriever.load(current, device="cpu"))
    watcher = IndexWatcher(config, batcher)
    assert not watcher.check(), "nothing changed yet"
    new = tmp_path / "new.jsonl"
    new.write_text(json.dumps({"_id": "fresh", "text": "brand new"}) + "\n")
    assert twotower_cli.main(["index", "add", str(current), "--corpus", str(new), "--device", "cpu",
                              "--no-progress"]) == 0
    assert watcher.check() and watcher.reloads == 1
    assert batcher.retriever.index.path == current and batcher.retriever.ntotal == 11
    assert "fresh" in batcher.retriever.index.docs["id"]
    assert not watcher.check(), "the same version is not loaded twice"
