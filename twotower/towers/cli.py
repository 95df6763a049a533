"""``twotower train``: options generated from :class:`towers.config.TrainConfig`.

Also the module torchrun starts: ``torchrun --nproc_per_node N -m towers.cli --pairs ... --out ...`` runs
``twotower train`` in every process. ``twotower train --nproc N`` launches exactly that on this machine.
Heavy imports (torch, transformers, datasets) stay inside the run functions so ``twotower --help`` is fast.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from twotower.common.cliargs import add_dataclass_args, dataclass_from_args, run_verb
from twotower.towers.config import TrainConfig
from twotower.towers.reranker_config import RerankerTrainConfig

NO_GAIN_EXIT = 3  # the towers were saved but did not beat the untrained base on dev
_LAUNCHED = "TWOTOWER_TRAIN_LAUNCHED"  # set by `--nproc N` for its workers

_EXAMPLE = """example:
  twotower train --pairs train.jsonl --out towers/ --max-steps 200   # dev split, best checkpoint, verdict
  twotower train --pairs train.jsonl --out towers/ --dev dev.jsonl --hard-negatives 1 --query-max-length auto
  twotower train --pairs train.jsonl --out towers/ --resume       # continue after an interruption
  twotower train --pairs train.jsonl --out towers/ --nproc 4      # 4 processes (GPUs) on this machine
  torchrun --nnodes 2 --node_rank 0 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29500 \\
      -m towers.cli --pairs train.jsonl --out /shared/towers     # 2 nodes x 8 GPUs (run on each node)

pairs rows: {"query": ..., "positive": ..., "negatives": [...optional hard negatives]}
exit status: 0 trained (and better than the base on dev), 2 bad input, 3 saved but no gain over the base on dev
"""


def add_train_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "train", help="contrastively train a query tower and a result tower on (query, positive) pairs",
        description="Train two towers with InfoNCE over in-batch (and optional hard) negatives; writes a TOWERS "
                    "dir with train_log.jsonl and resumable checkpoints.",
        epilog=_EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_args(parser, TrainConfig)
    parser.set_defaults(func=run_train)
    return parser


_RERANKER_EXAMPLE = """example:
  twotower train-reranker --pairs train.jsonl --towers towers/ --out reranker/ --max-steps 500
  twotower search --index index/ --reranker reranker/ --rerank 20 "parse a json file"

negatives: --hard-negatives per pair mined with --towers (`twotower mine`'s rules and margins);
the RERANKER dir loads with sentence_transformers.CrossEncoder(dir)
exit status: 0 trained (and better than the towers' order on dev), 2 bad input, 3 saved but no gain on dev
"""


def add_train_reranker_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "train-reranker", help="train a cross-encoder reranker on (query, positive) pairs, negatives mined with "
                               "the towers",
        description="Train a cross-encoder (from MiniLM or a local encoder dir) on the pairs with hard negatives "
                    "mined by TOWERS; dev: the towers' top-k reranked, nDCG@10 before -> after; writes a "
                    "RERANKER dir in sentence-transformers CrossEncoder format.",
        epilog=_RERANKER_EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_args(parser, RerankerTrainConfig)
    parser.set_defaults(func=run_train_reranker)
    return parser


def run_train_reranker(args: argparse.Namespace) -> int:
    config = dataclass_from_args(RerankerTrainConfig, args)
    from twotower.towers.reranker_train import check_inputs, train_reranker

    check_inputs(config)  # before the pairs or any model load
    out, meta = train_reranker(config)
    print(f"saved RERANKER dir to {out} (fingerprint {meta['fingerprint']}, max length {meta['max_length']})")
    return verdict_exit({**meta, "no_gain_reasons": [
        f"too few pairs: {meta['pairs_trained']} pairs trained (a cross-encoder usually needs thousands)",
        f"too high a learning rate: --lr {config.lr:g}", "too few steps, or the towers' top-k already in order"]},
        config.allow_no_gain, what="reranking", base="the towers' order")


def run_train(args: argparse.Namespace) -> int:
    config = dataclass_from_args(TrainConfig, args)
    from twotower.towers.train import check_train_out, train

    check_train_out(config)  # before any process, model or data loads
    if config.nproc > 1 and "WORLD_SIZE" not in os.environ:
        return launch_torchrun(config)

    model = train(config)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    print(f"saved TOWERS dir to {config.out} (fingerprint {model.fingerprint()}; inference at "
          f"{model.inference_max_length('query')}/{model.inference_max_length('result')} query/result tokens)")
    code = verdict_exit(model.train_config, config.allow_no_gain)
    # Under `twotower train --nproc N` the launching process reads the verdict from twotower.json and sets the
    # exit status; a worker that exited 3 would make torchrun report a failure.
    return 0 if os.environ.get(_LAUNCHED) else code


def verdict_exit(meta: dict[str, Any], allow_no_gain: bool, what: str = "the towers",
                 base: str = "the untrained base") -> int:
    """Print the verdict (the last line) and the reasons of a run without gain; the exit status: 3 when the
    towers (or reranking) did not beat the base on dev and ``--allow-no-gain`` is not given, else 0."""
    if "verdict" not in meta:
        print(f"no dev evaluation (--dev none, or too few pairs to hold out): no verdict on the gain over {base}")
        return 0
    if meta.get("improved"):
        print(meta["verdict"])
        return 0
    print(f"{what} did not beat {base} on dev; possible reasons:\n  "
          + "\n  ".join(meta.get("no_gain_reasons") or []), file=sys.stderr)
    saved = "reranker.json says \"improved\": false; the reranker is saved" if what == "reranking" else \
        "twotower.json says \"improved\": false; the towers are saved"
    print(f"{meta['verdict']}: no gain ({saved}"
          f"{'' if allow_no_gain else '; --allow-no-gain exits 0'})")
    return 0 if allow_no_gain else NO_GAIN_EXIT


def torchrun_command(config: TrainConfig) -> list[str]:
    """The single-node torchrun command line that runs ``config`` in ``config.nproc`` processes."""
    # --nproc itself is not passed on (each process is one of the N), and it must not be: torchrun's parser
    # would take "--nproc" for an abbreviation of its own --nproc-per-node.
    child = dataclasses.replace(config, nproc=1)
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={config.nproc}",
            "-m", "twotower.towers.cli", *config_argv(child)]


def launch_torchrun(config: TrainConfig) -> int:
    """Run ``config`` under torchrun on this machine (``--standalone``: a free local rendezvous port); its exit
    status. Inputs are checked here first so a bad file is one clean error, not N tracebacks."""
    import torch

    from twotower.towers.checkpoint import RUN_FILES
    from twotower.towers.data import load_pairs

    slots = max(os.cpu_count() or 1, torch.cuda.device_count())
    if config.nproc > slots:
        raise ValueError(f"--nproc {config.nproc} is more processes than this machine has CPUs or GPUs ({slots}); "
                         f"use --nproc <= {slots}, or torchrun across machines (docs/scale-out.md)")
    cols = (config.query_column, config.positive_column, config.negatives_column)
    for path in (config.pairs, config.dev_file):
        if path:
            load_pairs(path, *cols)
    out = Path(config.out)
    if not (config.resume or config.overwrite) and any((out / n).exists() for n in RUN_FILES):
        raise FileExistsError(f"--out '{out}' already holds a training run; pass --resume to continue it, "
                              "--overwrite to start over, or choose another --out")
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), _LAUNCHED: "1"}  # N share the CPUs
    rc = subprocess.run(torchrun_command(config), env=env, check=False).returncode
    meta_path = out / "twotower.json"
    if rc or not meta_path.exists():
        return rc
    return verdict_exit(json.loads(meta_path.read_text()).get("train_config") or {}, config.allow_no_gain)


def config_argv(config: TrainConfig) -> list[str]:
    """Command-line flags that rebuild ``config`` (inverse of ``add_dataclass_args``; defaults left out)."""
    argv: list[str] = []
    for f in dataclasses.fields(config):
        value, flag = getattr(config, f.name), "--" + f.name.replace("_", "-")
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if value == default and f.name not in ("pairs", "out"):
            continue
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, (list, tuple)):  # nargs="+" options (--matryoshka-dims 384 128)
            argv += [flag, *map(str, value)]
        elif value is not None:
            argv += [flag, str(value)]
    return argv


def main(argv: list[str] | None = None) -> int:
    """``python -m towers.cli [train] --pairs ... --out ...``: ``twotower train`` (the module torchrun runs)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="twotower")
    add_train_parser(parser.add_subparsers(dest="verb", required=True))
    args = parser.parse_args(argv if argv[:1] == ["train"] else ["train", *argv])
    return run_verb(args.func, args, "train")


if __name__ == "__main__":
    sys.exit(main())
