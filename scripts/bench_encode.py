"""Encoder throughput: twotower's Tower.encode vs SentenceTransformer.encode, same weights, same texts.

Runs side by side in one process (shared machines are noisy: compare ratios, not absolute figures) and
prints texts/s for each, the ratio to sentence-transformers, and max |cos - 1| between the embeddings.

    python scripts/bench_encode.py --corpus SUITE/corpus.jsonl --n 10000 --device cpu
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from towers.bases import resolve_base  # noqa: E402
from towers.model import Tower  # noqa: E402


def load_texts(corpus: str | None, n: int) -> list[str]:
    """First n docs of a BEIR corpus.jsonl (title + text), or the default codesearch-py suite's corpus."""
    if corpus is None:
        from eval.suites.build import build_suite
        from towers.bases import cache_dir

        corpus = str(build_suite("codesearch-py", cache_dir() / "suites" / "codesearch-py") / "corpus.jsonl")
    texts = []
    with open(corpus, encoding="utf-8") as fh:
        for line in fh:
            row = json.loads(line)
            texts.append((row.get("title", "") + " " + row["text"]).strip())
            if len(texts) >= n:
                break
    return texts


def timed(fn, repeats: int) -> tuple[float, np.ndarray]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--corpus", default=None, help="BEIR corpus.jsonl (default: codesearch-py suite corpus)")
    ap.add_argument("--n", type=int, default=10000, help="number of texts")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--repeats", type=int, default=1, help="best of N runs per system")
    ap.add_argument("--variants", default="fp32,bf16,int8",
                    help="twotower variants to run: fp32 (default path), bf16 (autocast), fp16 (cuda), int8 (cpu)")
    ap.add_argument("--json-out", default=None, help="append the JSON line to this file")
    args = ap.parse_args()

    from sentence_transformers import SentenceTransformer

    texts = load_texts(args.corpus, args.n)
    base = resolve_base("minilm")
    st = SentenceTransformer(str(base), device=args.device)
    st.max_seq_length = args.max_length
    tower = Tower.from_base(base, pooling="mean", max_length=args.max_length).to(args.device)
    # warm-up both (first-call allocations, oneDNN kernel selection)
    st.encode(texts[:128], batch_size=args.batch_size)
    tower.encode(texts[:128], batch_size=args.batch_size)

    st_s, st_emb = timed(lambda: st.encode(texts, batch_size=args.batch_size, convert_to_numpy=True,
                                           normalize_embeddings=True), args.repeats)
    rows = [{"system": "sentence-transformers", "texts_per_s": len(texts) / st_s, "ratio": 1.0, "max_abs_cos_err": 0.0}]
    for variant in args.variants.split(","):
        opts = {"fp32": {}, "bf16": {"amp_dtype": torch.bfloat16}, "fp16": {"amp_dtype": torch.float16},
                "int8": {"quantize": "int8"}}[variant]
        model = tower
        if opts.pop("quantize", None):
            model = tower.quantized_int8()
        s, emb = timed(lambda: model.encode(texts, batch_size=args.batch_size, **opts), args.repeats)
        cos = (emb * st_emb).sum(1)
        rows.append({"system": f"twotower-{variant}", "texts_per_s": len(texts) / s, "ratio": st_s / s,
                     "max_abs_cos_err": float(np.abs(cos - 1).max())})

    print(f"{'system':<24}{'texts/s':>10}{'x ST':>8}{'max|cos-1|':>13}")
    for r in rows:
        print(f"{r['system']:<24}{r['texts_per_s']:>10.1f}{r['ratio']:>8.2f}{r['max_abs_cos_err']:>13.2e}")
    line = {"bench": "encode", "device": args.device, "n": len(texts), "batch_size": args.batch_size,
            "max_length": args.max_length, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "machine": platform.processor() or platform.machine(), "rows": rows}
    print(json.dumps(line))
    if args.json_out:
        with open(args.json_out, "a") as fh:
            fh.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    main()
