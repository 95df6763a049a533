"""Soak test of `twotower serve`: 10k valid and invalid requests from concurrent clients, on loopback only.

Builds TOWERS + INDEX in a temp dir (MiniLM towers, or a tiny random BERT with --base tiny), starts a real
``twotower serve`` on a free 127.0.0.1 port, and sends --requests requests from --concurrency keep-alive
clients: about half valid searches (one query, batches, k up to the cap, unicode), the rest every kind of
bad request a client can send (k/nprobe out of range or of the wrong type, empty/too long/too many/non-string
queries, lone surrogates, extra fields, malformed or non-UTF-8 or over-deep JSON, a body over the limit, a
chunked body, wrong path/method). Each kind has the status it must get.

With ``--mutate-every SECONDS`` the index changes under the running server: every SECONDS a real
``twotower index add`` (5 new docs) or ``twotower index remove`` (the docs of the previous add) runs against
the served INDEX dir, and the server swaps each new version in between batches (``retrieval.reload``).

Checks (exit status 1 if any fails): no 5xx, every request got its kind's status, no connection errors or
timeouts, the server is alive and answers /health at the end, and its RSS grew < --max-rss-growth between
the end of the first thousand requests and the end of the last thousand; with --mutate-every also: every
add/remove succeeded and the server ends up serving the index's last generation. Prints a summary and one
JSON line.

    python -m scripts.soak_serve                      # MiniLM towers, 2000 docs, 10k requests, 16 clients
    python -m scripts.soak_serve --base tiny --requests 2000
    python -m scripts.soak_serve --mutate-every 5     # the same, with an add or a remove every 5 s
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scripts.bench_common import command_line, machine, stop_server, versions
from scripts.bench_serve import start_server, synthetic_texts, vocabulary  # (also sets OMP passive waits)

HOST = "127.0.0.1"  # loopback only: the soak never exposes a port to the network
MAX_QUERIES, MAX_QUERY_CHARS, MAX_K = 64, 2048, 1000  # the serve defaults (retrieval.config.ServeConfig)


# ---- the request mix ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Kind:
    """One kind of request: how to build it, how often, and the status(es) it must get."""

    name: str
    weight: float
    expect: tuple[int, ...]
    build: Callable[[random.Random, list[str]], bytes]  # -> the raw HTTP request
    fresh_connection: bool = False  # the server may close the connection after answering


def post(body: bytes | str, path: str = "/search", length: int | None = None) -> bytes:
    body = body.encode("utf-8", "surrogatepass") if isinstance(body, str) else body
    n = len(body) if length is None else length
    return (f"POST {path} HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {n}\r\n\r\n").encode() + body


def search(queries: Any, **fields: Any) -> bytes:
    return post(json.dumps({"queries": queries, **fields}))


def get(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode()


def kinds() -> list[Kind]:
    q = lambda r, qs: r.choice(qs)  # noqa: E731
    return [
        # valid: ~55% of the traffic
        Kind("valid-one-query", 25, (200,), lambda r, qs: search([q(r, qs)], k=10)),
        Kind("valid-batch", 12, (200,), lambda r, qs: search(r.sample(qs, r.randint(2, 8)), k=r.randint(1, 100))),
        Kind("valid-k-at-cap", 3, (200,), lambda r, qs: search([q(r, qs)], k=MAX_K)),
        Kind("valid-max-queries", 2, (200,), lambda r, qs: search(r.choices(qs, k=MAX_QUERIES), k=5)),
        Kind("valid-unicode", 5, (200,), lambda r, qs: search([q(r, qs) + " 検索 🔍 café\x00"], k=3)),
        Kind("valid-nprobe", 5, (200,), lambda r, qs: search([q(r, qs)], k=10, nprobe=r.randint(1, 64))),
        Kind("health", 3, (200,), lambda r, qs: get("/health")),
        # invalid fields: 422 with a message naming the field
        Kind("k-zero", 2, (422,), lambda r, qs: search([q(r, qs)], k=0)),
        Kind("k-negative", 1, (422,), lambda r, qs: search([q(r, qs)], k=-r.randint(1, 10**6))),
        Kind("k-above-cap", 2, (422,), lambda r, qs: search([q(r, qs)], k=MAX_K + 1)),
        Kind("k-huge", 1, (422,), lambda r, qs: search([q(r, qs)], k=2**64)),
        Kind("k-string", 2, (422,), lambda r, qs: search([q(r, qs)], k="10")),
        Kind("k-float", 1, (422,), lambda r, qs: search([q(r, qs)], k=2.5)),
        Kind("nprobe-zero", 1, (422,), lambda r, qs: search([q(r, qs)], nprobe=0)),
        Kind("nprobe-huge", 1, (422,), lambda r, qs: search([q(r, qs)], nprobe=2**64)),
        Kind("queries-empty", 2, (422,), lambda r, qs: search([])),
        Kind("query-blank", 2, (422,), lambda r, qs: search([q(r, qs), "   "])),
        Kind("query-not-string", 2, (422,), lambda r, qs: search([q(r, qs), 42])),
        Kind("queries-not-list", 1, (422,), lambda r, qs: search(q(r, qs))),
        Kind("queries-missing", 1, (422,), lambda r, qs: post(json.dumps({"k": 3}))),
        Kind("query-lone-surrogate", 2, (422,), lambda r, qs: search([q(r, qs) + "\ud800"])),
        Kind("query-too-long", 2, (422,), lambda r, qs: search(["x" * (MAX_QUERY_CHARS + 1)])),
        Kind("too-many-queries", 1, (422,), lambda r, qs: search(r.choices(qs, k=MAX_QUERIES + 1))),
        Kind("extra-field", 2, (422,), lambda r, qs: search([q(r, qs)], k=3, filter={"lang": "en"})),
        Kind("body-not-object", 2, (422,), lambda r, qs: post(r.choice(["[1, 2]", "null", "42", '"q"']))),
        # unparsable bodies: 400/422
        Kind("json-truncated", 2, (400, 422), lambda r, qs: post(json.dumps({"queries": [q(r, qs)]})[:-3])),
        Kind("json-not-utf8", 2, (400, 422), lambda r, qs: post(b'{"queries": ["\xff\xfe"]}')),
        Kind("json-too-deep", 1, (400, 422), lambda r, qs: post("[" * 100_000)),
        Kind("body-empty", 1, (400, 422), lambda r, qs: post(b"")),
        # transport-level: the server refuses before reading the body, then closes the connection
        Kind("body-over-limit", 1, (413,), lambda r, qs: post(b"{}", length=10**9), fresh_connection=True),
        Kind("body-chunked", 1, (411,), lambda r, qs: (
            f"POST /search HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: application/json\r\n"
            "Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n").encode(), fresh_connection=True),
        Kind("wrong-path", 1, (404,), lambda r, qs: post(json.dumps({"queries": ["a"]}), path="/serch")),
        Kind("wrong-method", 1, (405,), lambda r, qs: get("/search")),
    ]


def plan(n: int, queries: list[str], seed: int) -> list[tuple[Kind, bytes]]:
    rng = random.Random(seed)
    ks = kinds()
    chosen = rng.choices(ks, weights=[k.weight for k in ks], k=n)
    return [(k, k.build(rng, queries)) for k in chosen]


# ---- HTTP/1.1 over asyncio streams ---------------------------------------------------------------------------
class Connection:
    """One keep-alive connection; reopened when the server said ``Connection: close`` or hung up."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def open(self) -> None:
        await self.close()
        self.reader, self.writer = await asyncio.open_connection(HOST, self.port)

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            try:
                await self.writer.wait_closed()
            except OSError:  # already reset by the server
                pass
        self.reader = self.writer = None

    async def request(self, raw: bytes) -> tuple[int, bytes]:
        """Send ``raw``; (status, body). Reads by Content-Length (the server always sends one)."""
        if self.writer is None:
            await self.open()
        assert self.reader is not None and self.writer is not None, "connection not open"
        self.writer.write(raw)
        await self.writer.drain()
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        headers = {k.strip().lower(): v.strip() for k, _, v in
                   (line.decode("latin-1").partition(":") for line in head.split(b"\r\n")[1:] if line)}
        body = await self.reader.readexactly(int(headers.get("content-length", "0")))
        if headers.get("connection", "").lower() == "close":
            await self.close()
        return status, body


def rss_bytes(pid: int) -> int | None:
    """Resident set size of ``pid`` (Linux /proc; None elsewhere)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


async def soak(port: int, pid: int, requests: list[tuple[Kind, bytes]], concurrency: int, timeout_s: float,
               max_seconds: float) -> dict[str, Any]:
    """Send every request from ``concurrency`` workers; counts, failures and the RSS every 1000 requests."""
    by_class: Counter[str] = Counter()
    by_kind: dict[str, Counter[str]] = {}
    failures: list[str] = []
    latencies: list[float] = []
    rss: list[tuple[int, int | None]] = []
    next_i, done = 0, 0
    deadline = time.monotonic() + max_seconds

    async def worker() -> None:
        nonlocal next_i, done
        conn = Connection(port)
        try:
            while next_i < len(requests) and time.monotonic() < deadline:
                i, next_i = next_i, next_i + 1
                kind, raw = requests[i]
                use = Connection(port) if kind.fresh_connection else conn
                t0 = time.perf_counter()
                try:
                    status, body = await asyncio.wait_for(use.request(raw), timeout_s)
                except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as exc:
                    failures.append(f"request {i} ({kind.name}): connection error {type(exc).__name__}: {exc}")
                    by_class["transport-error"] += 1
                    await use.close()
                    continue
                except asyncio.TimeoutError:
                    failures.append(f"request {i} ({kind.name}): no answer within {timeout_s} s")
                    by_class["timeout"] += 1
                    await use.close()
                    continue
                finally:
                    if use is not conn:
                        await use.close()
                latencies.append(time.perf_counter() - t0)
                by_class[f"{status // 100}xx"] += 1
                by_kind.setdefault(kind.name, Counter())[str(status)] += 1
                if status not in kind.expect:
                    failures.append(f"request {i} ({kind.name}): status {status}, expected {kind.expect}: "
                                    f"{body[:200]!r}")
                done += 1
                if done % 1000 == 0:
                    rss.append((done, rss_bytes(pid)))
        finally:
            await conn.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    if not rss or rss[-1][0] != done:
        rss.append((done, rss_bytes(pid)))
    latencies.sort()
    pct = lambda p: round(latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1e3, 2) if latencies else None  # noqa: E731
    return {"sent": done + by_class["transport-error"] + by_class["timeout"], "answered": done,
            "seconds": round(wall, 1), "requests_per_s": round(done / wall, 1), "p50_ms": pct(0.5),
            "p99_ms": pct(0.99), "by_class": dict(by_class),
            "by_kind": {k: dict(v) for k, v in sorted(by_kind.items())},
            "rss_mb": [(n, round(b / 2**20, 1) if b else None) for n, b in rss], "failures": failures}


# ---- the index changing under the server -------------------------------------------------------------------
class Mutator(threading.Thread):
    """Every ``every`` seconds a real ``twotower index add`` (5 new docs) or ``index remove`` (those docs again)
    of the served INDEX dir, as a separate process, as an operator would run it."""

    def __init__(self, index: Path, root: Path, every: float) -> None:
        super().__init__(name="soak-mutator", daemon=True)
        self.index, self.root, self.every = index, root, every
        self.stop = threading.Event()
        self.ops: list[dict[str, Any]] = []

    def run(self) -> None:
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
        i = 0
        while not self.stop.wait(self.every):
            ids = [f"soak-{i // 2}-{j}" for j in range(5)]
            cli = [sys.executable, "-m", "twotower.cli", "index"]
            if i % 2 == 0:
                batch = self.root / f"add-{i // 2}.jsonl"
                batch.write_text("".join(json.dumps({"_id": d, "text": f"soak doc {d} about sorting files"}) + "\n"
                                         for d in ids))
                cmd = [*cli, "add", str(self.index), "--corpus", str(batch), "--device", "cpu", "--no-progress",
                       "--wait", "120"]
            else:
                cmd = [*cli, "remove", str(self.index), "--ids", *ids, "--wait", "120"]
            t0 = time.perf_counter()
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
            self.ops.append({"op": cmd[4], "rc": done.returncode, "seconds": round(time.perf_counter() - t0, 1),
                             "stderr": done.stderr[-300:] if done.returncode else ""})
            i += 1


async def wait_for_generation(port: int, generation: int, timeout_s: float = 60.0) -> int | None:
    """The generation /health reports once it reaches ``generation`` (or the last one seen after the timeout)."""
    seen, deadline = None, time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status, body = await Connection(port).request(get("/health"))
        seen = json.loads(body).get("generation") if status == 200 else None
        if seen == generation:
            break
        await asyncio.sleep(0.5)
    return seen


# ---- setup -------------------------------------------------------------------------------------------------
def tiny_base(root: Path) -> Path:
    """A random 2-layer, 32-wide BERT with the MiniLM tokenizer (no download): fast to serve."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from twotower.towers.bases import resolve_base

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(resolve_base("minilm"))
    model = BertModel(BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2,
                                 num_attention_heads=2, intermediate_size=64))
    path = root / "tiny-bert"
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path


def build(root: Path, base: str, n_docs: int, factory: str, seed: int) -> tuple[Path, Path, list[str]]:
    """(TOWERS, INDEX, query texts) under ``root``."""
    from twotower.index.build import build_index
    from twotower.index.config import EncodeConfig, IndexBuildConfig
    from twotower.towers.inference import result_encoder
    from twotower.towers.model import TwoTower

    base_dir = str(tiny_base(root)) if base == "tiny" else base
    towers = root / "towers"
    TwoTower.from_base(base_dir, shared=True, query_max_length=64, result_max_length=128).save(towers)
    words = vocabulary()
    texts = synthetic_texts(n_docs, words, 8, 30, seed)
    corpus = [{"_id": f"doc-{i}", "title": "", "text": t} for i, t in enumerate(texts)]
    index = build_index(result_encoder(TwoTower.load(towers), "cpu"), corpus, root / "index",
                        IndexBuildConfig(factory=factory), EncodeConfig(progress=True), towers_dir=towers)
    return towers, Path(index), synthetic_texts(500, words, 2, 7, seed + 1)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", default="minilm", help="towers base: minilm, tiny (random 2-layer BERT) or an HF dir")
    ap.add_argument("--docs", type=int, default=2000, help="corpus size")
    ap.add_argument("--factory", default="IVF16,Flat", help="faiss index (IVF: nprobe reaches faiss)")
    ap.add_argument("--requests", type=int, default=10_000)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds one request may take")
    ap.add_argument("--max-seconds", type=float, default=900.0, help="stop sending after this long")
    ap.add_argument("--max-rss-growth", type=float, default=0.10, help="allowed RSS growth, first to last 1000")
    ap.add_argument("--threads", type=int, default=0, help="server's torch threads (0 = torch default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default=None, help="keep towers/index here (default: a temp dir, deleted)")
    ap.add_argument("--json-out", default=None, help="append the JSON line to this file")
    ap.add_argument("--mutate-every", type=float, default=0.0,
                    help="seconds between `twotower index add` / `index remove` runs on the served index (0 = none)")
    return ap.parse_args()


def run_soak(args: argparse.Namespace) -> tuple[dict[str, Any], bool, int | None]:
    """Build towers and index, start the server, send the requests (and change the index under it with
    --mutate-every); the soak's result, whether the server is still alive, and its last /health status."""
    root = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="soak-serve-"))
    root.mkdir(parents=True, exist_ok=True)
    proc = None
    try:
        t0 = time.perf_counter()
        towers, index, queries = build(root, args.base, args.docs, args.factory, args.seed)
        print(f"built towers + {args.docs}-doc {args.factory} index in {time.perf_counter() - t0:.0f} s",
              file=sys.stderr)
        server_args = argparse.Namespace(device="cpu", max_batch=64, max_wait_ms=2.0, threads=args.threads,
                                         precision="fp32")
        proc, url = start_server(index, towers, server_args)
        port = int(url.rsplit(":", 1)[1])
        requests = plan(args.requests, queries, args.seed)
        mutator = Mutator(index, root, args.mutate_every) if args.mutate_every > 0 else None
        if mutator is not None:
            mutator.start()
        result = asyncio.run(soak(port, proc.pid, requests, args.concurrency, args.timeout, args.max_seconds))
        if mutator is not None:
            mutator.stop.set()
            mutator.join()
            from twotower.index.store import read_manifest

            final = int(read_manifest(index).get("generation", 1))
            served = asyncio.run(wait_for_generation(port, final)) if proc.poll() is None else None
            result["mutations"] = {"ops": len(mutator.ops), "adds": sum(o["op"] == "add" for o in mutator.ops),
                                   "removes": sum(o["op"] == "remove" for o in mutator.ops),
                                   "failed": [o for o in mutator.ops if o["rc"]], "final_generation": final,
                                   "served_generation": served,
                                   "op_seconds": [o["seconds"] for o in mutator.ops]}
        alive = proc.poll() is None
        health = asyncio.run(Connection(port).request(get("/health")))[0] if alive else None
    finally:
        if proc is not None:
            stop_server(proc)
        if not args.work:
            shutil.rmtree(root, ignore_errors=True)

    return result, alive, health


def check(result: dict[str, Any], alive: bool, health: int | None, args: argparse.Namespace
          ) -> tuple[dict[str, bool], list[float], float | None]:
    """The pass/fail checks, the server's RSS after each 1000 requests and its growth first to last."""
    rss = [b for _, b in result["rss_mb"] if b]
    growth = (rss[-1] - rss[0]) / rss[0] if len(rss) >= 2 else None
    checks = {
        "no 5xx": result["by_class"].get("5xx", 0) == 0,
        "every status as expected": not result["failures"],
        "all requests answered": result["answered"] == args.requests,
        "server alive, /health 200": alive and health == 200,
        f"RSS growth < {args.max_rss_growth:.0%}": growth is not None and growth < args.max_rss_growth,
    }
    mutations = result.get("mutations")
    if mutations is not None:
        checks["every index add/remove succeeded"] = mutations["ops"] > 0 and not mutations["failed"]
        checks["server serves the last generation"] = mutations["served_generation"] == mutations["final_generation"]
        print(f"index changes under the server: {mutations['adds']} adds, {mutations['removes']} removes "
              f"(each {min(mutations['op_seconds'], default=0)}-{max(mutations['op_seconds'], default=0)} s), "
              f"{len(mutations['failed'])} failed; last generation {mutations['final_generation']}, served "
              f"{mutations['served_generation']}")
        for failed in mutations["failed"][:5]:
            print(f"FAIL {failed['op']}: rc {failed['rc']}: {failed['stderr']}")
    return checks, rss, growth


def print_report(result: dict[str, Any], checks: dict[str, bool], rss: list[float], growth: float | None,
                 args: argparse.Namespace) -> None:
    valid = sum(v for k, c in result["by_kind"].items() for s, v in c.items() if s == "200" and k != "health")
    print(f"\n{result['answered']} requests ({valid} valid searches) from {args.concurrency} clients in "
          f"{result['seconds']} s: {result['requests_per_s']} req/s, p50 {result['p50_ms']} ms, "
          f"p99 {result['p99_ms']} ms")
    print("by status class: " + ", ".join(f"{k} {v}" for k, v in sorted(result["by_class"].items())))
    width = max(map(len, result["by_kind"]))
    for kind, counts in result["by_kind"].items():
        print(f"  {kind:<{width}}  " + ", ".join(f"{s}: {n}" for s, n in sorted(counts.items())))
    print("server RSS (MiB) after each 1000: " + " ".join(str(b) for b in rss)
          + (f"  (growth first->last {growth:+.1%})" if growth is not None else ""))
    for failure in result["failures"][:20]:
        print("FAIL " + failure)
    for name, ok in checks.items():
        print(f"{'ok  ' if ok else 'FAIL'} {name}")


def main() -> int:
    args = parse_args()
    result, alive, health = run_soak(args)
    checks, rss, growth = check(result, alive, health, args)
    print_report(result, checks, rss, growth, args)
    record = {"bench": "soak_serve", "machine": machine(), "versions": versions(), "base": args.base,
              "docs": args.docs, "factory": args.factory,
              "requests": args.requests, "concurrency": args.concurrency, "rss_growth": growth,
              "mutate_every": args.mutate_every,
              "checks": checks, **{k: v for k, v in result.items() if k != "failures"},
              "n_failures": len(result["failures"]), "loadavg_1min": round(os.getloadavg()[0], 2),
              "command": command_line()}
    line = json.dumps(record)
    print(line)
    if args.json_out:
        with open(args.json_out, "a", encoding="utf-8") as fh:
            fh.write(line + "\n")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
