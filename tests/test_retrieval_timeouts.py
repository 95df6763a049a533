"""``twotower serve`` against stalling and misbehaving clients, over raw sockets to a real uvicorn server on
127.0.0.1 (the same ``uvicorn.Config`` as ``serve``): headers or a body slower than ``--read-timeout`` get 408
and the connection is closed, connections beyond ``--max-connections`` get 503, a Content-Type other than JSON
gets 415 naming it, and a normal request still gets its answer."""
from __future__ import annotations

import json
import socket
import threading
import time

import pytest

from tests.conftest import build_tiny_index

TIMEOUT = 0.5


@pytest.fixture(scope="module")
def server(_tiny_models, tmp_path_factory):
    import uvicorn

    from twotower.retrieval.config import ServeConfig
    from twotower.retrieval.retriever import Retriever
    from twotower.retrieval.server import create_app, uvicorn_config

    _, index_dir = build_tiny_index(tmp_path_factory.mktemp("timeouts"), _tiny_models["bert"], n_docs=12)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = ServeConfig(index=str(index_dir), device="cpu", port=port, read_timeout=TIMEOUT, keep_alive=1.0,
                         max_connections=3, reload_interval=0, log_level="critical")
    srv = uvicorn.Server(uvicorn_config(config, create_app(config, Retriever.load(index_dir, device="cpu"))))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not srv.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert srv.started
    yield port
    srv.should_exit = True
    thread.join(10)


def exchange(port: int, data: bytes, wait: float = 10.0) -> tuple[bytes, float, bool]:
    """Send ``data``, read until the server closes: (response bytes, seconds until closed, closed)."""
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.settimeout(wait)
        t0 = time.monotonic()
        s.sendall(data)
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
        except TimeoutError:
            return out, time.monotonic() - t0, False
        return out, time.monotonic() - t0, True


def status_and_body(raw: bytes) -> tuple[int, dict]:
    """The first response's status and JSON body (``{"text": ...}`` for uvicorn's own plain-text ones)."""
    head, _, rest = raw.partition(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length"))
    body = rest[:length]
    try:
        return int(head.split()[1]), json.loads(body)
    except json.JSONDecodeError:
        return int(head.split()[1]), {"text": body.decode()}


def post(body: bytes, ctype: str = "application/json", length: int | None = None) -> bytes:
    n = len(body) if length is None else length
    return (f"POST /search HTTP/1.1\r\nHost: x\r\nContent-Type: {ctype}\r\nContent-Length: {n}\r\n\r\n").encode() + body


def test_a_body_shorter_than_its_content_length_gets_408_and_the_connection_closes(server):
    raw, took, closed = exchange(server, post(b'{"queries": ["a"', length=200))
    status, body = status_and_body(raw)
    assert status == 408 and closed and took < TIMEOUT + 5, (raw, took)
    assert "body" in body["error"] and "read_timeout 0.5 s" in body["error"]


@pytest.mark.parametrize("data", [b"", b"POST /search HTTP/1.1\r\nHost: x\r\nContent-Le"], ids=["nothing", "half"])
def test_headers_that_never_finish_get_408_and_the_connection_closes(server, data):
    raw, took, closed = exchange(server, data)
    status, body = status_and_body(raw)
    assert status == 408 and closed and took < TIMEOUT + 5, (raw, took)
    assert body["error"].startswith("headers: ")


def test_json_sent_as_text_plain_gets_415_naming_the_content_type(server):
    raw, took, closed = exchange(server, post(b'{"queries": ["a"]}', ctype="text/plain"), wait=20)
    status, body = status_and_body(raw)
    assert raw.count(b"HTTP/1.1 ") == 1 and closed and took > TIMEOUT, raw  # kept alive, then closed: no 408
    assert status == 415 and "'text/plain'" in body["error"] and "application/json" in body["error"], raw


def test_connections_beyond_the_cap_get_503_and_the_server_recovers(server):
    held = [socket.create_connection(("127.0.0.1", server)) for _ in range(3)]  # stalled: each holds a slot
    try:
        # the server counts a held connection once its event loop has accepted it: on a loaded machine that can
        # take longer than any fixed sleep, so ask again (each probe closes) until the cap answers, within 10 s
        deadline = time.monotonic() + 10
        while True:
            raw, _, _ = exchange(server, post(b'{"queries": ["a"]}'), wait=5)
            if status_and_body(raw)[0] == 503 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert status_and_body(raw)[0] == 503, raw
    finally:
        for s in held:
            s.close()
    time.sleep(0.2)
    ok = request_ok(server)
    assert ok["results"] and len(ok["results"][0]) == 2


def request_ok(port: int) -> dict:
    body = b'{"queries": ["sort a list"], "k": 2}'
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.settimeout(30)
        s.sendall(post(body).replace(b"Host: x\r\n", b"Host: x\r\nConnection: close\r\n"))
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    status, parsed = status_and_body(out)
    assert status == 200, out
    return parsed
