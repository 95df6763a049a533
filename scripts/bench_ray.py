"""Ray on one machine: what `--engine ray` costs against the single-process paths it replaces.

1. Build: docs/s of `twotower index build --engine ray` (a local Ray started by the command, and a Ray already
   running) against the single-process `twotower index build`, same corpus, towers and machine, taking turns
   (best of --repeats each). Every build is the CLI in a fresh process, so each pays its own imports and model
   load; the Ray builds pay the Ray start, the actors' start (imports + model load in every actor) and the shards'
   publish. The Ray command's own summary line (actors busy / actor-seconds) says where its time went.
2. Serve: latency of `twotower serve --shards SHARDS --engine ray` (a deployment per shard + the router) against
   `twotower serve --index MERGED` (one in-process index), one-query requests from 1 and 16 concurrent clients.

Usage: python -m scripts.bench_ray --towers TOWERS --corpus corpus.jsonl --docs 20000 --work DIR
The corpus is cut (or repeated, with fresh ids) to --docs rows. Prints a table and one JSON line.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from scripts.bench_common import machine, wait_for_health
from scripts.bench_serve import bench_queries, drive, free_port, start_server
from twotower.common.jsonl import iter_json_rows

ROOT = Path(__file__).resolve().parents[1]
# RAY_AUTH_MODE=disabled: Ray 2.5x+ token authentication would refuse the CLI's connection to the Ray this script
# starts (a loopback-only benchmark cluster, started and stopped several times).
os.environ["RAY_AUTH_MODE"] = "disabled"
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_WAIT_POLICY": "PASSIVE"}


def make_corpus(src: Path, n: int, out: Path) -> Path:
    """The first ``n`` rows of ``src``, repeated with fresh ids when it has fewer."""
    if out.is_file() and sum(1 for _ in out.open()) == n:
        return out
    rows = list(iter_json_rows(src))
    with out.open("w") as fh:
        for i in range(n):
            row = dict(rows[i % len(rows)])
            if i >= len(rows):
                row["_id"] = f"{row['_id']}-r{i // len(rows)}"
            fh.write(json.dumps(row) + "\n")
    return out


def run_build(args: argparse.Namespace, corpus: Path, out: Path, extra: list[str]) -> dict[str, Any]:
    """One `twotower index build` in a fresh process: wall seconds, docs/s, the Ray summary line if any."""
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "twotower.cli", "index", "build", "--towers", str(args.towers), "--corpus",
           str(corpus), "--out", str(out), "--factory", "Flat", "--device", "cpu", "--no-progress",
           "--batch-size", str(args.batch_size), *extra]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    summary = re.search(r"encoded in ([\d.]+) s; actors busy ([\d.]+) of ([\d.]+)", proc.stderr)
    rec = {"seconds": round(wall, 2), "docs_per_s": round(args.docs / wall, 1)}
    if summary:
        rec.update(pool_s=float(summary[1]), busy_s=float(summary[2]), actor_s=float(summary[3]))
    return rec


def bench_build(args: argparse.Namespace, corpus: Path) -> dict[str, Any]:
    import ray

    def ray_up(up: bool) -> str:
        """A local Ray in this process (for the "already running" runs) up or down; its address."""
        if up and not ray.is_initialized():
            ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level=logging.WARNING)
        elif not up and ray.is_initialized():
            ray.shutdown()
        return ray.get_runtime_context().gcs_address if up else ""

    t0 = time.perf_counter()
    ray_up(True)
    t_init = time.perf_counter() - t0
    enc = ["--engine", "ray", "--num-encoders", str(args.encoders)]
    systems = {"single process": (False, []), "ray (local Ray started by the command)": (False, enc),
               "ray (Ray already running)": (True, enc)}
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in systems}
    try:
        for _ in range(args.repeats):
            for name, (running, extra) in systems.items():
                address = ray_up(running)  # down for the others: an idle Ray still holds memory and wakes up
                extra = [*extra, "--ray-address", address] if running else extra
                results[name].append(run_build(args, corpus, args.work / "build-out", extra))
                print(name, results[name][-1], f"load {os.getloadavg()[0]:.2f}", file=sys.stderr)
    finally:
        ray_up(False)
    best = {name: min(runs, key=lambda r: r["seconds"]) for name, runs in results.items()}
    base = best["single process"]["seconds"]
    for rec in best.values():
        rec["overhead_vs_single"] = round(rec["seconds"] / base - 1, 3)
    return {"best": best, "runs": results, "ray_init_s": round(t_init, 2)}


def start_ray_server(shards: Path, args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "twotower.cli", "serve", "--shards", str(shards), "--engine", "ray", "--towers",
           str(args.towers), "--host", "127.0.0.1", "--port", str(port), "--device", "cpu", "--max-queue", "4096"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV)
    url = f"http://127.0.0.1:{port}"
    wait_for_health(proc, url, 300, "ray serve")
    return proc, url


def bench_serve(args: argparse.Namespace, corpus: Path) -> dict[str, Any]:
    shards, merged = args.work / "serve-shards", args.work / "serve-merged"
    if not (merged / "manifest.json").is_file():
        run_build(args, corpus, merged, ["--engine", "ray", "--num-encoders", str(args.encoders), "--num-shards",
                                         str(args.shards), "--shards-dir", str(shards)])
    queries = bench_queries(2000, 0)
    out: dict[str, Any] = {}
    serve_args = argparse.Namespace(device="cpu", max_batch=64, max_wait_ms=2.0, threads=0, precision="fp32")
    for name, start in (("one index in process", lambda: start_server(merged, args.towers, serve_args)),
                        (f"ray serve, {args.shards} shards", lambda: start_ray_server(shards, args))):
        proc, url = start()
        try:
            out[name] = [asyncio.run(drive(url, proc.pid, queries, c, args.requests, args.max_seconds, 10))
                         for c in (1, 16)]
        finally:
            proc.terminate()
            proc.wait(60)
        for row in out[name]:
            print(name, row, f"load {os.getloadavg()[0]:.2f}", file=sys.stderr)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--towers", type=Path, required=True, help="TOWERS dir")
    ap.add_argument("--corpus", type=Path, required=True, help="corpus.jsonl (cut or repeated to --docs rows)")
    ap.add_argument("--docs", type=int, default=20000, help="corpus rows to build")
    ap.add_argument("--work", type=Path, required=True, help="scratch dir (corpus copy, indexes, shards)")
    ap.add_argument("--encoders", type=int, default=2, help="Ray encoder actors")
    ap.add_argument("--shards", type=int, default=3, help="shards served by the serve benchmark")
    ap.add_argument("--batch-size", type=int, default=64, help="encode batch size")
    ap.add_argument("--repeats", type=int, default=1, help="builds per system (best kept)")
    ap.add_argument("--requests", type=int, default=2000, help="requests per concurrency level (at most)")
    ap.add_argument("--max-seconds", type=float, default=20.0, help="seconds per concurrency level (at most)")
    ap.add_argument("--skip", choices=["build", "serve"], default=None, help="leave one part out")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    corpus = make_corpus(args.corpus, args.docs, args.work / f"corpus-{args.docs}.jsonl")
    report: dict[str, Any] = {"machine": machine("cpu"), "docs": args.docs, "encoders": args.encoders,
                              "load_before": os.getloadavg()}
    if args.skip != "build":
        report["build"] = bench_build(args, corpus)
        print(f"\nbuild of {args.docs} docs ({os.cpu_count()} CPUs, {args.encoders} Ray encoder actors)")
        for name, rec in report["build"]["best"].items():
            print(f"  {name:<42} {rec['seconds']:>8.1f} s {rec['docs_per_s']:>8.1f} docs/s  "
                  f"{rec['overhead_vs_single']:+.1%}")
    if args.skip != "serve":
        report["serve"] = bench_serve(args, corpus)
        print("\nserve: one-query requests, k=10")
        for name, rows in report["serve"].items():
            for row in rows:
                print(f"  {name:<28} clients {row['concurrency']:>3}  p50 {row['p50_ms']:>8.2f} ms  p99 "
                      f"{row['p99_ms']:>8.2f} ms  {row['qps']:>8.1f} QPS  errors {row['errors']}")
    report["load_after"] = os.getloadavg()
    print(json.dumps(report))


if __name__ == "__main__":
    main()
