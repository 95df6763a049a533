"""``twotower bench`` and ``twotower demo`` (options generated from ``BenchConfig`` / ``DemoConfig``).

Heavy imports (torch, faiss, transformers) stay inside the run functions so ``twotower --help`` is fast.
"""
from __future__ import annotations

import argparse
from typing import Any

from twotower.common.cliargs import add_dataclass_args, dataclass_from_args
from twotower.eval.config import BenchConfig, DemoConfig


def add_bench_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "bench", help="benchmark systems on a BEIR suite and write a report",
        description="Run every system through the same encode -> exact faiss search -> metrics path on a BEIR "
                    "suite, and write REPORT/report.md (table, best bolded), results.json, recall_at_k.png and "
                    "similarity.png. Example: twotower bench --suite runs/demo/codesearch-py-cpu-small/suite "
                    "--systems towers=runs/demo/codesearch-py-cpu-small/towers,raw-llm=smollm2,minilm,bm25 "
                    "--out REPORT")
    add_dataclass_args(parser, BenchConfig)
    parser.set_defaults(func=run_bench)
    return parser


def run_bench(args: argparse.Namespace) -> int:
    cfg = dataclass_from_args(BenchConfig, args)  # options checked here, before any model loads
    # Heavy imports (torch, faiss, transformers) stay out of `twotower --help`: loaded only to run.
    from twotower.eval.bench import run_bench as bench
    from twotower.eval.report import format_table

    results = bench(cfg)
    print(format_table(results))
    print(f"report: {cfg.out}/report.md")
    return 0


def add_demo_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "demo", help="the main job: build data, train towers, index, benchmark, report",
        description="For each suite (default: codesearch-py, NL->code, and wiki, NL->NL): build it, train towers "
                    "from MiniLM and from SmolLM2 on its train pairs, index its corpus, and benchmark the towers "
                    "against the raw LLM (SmolLM2: last/mean/logits pooling), untrained MiniLM and BM25; then one "
                    "combined report that says what the results answer. Every step is cached: a rerun is quick. "
                    "The cpu-small profile is sized for 20 minutes on 2 CPU cores.")
    add_dataclass_args(parser, DemoConfig)
    parser.set_defaults(func=run_demo)
    return parser


def run_demo(args: argparse.Namespace) -> int:
    config = dataclass_from_args(DemoConfig, args)
    from twotower.eval.demo import run_demo as demo

    demo(config)
    return 0
