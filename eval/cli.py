"""``twotower bench`` and ``twotower demo`` (options generated from ``BenchConfig`` / ``DemoConfig``)."""
from __future__ import annotations

import argparse
from typing import Any

from towers.cliargs import add_dataclass_args, dataclass_from_args


def add_bench_parser(subparsers: Any) -> argparse.ArgumentParser:
    from eval.bench import BenchConfig

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
    from eval.bench import BenchConfig
    from eval.bench import run_bench as bench
    from eval.report import format_table

    cfg = dataclass_from_args(BenchConfig, args)
    if not cfg.suite:
        raise ValueError("--suite is required: a BEIR dir, e.g. runs/demo/codesearch-py-cpu-small/codesearch-py (built by `twotower demo`)")
    results = bench(cfg.suite, cfg.systems, cfg.out, cfg.k_max, cfg.batch_size, cfg.device, cfg.max_queries,
                    cfg.max_corpus, llm_batch_size=cfg.llm_batch_size, query_max_length=cfg.query_max_length,
                    doc_max_length=cfg.doc_max_length, prompt=cfg.prompt, n_random=cfg.n_random, seed=cfg.seed)
    print(format_table(results))
    print(f"report: {cfg.out}/report.md")
    return 0


def add_demo_parser(subparsers: Any) -> argparse.ArgumentParser:
    from eval.demo import DemoConfig

    parser = subparsers.add_parser(
        "demo", help="the main job: build data, train towers, index, benchmark, report",
        description="Build a suite (codesearch-py or nq), train two towers from MiniLM on its train pairs, index "
                    "its corpus, and benchmark the towers against the raw LLM (SmolLM2: last/mean/logits "
                    "pooling), untrained MiniLM and BM25. Every step is cached: a rerun is quick. The cpu-small "
                    "profile fits in 20 minutes on 2 CPU cores.")
    add_dataclass_args(parser, DemoConfig)
    parser.set_defaults(func=run_demo)
    return parser


def run_demo(args: argparse.Namespace) -> int:
    from eval.demo import DemoConfig
    from eval.demo import run_demo as demo

    demo(dataclass_from_args(DemoConfig, args))
    return 0
