"""Added latency of reranking one query's top N on the CPU (N = 20 and 100), beside the towers' own query encode.

Each item is one search request: a query and N candidate docs (the first rows of a BEIR corpus, so docs have the
suite's length; codesearch-py by default). Systems take turns item by item (``bench_common.take_turns``, best of
``--repeats``); the table gives p50/p95 ms per query and each system's ratio to the towers' query encode (the
first stage's per-query model cost). The cross-encoder's weights do not change its speed, so without
``--reranker`` an untrained one-label head on ``--base`` is timed.

    python -m scripts.bench_rerank --n 20,100 --queries 20 --reranker RERANKER --towers TOWERS
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reranker", default="", help="RERANKER dir (default: an untrained head on --base)")
    p.add_argument("--base", default="minilm", help="encoder of the untrained reranker (minilm or a local dir)")
    p.add_argument("--towers", default="", help="TOWERS dir for the reference query encode (default: MiniLM towers)")
    p.add_argument("--corpus", default="", help="BEIR corpus.jsonl giving the docs (default: codesearch-py's)")
    p.add_argument("--n", default="20,100", help="comma list of candidates reranked per query")
    p.add_argument("--queries", type=int, default=20, help="requests timed")
    p.add_argument("--repeats", type=int, default=3, help="each request's best of this many")
    p.add_argument("--max-length", type=int, default=256, help="tokens of query + doc (untrained reranker only)")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"), help="reranker autocast on the CPU")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--json-out", default="")
    args = p.parse_args(argv)

    import torch

    from scripts.bench_common import emit, load_corpus_texts, take_turns
    from twotower.towers.bases import resolve_base
    from twotower.towers.inference import tower_encoder
    from twotower.towers.model import TwoTower
    from twotower.towers.reranker import Reranker

    if args.threads:
        torch.set_num_threads(args.threads)
    ns = [int(n) for n in args.n.split(",")]
    if args.reranker:
        reranker = Reranker.load(args.reranker, "cpu", args.precision)
    else:
        reranker = Reranker.from_base(resolve_base(args.base), args.max_length, "cpu")
        reranker.amp_dtype = torch.bfloat16 if args.precision == "bf16" else None
    towers = TwoTower.load(args.towers) if args.towers else TwoTower.from_base("minilm")
    q_enc = tower_encoder(towers, "query", "cpu")
    docs = load_corpus_texts(args.corpus or None, max(ns) * 2)
    words = "how do I parse a file read the json sort a list of numbers and write it back".split()
    rng = np.random.default_rng(0)
    items = [(" ".join(rng.choice(words, 6)), [docs[j] for j in rng.permutation(len(docs))[:max(ns)]])
             for _ in range(args.queries)]
    systems = {"towers query encode": lambda it: q_enc.encode([it[0]], 1)}
    for n in ns:
        systems[f"rerank top-{n}"] = lambda it, n=n: reranker.rerank([it[0]], [it[1][:n]], batch_size=n)
    load = os.getloadavg()
    best, _ = take_turns(systems, items, args.repeats)
    ref = float(np.median(best["towers query encode"]))
    results = {}
    print(f"# {len(items)} requests, reranker max length {reranker.max_length}, {args.precision}, torch threads "
          f"{torch.get_num_threads()}, load average {' '.join(f'{v:.2f}' for v in load)}")
    print(f"{'system':24} {'p50 ms':>9} {'p95 ms':>9} {'x query encode':>15}")
    for name, times in best.items():
        p50, p95 = 1000 * float(np.median(times)), 1000 * float(np.percentile(times, 95))
        results[name] = {"p50_ms": round(p50, 2), "p95_ms": round(p95, 2), "ratio_to_query_encode":
                         round(p50 / (1000 * ref), 2)}
        print(f"{name:24} {p50:9.1f} {p95:9.1f} {p50 / (1000 * ref):15.1f}")
    emit("rerank", args, results, "cpu", args.json_out or None, load_avg=[round(v, 2) for v in load],
         max_length=reranker.max_length)
    return 0


if __name__ == "__main__":
    sys.exit(main())
