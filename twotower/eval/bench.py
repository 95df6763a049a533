"""Benchmark systems on a BEIR suite: encode -> exact faiss index -> search -> metrics, the same path for all.

faiss ``benchs/datasets.py::evaluate`` style: each dense system's corpus vectors go into one
``IndexFlatIP`` (exact search, so only the encoders differ), queries are searched for the top ``k_max``, and
the ranked ids go through ``common.metrics``. BM25 returns ranked ids directly and joins at the metrics step.
For the similarity plot, each query's cosine with its relevant docs and with random docs is kept.
"""
from __future__ import annotations

import dataclasses
import gc
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from twotower.common.device import resolve_device
from twotower.common.metrics import metric_names, per_query, positive_mask, recall_curve
from twotower.common.outputs import check_out_dir
from twotower.eval.config import BenchConfig
from twotower.eval.report import environment, similarity_summary, write_report
from twotower.eval.significance import CI_METRICS, compare_to_reference
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


def score_run(I: np.ndarray, relevant: Sequence[dict[int, int]], k_max: int) -> dict[str, Any]:
    """One row's metrics from its ranked ids ``I`` (nq, k_max): the means of the report metrics whose cut-off
    fits ``k_max`` (``common.metrics.metric_names``: ``--k-max 5`` reports no recall@100), the recall@k curve,
    and ``per_query`` ({metric: (n_valid,) array}, queries with a relevant doc) for the confidence intervals."""
    scores = per_query(I, relevant, metric_names(k_max))
    return {"metrics": {m: float(v.mean()) for m, v in scores.items()},
            "recall_curve": recall_curve(I, relevant, k_max).tolist(), "per_query": scores}


def check_relevance(suite: Any, where: str) -> list[str]:
    """Ids of the queries whose qrels hold no relevant doc (grade > 0), warned about in one line; a suite where
    no query has one is refused (every metric would be 0 for nothing)."""
    mask = positive_mask(suite.relevant_rows())
    empty = [q for q, ok in zip(suite.query_ids, mask) if not ok]
    if len(empty) == len(mask):
        raise ValueError(f"{where}: no query has a relevant doc (every score <= 0): nothing to evaluate; "
                         f"relevant docs need a score > 0")
    if empty:
        shown = ", ".join(empty[:10]) + (f", ... ({len(empty) - 10} more)" if len(empty) > 10 else "")
        print(f"bench: warning: {where}: {len(empty)} of {len(mask)} queries have no relevant doc (score > 0) and "
              f"are left out of every metric: {shown}", file=sys.stderr)
    return empty


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
    docs, queries, k_max = run.docs, run.queries, run.config.k_max
    depth_k = candidates_per_side(k_max, system.options.depth, len(docs))
    xb, xq, t_docs, t_queries = _dense_vectors(system, run)
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
        out[row] = {**score_run(I, run.relevant, k_max), "config": configs[row], "timings": timings}
    return out


def _dense_vectors(system: Any, run: _Run) -> tuple[np.ndarray, np.ndarray, float, float]:
    """(doc vectors, query vectors, encode seconds of each) of a hybrid or rerank system's dense side: those a
    plain system of the same encoder already made, else encoded now."""
    if system.dense_key in run.encoded:
        return run.encoded[system.dense_key]
    batch_size = run.config.batch_size
    t0 = time.perf_counter()
    xb = system.encode_docs(run.docs, batch_size, run.show_progress)[system.label]
    t_docs = time.perf_counter() - t0
    t0 = time.perf_counter()
    xq = system.encode_queries(run.queries, batch_size, run.show_progress)[system.label]
    return xb, xq, t_docs, time.perf_counter() - t0


def _run_rerank(system: Any, run: _Run) -> dict[str, Any]:
    """The row of a towers+rerank system: the towers' exact top ``max(k_max, N)``, its first N reranked."""
    docs, queries, k_max, batch_size = run.docs, run.queries, run.config.k_max, run.config.batch_size
    xb, xq, t_docs, t_queries = _dense_vectors(system, run)
    t0 = time.perf_counter()
    _, I = search(build_faiss(xb, "Flat"), xq, min(max(k_max, system.n), len(docs)))
    t_dense = time.perf_counter() - t0
    I, t_rerank = system.rerank_ids(queries, docs, I, batch_size, run.show_progress)
    I = I[:, :k_max]
    if I.shape[1] < k_max:  # tiny corpora: pad like faiss does
        I = np.pad(I, ((0, 0), (0, k_max - I.shape[1])), constant_values=-1)
    timings = {"encode_docs_s": t_docs, "encode_queries_s": t_queries, "docs_per_s": len(docs) / max(t_docs, 1e-9),
               "index_s": 0.0, "search_s": t_dense + t_rerank, "dense_search_s": t_dense, "rerank_s": t_rerank,
               "rerank_ms_per_query": 1000 * t_rerank / max(len(queries), 1), "reranked_per_query": system.n}
    return {**score_run(I, run.relevant, k_max), "config": system.config()[system.label], "timings": timings}


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
    check_out_dir(c.out, ("report",), verb="bench",
                  inputs={"--suite": c.suite, "--systems": [v for s in specs for v in (s.value, s.reranker)]})
    device = str(resolve_device(c.device))
    k_max, batch_size, max_queries, max_corpus, seed = c.k_max, c.batch_size, c.max_queries, c.max_corpus, c.seed
    built = build_systems(specs, c, device)
    row_names = [r for s in built for r in s.rows]
    if c.reference and c.reference not in row_names:
        raise ValueError(f"--reference '{c.reference}' is not a row of this bench: choose {', '.join(row_names)}")
    # Vectors a hybrid system shares with a plain towers/minilm system are encoded once (kept only when needed).
    wanted = {s.dense_key for s in built if getattr(s, "hybrid", False) or getattr(s, "rerank", False)}
    full = load_beir(c.suite)
    suite = full.subsample(max_queries, max_corpus, seed) if (max_queries or max_corpus) else full
    no_relevant = check_relevance(suite, str(suite.path / "qrels" / "test.tsv"))
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
            rows[system.label] = {**score_run(I, relevant, k_max), "config": configs[system.label],
                                  "timings": {"index_s": t_index, "search_s": t_search,
                                              "docs_per_s": len(docs) / max(t_index, 1e-9)}}
            continue
        if getattr(system, "rerank", False):
            rows[system.label] = _run_rerank(system, run)
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
            rows[row] = {**score_run(I, relevant, k_max), "config": configs[row], "timings": timings,
                         "dim": int(xb.shape[1]), "similarity": similarity_summary(similarity[row])}
            del index, xb, xq
            gc.collect()
    scores = {name: row.pop("per_query") for name, row in rows.items()}  # per query, kept for the CIs
    ci_metrics = [m for m in CI_METRICS if m in metric_names(k_max)]
    skipped = set(no_relevant)
    valid_ids = [q for q in suite.query_ids if q not in skipped]
    results = {
        "suite": {**suite.summary(), "path": str(suite.path), "full_checksum": full.checksum,
                  "max_queries": max_queries, "max_corpus": max_corpus, "seed": seed,
                  "queries_without_relevant": no_relevant},
        "systems": rows,
        "significance": compare_to_reference(rows, scores, ci_metrics, c.reference or None),
        "per_query": {"query_ids": valid_ids, "metrics": ci_metrics,
                      "systems": {name: {m: v[m].tolist() for m in ci_metrics} for name, v in scores.items()}},
        "bench": {"k_max": k_max, "batch_size": batch_size, "llm_batch_size": c.llm_batch_size,
                  "query_max_length": c.query_max_length, "doc_max_length": c.doc_max_length, "prompt": c.prompt,
                  "llm_precision": c.llm_precision,
                  "n_random": c.n_random, "seed": seed, "systems": [dataclasses.asdict(s) for s in specs],
                  "search": "faiss IndexFlatIP (exact inner product on L2-normalised vectors)"},
        "environment": environment(device),
        **({"extra": extra} if extra else {}),
    }
    write_report(results, c.out, similarity)
    return results
