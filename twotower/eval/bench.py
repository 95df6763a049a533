"""Benchmark systems on a BEIR suite: encode -> exact faiss index -> search -> metrics, the same path for all.

faiss ``benchs/datasets.py::evaluate`` style: each dense system's corpus vectors go into one
``IndexFlatIP`` (exact search, so only the encoders differ), queries are searched for the top ``k_max``, and
the ranked ids go through ``common.metrics``. BM25 returns ranked ids directly and joins at the metrics step.
For the similarity plot, each query's cosine with its relevant docs and with random docs is kept.
"""
from __future__ import annotations

import dataclasses
import gc
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from twotower.common.device import resolve_device
from twotower.common.metrics import evaluate, recall_curve
from twotower.common.outputs import check_out_dir
from twotower.eval.config import BenchConfig
from twotower.eval.report import environment, similarity_summary, write_report
from twotower.eval.suites.beir import load_beir
from twotower.eval.systems import SystemSpec, build_systems, parse_systems
from twotower.index.faiss_utils import build_faiss, search
from twotower.index.hybrid import candidates_per_side, hybrid_rank


def similarity_samples(xq: np.ndarray, xb: np.ndarray, relevant: Sequence[dict[int, int]],
                       random_rows: np.ndarray) -> dict[str, np.ndarray]:
    """Cosines (vectors are L2-normalised) of each query with its relevant docs and with random docs.

    Args:
        xq: (nq, d) query vectors; xb: (nb, d) doc vectors.
        random_rows: (nq, n_random) doc rows; any that happen to be relevant are dropped.
    """
    pos, neg = [], []
    for q, rel in enumerate(relevant):
        rows = [r for r, g in rel.items() if g > 0]
        pos.append(xb[rows] @ xq[q])
        others = [r for r in random_rows[q] if r not in rel]
        neg.append(xb[others] @ xq[q])
    return {"relevant": np.concatenate(pos).astype(np.float32), "random": np.concatenate(neg).astype(np.float32)}


def _score(I: np.ndarray, relevant: Sequence[dict[int, int]], k_max: int) -> dict[str, Any]:
    return {"metrics": evaluate(I, relevant), "recall_curve": recall_curve(I, relevant, k_max).tolist()}


@dataclasses.dataclass
class _Run:
    """What every system of one bench run shares: the settings, the suite's texts, and the dense vectors and
    BM25 rankings a hybrid system reuses."""

    config: BenchConfig
    docs: list[str]
    queries: list[str]
    relevant: Sequence[dict[int, int]]
    show_progress: bool
    # dense_key -> (xb, xq, t_docs, t_queries) of the plain systems whose vectors a hybrid system shares
    encoded: dict[Any, Any] = dataclasses.field(default_factory=dict)
    # candidates per side -> (D, I, t_index, t_search): one BM25 index per bench
    bm25_runs: dict[int, Any] = dataclasses.field(default_factory=dict)


def _fetched(D: np.ndarray, I: np.ndarray) -> Any:
    """One side of a hybrid search already run: ``n -> its top n`` (``index.hybrid.hybrid_rank``'s input)."""
    return lambda n: (D[:, :n], I[:, :n])


def _run_hybrid(system: Any, run: _Run) -> dict[str, dict[str, Any]]:
    """Rows of one hybrid system: exact dense and BM25 candidates, then ``index.hybrid.hybrid_rank`` per fusion
    (the Retriever's rule); each side is searched once and timed apart from the fusion."""
    docs, queries, k_max, batch_size = run.docs, run.queries, run.config.k_max, run.config.batch_size
    depth_k = candidates_per_side(k_max, system.options.depth, len(docs))
    if system.dense_key in run.encoded:
        xb, xq, t_docs, t_queries = run.encoded[system.dense_key]
    else:
        t0 = time.perf_counter()
        xb = system.encode_docs(docs, batch_size, run.show_progress)[system.label]
        t_docs = time.perf_counter() - t0
        t0 = time.perf_counter()
        xq = system.encode_queries(queries, batch_size, run.show_progress)[system.label]
        t_queries = time.perf_counter() - t0
    t0 = time.perf_counter()
    Dd, Id = search(build_faiss(xb, "Flat"), xq, depth_k)
    t_dense = time.perf_counter() - t0
    if depth_k not in run.bm25_runs:
        t0 = time.perf_counter()
        system.retriever.index(docs)
        t_index = time.perf_counter() - t0
        t0 = time.perf_counter()
        run.bm25_runs[depth_k] = (*system.retriever.search(queries, depth_k), t_index, time.perf_counter() - t0)
    Db, Ib, t_bm25_index, t_bm25 = run.bm25_runs[depth_k]
    configs = system.config()
    out = {}
    for row, opts in system.row_options().items():
        t0 = time.perf_counter()
        _, I = hybrid_rank(_fetched(Dd, Id), _fetched(Db, Ib), k_max, len(docs), opts)
        t_fuse = time.perf_counter() - t0
        timings = {"encode_docs_s": t_docs, "encode_queries_s": t_queries, "docs_per_s": len(docs) / max(t_docs, 1e-9),
                   "index_s": t_bm25_index, "search_s": t_dense + t_bm25 + t_fuse, "dense_search_s": t_dense,
                   "bm25_search_s": t_bm25, "fuse_s": t_fuse, "candidates_per_side": depth_k}
        out[row] = {**_score(I, run.relevant, k_max), "config": configs[row], "timings": timings}
    return out


def run_bench(config: BenchConfig, specs: Sequence[SystemSpec] | None = None, show_progress: bool = True,
              extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Benchmark the systems of ``config`` on its suite and write the report dir ``config.out``.

    Args:
        config: suite, systems (the ``--systems`` string, see ``eval.systems``), out (report dir, written
            atomically), k_max (results per query; recall@k curves go up to it), sizes and lengths.
        specs: already parsed systems, used instead of ``config.systems``.
        extra: more fields recorded in results.json (e.g. the demo's profile and step timings).

    Returns:
        The results dict written to ``out/results.json``.
    """
    c = config
    specs = list(specs) if specs is not None else parse_systems(c.systems)
    check_out_dir(c.out, ("report",), verb="bench", inputs={"--suite": c.suite, "--systems": [s.value for s in specs]})
    device = str(resolve_device(c.device))
    k_max, batch_size, max_queries, max_corpus, seed = c.k_max, c.batch_size, c.max_queries, c.max_corpus, c.seed
    built = build_systems(specs, c, device)
    # Vectors a hybrid system shares with a plain towers/minilm system are encoded once (kept only when needed).
    wanted = {s.dense_key for s in built if getattr(s, "hybrid", False)}
    full = load_beir(c.suite)
    suite = full.subsample(max_queries, max_corpus, seed) if (max_queries or max_corpus) else full
    docs, queries, relevant = suite.doc_texts(), suite.query_texts, suite.relevant_rows()
    run = _Run(c, docs, queries, relevant, show_progress)
    rng = np.random.default_rng(seed)
    random_rows = rng.integers(0, len(docs), size=(len(queries), c.n_random))
    rows: dict[str, dict[str, Any]] = {}
    similarity: dict[str, dict[str, np.ndarray]] = {}
    for system in tqdm(built, desc="systems", unit="system", disable=not show_progress):
        configs = system.config()
        if not system.dense:
            t0 = time.perf_counter()
            system.retriever.index(docs, show_progress=show_progress)
            t_index = time.perf_counter() - t0
            t0 = time.perf_counter()
            _, I = system.retriever.search(queries, k_max, show_progress=show_progress)
            t_search = time.perf_counter() - t0
            rows[system.label] = {**_score(I, relevant, k_max), "config": configs[system.label],
                                  "timings": {"index_s": t_index, "search_s": t_search,
                                              "docs_per_s": len(docs) / max(t_index, 1e-9)}}
            continue
        if getattr(system, "hybrid", False):
            rows.update(_run_hybrid(system, run))
            continue
        t0 = time.perf_counter()
        xb_rows = system.encode_docs(docs, batch_size, show_progress)
        t_docs = time.perf_counter() - t0
        cache_docs = dict(getattr(getattr(system, "encoder", None), "last_stats", {}))
        t0 = time.perf_counter()
        xq_rows = system.encode_queries(queries, batch_size, show_progress)
        t_queries = time.perf_counter() - t0
        key = getattr(system, "dense_key", None)
        if key is not None and key in wanted:
            run.encoded[key] = (xb_rows[system.label], xq_rows[system.label], t_docs, t_queries)
        for row in system.rows:
            xb, xq = xb_rows.pop(row), xq_rows.pop(row)
            t0 = time.perf_counter()
            index = build_faiss(xb, "Flat")
            t_index = time.perf_counter() - t0
            t0 = time.perf_counter()
            _, I = search(index, xq, min(k_max, len(docs)))
            t_search = time.perf_counter() - t0
            if I.shape[1] < k_max:  # tiny corpora: pad like faiss does
                I = np.pad(I, ((0, 0), (0, k_max - I.shape[1])), constant_values=-1)
            similarity[row] = similarity_samples(xq, xb, relevant, random_rows)
            timings = {"encode_docs_s": t_docs, "encode_queries_s": t_queries, "index_s": t_index,
                       "search_s": t_search, "docs_per_s": len(docs) / max(t_docs, 1e-9),
                       "queries_per_s": len(queries) / max(t_queries, 1e-9)}
            if len(system.rows) > 1:
                timings["encode_shared_by"] = system.rows  # one forward pass served every pooling
            if cache_docs:
                timings["docs_from_cache"] = cache_docs.get("cached", 0)
            rows[row] = {**_score(I, relevant, k_max), "config": configs[row], "timings": timings,
                         "dim": int(xb.shape[1]), "similarity": similarity_summary(similarity[row])}
            del index, xb, xq
            gc.collect()
    results = {
        "suite": {**suite.summary(), "path": str(suite.path), "full_checksum": full.checksum,
                  "max_queries": max_queries, "max_corpus": max_corpus, "seed": seed},
        "systems": rows,
        "bench": {"k_max": k_max, "batch_size": batch_size, "llm_batch_size": c.llm_batch_size,
                  "query_max_length": c.query_max_length, "doc_max_length": c.doc_max_length, "prompt": c.prompt, "llm_precision": c.llm_precision,
                  "n_random": c.n_random, "seed": seed, "systems": [dataclasses.asdict(s) for s in specs],
                  "search": "faiss IndexFlatIP (exact inner product on L2-normalised vectors)"},
        "environment": environment(device),
        **({"extra": extra} if extra else {}),
    }
    write_report(results, c.out, similarity)
    return results
