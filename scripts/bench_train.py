"""Training throughput: ``towers.train.train`` vs sentence-transformers' MultipleNegativesRankingLoss training
(``SentenceTransformerTrainer``) on the same MiniLM weights, pairs, batches, batch size and max lengths.

Every system runs its real training loop in its own thread of one process, and the threads take strict
turns step by step (a baton passed at the end of each optimizer step): step i of every system runs right
after step i of the others, so a burst of load from a neighbour on a shared machine hits all of them alike.
Each system's first ``--warmup`` steps and its last step (the others' post-training saves overlap it) are
not timed. pairs/s = timed steps x batch size / their summed wall time.

Both systems see the same global batches: ``towers.sampler.NoDuplicatesBatchSampler``'s, handed to the
sentence-transformers trainer as its batch sampler. Queries are cut at ``--query-max-length`` tokens and
results at ``--result-max-length`` on both sides (sentence-transformers: the Transformer module's
``query_length`` / ``document_length`` with a ``router_mapping``; with ``--towers separate``: a ``Router``
with one Transformer per side). Same loss (scale 20 = temperature 0.05), AdamW, lr, warm-up, decay,
gradient clipping. The mean loss of the timed steps of each system is printed as a sanity check (same
batches and weights; dropout draws differ).

    python -m scripts.bench_train --steps 10 --batch-size 32 --device cpu
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("TQDM_DISABLE", "1")  # both loops' progress bars; the table says what happened
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from scripts.bench_common import add_base_arg, check_device, codesearch_dir, comma_choices, emit, print_table
from twotower.common.jsonl import iter_json_rows

SYSTEMS = ("st-fp32", "st-bf16", "twotower-fp32", "twotower-bf16")


class Baton:
    """Strict round-robin between threads: one runs a training step while the others wait.

    A system calls :meth:`step_done` at the end of each of its steps; it returns when it is that system's
    turn again. Turns start once every system has finished its first (free-running) step, so start-up
    work (model loading, dataset set-up) never overlaps a timed step.
    """

    def __init__(self, names: list[str]) -> None:
        self.order = list(names)
        self.cond = threading.Condition()
        self.turn: str | None = None
        self.arrived: set[str] = set()
        self.gone: set[str] = set()

    def _next_after(self, name: str) -> str | None:
        i = self.order.index(name)
        for j in range(1, len(self.order) + 1):
            cand = self.order[(i + j) % len(self.order)]
            if cand not in self.gone:
                return cand
        return None

    def _start_if_ready(self) -> None:
        if self.turn is None and self.arrived | self.gone >= set(self.order):
            self.turn = next((n for n in self.order if n not in self.gone), None)

    def step_done(self, name: str) -> None:
        with self.cond:
            if name in self.arrived and self.turn == name:
                self.turn = self._next_after(name)
            self.arrived.add(name)
            self._start_if_ready()
            self.cond.notify_all()
            self.cond.wait_for(lambda: self.turn == name)

    def leave(self, name: str) -> None:
        """``name`` runs no more steps (finished or failed): skip it from now on."""
        with self.cond:
            self.gone.add(name)
            if self.turn == name:
                self.turn = self._next_after(name)
            self._start_if_ready()
            self.cond.notify_all()


class StepClock:
    """Per-system step wall times under the baton: a step runs from getting the turn to its step end."""

    def __init__(self, baton: Baton, name: str, total_steps: int) -> None:
        self.baton, self.name, self.total = baton, name, total_steps
        self.steps = 0
        self.times: list[float] = []  # seconds of steps 2..total-1 (step 1 runs before the turns start)
        self.losses: dict[int, float] = {}  # step (1-based) -> its loss
        self._start: float | None = None

    def step_end(self) -> None:
        now = time.perf_counter()
        self.steps += 1
        if self._start is not None:
            self.times.append(now - self._start)
        if self.steps >= self.total:
            self.baton.leave(self.name)
            self._start = None
            return
        self.baton.step_done(self.name)
        self._start = time.perf_counter()


# ---- the systems --------------------------------------------------------------------------------------
def subset_pairs(path: Path, n: int, out: Path) -> Path:
    """The first ``n`` rows of a pairs JSONL (query, positive), written to ``out``."""
    with open(out, "w", encoding="utf-8") as dst:
        for row in iter_json_rows(path, n):
            dst.write(json.dumps({"query": row["query"], "positive": row["positive"]}) + "\n")
    return out


def global_batches(pairs: Path, batch_size: int, seed: int, steps: int) -> list[list[int]]:
    """The global batches ``towers.train`` draws for its first ``steps`` steps."""
    from twotower.towers.data import load_pairs
    from twotower.towers.sampler import NoDuplicatesBatchSampler, conflict_keys

    ds = load_pairs(pairs)
    sampler = NoDuplicatesBatchSampler(conflict_keys(list(ds["query"]), list(ds["positive"])), batch_size, seed)
    return [sampler.next_global_batch().tolist() for _ in range(steps)]


def run_twotower(clock: StepClock, pairs: Path, out: Path, args: argparse.Namespace, amp: str) -> None:
    import twotower.towers.train as tt

    config = tt.TrainConfig(pairs=str(pairs), out=str(out), base=args.base, shared=args.towers == "shared",
                            query_max_length=args.query_max_length, result_max_length=args.result_max_length,
                            batch_size=args.batch_size, max_steps=clock.total, lr=2e-5, warmup_ratio=0.1,
                            weight_decay=0.01, max_grad_norm=1.0, temperature=0.05, seed=args.seed,
                            device=args.device, amp=amp, negatives_per_query=0, eval_every=0, checkpoint_every=0,
                            log_every=10_000)
    tt.train(config)


def run_st(clock: StepClock, pairs: Path, out: Path, args: argparse.Namespace, bf16: bool,
           batches: list[list[int]]) -> None:
    import datasets
    from sentence_transformers import (
        SentenceTransformer,
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
    from transformers import TrainerCallback

    from twotower.towers.bases import resolve_base

    base = str(resolve_base(args.base))
    if args.towers == "shared":
        model = SentenceTransformer(base, device=args.device)
        model[0].query_length, model[0].document_length = args.query_max_length, args.result_max_length
    else:
        from sentence_transformers.base.modules import Router

        query, doc = SentenceTransformer(base, device="cpu"), SentenceTransformer(base, device="cpu")
        query.max_seq_length, doc.max_seq_length = args.query_max_length, args.result_max_length
        router = Router.for_query_document(query_modules=list(query), document_modules=list(doc))
        model = SentenceTransformer(modules=[router], device=args.device)
    rows = list(iter_json_rows(pairs))
    train_ds = datasets.Dataset.from_dict({"query": [r["query"] for r in rows],
                                           "positive": [r["positive"] for r in rows]})

    class FixedBatches:
        """towers.train's batches, in its order (set_epoch: the trainer calls it each epoch)."""

        def __init__(self, *_: Any, **__: Any) -> None:
            pass

        def __iter__(self):  # noqa: ANN204
            return iter(batches)

        def __len__(self) -> int:
            return len(batches)

        def set_epoch(self, epoch: int) -> None:
            pass

    class Clock(TrainerCallback):
        def on_step_end(self, targs, state, control, **kw):  # noqa: ANN001, ANN201
            clock.step_end()

        def on_log(self, targs, state, control, logs=None, **kw):  # noqa: ANN001, ANN201
            if logs and "loss" in logs:  # logging_steps=1: the loss of step global_step
                clock.losses[state.global_step] = float(logs["loss"])

    targs = SentenceTransformerTrainingArguments(
        output_dir=str(out), per_device_train_batch_size=args.batch_size, max_steps=clock.total,
        # warm-up in whole steps as towers counts it, int(0.1 x total) (a float 0.1 would round up)
        learning_rate=2e-5, warmup_steps=int(0.1 * clock.total), weight_decay=0.01, max_grad_norm=1.0,
        lr_scheduler_type="linear",
        bf16=bf16, use_cpu=args.device == "cpu", logging_steps=1, save_strategy="no", report_to="none",
        disable_tqdm=True, seed=args.seed, dataloader_drop_last=True, batch_sampler=FixedBatches,
        router_mapping={"query": "query", "positive": "document"})
    trainer = SentenceTransformerTrainer(model=model, args=targs, train_dataset=train_ds,
                                         loss=MultipleNegativesRankingLoss(model, scale=20.0), callbacks=[Clock()])
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # a printed dict per step (logging_steps=1 is for the losses)
    trainer.train()


def hook_twotower(clocks: dict[int, StepClock]) -> None:
    """Time ``towers.train``'s loop from the outside: its optimizer_step ends a step, its forward_backward
    returns the step's loss. The thread that calls them tells which system's clock it is."""
    import twotower.towers.train as tt

    step, fb = tt.optimizer_step, tt.forward_backward

    def optimizer_step(*a: Any, **kw: Any) -> None:
        step(*a, **kw)
        clocks[threading.get_ident()].step_end()

    def forward_backward(*a: Any, **kw: Any) -> Any:
        loss = fb(*a, **kw)
        clock = clocks[threading.get_ident()]
        clock.losses[clock.steps + 1] = float(loss)
        return loss

    tt.optimizer_step, tt.forward_backward = optimizer_step, forward_backward


def parse_args() -> tuple[argparse.Namespace, list[str]]:
    """The options and the systems to run (bad combinations exit with a one-line message)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pairs", default=None, help="pairs JSONL (query, positive); default: codesearch-py train.jsonl")
    ap.add_argument("--steps", type=int, default=10, help="timed optimizer steps per system")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first (the first one runs before turns)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--query-max-length", type=int, default=32)
    ap.add_argument("--result-max-length", type=int, default=128)
    ap.add_argument("--towers", default="shared", choices=["shared", "separate"],
                    help="one MiniLM for both sides (a plain SentenceTransformer) or one per side (ST: Router)")
    ap.add_argument("--systems", default="st-fp32,twotower-fp32,twotower-bf16",
                    help=f"comma-separated from {', '.join(SYSTEMS)} (st-fp32 and st-bf16 need separate runs)")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    add_base_arg(ap)
    ap.add_argument("--json-out", default=None, help="append the JSON line to this file")
    args = ap.parse_args()
    systems = comma_choices(args.systems, SYSTEMS, "system")
    if "st-fp32" in systems and "st-bf16" in systems:
        raise SystemExit("st-fp32 and st-bf16 cannot share a process (accelerate's AcceleratorState is a "
                         "process-wide singleton fixed to one mixed precision): run them in two invocations")
    if args.warmup < 1 or args.steps < 1:
        raise SystemExit("--warmup and --steps must be >= 1")
    return args, systems


def run_systems(systems: list[str], pairs: Path, batches: list[list[int]], total: int, tmp: Path,
                args: argparse.Namespace) -> dict[str, StepClock]:
    """Train every system in its own thread, one step each in turn (the baton); their step clocks."""
    baton = Baton(systems)
    clocks = {s: StepClock(baton, s, total) for s in systems}
    by_thread: dict[int, StepClock] = {}
    hook_twotower(by_thread)
    errors: dict[str, str] = {}

    def runner(name: str) -> Callable[[], None]:
        def run() -> None:
            by_thread[threading.get_ident()] = clocks[name]
            try:
                if name.startswith("twotower"):
                    run_twotower(clocks[name], pairs, tmp / name, args, "bf16" if name.endswith("bf16") else "none")
                else:
                    run_st(clocks[name], pairs, tmp / name, args, name.endswith("bf16"), batches)
            except BaseException:  # noqa: BLE001 - reported below; the other systems must not wait for it
                errors[name] = traceback.format_exc()
            finally:
                baton.leave(name)
        return run

    threads = [threading.Thread(target=runner(s), name=s) for s in systems]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        for name, tb in errors.items():
            print(f"--- {name} failed:\n{tb}")
        raise SystemExit(1)
    return clocks



def summarize(clocks: dict[str, StepClock], systems: list[str], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Per system: pairs/s, seconds per step and mean loss over the timed steps, and the ratios to ST."""
    rows = []
    for s in systems:
        # times[0] is step 2; timed: steps warmup + 1 .. warmup + steps
        timed = clocks[s].times[args.warmup - 1: args.warmup - 1 + args.steps]
        assert len(timed) == args.steps, f"{s}: {len(clocks[s].times)} timed steps, expected >= {args.steps}"
        losses = [clocks[s].losses[i] for i in range(args.warmup + 1, args.warmup + args.steps + 1)
                  if i in clocks[s].losses]
        rows.append({"system": s, "pairs_per_s": args.steps * args.batch_size / sum(timed),
                     "s_per_step": sum(timed) / args.steps, "min_step_s": min(timed),
                     "mean_loss": sum(losses) / len(losses) if losses else None})
    ref = {r["system"]: r["pairs_per_s"] for r in rows}
    for r in rows:
        prec = r["system"].rsplit("-", 1)[-1]
        r["x_st_fp32"] = r["pairs_per_s"] / ref["st-fp32"] if "st-fp32" in ref else None
        r["x_st_same_precision"] = r["pairs_per_s"] / ref[f"st-{prec}"] if f"st-{prec}" in ref else None
    return rows


def main() -> None:
    args, systems = parse_args()
    device = check_device(args.device)
    total = args.warmup + args.steps + 1  # + 1: the last step overlaps the others' end-of-training work

    import torch

    # Import in this thread what the systems' threads import lazily (transformers' lazy module is not
    # thread-safe: two threads importing from it at once can fail).
    from sentence_transformers import SentenceTransformerTrainer  # noqa: F401
    from transformers import TrainerCallback, get_linear_schedule_with_warmup  # noqa: F401

    pairs_src = Path(args.pairs) if args.pairs else codesearch_dir() / "train.jsonl"
    tmp = Path(tempfile.mkdtemp(prefix="bench-train-"))
    pairs = subset_pairs(pairs_src, 4 * total * args.batch_size, tmp / "pairs.jsonl")
    batches = global_batches(pairs, args.batch_size, args.seed, total)
    rows = summarize(run_systems(systems, pairs, batches, total, tmp, args), systems, args)
    print(f"{args.steps} timed steps of batch {args.batch_size} per system (after {args.warmup} warm-up), "
          f"query/result max length {args.query_max_length}/{args.result_max_length}, towers {args.towers}, "
          f"{device}, {torch.get_num_threads()} torch threads, steps interleaved round-robin")
    print_table(rows, [("system", "system", ""), ("pairs_per_s", "pairs/s", ".2f"), ("s_per_step", "s/step", ".2f"),
                       ("min_step_s", "min step s", ".2f"), ("x_st_fp32", "x ST fp32", ".2f"),
                       ("x_st_same_precision", "x ST same prec", ".2f"), ("mean_loss", "mean loss", ".4f")])
    emit("train", args, rows, device, args.json_out)


if __name__ == "__main__":
    main()
