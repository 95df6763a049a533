"""Static query tower vs the MiniLM query tower, side by side in one run: query encoding and `serve`.

1. Query encoding per query at batch 1 and batch 64 (the CPU encoders of `search` / `serve`): the two
   query towers take turns call by call (batch 1: ``cycle_times``, paired medians) and batch by batch
   (batch 64: ``take_turns``, best of N), so a shared machine's load swings hit both alike.
2. A real `twotower serve` per system on the *same* INDEX (a static tower trained with
   ``--result-tower-from`` keeps the result tower, so the index's fingerprint fits both), driven by C
   concurrent one-query clients (``bench_serve.drive``): QPS and p50/p95/p99 latency. The servers run one at
   a time, alternating by concurrency level, each level measured in both before the next.

    python -m scripts.bench_static --towers TOWERS --static STATIC_TOWERS --index INDEX \
        --queries SUITE/queries.jsonl --concurrency 1 32
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

from scripts.bench_common import cycle_times, emit, median, print_table, stop_server, take_turns
from scripts.bench_serve import bench_queries, drive, start_server
from twotower.common.jsonl import iter_json_rows
from twotower.retrieval.cli import passive_openmp

passive_openmp()  # before torch/faiss load, here and in the server subprocesses (they inherit the env)


def load_queries(path: str | None, n: int, seed: int) -> list[str]:
    """The first ``n`` queries of a BEIR queries.jsonl, else synthetic 2-7 word queries (bench_serve's)."""
    if not path:
        return bench_queries(n, seed)
    return [row["text"] for row in iter_json_rows(path, n)]


def encoding(systems: dict[str, Path], queries: list[str], min_seconds: float, repeats: int) -> list[dict[str, Any]]:
    """ms per query of each system's query encoder at batch 1 and batch 64."""
    from twotower.towers.inference import query_encoder
    from twotower.towers.model import TwoTower

    encoders = {name: query_encoder(TwoTower.load(path), device="cpu") for name, path in systems.items()}
    for enc in encoders.values():
        enc.encode(queries[:64])  # warm-up: first-call allocations, lazy init
    turn = {"i": 0}

    def one(enc: Any) -> Any:
        def call() -> Any:
            turn["i"] += 1
            return enc.encode([queries[turn["i"] % len(queries)]], batch_size=1)
        return call

    single = cycle_times({name: one(enc) for name, enc in encoders.items()}, min_seconds=min_seconds, min_rounds=50)
    batches = [queries[i:i + 64] for i in range(0, len(queries) - 63, 64)]
    best, _ = take_turns({name: (lambda b, e=enc: e.encode(b, batch_size=64)) for name, enc in encoders.items()},
                         batches, repeats)
    rows = []
    for name in systems:
        rows.append({"system": name, "batch1_ms": 1e3 * median(single[name]), "rounds": len(single[name]),
                     "batch64_ms_per_query": 1e3 * sum(best[name]) / (64 * len(batches))})
    ref = rows[0]
    for row in rows:
        row["speedup_batch1"] = ref["batch1_ms"] / row["batch1_ms"]
        row["speedup_batch64"] = ref["batch64_ms_per_query"] / row["batch64_ms_per_query"]
    return rows


def serving(systems: dict[str, Path], index: Path, queries: list[str], args: argparse.Namespace
            ) -> list[dict[str, Any]]:
    """QPS and latency of a real server per system and concurrency level, the systems alternating."""
    rows = []
    for c in args.concurrency:
        for name, towers in systems.items():
            proc, url = start_server(index, towers, args)
            try:
                row = asyncio.run(drive(url, proc.pid, queries, c, args.requests, args.max_seconds, args.k))
            finally:
                stop_server(proc)
            rows.append({"system": name, "loadavg_1min": round(os.getloadavg()[0], 2), **row})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    for row in rows:  # QPS ratio against the first system at the same concurrency
        ref = next(r for r in rows if r["concurrency"] == row["concurrency"])
        row["qps_x"] = row["qps"] / ref["qps"]
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--towers", required=True, help="TOWERS dir with a transformer query tower (the reference)")
    ap.add_argument("--static", required=True, help="TOWERS dir with a static query tower (same result tower)")
    ap.add_argument("--index", required=True, help="INDEX dir built with the result tower they share")
    ap.add_argument("--queries", default=None, help="BEIR queries.jsonl (default: synthetic 2-7 word queries)")
    ap.add_argument("--n-queries", type=int, default=512, help="queries used (cycled)")
    ap.add_argument("--encode-seconds", type=float, default=20.0, help="minimum time of the batch-1 rounds")
    ap.add_argument("--repeats", type=int, default=3, help="best-of-N for the batch-64 timing")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--requests", type=int, default=3000, help="requests per level and system (upper bound)")
    ap.add_argument("--max-seconds", type=float, default=20.0, help="time cap per level and system")
    ap.add_argument("-k", type=int, default=10)
    ap.add_argument("--max-batch", type=int, default=64)
    ap.add_argument("--max-wait-ms", type=float, default=2.0)
    ap.add_argument("--threads", type=int, default=0, help="servers' torch threads (0 = torch default)")
    ap.add_argument("--skip-serve", action="store_true", help="only the encoding part")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json-out", default=None, help="append the JSON line to this file")
    args = ap.parse_args()
    args.device, args.precision = "cpu", "fp32"  # what start_server passes on: the CPU query path

    systems = {"minilm-query": Path(args.towers), "static-query": Path(args.static)}
    queries = load_queries(args.queries, args.n_queries, args.seed)
    load_start = round(os.getloadavg()[0], 2)
    enc = encoding(systems, queries, args.encode_seconds, args.repeats)
    print_table(enc, [("system", "query tower", "s"), ("batch1_ms", "batch 1 ms/query", ".3f"),
                      ("speedup_batch1", "x", ".1f"), ("batch64_ms_per_query", "batch 64 ms/query", ".4f"),
                      ("speedup_batch64", "x", ".1f")])
    serve = [] if args.skip_serve else serving(systems, Path(args.index), queries, args)
    if serve:
        print_table(serve, [("system", "query tower", "s"), ("concurrency", "clients", "d"), ("qps", "QPS", ".1f"),
                            ("qps_x", "x", ".2f"), ("p50_ms", "p50 ms", ".2f"), ("p99_ms", "p99 ms", ".2f"),
                            ("mean_batch", "batch", ".2f"), ("errors", "errors", "d"),
                            ("loadavg_1min", "load", ".2f")])
    emit("static", args, {"encoding": enc, "serve": serve}, json_out=args.json_out, loadavg_1min_at_start=load_start,
         loadavg_1min_at_end=round(os.getloadavg()[0], 2))


if __name__ == "__main__":
    main()
