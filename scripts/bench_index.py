"""Benchmark FAISS index types on synthetic normalised vectors: build time, memory, QPS, recall@10 vs Flat.

Vectors: ``index.synthetic.clustered_vectors`` (a Gaussian mixture in a 32-dim latent space, randomly lifted
to ``--d`` dims, plus isotropic noise, L2-normalised): text embeddings are clustered with a low intrinsic
dimension, and uniform random vectors would make every ANN index look far worse than on real data.
Queries are held-out draws from the same distribution. Ground truth = exact Flat search.

Every index goes through the same code as ``twotower index build`` / ``load_index``
(``index.faiss_utils``: ``make_index`` -> ``train_index`` on a sample -> ``add`` -> ``search`` with
per-call parameters). Prints a table and one JSON line.

    python scripts/bench_index.py --n 1000000 --d 384 --nq 1000 --device cpu
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from index.factory import choose_nlist, default_nprobe  # noqa: E402
from index.synthetic import ann_recall, clustered_vectors  # noqa: E402


def release_freed_memory() -> None:
    """Return freed heap pages to the OS (glibc), so the next index's RSS growth is its own."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc: RSS deltas are then upper-bounded by reuse, index_bytes stays exact
        pass


def rss_bytes() -> int:
    """Current resident set size (Linux /proc; 0 elsewhere)."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def timed_search(fn: Any, min_seconds: float = 1.0) -> tuple[float, Any]:
    """Run ``fn()`` until ``min_seconds`` have passed (at least once); returns (seconds per run, result)."""
    runs, start = 0, time.perf_counter()
    while True:
        out = fn()
        runs += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return elapsed / runs, out


def index_bytes(index: Any) -> int:
    import faiss

    with tempfile.NamedTemporaryFile(suffix=".faiss") as fh:
        faiss.write_index(index, fh.name)
        return os.path.getsize(fh.name)


def bench_faiss(factory: str, xb: np.ndarray, xq: np.ndarray, gt: np.ndarray, k: int, train_size: int,
                sweep: list[dict[str, int]], flat_qps: float, min_seconds: float = 1.0) -> list[dict[str, Any]]:
    from index.faiss_utils import make_index, search, search_defaults, train_index

    rss0 = rss_bytes()
    t0 = time.perf_counter()
    index = make_index(factory, xb.shape[1])
    if not index.is_trained:
        rng = np.random.default_rng(0)
        train_index(index, xb[np.sort(rng.choice(len(xb), min(train_size, len(xb)), replace=False))])
    t_train = time.perf_counter() - t0
    for start in range(0, len(xb), 262_144):  # chunked add, as the build does
        index.add(xb[start : start + 262_144])
    t_build = time.perf_counter() - t0
    mem = {"index_bytes": index_bytes(index), "rss_delta_bytes": rss_bytes() - rss0}
    defaults = search_defaults(index)
    rows = []
    for params in sweep or [{}]:
        sec, (_, I) = timed_search(lambda: search(index, xq, k, params.get("nprobe"), params.get("ef_search")),
                                   min_seconds)
        qps = len(xq) / sec
        rows.append({"index": factory, "params": params, "default": params == defaults or (not params and not defaults),
                     "train_s": round(t_train, 1), "build_s": round(t_build, 1), **mem, "qps": round(qps, 1),
                     "recall@10": round(ann_recall(I, gt, k), 4), "speedup_vs_flat": round(qps / flat_qps, 1)})
        print(_fmt(rows[-1]), flush=True)
    del index
    release_freed_memory()
    return rows


def bench_torch_flat(xb: np.ndarray, xq: np.ndarray, gt: np.ndarray, k: int, float16: bool,
                     flat_qps: float) -> dict[str, Any]:
    """Exact search with torch on the GPU (the path used when faiss has no GPU build)."""
    import torch

    from index.torch_search import TorchFlatSearcher

    t0 = time.perf_counter()
    searcher = TorchFlatSearcher(xb, "cuda", float16=float16)
    torch.cuda.synchronize()
    t_build = time.perf_counter() - t0
    searcher.search(xq, k)  # warm-up (cuBLAS handles, kernels)
    sec, (_, I) = timed_search(lambda: searcher.search(xq, k))
    row = {"index": f"torch-cuda Flat{' fp16' if float16 else ''}", "params": {}, "default": True, "train_s": 0.0,
           "build_s": round(t_build, 1), "index_bytes": searcher.xb.numel() * searcher.xb.element_size(),
           "rss_delta_bytes": torch.cuda.max_memory_allocated(), "qps": round(len(xq) / sec, 1),
           "recall@10": round(ann_recall(I, gt, k), 4), "speedup_vs_flat": round(len(xq) / sec / flat_qps, 1)}
    print(_fmt(row), flush=True)
    return row


HEADER = f"{'index':<22} {'params':<16} {'train s':>8} {'build s':>8} {'index MiB':>10} {'RSS+ MiB':>9} " \
         f"{'QPS':>10} {'R@10':>7} {'x Flat':>7}"


def _fmt(r: dict[str, Any]) -> str:
    params = ",".join(f"{k}={v}" for k, v in r["params"].items()) + (" *" if r["default"] and r["params"] else "")
    return (f"{r['index']:<22} {params:<16} {r['train_s']:>8.1f} {r['build_s']:>8.1f} "
            f"{r['index_bytes'] / 2**20:>10.1f} {r['rss_delta_bytes'] / 2**20:>9.1f} {r['qps']:>10.1f} "
            f"{r['recall@10']:>7.4f} {r['speedup_vs_flat']:>7.1f}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=1_000_000, help="base vectors")
    p.add_argument("--d", type=int, default=384, help="dimension (384 = MiniLM)")
    p.add_argument("--nq", type=int, default=1000, help="held-out queries")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cuda adds the torch exact-search GPU path (and faiss GPU when faiss has it)")
    p.add_argument("--threads", type=int, default=0, help="faiss OpenMP threads (0 = faiss default)")
    p.add_argument("--nlist", type=int, default=0, help="IVF lists (0 = what --factory auto picks for --n)")
    p.add_argument("--min-seconds", type=float, default=1.0, help="repeat each search for at least this long")
    p.add_argument("--pq-m", type=int, default=0, help="PQ bytes per vector (0 = d/8: 8-dim sub-vectors)")
    p.add_argument("--hnsw-m", type=int, default=32)
    p.add_argument("--skip", nargs="*", default=[], choices=("ivf", "ivfsq8", "ivfpq", "hnsw"), help="index kinds to skip")
    p.add_argument("--json-out", default="", help="also write the JSON result here")
    args = p.parse_args(argv)

    import faiss

    if args.threads:
        faiss.omp_set_num_threads(args.threads)
    nlist = args.nlist or choose_nlist(args.n)
    pq_m = args.pq_m or args.d // 8
    print(f"# {args.n} x {args.d} clustered synthetic vectors, {args.nq} held-out queries, k={args.k}, "
          f"faiss {faiss.__version__} ({faiss.omp_get_max_threads()} threads), {os.cpu_count()} CPUs", flush=True)
    t0 = time.perf_counter()
    x = clustered_vectors(args.n + args.nq, args.d, n_clusters=max(10, args.n // 1000), seed=0)
    xb, xq = x[: args.n], x[args.n :]
    print(f"# data generated in {time.perf_counter() - t0:.1f} s", flush=True)
    print(HEADER, flush=True)

    # Flat: exact search, the reference for recall and speed.
    flat = faiss.IndexFlatIP(args.d)
    t0 = time.perf_counter()
    flat.add(xb)
    t_flat = time.perf_counter() - t0
    sec, (_, gt) = timed_search(lambda: flat.search(xq, args.k), args.min_seconds)
    flat_qps = args.nq / sec
    rows = [{"index": "Flat", "params": {}, "default": True, "train_s": 0.0, "build_s": round(t_flat, 1),
             "index_bytes": args.n * args.d * 4, "rss_delta_bytes": args.n * args.d * 4,
             "qps": round(flat_qps, 1), "recall@10": 1.0, "speedup_vs_flat": 1.0}]
    print(_fmt(rows[0]), flush=True)
    del flat
    release_freed_memory()
    if args.device == "cuda":
        rows.append(bench_torch_flat(xb, xq, gt, args.k, False, flat_qps))
        rows.append(bench_torch_flat(xb, xq, gt, args.k, True, flat_qps))

    nprobes = sorted({1, 4, 8, 16, 32, 64, 128, default_nprobe(nlist)} & set(range(1, nlist + 1)))
    train = max(64 * nlist, 50_000)  # the rule `index build` uses (IndexBuildConfig.train_size = 0)
    if "ivf" not in args.skip:
        rows += bench_faiss(f"IVF{nlist},Flat", xb, xq, gt, args.k, train, [{"nprobe": p} for p in nprobes],
                            flat_qps, args.min_seconds)
    if "ivfsq8" not in args.skip:
        rows += bench_faiss(f"IVF{nlist},SQ8", xb, xq, gt, args.k, train,
                            [{"nprobe": p} for p in nprobes if 4 <= p <= 64], flat_qps, args.min_seconds)
    if "ivfpq" not in args.skip:
        rows += bench_faiss(f"IVF{nlist},PQ{pq_m}", xb, xq, gt, args.k, train,
                            [{"nprobe": p} for p in nprobes if p >= 8], flat_qps, args.min_seconds)
    if "hnsw" not in args.skip:
        rows += bench_faiss(f"HNSW{args.hnsw_m}", xb, xq, gt, args.k, 0,
                            [{"ef_search": e} for e in (16, 32, 64, 128, 256)], flat_qps, args.min_seconds)

    goal = [r for r in rows if r["recall@10"] >= 0.95 and r["speedup_vs_flat"] >= 10]
    best = max(goal, key=lambda r: r["speedup_vs_flat"]) if goal else None
    verdict = f"met by {best['index']} {json.dumps(best['params'])}: {best['qps']} QPS = {best['speedup_vs_flat']}x " \
              f"Flat at recall@10 {best['recall@10']}" if best else "not met"
    print(f"# goal (recall@10 >= 0.95 at >= 10x Flat QPS): {verdict}")
    import torch

    result = {"bench": "index", "n": args.n, "d": args.d, "nq": args.nq, "k": args.k, "device": args.device,
              "data": "clustered_vectors(latent=32, n_clusters=n/1000, spread=0.6, noise=0.05)",
              "machine": {"cpus": os.cpu_count(), "faiss_threads": faiss.omp_get_max_threads(),
                          "platform": platform.platform(), "processor": platform.processor()},
              "versions": {"faiss": faiss.__version__, "numpy": np.__version__, "torch": torch.__version__,
                           "python": platform.python_version()},
              "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "results": rows}
    line = json.dumps(result)
    print(line)
    if args.json_out:
        Path(args.json_out).write_text(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
