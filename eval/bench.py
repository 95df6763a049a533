"""Benchmark systems on a BEIR suite: encode -> exact faiss index -> search -> metrics, the same path for all.

faiss ``benchs/datasets.py::evaluate`` style: each dense system's corpus vectors go into one
``IndexFlatIP`` (exact search, so only the encoders differ), queries are searched for the top ``k_max``, and
the ranked ids go through ``eval.metrics``. BM25 returns ranked ids directly and joins at the metrics step.
For the similarity plot, each query's cosine with its relevant docs and with random docs is kept.
"""
from __future__ import annotations

import dataclasses
import gc
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from eval.metrics import evaluate, recall_curve
from eval.systems import SystemSpec, build_systems, parse_systems, resolve_device
from towers.cliargs import field


@dataclasses.dataclass
class BenchConfig:
    """Options of ``twotower bench`` (the CLI is generated from these fields)."""

    suite: str = field("", "BEIR suite dir (corpus.jsonl, queries.jsonl, qrels/test.tsv)", flag="--suite")
    systems: str = field("raw-llm=smollm2,minilm,bm25",
                         "comma list: towers[:LABEL]=DIR, raw-llm[=MODEL[:last+mean+logits]], minilm, bm25")
    out: str = field("REPORT", "report dir to write (report.md, results.json, recall_at_k.png, similarity.png)")
    k_max: int = field(100, "results retrieved per query (recall@k is reported up to this k)")
    batch_size: int = field(64, "texts per batch for the towers and MiniLM")
    llm_batch_size: int = field(16, "texts per batch for the raw LLM (bigger activations)")
    device: str = field("auto", "auto | cpu | cuda (encoders; search is exact faiss on CPU)",
                        choices=["auto", "cpu", "cuda"])
    max_queries: int | None = field(None, "evaluate on a random subset of this many queries")
    max_corpus: int | None = field(None, "keep at most this many docs (all relevant docs of kept queries stay)")
    query_max_length: int = field(64, "query tokens for minilm and raw-llm (trained towers keep their own)")
    doc_max_length: int = field(256, "doc tokens for minilm and raw-llm (raw-llm's prompt comes on top)")
    prompt: str = field("promptEOL", "raw-llm prompt: promptEOL, none, or a template with {text}")
    n_random: int = field(10, "random docs per query for the similarity plot")
    seed: int = field(0, "seed for the query/corpus subsample and the random docs")


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


def run_bench(suite_dir: str | Path, systems: str | Sequence[str] | Sequence[SystemSpec], out: str | Path,
              k_max: int = 100, batch_size: int = 64, device: str = "auto", max_queries: int | None = None,
              max_corpus: int | None = None, *, llm_batch_size: int = 16, query_max_length: int = 64,
              doc_max_length: int = 256, prompt: str | None = "promptEOL", n_random: int = 10, seed: int = 0,
              show_progress: bool = True, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Benchmark ``systems`` on the suite and write the report dir ``out``.

    Args:
        suite_dir: a BEIR folder (see ``eval.suites.beir.load_beir``).
        systems: ``--systems`` string(s) or parsed specs (see ``eval.systems``).
        out: report dir (written atomically).
        k_max: results per query; recall@k curves go up to it.
        extra: more fields recorded in results.json (e.g. the demo's profile and step timings).

    Returns:
        The results dict written to ``out/results.json``.
    """
    from eval.report import environment, similarity_summary, write_report
    from eval.suites.beir import load_beir
    from index.faiss_utils import build_faiss, search

    specs = [s for s in systems if isinstance(s, SystemSpec)] if not isinstance(systems, str) else []
    if isinstance(systems, str) or len(specs) != len(systems):
        specs = parse_systems(systems)  # type: ignore[arg-type]
    device = resolve_device(device)
    built = build_systems(specs, device, query_max_length, doc_max_length,
                          None if prompt in (None, "none") else prompt, llm_batch_size)
    full = load_beir(suite_dir)
    suite = full.subsample(max_queries, max_corpus, seed) if (max_queries or max_corpus) else full
    docs, queries, relevant = suite.doc_texts(), suite.query_texts, suite.relevant_rows()
    rng = np.random.default_rng(seed)
    random_rows = rng.integers(0, len(docs), size=(len(queries), n_random))
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
        t0 = time.perf_counter()
        xb_rows = system.encode_docs(docs, batch_size, show_progress)
        t_docs = time.perf_counter() - t0
        cache_docs = dict(getattr(getattr(system, "encoder", None), "last_stats", {}))
        t0 = time.perf_counter()
        xq_rows = system.encode_queries(queries, batch_size, show_progress)
        t_queries = time.perf_counter() - t0
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
        "bench": {"k_max": k_max, "batch_size": batch_size, "llm_batch_size": llm_batch_size,
                  "query_max_length": query_max_length, "doc_max_length": doc_max_length, "prompt": prompt,
                  "n_random": n_random, "seed": seed, "systems": [dataclasses.asdict(s) for s in specs],
                  "search": "faiss IndexFlatIP (exact inner product on L2-normalised vectors)"},
        "environment": environment(device),
        **({"extra": extra} if extra else {}),
    }
    write_report(results, out, similarity)
    return results
