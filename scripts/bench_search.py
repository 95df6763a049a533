"""Search overhead: ``Retriever.search_vectors`` vs raw ``faiss`` ``index.search`` on the same index and vectors.

The INDEX dirs are built with the project's own API (``index.build.build_index`` over a table encoder that
returns precomputed vectors, then ``index.load.load_index``): ``--n`` synthetic normalised vectors
(``index.synthetic.clustered_vectors``) in a Flat index and an IVF index. Queries are held-out draws from
the same distribution. "raw faiss" is what a faiss user writes: ``index.search(xq, k)`` on the same
loaded CPU index object, with ``nprobe`` set on the index to the manifest's default. Ours returns
``Hit`` objects (id, score, text, title, metadata), raw faiss returns the two arrays; that work is part
of the overhead, as it is what a caller of ours gets.

Per index and batch size the systems are called one after another, round by round, for ``--seconds``;
overhead % = median over rounds of (ours - raw) / median raw (paired: the two calls of a round ran
moments apart, which cancels the drift of a shared machine's load). The breakdown columns show where
ours spends it: ``LoadedIndex.search`` alone (validation, per-call parameter object, tombstone selector)
and ``hits_from`` (doc rows + Hit objects). ``Retriever.search`` end to end (query encoding by the MiniLM
query tower on codesearch-py queries, same pairing) vs sentence-transformers ``encode`` + raw faiss is
printed for context: the encoder dominates.

    python -m scripts.bench_search --n 100000 --batches 1,32,256 --device cpu
"""
from __future__ import annotations

import argparse
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from scripts.bench_common import (
    add_base_arg,
    check_device,
    codesearch_dir,
    cycle_times,
    emit,
    gpu_peaks,
    median,
    paired_overhead,
    print_table,
)
from twotower.common.jsonl import iter_json_rows

K = 10


class VectorTable:
    """Encoder-protocol object returning precomputed vectors: the text of doc i is ``"doc i"``."""

    def __init__(self, xb: np.ndarray) -> None:
        self.xb = xb
        self.dim = int(xb.shape[1])

    def encode(self, texts: list[str], batch_size: int = 64, show_progress: bool = False) -> np.ndarray:
        return self.xb[[int(t.rsplit(" ", 1)[-1]) for t in texts]]


def build(xb: np.ndarray, factory: str, out: Path) -> Path:
    """An INDEX dir of ``xb`` built by ``index.build.build_index`` (docs: id ``d<i>``, text ``doc <i>``)."""
    from twotower.index.build import build_index
    from twotower.index.config import EncodeConfig, IndexBuildConfig

    corpus = [{"_id": f"d{i}", "title": "", "text": f"doc {i}"} for i in range(len(xb))]
    return build_index(VectorTable(xb), corpus, out, IndexBuildConfig(factory=factory), EncodeConfig(progress=False))


def raw_search(index: Any, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    return index.search(xq, k)


def raw_searcher(loaded: Any, faiss: Any) -> tuple[str, Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]]:
    """What a user of the library underneath writes for the same search as ``loaded``: the CPU index object
    itself (``nprobe`` set on it), faiss's GPU clone of it, or, for our torch GPU path, ``xb`` on the GPU
    with one matmul + ``topk``."""
    if loaded.device == "cpu":
        index = loaded.cpu_index
        nprobe = loaded.search_defaults.get("nprobe")
        if nprobe:
            faiss.extract_index_ivf(index).nprobe = nprobe
        return "faiss-cpu", lambda xq, k: raw_search(index, xq, k)
    if loaded.device == "faiss-gpu":
        gpu = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, loaded.cpu_index)
        return "faiss-gpu", lambda xq, k: raw_search(gpu, xq, k)
    import torch

    xb = torch.from_numpy(loaded.cpu_index.reconstruct_n(0, loaded.ntotal)).cuda()

    def torch_search(xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        with torch.inference_mode():
            d, i = (torch.from_numpy(xq).cuda() @ xb.T).topk(k, dim=1)
            return d.cpu().numpy(), i.cpu().numpy()
    return "torch matmul+topk", torch_search


def query_texts(n: int, path: str | None = None) -> list[str]:
    """The first ``n`` query texts of a BEIR queries.jsonl (default: the codesearch-py suite's)."""
    return [row["text"] for row in iter_json_rows(path or codesearch_dir() / "queries.jsonl", n)]


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=100_000, help="vectors in the index")
    ap.add_argument("--d", type=int, default=384, help="dimension (384 = MiniLM, so the query tower fits)")
    ap.add_argument("--ivf", default="auto", help="IVF factory string, or auto (the nlist `index build` picks)")
    ap.add_argument("--batches", default="1,32,256", help="query batch sizes")
    ap.add_argument("--seconds", type=float, default=3.0, help="timing per index and batch size (all systems)")
    ap.add_argument("--min-rounds", type=int, default=7, help="at least this many calls of each system")
    ap.add_argument("--e2e-seconds", type=float, default=10.0, help="timing per batch size end to end")
    ap.add_argument("--end-to-end", action=argparse.BooleanOptionalAction, default=True,
                    help="also time Retriever.search with query encoding (MiniLM query tower)")
    ap.add_argument("--faiss-threads", type=int, default=0,
                    help="faiss OpenMP threads (0 = faiss's default; 1 is steadier on a loaded shared machine)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                    help="device of the query tower; cuda also searches the Flat index on the GPU (faiss-gpu, "
                         "else our torch path) against the same library used directly")
    add_base_arg(ap)
    ap.add_argument("--queries", default=None,
                    help="BEIR queries.jsonl for the end-to-end rows (default: the codesearch-py suite's)")
    ap.add_argument("--json-out", default=None, help="append the JSON line to this file")
    return ap.parse_args()


def time_batch(loaded: Any, retriever: Any, raw: Callable[[np.ndarray, int], Any], xq: np.ndarray, where: str,
               args: argparse.Namespace) -> dict[str, Any]:
    """One batch of queries through the raw library and through ours, called in turn round by round: the
    medians, the paired overheads and the per-call extra time."""
    ref_d, ref_i = raw(xq, K)
    D, I = loaded.search(xq, K)
    if where == "cpu":
        assert np.array_equal(ref_i, I), "same index, same hits"
    else:  # GPU reductions may order near-ties differently: same scores, ids may swap
        assert np.allclose(ref_d, D, atol=1e-4), "same index, same scores"
    times = cycle_times({
        "raw": lambda: raw(xq, K),
        "ours": lambda: retriever.search_vectors(xq, K),
        "index_search": lambda: loaded.search(xq, K),
    }, args.seconds, args.min_rounds)
    hits_s = median(cycle_times({"hits_from": lambda: retriever.hits_from(D, I)}, 0.2, 5)["hits_from"])
    raw_s, ours_s = median(times["raw"]), median(times["ours"])
    b = len(xq)
    return {"rounds": len(times["raw"]), "raw_ms": 1e3 * raw_s, "ours_ms": 1e3 * ours_s,
            "overhead_pct": 100 * paired_overhead(times["raw"], times["ours"]),
            "index_search_pct": 100 * paired_overhead(times["raw"], times["index_search"]),
            "extra_us": 1e6 * median([o - r for r, o in zip(times["raw"], times["ours"])]),
            "hits_from_us": 1e6 * hits_s, "raw_qps": b / raw_s, "ours_qps": b / ours_s}


def bench_end_to_end(args: argparse.Namespace, device: str, batches: list[int], ivf: str, ivf_raw: Any,
                     ivf_retriever: Any) -> list[dict[str, Any]]:
    """``Retriever.search`` (query encoding included) against sentence-transformers' encode + raw faiss."""
    from sentence_transformers import SentenceTransformer

    from twotower.towers.bases import resolve_base

    st = SentenceTransformer(str(resolve_base(args.base)), device=device)
    st.max_seq_length = 64
    texts = query_texts(max(batches), args.queries)
    ivf_retriever.search(texts[:8], K)  # warm-up
    st.encode(texts[:8])
    e2e: list[dict[str, Any]] = []
    for b in batches:
        qs = texts[:b]
        times = cycle_times({
            "st+faiss": lambda: ivf_raw(st.encode(qs, batch_size=64, convert_to_numpy=True,
                                                  normalize_embeddings=True), K),
            "retriever.search": lambda: ivf_retriever.search(qs, K)}, args.e2e_seconds, 3)
        st_s, ours_s = median(times["st+faiss"]), median(times["retriever.search"])
        e2e.append({"index": ivf, "batch": b, "rounds": len(times["st+faiss"]), "st_faiss_ms": 1e3 * st_s,
                    "ours_ms": 1e3 * ours_s, "x_st": st_s / ours_s,
                    "ours_vs_st_pct": 100 * paired_overhead(times["st+faiss"], times["retriever.search"])})
    print("\nend to end with query encoding (MiniLM, max 64 tokens), IVF index:")
    print_table(e2e, [("batch", "batch", "d"), ("rounds", "rounds", "d"),
                      ("st_faiss_ms", "ST encode + faiss ms", ".1f"), ("ours_ms", "Retriever.search ms", ".1f"),
                      ("x_st", "x ST", ".2f"), ("ours_vs_st_pct", "paired diff %", "+.1f")])
    return e2e


def main() -> None:
    args = parse_args()
    device = check_device(args.device)
    batches = [int(b) for b in args.batches.split(",")]

    import faiss

    from twotower.index.factory import choose_nlist
    from twotower.index.load import load_index
    from twotower.index.synthetic import clustered_vectors
    from twotower.retrieval.retriever import Retriever
    from twotower.towers.bases import resolve_base
    from twotower.towers.model import Tower

    if args.faiss_threads:
        faiss.omp_set_num_threads(args.faiss_threads)
    data = clustered_vectors(args.n + max(batches), args.d, seed=0)
    xb, xq_all = data[: args.n], data[args.n:]
    ivf = f"IVF{choose_nlist(args.n)},Flat" if args.ivf == "auto" else args.ivf
    tower = Tower.from_base(resolve_base(args.base), pooling="mean", max_length=64).to(device)
    if tower.dim != args.d:
        raise SystemExit(f"--d {args.d} must equal the query tower's dim {tower.dim}")
    tmp = Path(tempfile.mkdtemp(prefix="bench-search-"))
    rows: list[dict[str, Any]] = []
    runs = [("Flat", "cpu"), (ivf, "cpu")] + ([("Flat", "cuda")] if device == "cuda" else [])
    dirs = {factory: build(xb, factory, tmp / factory.replace(",", "_")) for factory in dict(runs)}
    peaks = gpu_peaks(device)
    for factory, where in runs:
        loaded = load_index(dirs[factory], device=where)
        raw_name, raw = raw_searcher(loaded, faiss)
        retriever = Retriever(loaded, tower)
        if (factory, where) == (ivf, "cpu"):
            ivf_raw, ivf_retriever = raw, retriever  # the end-to-end comparison below uses these
        for b in batches:
            row = {"index": factory, "where": f"{loaded.device} vs {raw_name}",
                   "nprobe": loaded.search_defaults.get("nprobe"), "batch": b,
                   **time_batch(loaded, retriever, raw, np.ascontiguousarray(xq_all[:b]), where, args)}
            if where == "cuda" and peaks:  # exact search streams every base vector once per call
                row["raw_hbm_pct"] = 100 * xb.nbytes / (row["raw_ms"] / 1e3) / 1e9 / peaks[1]
            rows.append(row)
    print(f"n={args.n} d={args.d}, k={K}; medians of single calls, systems called in turn round by round "
          f"(>= {args.seconds}s, >= {args.min_rounds} rounds); overhead = median paired difference / median raw; "
          f"faiss {faiss.__version__} with {faiss.omp_get_max_threads()} OpenMP threads")
    print_table(rows, [("index", "index", ""), ("where", "ours vs raw", ""), ("nprobe", "nprobe", ""),
                       ("batch", "batch", "d"), ("rounds", "rounds", "d"), ("raw_ms", "raw ms", ".3f"),
                       ("ours_ms", "ours ms", ".3f"),
                       ("overhead_pct", "overhead %", "+.1f"), ("extra_us", "extra us", ".0f"),
                       ("index_search_pct", "LoadedIndex.search %", "+.1f"), ("hits_from_us", "hits_from us", ".0f")]
                + ([("raw_hbm_pct", "raw % HBM peak", ".1f")] if peaks else []))
    e2e = bench_end_to_end(args, device, batches, ivf, ivf_raw, ivf_retriever) if args.end_to_end else []
    emit("search", args, rows, device, args.json_out, end_to_end=e2e)


if __name__ == "__main__":
    main()
