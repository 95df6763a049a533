"""The `twotower` console command: a thin dispatcher.

Each verb's parser and code live in the package that owns the job (towers/, index/, retrieval/, eval/);
this module only wires them into one ``argparse`` tree. Verb modules keep heavy imports (torch, faiss)
inside their run functions so ``twotower --help`` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from twotower.common.cliargs import run_verb

# verb -> "module:function" that registers the verb's subparser (and sets ``func``) on a subparsers object.
VERBS: dict[str, str] = {
    "data": "twotower.eval.suites.cli:add_data_parser",
    "train": "twotower.towers.cli:add_train_parser",
    "train-reranker": "twotower.towers.cli:add_train_reranker_parser",
    "index": "twotower.index.cli:add_index_parser",
    "mine": "twotower.index.cli:add_mine_parser",
    "search": "twotower.retrieval.cli:add_search_parser",
    "serve": "twotower.retrieval.cli:add_serve_parser",
    "bench": "twotower.eval.cli:add_bench_parser",
    "demo": "twotower.eval.cli:add_demo_parser",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="twotower", description="Two-tower retrieval: train, index, search, serve, benchmark."
    )
    sub = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    for verb, target in VERBS.items():
        module_name, func_name = target.split(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:  # a stage not built yet must not break the other verbs
            if exc.name != module_name:
                raise
            continue
        getattr(module, func_name)(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_verb(args.func, args, args.verb)


if __name__ == "__main__":
    sys.exit(main())
