"""Encoder throughput: twotower's Tower.encode vs SentenceTransformer.encode, same weights, same texts.

Runs side by side in one process, the systems taking turns chunk by chunk (``--chunk`` texts; shared
machines are noisy: compare ratios, not absolute figures), and prints texts/s for each (the sum over chunks
of each chunk's best time over ``--repeats`` rounds), the ratio to sentence-transformers, and max
|cos - 1| between each variant's embeddings and sentence-transformers'.

    python -m scripts.bench_encode --n 10000 --repeats 2 --device cpu
"""
from __future__ import annotations

import argparse

import numpy as np
import torch

from scripts.bench_common import (
    add_base_arg,
    check_device,
    comma_choices,
    emit,
    gpu_peaks,
    load_corpus_texts,
    print_table,
    take_turns,
)
from twotower.towers.bases import resolve_base
from twotower.towers.inference import cast_copy, int8_copy
from twotower.towers.model import Tower
from twotower.towers.onnx import onnx_copy

VARIANTS = ("fp32", "bf16", "fp16", "bf16w", "fp16w", "int8", "onnx")


def encoder_flops(tower: Tower, texts: list[str], max_length: int) -> float:
    """Matmul FLOPs of one encoder pass over ``texts`` counting real tokens only (no padding): per text of
    t tokens, 2 x t x (non-embedding parameters) for the dense layers plus 4 x t^2 x hidden per layer for
    attention scores and the weighted sum."""
    config = tower.encoder.config
    dense = sum(p.numel() for n, p in tower.encoder.named_parameters() if "embeddings" not in n)
    lengths = [len(ids) for ids in tower.tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]]
    return float(sum(2 * t * dense + 4 * t * t * config.hidden_size * config.num_hidden_layers for t in lengths))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--corpus", default=None, help="BEIR corpus.jsonl (default: codesearch-py suite corpus)")
    ap.add_argument("--n", type=int, default=10000, help="number of texts")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--repeats", type=int, default=1, help="rounds; each system's best time per chunk counts")
    ap.add_argument("--chunk", type=int, default=256,
                    help="texts per turn: the systems take turns chunk by chunk, so load bursts hit all alike")
    ap.add_argument("--variants", default="fp32,bf16,int8",
                    help=f"twotower variants, comma-separated from {', '.join(VARIANTS)}: fp32 (default path), "
                         "bf16/fp16 (autocast), bf16w/fp16w (a copy with weights in that dtype: "
                         "towers.inference.cast_copy), "
                         "int8 (CPU dynamic quantisation), onnx (towers.onnx.onnx_copy: fp32 in ONNX Runtime, CPU)")
    ap.add_argument("--st-half", action="store_true",
                    help="also time sentence-transformers with fp16 weights (CUDA: what an ST user does on a GPU)")
    add_base_arg(ap)
    ap.add_argument("--json-out", default=None, help="append the JSON line to this file")
    args = ap.parse_args()
    device = check_device(args.device)
    variants = comma_choices(args.variants, VARIANTS, "variant")
    if device == "cuda" and {"int8", "onnx"} & set(variants):
        raise SystemExit("variants int8 and onnx are CPU-only; drop them with --device cuda")

    from sentence_transformers import SentenceTransformer

    texts = load_corpus_texts(args.corpus, args.n)
    base = resolve_base(args.base)
    st = SentenceTransformer(str(base), device=device)
    st.max_seq_length = args.max_length
    tower = Tower.from_base(base, pooling="mean", max_length=args.max_length).to(device)
    models = {"int8": int8_copy(tower) if "int8" in variants else None,
              "bf16w": cast_copy(tower, torch.bfloat16) if "bf16w" in variants else None,
              "fp16w": cast_copy(tower, torch.float16) if "fp16w" in variants else None,
              "onnx": onnx_copy(tower) if "onnx" in variants else None}
    amp = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}

    def st_encode(chunk: list[str]) -> np.ndarray:
        return st.encode(chunk, batch_size=args.batch_size, convert_to_numpy=True, normalize_embeddings=True)

    systems = {"sentence-transformers": st_encode}
    st_encode(texts[:64])  # warm-up: first-call allocations, oneDNN kernel choice
    if args.st_half:
        st16 = SentenceTransformer(str(base), device=device).half()
        st16.max_seq_length = args.max_length
        systems["sentence-transformers-fp16"] = lambda chunk: st16.encode(
            chunk, batch_size=args.batch_size, convert_to_numpy=True, normalize_embeddings=True)
        systems["sentence-transformers-fp16"](texts[:64])
    for v in variants:
        model = models.get(v) or tower
        model.encode(texts[:64], batch_size=args.batch_size, amp_dtype=amp.get(v))  # warm-up
        systems[f"twotower-{v}"] = (lambda chunk, m=model, a=amp.get(v): m.encode(chunk, batch_size=args.batch_size,
                                                                                amp_dtype=a))

    # Chunk by chunk, every system in turn; each still length-sorts inside its chunk.
    chunks = [texts[i: i + args.chunk] for i in range(0, len(texts), args.chunk)]
    best, outs = take_turns(systems, chunks, args.repeats, device)
    names = list(systems)
    emb = {name: np.concatenate(parts) for name, parts in outs.items()}
    st_s = sum(best["sentence-transformers"])
    rows = []
    for name in names:
        seconds = sum(best[name])
        cos = (emb[name] * emb["sentence-transformers"]).sum(1)
        rows.append({"system": name, "seconds": seconds, "texts_per_s": len(texts) / seconds,
                     "ratio": st_s / seconds, "max_abs_cos_err": float(np.abs(cos - 1).max()),
                     "chunk_ratios": [b / s for b, s in zip(best["sentence-transformers"], best[name])]})
    peaks = gpu_peaks(device)
    if peaks:  # useful FLOPs (non-pad tokens) per second as a fraction of the GPU's dense bf16 peak
        flops = encoder_flops(tower, texts, args.max_length)
        for row in rows:
            row["tflops"] = flops / row["seconds"] / 1e12
            row["pct_bf16_peak"] = 100 * row["tflops"] / peaks[0]
    print(f"{len(texts)} texts, batch {args.batch_size}, max length {args.max_length}, {device}; chunks of "
          f"{args.chunk} texts, systems in turn per chunk, best of {args.repeats} rounds per chunk, summed")
    print_table(rows, [("system", "system", ""), ("texts_per_s", "texts/s", ".1f"), ("ratio", "x ST", ".2f"),
                       ("max_abs_cos_err", "max|cos-1|", ".2e")]
                + ([("tflops", "TFLOP/s", ".1f"), ("pct_bf16_peak", "% bf16 peak", ".1f")] if peaks else []))
    emit("encode", args, rows, device, args.json_out, n=len(texts))


if __name__ == "__main__":
    main()
