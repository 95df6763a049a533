"""Serving benchmark: a real `twotower serve` on loopback, driven by C concurrent clients.

Prints QPS and p50/p95/p99 latency per concurrency level, the server's mean micro-batch size, and the
Retriever's overhead over a raw faiss search of the same vectors (batch 1 and 256). Appends one JSON line
with the machine, versions, corpus and figures to --json-out.

The corpus (unless --index reuses one): --docs texts (synthetic short texts, or the first rows of a BEIR
--corpus). Encoding 100k docs with MiniLM on 2 shared CPU cores takes too long for a benchmark, so only the
first --encode-docs are encoded by the result tower; the rest get the vector of a real doc plus small
Gaussian noise, renormalised (they lie on the real data's manifold, so IVF lists fill like real ones). The
index is built through `index.build.build_index` with an encoder that serves those precomputed vectors.

    python -m scripts.bench_serve --docs 100000 --concurrency 1 8 32 --device cpu
"""
from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from scripts.bench_common import command_line, machine, stop_server, versions, wait_for_health
from twotower.common.jsonl import iter_json_rows
from twotower.retrieval.cli import passive_openmp

passive_openmp()  # before torch/faiss load, here and in the server subprocess (inherits the env)


# ---- corpus ------------------------------------------------------------------------------------------
def vocabulary() -> list[str]:
    """Whole English words of the MiniLM tokenizer vocab (deterministic, no download)."""
    from transformers import AutoTokenizer

    from twotower.towers.bases import resolve_base

    vocab = AutoTokenizer.from_pretrained(resolve_base("minilm")).get_vocab()
    return sorted(w for w in vocab if w.isalpha() and w.isascii() and len(w) >= 3)


def synthetic_texts(n: int, words: Sequence[str], lo: int, hi: int, seed: int) -> list[str]:
    """n distinct texts of lo..hi words, Zipf-like word frequencies (a few words are common)."""
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, len(words) + 1) ** 0.8
    perm = rng.permutation(len(words))  # which words are common is random, not alphabetical
    p = p[np.argsort(perm)] / p.sum()
    words_arr = np.asarray(words)
    out: list[str] = []
    seen: set[str] = set()
    while len(out) < n:
        text = " ".join(words_arr[rng.choice(len(words), size=int(rng.integers(lo, hi + 1)), p=p)])
        if text not in seen:
            seen.add(text)
            out.append(text)
    return out


def corpus_texts(corpus: str | None, n: int, words: Sequence[str], seed: int) -> list[str]:
    texts: list[str] = []
    if corpus:
        texts = [row["text"] for row in iter_json_rows(corpus, n)]
        texts = list(dict.fromkeys(texts))  # the precomputed-vector encoder keys on the text
    return texts + synthetic_texts(n - len(texts), words, 8, 30, seed) if len(texts) < n else texts


class PrecomputedEncoder:
    """Encoder protocol over a text -> vector table (vectors computed before the index build).

    ``fingerprint()`` is the towers' one, so the index manifest matches the query tower that serves it.
    """

    def __init__(self, texts: Sequence[str], xb: np.ndarray, fingerprint: str) -> None:
        self.dim = xb.shape[1]
        self._row = {t: i for i, t in enumerate(texts)}
        self._xb = xb
        self._fingerprint = fingerprint

    def fingerprint(self) -> str:
        return self._fingerprint

    def encode(self, texts: Sequence[str], batch_size: int = 64, show_progress: bool = False) -> np.ndarray:
        return self._xb[[self._row[t] for t in texts]]


def corpus_vectors(towers: Path, texts: Sequence[str], n_encode: int, device: str, seed: int) -> np.ndarray:
    """xb float32 (n, d): the first n_encode encoded by the result tower, the rest noisy copies of them."""
    from twotower.towers.model import Tower

    tower = Tower.load(towers / "result_tower").to(device)
    real = tower.encode(list(texts[:n_encode]), batch_size=128, show_progress=True)  # (m, d)
    rng = np.random.default_rng(seed)
    n, m = len(texts), len(real)
    xb = np.empty((n, real.shape[1]), dtype=np.float32)
    xb[:m] = real
    for start in range(m, n, 10000):  # chunks keep the noise buffer small
        stop = min(start + 10000, n)
        v = real[np.arange(start, stop) % m] + rng.normal(0, 0.04, (stop - start, real.shape[1])).astype(np.float32)
        xb[start:stop] = v / np.linalg.norm(v, axis=1, keepdims=True)
    return xb


def cached_vectors(work: Path, towers: Path, texts: Sequence[str], args: argparse.Namespace) -> np.ndarray:
    """``corpus_vectors`` cached as .npy under ``work`` (keyed by corpus, sizes, seed and towers)."""
    from twotower.towers.model import read_towers_meta

    key = f"{Path(args.corpus).stem if args.corpus else 'synthetic'}-{args.docs}-{args.encode_docs}-{args.seed}"
    path = work / f"xb-{key}-{read_towers_meta(towers)['fingerprint']}.npy"
    if path.exists():
        return np.load(path)
    t0 = time.perf_counter()
    xb = corpus_vectors(towers, texts, min(args.encode_docs, args.docs), args.device, args.seed)
    print(f"corpus vectors: {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    from twotower.common.atomic import write_bytes_atomic

    buf = io.BytesIO()
    np.save(buf, xb)
    write_bytes_atomic(path, buf.getvalue())
    return xb


def bench_towers(args: argparse.Namespace) -> Path:
    """--towers, or MiniLM towers (shared weights) built once under the work dir."""
    from twotower.towers.model import TwoTower

    towers = Path(args.towers) if args.towers else work_dir(args) / "towers-minilm"
    if not (towers / "twotower.json").exists():
        print(f"building MiniLM towers in {towers}", file=sys.stderr)
        TwoTower.from_base("minilm", shared=True, query_max_length=64, result_max_length=256).save(towers)
    return towers


def work_dir(args: argparse.Namespace) -> Path:
    from twotower.common.cache import cache_dir

    return Path(args.work) if args.work else cache_dir() / "bench-serve"


def bench_index(args: argparse.Namespace, towers: Path, factory: str) -> Path:
    """The benchmark corpus indexed with ``factory`` (built once, cached under the work dir)."""
    work = work_dir(args)
    index_dir = work / f"index-{args.docs}-{args.encode_docs}-{factory.replace(',', '_')}"
    if not (index_dir / "manifest.json").exists():
        from twotower.index.build import build_index
        from twotower.index.config import IndexBuildConfig
        from twotower.towers.model import read_towers_meta

        texts = corpus_texts(args.corpus, args.docs, vocabulary(), args.seed)
        xb = cached_vectors(work, towers, texts, args)
        corpus = [{"_id": f"doc-{i}", "title": "", "text": t} for i, t in enumerate(texts)]
        encoder = PrecomputedEncoder(texts, xb, read_towers_meta(towers)["fingerprint"])
        build_index(encoder, corpus, index_dir, IndexBuildConfig(factory=factory), towers_dir=towers)
    return index_dir


def corpus_info(args: argparse.Namespace) -> dict[str, Any]:
    if args.index:
        return {"index": "reused", "path": args.index}
    return {"docs": args.docs, "encoded_by_tower": min(args.encode_docs, args.docs),
            "source": args.corpus or "synthetic short texts (8-30 MiniLM-vocab words)",
            "rest": "noisy copies (sigma 0.04/dim) of encoded vectors, renormalised"}


def bench_queries(n: int, seed: int) -> list[str]:
    return synthetic_texts(n, vocabulary(), 2, 7, seed + 1)


# ---- in-process overhead: Retriever.search_vectors vs the raw faiss search ----------------------------
def overhead(index_dir: Path, towers: Path, queries: list[str], k: int, device: str, precision: str
             ) -> dict[str, Any]:
    from twotower.retrieval.retriever import Retriever

    r = Retriever.load(index_dir, towers, device=device, precision=precision)
    out: dict[str, Any] = {"factory": r.index.manifest.get("factory"), "ntotal": r.ntotal}
    for nq in (1, 256):
        xq = r.encode((queries * (nq // len(queries) + 1))[:nq])
        reps = max(5, 200 // nq)
        raw, ours = [], []
        for _ in range(reps):  # interleaved, so machine noise hits both alike
            t0 = time.perf_counter()
            r.index.search(xq, k)
            raw.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            r.search_vectors(xq, k)
            ours.append(time.perf_counter() - t0)
        raw_ms, ours_ms = np.median(raw) * 1e3, np.median(ours) * 1e3
        out[f"batch{nq}"] = {"faiss_ms": round(raw_ms, 3), "retriever_ms": round(ours_ms, 3),
                             "overhead_pct": round(100 * (ours_ms - raw_ms) / raw_ms, 1)}
    for nq in (1, 32):
        t0 = time.perf_counter()
        for _ in range(10):
            r.encode(queries[:nq])
        out[f"encode{nq}_ms"] = round((time.perf_counter() - t0) / 10 * 1e3, 2)
    return out


# ---- the server and its clients -------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(index_dir: Path, towers: Path, args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "twotower.cli", "serve", "--index", str(index_dir), "--towers", str(towers),
           "--host", "127.0.0.1", "--port", str(port), "--device", args.device, "--max-batch", str(args.max_batch),
           "--max-wait-ms", str(args.max_wait_ms), "--log-level", "warning", "--max-queue", "4096",
           "--threads", str(args.threads), "--precision", args.precision]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen(cmd, env=env)
    url = f"http://127.0.0.1:{port}"
    wait_for_health(proc, url, 180)
    return proc, url


class RawClient:
    """One keep-alive HTTP/1.1 connection with a minimal request writer and response reader.

    The load generator shares the machine's cores with the server; httpx costs ~1 ms of CPU per request,
    this a few tens of microseconds, so the figures measure the server rather than the client.
    """

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port

    async def __aenter__(self) -> RawClient:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.writer.close()

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        self.writer.write(f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
                          f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                       if line.lower().startswith(b"content-length:")), None)
        if length is None:
            raise RuntimeError(f"response without Content-Length: {head[:200]!r}")
        return status, await self.reader.readexactly(length)


def process_cpu_seconds(pid: int) -> float | None:
    """user + system CPU time of process ``pid`` (Linux /proc; None elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def drive(url: str, server_pid: int, queries: list[str], concurrency: int, requests: int,
                max_seconds: float, k: int) -> dict[str, Any]:
    """C clients, each sending one-query requests back to back, until `requests` or `max_seconds`."""
    import httpx

    host, port = url.removeprefix("http://").split(":")
    bodies = [json.dumps({"queries": [q], "k": k}).encode() for q in queries]
    latencies: list[float] = []
    errors = 0
    sent = 0
    t_end = 0.0

    async def worker(w: int, client: RawClient) -> None:
        nonlocal sent, errors
        i = w
        while sent < requests and time.perf_counter() < t_end:
            sent += 1
            t0 = time.perf_counter()
            status, _ = await client.post("/search", bodies[i % len(bodies)])
            latencies.append(time.perf_counter() - t0)
            errors += status != 200
            i += concurrency

    clients = [RawClient(host, int(port)) for _ in range(concurrency)]
    for c in clients:
        await c.__aenter__()
    try:
        for c, body in zip(clients, bodies):  # warm-up: one request per connection
            await c.post("/search", body)
        before = httpx.get(f"{url}/health").json()
        cpu_server, cpu_client = process_cpu_seconds(server_pid), time.process_time()
        t0 = time.perf_counter()
        t_end = t0 + max_seconds
        await asyncio.gather(*(worker(w, c) for w, c in enumerate(clients)))
        wall = time.perf_counter() - t0
        cpu_client = time.process_time() - cpu_client
        cpu_server_end = process_cpu_seconds(server_pid)
        after = httpx.get(f"{url}/health").json()
    finally:
        for c in clients:
            await c.__aexit__()
    lat = np.asarray(latencies) * 1e3
    batches = after["batches"] - before["batches"]
    n = len(lat)
    return {"concurrency": concurrency, "requests": n, "errors": errors, "seconds": round(wall, 2),
            "qps": round(n / wall, 1), "p50_ms": round(float(np.percentile(lat, 50)), 2),
            "p95_ms": round(float(np.percentile(lat, 95)), 2), "p99_ms": round(float(np.percentile(lat, 99)), 2),
            "mean_batch": round((after["queries"] - before["queries"]) / batches, 2) if batches else 0.0,
            "server_cpu_ms_per_req": round((cpu_server_end - cpu_server) / n * 1e3, 2) if cpu_server else None,
            "client_cpu_ms_per_req": round(cpu_client / n * 1e3, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--index", default=None, help="reuse this INDEX dir (default: build one under --work)")
    ap.add_argument("--towers", default=None, help="TOWERS dir (default: MiniLM towers built under --work)")
    ap.add_argument("--corpus", default=None, help="BEIR corpus.jsonl for doc texts (default: synthetic)")
    ap.add_argument("--docs", type=int, default=100_000, help="corpus size")
    ap.add_argument("--encode-docs", type=int, default=5000, help="docs encoded by the tower; the rest: noisy copies")
    ap.add_argument("--factory", default="auto", help="faiss index factory for the built index")
    ap.add_argument("--work", default=None, help="cache dir for towers and indexes (default: CACHE/bench-serve)")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--requests", type=int, default=2000, help="requests per concurrency level (upper bound)")
    ap.add_argument("--max-seconds", type=float, default=30.0, help="time cap per concurrency level")
    ap.add_argument("-k", type=int, default=10)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--max-batch", type=int, default=64)
    ap.add_argument("--max-wait-ms", type=float, default=2.0)
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"], help="query encoding")
    ap.add_argument("--threads", type=int, default=0, help="server's torch threads (0 = torch default)")
    ap.add_argument("--overhead-factories", nargs="*", default=["served", "Flat"],
                    help="indexes to measure Retriever-vs-raw-faiss overhead on, in-process ('served' = the "
                         "served index; others are built from the same vectors); none to skip")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json-out", default=None, help="append the JSON line to this file")
    args = ap.parse_args()

    towers = bench_towers(args)
    index_dir = Path(args.index) if args.index else bench_index(args, towers, args.factory)
    queries = bench_queries(1000, args.seed)
    record: dict[str, Any] = {
        "bench": "serve", "device": args.device, "corpus": corpus_info(args), "k": args.k, "max_batch": args.max_batch,
        "max_wait_ms": args.max_wait_ms, "threads": args.threads, "precision": args.precision,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "loadavg_1min_at_start": round(os.getloadavg()[0], 2), "command": command_line()}

    import faiss  # noqa: F401  (imported here so that versions() reports them)
    import torch  # noqa: F401

    record["machine"], record["versions"] = machine(args.device), versions()  # after the imports it reports
    record["overhead"] = []
    for factory in args.overhead_factories:
        path = index_dir if factory == "served" else bench_index(args, towers, factory)
        record["overhead"].append(overhead(path, towers, queries, args.k, args.device, args.precision))
        print(json.dumps(record["overhead"][-1]), file=sys.stderr)
    proc, url = start_server(index_dir, towers, args)
    try:
        record["levels"] = []
        heads = ("clients", "requests", "QPS", "p50 ms", "p95 ms", "p99 ms", "batch", "errors", "srv cpu ms/req")
        print(" ".join(f"{h:>{w}}" for h, w in zip(heads, (7, 8, 8, 8, 8, 8, 6, 6, 14))))
        for c in args.concurrency:
            row = asyncio.run(drive(url, proc.pid, queries, c, args.requests, args.max_seconds, args.k))
            record["levels"].append(row)
            print(f"{c:>7} {row['requests']:>8} {row['qps']:>8.1f} {row['p50_ms']:>8.2f} {row['p95_ms']:>8.2f} "
                  f"{row['p99_ms']:>8.2f} {row['mean_batch']:>6.2f} {row['errors']:>6} "
                  f"{row['server_cpu_ms_per_req'] or 0:>14.2f}", flush=True)
    finally:
        stop_server(proc)
    record["loadavg_1min_at_end"] = round(os.getloadavg()[0], 2)  # other work on the machine skews figures
    line = json.dumps(record)
    print(line)
    if args.json_out:
        with open(args.json_out, "a", encoding="utf-8") as fh:
            fh.write(line + "\n")


if __name__ == "__main__":
    main()
