"""Choose the hybrid fusion and alpha on DEV pairs (never on the test queries): towers vs bm25 vs RRF vs
weighted fusion at alpha 0.0..1.0 (minmax and zscore), recall@10 and nDCG@10.

The dev pairs (JSONL rows with ``query`` and ``positive``, e.g. a suite's ``dev.jsonl``) become a small
retrieval task: the corpus is every distinct positive, each query's relevant doc its own positive. Each side
is ranked once (exact dense search of the towers' vectors, the bm25s index of ``index.bm25``), then every
fusion setting is applied to the same two ranked lists (``index.hybrid.fuse``). Prints a table and one JSON
line with the best setting per metric.

    python -m scripts.tune_hybrid --towers TOWERS --pairs SUITE/dev.jsonl
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--towers", required=True, help="TOWERS dir")
    ap.add_argument("--pairs", required=True, help="dev pairs JSONL (query, positive)")
    ap.add_argument("--k", type=int, default=10, help="cut-off of the reported metrics")
    ap.add_argument("--depth", type=int, default=10, help="candidates per side = k_max * depth")
    ap.add_argument("--k-max", type=int, default=100, help="results per query (as twotower bench)")
    ap.add_argument("--batch-size", type=int, default=64, help="encode batch size")
    args = ap.parse_args()

    from twotower.common.jsonl import iter_json_rows
    from twotower.common.metrics import evaluate
    from twotower.eval.bm25 import BM25Retriever
    from twotower.eval.systems import SystemSpec, TowersSystem
    from twotower.index.faiss_utils import build_faiss, search
    from twotower.index.hybrid import candidates_per_side, hybrid_rank
    from twotower.index.query import QueryOptions

    rows = list(iter_json_rows(Path(args.pairs)))
    docs: dict[str, int] = {}
    for r in rows:
        docs.setdefault(r["positive"], len(docs))
    queries = [r["query"] for r in rows]
    relevant = [{docs[r["positive"]]: 1} for r in rows]
    corpus = list(docs)
    towers = TowersSystem(SystemSpec("towers", "towers", args.towers), "cpu")
    xb = towers.encode_docs(corpus, args.batch_size, True)["towers"]
    xq = towers.encode_queries(queries, args.batch_size, True)["towers"]
    depth_k = candidates_per_side(args.k_max, args.depth, len(corpus))
    Dd, Id = search(build_faiss(xb, "Flat"), xq, depth_k)
    bm25 = BM25Retriever()
    bm25.index(corpus)
    Db, Ib = bm25.search(queries, depth_k)
    recall, ndcg = f"recall@{args.k}", f"ndcg@{args.k}"
    table: list[tuple[str, dict[str, float]]] = []

    def add(name: str, I: np.ndarray) -> None:
        m = evaluate(I[:, : args.k_max], relevant)
        table.append((name, {recall: m[recall], ndcg: m[ndcg]}))

    add("towers", Id)
    add("bm25", Ib)
    def fused(**options: Any) -> np.ndarray:  # the Retriever's and bench's hybrid rule, on the runs above
        opts = QueryOptions(k=args.k_max, mode="hybrid", depth=args.depth, **options).resolve()
        return hybrid_rank(lambda n: (Dd[:, :n], Id[:, :n]), lambda n: (Db[:, :n], Ib[:, :n]), args.k_max,
                           len(corpus), opts)[1]

    add("hybrid-rrf", fused(fusion="rrf"))
    for norm in ("minmax", "zscore"):
        for alpha in np.round(np.arange(0.0, 1.01, 0.1), 2):
            add(f"weighted {norm} alpha={alpha:.1f}", fused(fusion="weighted", alpha=float(alpha), norm=norm))
    print(f"dev pairs {args.pairs}: {len(queries)} queries, {len(corpus)} docs; load {os.getloadavg()[0]:.2f}",
          file=sys.stderr)
    for name, m in table:
        print(f"{name:<32} {recall} {m[recall]:.3f}  {ndcg} {m[ndcg]:.3f}", file=sys.stderr)
    weighted = [(n, m) for n, m in table if n.startswith("weighted")]
    best = {metric: max(weighted, key=lambda t: (t[1][metric], t[1][recall] + t[1][ndcg]))[0]
            for metric in (recall, ndcg)}
    print(json.dumps({"pairs": args.pairs, "queries": len(queries), "docs": len(corpus), "towers": args.towers,
                      "results": dict(table), "best_weighted": best}))


if __name__ == "__main__":
    main()
