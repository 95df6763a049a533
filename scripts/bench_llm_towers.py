"""What makes a decoder-LLM tower (SmolLM2-135M by default) encode and train at a usable speed on this machine.

Encoding: docs/s of one result tower at the demo's doc length, in float32, bf16 autocast and a bf16 weight
cast (``towers.inference.cast_copy``), the variants taking turns batch by batch (best of ``--repeats``).
Training: seconds per optimizer step of the real step functions (``towers.train.forward_backward`` +
``optimizer_step``) on the same batches, one variant after another within each round, so a burst of load
from a neighbour hits them alike:

    fp32            float32 (the default on CPU)
    bf16            bf16 autocast (weights and optimizer in float32)
    bf16+ckpt       bf16 + gradient checkpointing (less memory, one more forward)
    bf16+gc8        bf16 + GradCache in chunks of 8 rows (memory of 8 rows, one more forward)
    bf16+lora16     bf16, LoRA rank 16 on every linear layer (base frozen: no weight gradients, tiny AdamW)

Also the cosine between fp32 and bf16 vectors (what bf16 costs in accuracy). Quote ``uptime`` with the figures:
the machine is shared.

    python -m scripts.bench_llm_towers --base smollm2 --steps 3 --batch-size 32
"""
from __future__ import annotations

import argparse
import copy
import os
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from scripts.bench_common import codesearch_dir, emit, median, print_table, take_turns
from twotower.common.jsonl import iter_json_rows

TRAIN_VARIANTS = ("fp32", "bf16", "bf16+ckpt", "bf16+gc8", "bf16+lora16")


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default="smollm2", help="decoder LLM base: smollm2, gemma3 or a local HF dir")
    ap.add_argument("--pairs", default=None, help="pairs .jsonl (default: codesearch-py's train.jsonl)")
    ap.add_argument("--docs", type=int, default=128, help="docs encoded per variant per round")
    ap.add_argument("--encode-batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2, help="encoding rounds (best of)")
    ap.add_argument("--steps", type=int, default=3, help="timed training steps per variant (after one warm-up)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--query-max-length", type=int, default=32)
    ap.add_argument("--result-max-length", type=int, default=64)
    ap.add_argument("--variants", default=",".join(TRAIN_VARIANTS))
    ap.add_argument("--skip-encode", action="store_true")
    ap.add_argument("--json-out", default=None)
    return ap.parse_args()


def bench_encode(model: Any, rows: list[dict[str, Any]], args: argparse.Namespace) -> list[dict[str, Any]]:
    """docs/s of the result tower in fp32, bf16 autocast and a bf16 cast copy, with their cosine to fp32."""
    import numpy as np
    import torch

    from twotower.towers.inference import cast_copy

    tower = model.result_tower.eval()
    docs = [r["positive"] for r in rows[: args.docs]]
    batches = [docs[i:i + args.encode_batch] for i in range(0, len(docs), args.encode_batch)]
    cast = cast_copy(tower, torch.bfloat16)
    systems = {"fp32": lambda b: tower.encode(b, len(b)),
               "bf16-autocast": lambda b: tower.encode(b, len(b), amp_dtype=torch.bfloat16),
               "bf16-cast": lambda b: cast.encode(b, len(b))}
    best, outs = take_turns(systems, batches, args.repeats)
    ref = np.concatenate(outs["fp32"])
    enc_rows = []
    for name in systems:
        vecs = np.concatenate(outs[name])
        cos = (vecs * ref).sum(1)
        enc_rows.append({"variant": name, "docs_s": len(docs) / sum(best[name]),
                         "min_cos_vs_fp32": float(cos.min())})
    print_table(enc_rows, [("variant", "encode", "s"), ("docs_s", "docs/s", ".1f"),
                           ("min_cos_vs_fp32", "min cos vs fp32", ".6f")])
    return enc_rows  # the bf16 copy is freed with this frame, before training


def bench_train(model: Any, rows: list[dict[str, Any]], pairs_path: Path, args: argparse.Namespace
                ) -> list[dict[str, Any]]:
    """Seconds per training step (the real step functions) of each variant, in turns, after one warm-up."""
    import torch

    from twotower.towers.config import TrainConfig
    from twotower.towers.lora import apply_lora
    from twotower.towers.loss import Temperature
    from twotower.towers.train import (
        Batch,
        TowerForward,
        _enable_checkpointing,
        _param_groups,
        forward_backward,
        optimizer_step,
    )

    variants = [v for v in args.variants.split(",") if v]
    cfg = TrainConfig(pairs=str(pairs_path), out="unused", lr=1e-5)
    temp = Temperature(0.05)
    setups = {}
    for name in variants:
        m = model
        if "lora" in name:
            m = copy.deepcopy(model)
            apply_lora(m, 16, 32.0, "all-linear")
        m.train()
        params = [p for g in _param_groups(m, temp, cfg) for p in g["params"]]
        opt = torch.optim.AdamW(_param_groups(m, temp, cfg), lr=1e-5, fused=True)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        amp = torch.bfloat16 if name.startswith("bf16") else None
        setups[name] = (m, TowerForward(m, amp), opt, sched, scaler, params)

    def run_step(name: str, step: int) -> float:
        m, fwd, opt, sched, scaler, params = setups[name]
        for tower in (m.query_tower, m.result_tower):  # the variants share one model: set its checkpointing
            if "ckpt" in name:
                _enable_checkpointing(tower.encoder)
            elif hasattr(tower.encoder, "activation_checkpointing_disable"):  # transformers >= 5
                tower.encoder.activation_checkpointing_disable()
            else:
                tower.encoder.gradient_checkpointing_disable()
        lo = (step * args.batch_size) % (len(rows) - args.batch_size)
        chunk = rows[lo: lo + args.batch_size]
        batch = Batch([r["query"] for r in chunk], [r["positive"] for r in chunk], [])
        t0 = time.perf_counter()
        forward_backward(fwd, m, batch, torch.device("cpu"), temp, cache_chunk_size=8 if "gc8" in name else 0)
        optimizer_step(params, opt, sched, scaler, 1.0)
        return time.perf_counter() - t0

    times: dict[str, list[float]] = {n: [] for n in variants}
    for step in range(args.steps + 1):
        order = variants[step % len(variants):] + variants[: step % len(variants)]
        for name in order:
            dt = run_step(name, step)
            if step:  # the first round warms up allocators and kernels
                times[name].append(dt)
    base = median(times[variants[0]])
    train_rows = [{"variant": n, "s_step": median(times[n]), "pairs_s": args.batch_size / median(times[n]),
                   "speedup": base / median(times[n])} for n in variants]
    print_table(train_rows, [("variant", "train", "s"), ("s_step", "s/step", ".2f"), ("pairs_s", "pairs/s", ".2f"),
                             ("speedup", f"x vs {variants[0]}", ".2f")])
    return train_rows


def main() -> None:
    args = parse_args()
    import torch

    from twotower.towers.model import TwoTower

    pairs_path = Path(args.pairs) if args.pairs else codesearch_dir() / "train.jsonl"
    rows = list(iter_json_rows(pairs_path, 4096))
    load_start = os.getloadavg()
    torch.manual_seed(0)
    model = TwoTower.from_base(args.base, query_max_length=args.query_max_length,
                               result_max_length=args.result_max_length)
    results: dict = {"threads": torch.get_num_threads()}
    if not args.skip_encode:
        results["encode"] = bench_encode(model, rows, args)
    results["train"] = bench_train(model, rows, pairs_path, args)
    emit("llm_towers", args, results, load_start=load_start, load_end=os.getloadavg())


if __name__ == "__main__":
    main()
