"""Benchmark filtered search: faiss ``IDSelector`` pushdown (what ``Retriever.search(filter=...)`` does) vs
post-filtering an over-fetched unfiltered search, at 1%, 10% and 50% selectivity, on Flat, IVF and HNSW.

Vectors: ``index.synthetic.clustered_vectors`` (``--n`` rows, held-out queries from the same mixture). Each
row gets a random ``bucket`` in 0..99 as metadata; the filter ``{"bucket": {"$lt": s}}`` keeps s% of the rows.
The filter goes through the real code: ``index.filters`` (inverted map -> allowed mask) and
``LoadedIndex.search(allowed=...)`` (selector + nprobe/efSearch widened by 1/selectivity). The baseline
fetches ``--overfetch * k / selectivity`` unfiltered results (the same nprobe/efSearch, no widening) and keeps
the first k allowed ones. Ground truth: exact inner-product top-k among the allowed rows.
QPS = queries / seconds of one batched search, best of ``--repeats``, the two methods timed in turn.

    python -m scripts.bench_filter --n 100000 --d 128 --nq 200
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from scripts.bench_common import machine, versions


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=100_000, help="rows")
    ap.add_argument("--d", type=int, default=128, help="dims")
    ap.add_argument("--nq", type=int, default=200, help="queries")
    ap.add_argument("--k", type=int, default=10, help="results per query")
    ap.add_argument("--factories", default="Flat;IVF1024,Flat;HNSW32", help="faiss factory strings, ';'-separated")
    ap.add_argument("--selectivity", default="1,10,50", help="percent of rows a filter keeps")
    ap.add_argument("--overfetch", type=float, default=2.0, help="post-filter baseline fetches overfetch*k/selectivity")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per method (best taken)")
    ap.add_argument("--threads", type=int, default=1, help="faiss OpenMP threads")
    return ap.parse_args()


def bench_unfiltered(index: Any, xb: np.ndarray, xq: np.ndarray, args: argparse.Namespace, nprobe: int | None,
                     ef: int | None) -> dict[str, float]:
    """The same index unfiltered at its defaults: what an ANN index gives up before any filter."""
    from twotower.index.faiss_utils import search_params

    gt_all = np.argsort(-(xq @ xb.T), axis=1)[:, : args.k]
    params_all = search_params(index, nprobe, ef)
    best = float("inf")
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        _, I_all = index.search(xq, args.k, params=params_all) if params_all is not None else index.search(xq, args.k)
        best = min(best, time.perf_counter() - t0)
    return {"unfiltered_qps": round(args.nq / best, 1), f"unfiltered_recall@{args.k}": round(float(np.mean(
        [len(set(a) & set(b)) / len(b) for a, b in zip(I_all, gt_all)])), 4)}


def compare_filters(index: Any, loaded: Any, xb: np.ndarray, xq: np.ndarray, allowed: np.ndarray, fetch: int,
                    plain: Any, args: argparse.Namespace) -> dict[str, float]:
    """QPS, recall@k against the exact filtered top k, and the share of queries with k hits, of the filter
    pushed into the search (``LoadedIndex.search(allowed=)``) and of post-filtering ``fetch`` hits."""
    scores = xq @ xb[allowed].T  # (nq, n_allowed): exact filtered ground truth
    rows = np.flatnonzero(allowed)
    gt = rows[np.argsort(-scores, axis=1)[:, : args.k]]

    def pushdown() -> np.ndarray:
        return loaded.search(xq, args.k, allowed=allowed)[1]

    def postfilter() -> np.ndarray:
        _, I = index.search(xq, fetch, params=plain) if plain is not None else index.search(xq, fetch)
        ok = (I >= 0) & allowed[np.clip(I, 0, None)]
        out = np.full((len(xq), args.k), -1, np.int64)
        for q in range(len(xq)):
            hit = I[q][ok[q]][: args.k]
            out[q, : len(hit)] = hit
        return out

    times: dict[str, list[float]] = {"pushdown": [], "postfilter": []}
    got = {}
    for _ in range(args.repeats):
        for name, fn in (("pushdown", pushdown), ("postfilter", postfilter)):
            t0 = time.perf_counter()
            got[name] = fn()
            times[name].append(time.perf_counter() - t0)
    row: dict[str, float] = {}
    for name in times:
        I = got[name]
        recall = np.mean([len(set(a[a >= 0]) & set(b)) / len(b) for a, b in zip(I, gt)])
        row[f"{name}_qps"] = round(args.nq / min(times[name]), 1)
        row[f"{name}_recall@{args.k}"] = round(float(recall), 4)
        row[f"{name}_full"] = round(float(np.mean((I >= 0).sum(1) == args.k)), 4)  # queries with k hits
    return row


def main() -> None:
    args = parse_args()
    import faiss

    from twotower.index.faiss_utils import build_faiss, search_defaults, search_params
    from twotower.index.filters import FilterMap, build_filter_table
    from twotower.index.load import LoadedIndex
    from twotower.index.synthetic import clustered_vectors

    faiss.omp_set_num_threads(args.threads)
    factories = [f for f in args.factories.split(";") if f]
    xb = clustered_vectors(args.n, args.d, seed=0)
    xq = clustered_vectors(args.nq, args.d, seed=1)
    bucket = np.random.default_rng(2).integers(0, 100, args.n)
    fmap = FilterMap(build_filter_table(json.dumps({"bucket": int(b)}) for b in bucket), args.n)
    results = []
    print(f"n={args.n} d={args.d} nq={args.nq} k={args.k} threads={args.threads} load={os.getloadavg()[0]:.2f}",
          file=sys.stderr)
    for factory in factories:
        t0 = time.perf_counter()
        index = build_faiss(xb, factory, xt=xb[: min(args.n, 50_000)])
        t_build = time.perf_counter() - t0
        defaults = search_defaults(index)
        manifest = {"dim": args.d, "search_defaults": defaults}
        loaded = LoadedIndex(Path("."), index, manifest, None, np.empty(0, np.int64), "cpu")
        nprobe, ef = defaults.get("nprobe"), defaults.get("ef_search")
        unfiltered = bench_unfiltered(index, xb, xq, args, nprobe, ef)
        print(f"{factory:<16} unfiltered {unfiltered['unfiltered_qps']:>9.1f} qps  recall "
              f"{unfiltered[f'unfiltered_recall@{args.k}']:.3f}", file=sys.stderr)
        for pct in [float(p) for p in args.selectivity.split(",")]:
            allowed = fmap.allowed({"bucket": {"$lt": pct}})
            fetch = int(min(args.n, np.ceil(args.overfetch * args.k / allowed.mean())))
            plain = search_params(index, nprobe, max(ef or 0, fetch) if ef else None)
            row = {"factory": factory, "selectivity_pct": pct, "allowed": int(allowed.sum()),
                   "build_s": round(t_build, 1), "nprobe": nprobe, "ef_search": ef, "postfilter_fetch": fetch,
                   **unfiltered, **compare_filters(index, loaded, xb, xq, allowed, fetch, plain, args)}
            results.append(row)
            print(f"{factory:<16} {pct:>5g}%  pushdown {row['pushdown_qps']:>9.1f} qps  recall "
                  f"{row[f'pushdown_recall@{args.k}']:.3f} | post-filter(fetch {fetch}) {row['postfilter_qps']:>9.1f} "
                  f"qps  recall {row[f'postfilter_recall@{args.k}']:.3f}  full {row['postfilter_full']:.2f}",
                  file=sys.stderr)
        index = loaded = None  # free them before the next factory
    print(json.dumps({"bench": "filter", "args": vars(args), "machine": machine(), "versions": versions(),
                      "results": results}))


if __name__ == "__main__":
    main()
