"""nDCG@10 of towers at truncated dims (Matryoshka): full-dim vectors cut to each dim and re-normalised.

For each TOWERS dir the suite's corpus is encoded once by the result tower and its queries by the query tower;
each dim keeps the first ``dim`` coordinates re-normalised (``common.encoder.truncate_renorm``: what
``index build --dim`` and the retriever do), then exact Flat search and ``common.metrics`` (the
``twotower bench`` path). Prints a table (nDCG@10 and its share of the same towers' full-dim figure) and one
JSON line.

    python -m scripts.bench_matryoshka --suite SUITE_DIR --towers plain=TOWERS_A mrl=TOWERS_B --dims 384,256,128,64
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--suite", required=True, help="BEIR suite dir (corpus.jsonl, queries.jsonl, qrels/test.tsv)")
    p.add_argument("--towers", nargs="+", required=True, metavar="LABEL=DIR", help="TOWERS dirs to compare")
    p.add_argument("--dims", default="384,256,128,64", help="comma list of dims (the first should be the full dim)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--json-out", default="")
    args = p.parse_args(argv)

    from scripts.bench_common import emit
    from twotower.common.encoder import truncate_renorm
    from twotower.common.metrics import ndcg_at_k, recall_at_k
    from twotower.eval.suites.beir import load_beir
    from twotower.index.faiss_utils import build_faiss, search
    from twotower.towers.inference import query_encoder, result_encoder
    from twotower.towers.model import TwoTower

    dims = [int(d) for d in args.dims.split(",")]
    suite = load_beir(args.suite)
    docs, queries, relevant = suite.doc_texts(), suite.query_texts, suite.relevant_rows()
    print(f"# {suite.name}: {len(docs)} docs, {len(queries)} queries; load average "
          f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}", flush=True)
    results: dict[str, dict[str, dict[str, float]]] = {}
    for spec in args.towers:
        label, path = spec.split("=", 1)
        model = TwoTower.load(path)
        t0 = time.perf_counter()
        xb = result_encoder(model, "cpu").encode(docs, batch_size=args.batch_size)
        xq = query_encoder(model, "cpu").encode(queries, batch_size=args.batch_size)
        t_enc = time.perf_counter() - t0
        meta = json.loads((Path(path) / "twotower.json").read_text())
        mrl = (meta.get("train_config") or {}).get("matryoshka_dims") or []
        results[label] = {"towers": path, "matryoshka_dims": mrl, "encode_s": round(t_enc, 1), "dims": {}}
        for dim in dims:
            _, I = search(build_faiss(truncate_renorm(xb, dim), "Flat"), truncate_renorm(xq, dim), 10)
            results[label]["dims"][str(dim)] = {"ndcg@10": round(ndcg_at_k(I, relevant, 10), 4),
                                               "recall@10": round(recall_at_k(I, relevant, 10), 4)}
    full = str(dims[0])
    print(f"{'towers':<12} {'MRL dims':<16} " + " ".join(f"{'nDCG@' + str(d):>10} {'%':>6}" for d in dims))
    for label, r in results.items():
        base = r["dims"][full]["ndcg@10"]
        cells = " ".join(f"{r['dims'][str(d)]['ndcg@10']:>10.4f} {100 * r['dims'][str(d)]['ndcg@10'] / base:>5.1f}%"
                         for d in dims)
        print(f"{label:<12} {','.join(map(str, r['matryoshka_dims'])) or '-':<16} {cells}")
    emit("matryoshka", args, results, json_out=args.json_out, suite=str(args.suite), n_docs=len(docs),
         n_queries=len(queries), dims=dims, load_average_end=os.getloadavg())
    return 0


if __name__ == "__main__":
    sys.exit(main())
