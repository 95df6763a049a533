"""``twotower train``: options generated from :class:`towers.config.TrainConfig`."""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

from towers.cliargs import add_dataclass_args, dataclass_from_args
from towers.config import TrainConfig

_EXAMPLE = """example:
  twotower train --pairs train.jsonl --out towers/ --dev dev.jsonl --max-steps 200
  twotower train --pairs train.jsonl --out towers/ --resume       # continue after an interruption

pairs rows: {"query": ..., "positive": ..., "negatives": [...optional hard negatives]}
"""


def add_train_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "train", help="contrastively train a query tower and a result tower on (query, positive) pairs",
        description="Train two towers with InfoNCE over in-batch (and optional hard) negatives; writes a TOWERS "
                    "dir with train_log.jsonl and resumable checkpoints.",
        epilog=_EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    required = ("pairs", "out")
    helps = {f.name: f.metadata["help"] for f in dataclasses.fields(TrainConfig)}
    for name in required:  # TrainConfig needs a default for them; the command line must give them
        parser.add_argument(f"--{name}", dest=name, required=True, help=helps[name])
    add_dataclass_args(parser, TrainConfig, skip=required)
    parser.set_defaults(func=run_train)
    return parser


def run_train(args: argparse.Namespace) -> int:
    from towers.train import LOG_NAME, train

    config = dataclass_from_args(TrainConfig, args)
    model = train(config)
    recalls = [r["dev_recall@10"] for r in _read_log(Path(config.out) / LOG_NAME) if "dev_recall@10" in r]
    summary = f"dev recall@10 {recalls[0]:.4f} -> {recalls[-1]:.4f}; " if recalls else ""
    print(f"{summary}saved TOWERS dir to {config.out} (fingerprint {model.fingerprint()})")
    return 0


def _read_log(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
