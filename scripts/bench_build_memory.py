"""Peak RSS of ``twotower index build`` as the corpus grows past ``--memory-budget``: streaming keeps it bounded.

Builds a tiny real TOWERS dir in the script (a random 1-layer BERT, hidden 64, on MiniLM's tokenizer, with
a linear projection to ``--dim`` so the vectors are as large as MiniLM's), writes synthetic
short-text corpora of ``--n`` x 1, 2, 4 docs, and runs the real CLI, ``twotower index build``, on each as a
subprocess whose resident set size (with its children) is sampled every 50 ms (psutil). The float vectors
of every corpus exceed the memory budget, so ``--factory auto`` picks a compressed IVF index that fits it.

What should stay flat: the encoder's chunk (``--chunk-size`` docs of vectors + texts), the IVF training
sample (``--train-size`` vectors; fixed here, see below) and the fixed cost of the process (torch, faiss,
datasets). What grows by design: the index itself (within the budget) and the doc-id hash set of the
duplicate check (~70 bytes a doc). A first run on a tiny corpus measures the fixed cost.

Note: ``--train-size 0`` (auto) samples max(64 x nlist, 50k) vectors into memory whatever the budget;
that is why this script fixes it.

    python -m scripts.bench_build_memory --n 40000 --memory-budget 32MB --device cpu
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from scripts.bench_common import ROOT, RssSampler, emit, print_table

MB = 2**20


def make_towers(out: Path, dim: int) -> Path:
    """A tiny random TOWERS dir (shared tower; 1 layer, hidden 64, projection to ``dim``), saved like a trained one."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from twotower.towers.bases import resolve_base
    from twotower.towers.model import Tower, TwoTower

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(resolve_base("minilm"))
    encoder = BertModel(BertConfig(vocab_size=tok.vocab_size, hidden_size=64, num_hidden_layers=1,
                                   num_attention_heads=2, intermediate_size=128, max_position_embeddings=512))
    tower = Tower(encoder, tok, pooling="mean", max_length=32, proj_dim=dim)
    model = TwoTower(tower, None, base="tiny-bert", train_config={"result_max_length": 32})
    model.save(out)
    return out


def write_corpus(path: Path, n: int, seed: int = 0) -> int:
    """``n`` BEIR rows of 6-14 random words from a fixed vocabulary; returns the file size in bytes."""
    rng = np.random.default_rng(seed)
    vocab = np.array([f"w{i:04d}" for i in range(5000)])
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(n):
            words = vocab[rng.integers(0, len(vocab), rng.integers(6, 15))]
            fh.write(json.dumps({"_id": f"doc{i}", "title": "", "text": " ".join(words)}) + "\n")
    return path.stat().st_size


def build(towers: Path, corpus: Path, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Run ``twotower index build`` and sample its RSS; returns peak RSS, wall time and the manifest."""
    cmd = [sys.executable, "-c", "import sys, twotower.cli; sys.exit(twotower.cli.main())", "index", "build",
           "--towers", str(towers), "--corpus", str(corpus), "--out", str(out), "--memory-budget", args.memory_budget,
           "--chunk-size", str(args.chunk_size), "--batch-size", str(args.batch_size), "--train-size",
           str(args.train_size), "--device", args.device, "--no-progress"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    with RssSampler(proc.pid, interval=0.05) as rss:
        output, _ = proc.communicate()
    if proc.returncode:
        raise SystemExit(f"twotower index build failed ({proc.returncode}):\n{output}")
    manifest = json.loads((out / "manifest.json").read_text())
    return {"peak_rss_bytes": rss.peak_bytes, "samples": rss.samples, "seconds": time.perf_counter() - t0,
            "factory": manifest["factory"], "index_bytes": manifest["index_bytes"], "ntotal": manifest["ntotal"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=40_000, help="docs of the 1x corpus (2x and 4x follow)")
    ap.add_argument("--scales", default="1,2,4", help="corpus sizes as multiples of --n")
    ap.add_argument("--dim", type=int, default=384, help="vector dimension (the towers' projection)")
    ap.add_argument("--memory-budget", default="32MB", help="passed to `index build` (below the float vectors)")
    ap.add_argument("--chunk-size", type=int, default=8192, help="docs per encoded chunk (`index build`)")
    ap.add_argument("--batch-size", type=int, default=256, help="encoder batch (`index build`)")
    ap.add_argument("--train-size", type=int, default=40_000, help="IVF/PQ training sample (`index build`)")
    ap.add_argument("--baseline-n", type=int, default=2_000, help="docs of the fixed-cost run")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--json-out", default=None, help="append the JSON line to this file")
    args = ap.parse_args()

    from twotower.index.factory import format_bytes, parse_memory

    budget = parse_memory(args.memory_budget)
    tmp = Path(tempfile.mkdtemp(prefix="bench-build-memory-"))
    towers = make_towers(tmp / "towers", args.dim)
    sizes = [args.baseline_n] + [args.n * int(s) for s in args.scales.split(",")]
    rows = []
    for n in sizes:
        corpus = tmp / f"corpus-{n}.jsonl"
        corpus_bytes = write_corpus(corpus, n)
        r = build(towers, corpus, tmp / f"index-{n}", args)
        vectors = 4 * n * args.dim
        rows.append({"docs": n, "corpus_mb": corpus_bytes / MB, "float_vectors_mb": vectors / MB,
                     "over_budget": vectors > budget, "factory": r["factory"], "index_mb": r["index_bytes"] / MB,
                     "peak_rss_mb": r["peak_rss_bytes"] / MB, "seconds": r["seconds"], "rss_samples": r["samples"]})
        print(f"built {n} docs: peak RSS {r['peak_rss_bytes'] / MB:.0f} MiB ({r['factory']}, {r['seconds']:.0f} s)",
              flush=True)
    base = rows[0]["peak_rss_mb"]
    for r in rows:
        r["rss_over_fixed_mb"] = r["peak_rss_mb"] - base
    print(f"\n`twotower index build` with --memory-budget {args.memory_budget} ({format_bytes(budget)}), chunk "
          f"{args.chunk_size} docs, train sample {args.train_size} vectors, dim {args.dim}, {args.device}; "
          f"first row = fixed cost")
    print_table(rows, [("docs", "docs", "d"), ("float_vectors_mb", "float vectors MiB", ".1f"),
                       ("over_budget", "> budget", ""),
                       ("factory", "factory (auto)", ""), ("index_mb", "index MiB", ".1f"),
                       ("peak_rss_mb", "peak RSS MiB", ".0f"), ("rss_over_fixed_mb", "over fixed MiB", ".0f"),
                       ("seconds", "build s", ".0f")])
    grown = rows[-1]
    first = rows[1]
    print(f"\n{first['docs']} -> {grown['docs']} docs: float vectors "
          f"{grown['float_vectors_mb'] - first['float_vectors_mb']:+.0f} MiB, peak RSS "
          f"{grown['peak_rss_mb'] - first['peak_rss_mb']:+.0f} MiB "
          f"(index {grown['index_mb'] - first['index_mb']:+.1f} MiB)")
    emit("build_memory", args, rows, args.device, args.json_out, memory_budget_bytes=budget)


if __name__ == "__main__":
    main()
