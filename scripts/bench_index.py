"""Benchmark FAISS index types: build time, RAM bytes per doc, QPS, recall@10 vs Flat, with and without re-scoring.

Vectors: ``index.synthetic.clustered_vectors`` (a Gaussian mixture in a 32-dim latent space, randomly lifted
to ``--d`` dims, plus isotropic noise, L2-normalised): text embeddings are clustered with a low intrinsic
dimension, and uniform random vectors would make every ANN index look far worse than on real data.
Queries are held-out draws from the same distribution. Ground truth = exact Flat search.

Every index goes through the same code as ``twotower index build`` / ``load_index``
(``index.faiss_utils``: ``make_index`` -> ``train_index`` on a sample -> ``add`` -> ``search`` with
per-call parameters). Prints a table and one JSON line.

Compact codes (IVF-SQ8, IVF-PQ, binary sign bits ``BFlat`` / ``BIVF``) are also measured with re-scoring
(``--rescore 2,4,10``): ``k * N`` candidates from the codes, re-scored exactly by ``index.rescore.rescore`` with
the float vectors memory-mapped from a ``.npy`` file, as a loaded INDEX dir does. RAM bytes per doc = the faiss
file's size / n (what ``load_index`` reads into memory; the vectors stay on disk).

Real embeddings instead of synthetic ones: ``--suite DIR --towers DIR`` encodes the BEIR suite's corpus with the
result tower and ``--nq`` of its queries with the query tower (cached as .npy in ``--cache-dir``).

    python -m scripts.bench_index --n 1000000 --d 384 --nq 1000 --device cpu
    python -m scripts.bench_index --n 500000 --kinds ivfsq8,ivfpq,bflat,bivf --rescore 2,4,10,20
    python -m scripts.bench_index --suite SUITE_DIR --towers TOWERS_DIR --cache-dir DIR --kinds ivfsq8,ivfpq,bflat,bivf
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from scripts.bench_common import machine, versions
from twotower.index.factory import choose_nlist, default_nprobe
from twotower.index.synthetic import ann_recall, clustered_vectors

KINDS = ("ivf", "ivfsq8", "ivfpq", "hnsw", "bflat", "bivf")


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


def index_bytes(index: Any, write: Any) -> int:
    """Size of the index file (``index.faiss_utils.write_index``: float and binary indexes alike)."""
    with tempfile.NamedTemporaryFile(suffix=".faiss") as fh:
        write(index, fh.name)
        return os.path.getsize(fh.name)


def bench_faiss(factory: str, xb: np.ndarray, xq: np.ndarray, gt: np.ndarray, k: int, train_size: int,
                sweep: list[dict[str, int]], flat_qps: float, min_seconds: float = 1.0,
                rescores: tuple[int, ...] = (0,), vectors: np.ndarray | None = None) -> list[dict[str, Any]]:
    """Build ``factory`` over ``xb`` and time each search setting of ``sweep`` at each re-scoring factor
    (0 = none; N > 0 re-scores ``k * N`` candidates with ``vectors``, the memory-mapped floats)."""
    from twotower.index.faiss_utils import make_index, search, search_defaults, train_index, write_index
    from twotower.index.rescore import rescore

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
    mem = {"index_bytes": index_bytes(index, write_index), "rss_delta_bytes": rss_bytes() - rss0}
    flat_bytes = 4 * xb.shape[1]
    mem["ram_bytes_per_doc"] = round(mem["index_bytes"] / len(xb), 1)
    mem["ram_x_less_than_flat"] = round(flat_bytes * len(xb) / mem["index_bytes"], 1)
    defaults = search_defaults(index)
    rows = []
    for params in sweep or [{}]:
        for n_re in rescores:
            if n_re and vectors is None:
                continue

            def run(n_re: int = n_re, params: dict[str, int] = params) -> tuple[np.ndarray, np.ndarray]:
                kk = min(k * n_re, len(xb)) if n_re else k
                D, I = search(index, xq, kk, params.get("nprobe"), params.get("ef_search"))
                return rescore(xq, I, vectors, k) if n_re else (D, I)

            sec, (_, I) = timed_search(run, min_seconds)
            qps = len(xq) / sec
            rows.append({"index": factory, "params": params, "rescore": n_re,
                         "default": params == defaults or (not params and not defaults),
                         "train_s": round(t_train, 1), "build_s": round(t_build, 1), **mem, "qps": round(qps, 1),
                         "recall@10": round(ann_recall(I, gt, k), 4), "speedup_vs_flat": round(qps / flat_qps, 1)})
            print(_fmt(rows[-1]), flush=True)
    index = None  # free it before the next kind (the run() closures are done with it)
    release_freed_memory()
    return rows


def bench_torch_flat(xb: np.ndarray, xq: np.ndarray, gt: np.ndarray, k: int, float16: bool,
                     flat_qps: float) -> dict[str, Any]:
    """Exact search with torch on the GPU (the path used when faiss has no GPU build)."""
    import torch

    from twotower.index.torch_search import TorchFlatSearcher

    t0 = time.perf_counter()
    searcher = TorchFlatSearcher(xb, "cuda", float16=float16)
    torch.cuda.synchronize()
    t_build = time.perf_counter() - t0
    searcher.search(xq, k)  # warm-up (cuBLAS handles, kernels)
    sec, (_, I) = timed_search(lambda: searcher.search(xq, k))
    row = {"index": f"torch-cuda Flat{' fp16' if float16 else ''}", "params": {}, "rescore": 0, "default": True,
           "train_s": 0.0, "ram_bytes_per_doc": searcher.xb.element_size() * xb.shape[1], "ram_x_less_than_flat": 1.0,
           "build_s": round(t_build, 1), "index_bytes": searcher.xb.numel() * searcher.xb.element_size(),
           "rss_delta_bytes": torch.cuda.max_memory_allocated(), "qps": round(len(xq) / sec, 1),
           "recall@10": round(ann_recall(I, gt, k), 4), "speedup_vs_flat": round(len(xq) / sec / flat_qps, 1)}
    print(_fmt(row), flush=True)
    return row


HEADER = f"{'index':<22} {'params':<16} {'rescore':>7} {'train s':>8} {'build s':>8} {'index MiB':>10} " \
         f"{'B/doc':>7} {'RAM /':>6} {'RSS+ MiB':>9} {'QPS':>10} {'R@10':>7} {'x Flat':>7}"


def _fmt(r: dict[str, Any]) -> str:
    params = ",".join(f"{k}={v}" for k, v in r["params"].items()) + (" *" if r["default"] and r["params"] else "")
    return (f"{r['index']:<22} {params:<16} {r.get('rescore', 0):>7} {r['train_s']:>8.1f} {r['build_s']:>8.1f} "
            f"{r['index_bytes'] / 2**20:>10.1f} {r['ram_bytes_per_doc']:>7.1f} {r['ram_x_less_than_flat']:>6.1f} "
            f"{r['rss_delta_bytes'] / 2**20:>9.1f} {r['qps']:>10.1f} {r['recall@10']:>7.4f} "
            f"{r['speedup_vs_flat']:>7.1f}")


def suite_vectors(suite: str, towers: str, nq: int, cache_dir: str, batch_size: int = 64
                  ) -> tuple[np.ndarray, np.ndarray, str]:
    """(xb corpus vectors, xq vectors of ``nq`` random queries, description) of a BEIR suite encoded by the
    towers (result tower for docs, query tower for queries), cached in ``cache_dir`` by towers fingerprint."""
    from twotower.eval.suites.beir import load_beir
    from twotower.towers.inference import query_encoder, result_encoder
    from twotower.towers.model import TwoTower, read_towers_meta

    fp = read_towers_meta(towers)["fingerprint"]
    suite_data = load_beir(suite)
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    xb_path, xq_path = cache / f"xb-{fp[:12]}-{len(suite_data.corpus_ids)}.npy", cache / f"xq-{fp[:12]}-{nq}.npy"
    desc = f"{suite} ({len(suite_data.corpus_ids)} docs) encoded by towers {towers} (fingerprint {fp[:12]})"
    if xb_path.is_file() and xq_path.is_file():
        return np.load(xb_path), np.load(xq_path), desc
    model = TwoTower.load(towers)
    t0 = time.perf_counter()
    xb = result_encoder(model, "cpu").encode(suite_data.doc_texts(), batch_size=batch_size, show_progress=True)
    queries = suite_data.query_texts
    pick = np.sort(np.random.default_rng(0).choice(len(queries), min(nq, len(queries)), replace=False))
    xq = query_encoder(model, "cpu").encode([queries[i] for i in pick], batch_size=batch_size, show_progress=True)
    print(f"# encoded {len(xb)} docs + {len(xq)} queries in {time.perf_counter() - t0:.0f} s", flush=True)
    np.save(xb_path, xb)
    np.save(xq_path, xq)
    return xb, xq, desc


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str], tuple[int, ...]]:
    """The options, the index kinds to run and the re-scoring factors (a bad option exits 2)."""
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
    p.add_argument("--skip", nargs="*", default=[], choices=KINDS, help="index kinds to skip")
    p.add_argument("--kinds", default="ivf,ivfsq8,ivfpq,hnsw",
                   help=f"comma list of index kinds to run, from {','.join(KINDS)} (bflat/bivf: binary sign bits)")
    p.add_argument("--nprobes", default="", help="comma list of nprobe values for IVF kinds (default: a sweep around "
                                                 "the manifest default; real embeddings need more than synthetic)")
    p.add_argument("--rescore", default="0", help="comma list of re-scoring factors N for compact codes (0 = none)")
    p.add_argument("--suite", default="",
                   help="real embeddings: BEIR suite dir whose corpus is encoded (with --towers)")
    p.add_argument("--towers", default="", help="TOWERS dir that encodes --suite")
    p.add_argument("--cache-dir", default="", help="where --suite vectors (and the re-scoring .npy) are kept")
    p.add_argument("--json-out", default="", help="also write the JSON result here")
    args = p.parse_args(argv)
    kinds = [k for k in args.kinds.split(",") if k and k not in args.skip]
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown:
        p.error(f"unknown --kinds {','.join(unknown)}: choose from {','.join(KINDS)}")
    rescores = tuple(sorted({int(x) for x in args.rescore.split(",")}))
    if args.suite and not args.towers:
        p.error("--suite needs --towers")
    return args, kinds, rescores


def load_vectors(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray, str]:
    """(base vectors, queries, what they are): --suite's encoded corpus, or clustered synthetic vectors.
    Sets ``args.n``, ``args.d``, ``args.nq`` to the data's."""
    if args.suite:
        xb, xq, data_desc = suite_vectors(args.suite, args.towers, args.nq, args.cache_dir or tempfile.gettempdir())
        args.n, args.d, args.nq = len(xb), xb.shape[1], len(xq)
        return xb, xq, data_desc
    x = clustered_vectors(args.n + args.nq, args.d, n_clusters=max(10, args.n // 1000), seed=0)
    return x[: args.n], x[args.n :], "clustered_vectors(latent=32, n_clusters=n/1000, spread=0.6, noise=0.05)"


def bench_flat(xb: np.ndarray, xq: np.ndarray, args: argparse.Namespace
               ) -> tuple[dict[str, Any], np.ndarray, float]:
    """Flat, exact search: the reference row for recall and speed, the true top-k ids and Flat's QPS."""
    import faiss

    flat = faiss.IndexFlatIP(args.d)
    t0 = time.perf_counter()
    flat.add(xb)
    t_flat = time.perf_counter() - t0
    sec, (_, gt) = timed_search(lambda: flat.search(xq, args.k), args.min_seconds)
    row = {"index": "Flat", "params": {}, "rescore": 0, "default": True, "train_s": 0.0, "build_s": round(t_flat, 1),
           "index_bytes": args.n * args.d * 4, "rss_delta_bytes": args.n * args.d * 4,
           "ram_bytes_per_doc": 4 * args.d, "ram_x_less_than_flat": 1.0,
           "qps": round(args.nq / sec, 1), "recall@10": 1.0, "speedup_vs_flat": 1.0}
    return row, gt, args.nq / sec


def plans_for(args: argparse.Namespace, nlist: int, rescores: tuple[int, ...]
              ) -> dict[str, tuple[str, list[dict[str, int]], tuple[int, ...]]]:
    """kind -> (factory string, parameter sweep, re-scoring factors)."""
    pq_m = args.pq_m or args.d // 8
    nprobes = sorted({1, 4, 8, 16, 32, 64, 128, default_nprobe(nlist)} & set(range(1, nlist + 1)))
    dflt = default_nprobe(nlist)
    none = (0,)
    plans = {
        "ivf": (f"IVF{nlist},Flat", [{"nprobe": p} for p in nprobes], none),
        "ivfsq8": (f"IVF{nlist},SQ8", [{"nprobe": p} for p in nprobes if 4 <= p <= 64], rescores),
        "ivfpq": (f"IVF{nlist},PQ{pq_m}", [{"nprobe": p} for p in nprobes if p >= 8], rescores),
        "hnsw": (f"HNSW{args.hnsw_m}", [{"ef_search": e} for e in (16, 32, 64, 128, 256)], none),
        "bflat": ("BFlat", [{}], rescores),
        "bivf": (f"BIVF{nlist}", [{"nprobe": p} for p in nprobes if p >= dflt], rescores),
    }
    if args.nprobes:
        chosen = [{"nprobe": int(v)} for v in args.nprobes.split(",")]
        for kind in ("ivf", "ivfsq8", "ivfpq", "bivf"):
            plans[kind] = (plans[kind][0], chosen, plans[kind][2])
    elif any(rescores):  # with re-scoring, nprobe values around the default keep the table short
        for kind in ("ivfsq8", "ivfpq"):
            factory, sweep, rs = plans[kind]
            plans[kind] = (factory, [s for s in sweep if s["nprobe"] in (min(8, dflt), dflt, min(2 * dflt, nlist))], rs)
    return plans


def print_goals(rows: list[dict[str, Any]]) -> None:
    """Which rows meet the issue's goals (speed, RAM, binary + re-score)."""
    goal = [r for r in rows if r["recall@10"] >= 0.95 and r["speedup_vs_flat"] >= 10]
    best = max(goal, key=lambda r: r["speedup_vs_flat"]) if goal else None
    verdict = f"met by {best['index']} {json.dumps(best['params'])}: {best['qps']} QPS = {best['speedup_vs_flat']}x " \
              f"Flat at recall@10 {best['recall@10']}" if best else "not met"
    print(f"# goal (recall@10 >= 0.95 at >= 10x Flat QPS): {verdict}")
    for name, ok in [("RAM >= 8x less than Flat at recall@10 >= 0.99",
                      lambda r: r["ram_x_less_than_flat"] >= 8 and r["recall@10"] >= 0.99),
                     ("binary + re-score at recall@10 >= 0.95 with 32x less RAM",
                      lambda r: r["index"].startswith("B") and r["rescore"] and r["ram_x_less_than_flat"] >= 31.95
                      and r["recall@10"] >= 0.95)]:
        met = [r for r in rows if ok(r)]
        top = max(met, key=lambda r: r["qps"]) if met else None
        print(f"# goal ({name}): " + (f"met by {top['index']} {json.dumps(top['params'])} rescore={top['rescore']}: "
                                      f"{top['ram_x_less_than_flat']}x less RAM, recall@10 {top['recall@10']}, "
                                      f"{top['qps']} QPS" if top else "not met"), flush=True)


def main(argv: list[str] | None = None) -> int:
    args, kinds, rescores = parse_args(argv)
    import faiss

    if args.threads:
        faiss.omp_set_num_threads(args.threads)
    t0 = time.perf_counter()
    xb, xq, data_desc = load_vectors(args)
    nlist = args.nlist or choose_nlist(args.n)
    print(f"# {args.n} x {args.d} vectors: {data_desc}; {args.nq} queries, k={args.k}, "
          f"faiss {faiss.__version__} ({faiss.omp_get_max_threads()} threads), {os.cpu_count()} CPUs, load average "
          f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}", flush=True)
    print(f"# data ready in {time.perf_counter() - t0:.1f} s", flush=True)
    vectors = None
    if any(rescores):  # the float vectors as a loaded INDEX dir sees them: a memory-mapped .npy on disk
        if args.cache_dir:
            Path(args.cache_dir).mkdir(parents=True, exist_ok=True)
        vec_dir = tempfile.mkdtemp(dir=args.cache_dir or None)
        np.save(Path(vec_dir) / "vectors.npy", xb)
        vectors = np.load(Path(vec_dir) / "vectors.npy", mmap_mode="r")
    print(HEADER, flush=True)

    flat_row, gt, flat_qps = bench_flat(xb, xq, args)
    rows = [flat_row]
    print(_fmt(rows[0]), flush=True)
    release_freed_memory()  # the Flat index is freed with bench_flat's frame
    if args.device == "cuda":
        rows.append(bench_torch_flat(xb, xq, gt, args.k, False, flat_qps))
        rows.append(bench_torch_flat(xb, xq, gt, args.k, True, flat_qps))
    train = max(64 * nlist, 50_000)  # the rule `index build` uses (IndexBuildConfig.train_size = 0)
    plans = plans_for(args, nlist, rescores)
    for kind in kinds:
        factory, sweep, rs = plans[kind]
        rows += bench_faiss(factory, xb, xq, gt, args.k, train if kind != "hnsw" else 0, sweep, flat_qps,
                            args.min_seconds, rs, vectors)
    print_goals(rows)
    if vectors is not None:
        import shutil

        del vectors
        shutil.rmtree(vec_dir, ignore_errors=True)
    import torch  # noqa: F401  (imported so that versions() reports it)

    result = {"bench": "index", "n": args.n, "d": args.d, "nq": args.nq, "k": args.k, "device": args.device,
              "data": data_desc, "load_average_end": os.getloadavg(),
              "machine": {**machine(args.device), "faiss_threads": faiss.omp_get_max_threads()},
              "versions": versions(),
              "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "results": rows}
    line = json.dumps(result)
    print(line)
    if args.json_out:
        Path(args.json_out).write_text(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
