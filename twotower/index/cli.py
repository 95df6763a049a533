"""CLI verbs ``twotower index build|merge|add|remove|info`` and ``twotower mine``.

Heavy imports (torch, faiss, datasets) stay inside the run functions so ``twotower --help`` is fast.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from twotower.common.cliargs import add_dataclass_args, dataclass_from_args, finite_float
from twotower.index.config import EncodeConfig, IndexBuildConfig, MergeConfig, MineConfig, RayBuildConfig, ShardConfig


def add_index_parser(subparsers: Any) -> None:
    """Register ``index`` with its sub-verbs build, merge, add, remove, info."""
    parser = subparsers.add_parser(
        "index", help="build and maintain a FAISS index of a corpus (INDEX dir)",
        description="Encode a corpus with the result tower into a persistent FAISS index (an INDEX dir with "
                    "index.faiss, an Arrow doc store and manifest.json), and maintain it.")
    sub = parser.add_subparsers(dest="index_verb", metavar="SUBVERB", required=True)

    build = sub.add_parser("build", help="encode a corpus and build an INDEX dir",
                           description="Encode --corpus with the result tower of --towers (streamed, resumable "
                                       "chunks) and write a FAISS index + doc store to --out, atomically. With "
                                       "--shard-id I --num-shards N (or under torchrun: RANK of WORLD_SIZE) encode "
                                       "only shard I (contiguous rows) into --out/shard-I-of-N and build the index "
                                       "afterwards with `twotower index merge --shards OUT`. With --engine ray a "
                                       "pool of Ray encoder actors (Ray Data) builds all --num-shards shards, on "
                                       "this machine or a cluster, and merges them into --out.")
    build.add_argument("--towers", required=True, help="TOWERS dir (output of `twotower train`)")
    build.add_argument("--corpus", required=True,
                       help="corpus.jsonl (BEIR rows _id/title/text), .jsonl.gz, .parquet, a BEIR dir, a dir of "
                            ".jsonl/.jsonl.gz/.parquet files (read in name order), a saved dataset dir, or "
                            "hf:NAME[:CONFIG]")
    build.add_argument("--out", required=True, help="INDEX dir to write (sharded: the dir holding the shard dirs)")
    add_dataclass_args(build, IndexBuildConfig)
    add_dataclass_args(build, EncodeConfig)
    add_dataclass_args(build, ShardConfig)
    add_dataclass_args(build, RayBuildConfig)
    _add_wait(build)
    build.set_defaults(func=run_index_build)

    merge = sub.add_parser("merge", help="build one INDEX dir from the shards of a sharded build",
                           description="Check that the SHARD dirs cover one corpus exactly once with one result "
                                       "tower, train the index once on a sample across all shards, add the shards "
                                       "in corpus order (faiss id = corpus row, as a single-machine build), and "
                                       "write an INDEX dir to --out, atomically.")
    merge.add_argument("--shards", nargs="+", required=True,
                       help="SHARD dirs, or dirs holding them (the --out of `index build --num-shards N`)")
    merge.add_argument("--out", required=True, help="INDEX dir to write")
    merge.add_argument("--towers", default=None,
                       help="TOWERS dir to record in the manifest (default: the one the shards recorded); checked "
                            "against the shards' fingerprint")
    add_dataclass_args(merge, MergeConfig)
    add_dataclass_args(merge, IndexBuildConfig)
    _add_wait(merge)
    merge.set_defaults(func=run_index_merge)

    add = sub.add_parser("add", help="encode new docs and append them to an INDEX dir (atomic)",
                         description="Append the docs of --corpus to INDEX, encoded with the same towers "
                                     "(checked by fingerprint). Ids already live in the index are refused.")
    add.add_argument("index", metavar="INDEX", help="INDEX dir")
    add.add_argument("--corpus", required=True, help="new docs (same formats as `index build --corpus`)")
    add.add_argument("--towers", default=None, help="TOWERS dir (default: the one recorded in the manifest)")
    add_dataclass_args(add, EncodeConfig)
    _add_wait(add)
    add.set_defaults(func=run_index_add)

    remove = sub.add_parser("remove", help="remove docs by id (tombstones, atomic)",
                            description="Mark docs removed so search never returns them. All ids must be live, "
                                        "otherwise nothing changes.")
    remove.add_argument("index", metavar="INDEX", help="INDEX dir")
    remove.add_argument("--ids", nargs="+", default=[], help="doc ids to remove")
    remove.add_argument("--ids-file", default=None, help="file with one doc id per line")
    _add_wait(remove)
    remove.set_defaults(func=run_index_remove)

    info = sub.add_parser("info", help="show what an INDEX dir holds",
                          description="Print ntotal, factory, dim, search defaults, size on disk, RAM and disk "
                                      "bytes per doc (RAM: index.faiss, read whole; disk: everything, the "
                                      "memory-mapped docs/ and vectors.npy included), re-scoring and the towers "
                                      "fingerprint of an INDEX dir (reads only the manifest and file sizes).")
    info.add_argument("index", metavar="INDEX", help="INDEX dir")
    info.add_argument("--json", action="store_true", help="print one JSON object")
    info.set_defaults(func=run_index_info)


def _add_wait(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--wait", type=finite_float, default=0.0, metavar="SECONDS",
                        help="when another process is writing the same INDEX dir, wait up to this long for it to "
                             "finish (default: 0, refuse at once naming its pid)")


def _check_wait(args: argparse.Namespace) -> float:
    if args.wait < 0:
        raise ValueError(f"--wait must be >= 0 seconds, got {args.wait:g}")
    return args.wait


def add_mine_parser(subparsers: Any) -> None:
    """Register ``mine``: hard negatives for the next training round."""
    parser = subparsers.add_parser(
        "mine", help="mine hard negatives for pairs with trained towers",
        description="Index the pairs' positives (and --corpus) with the result tower, search each query with the "
                    "query tower, and write the pairs with a negatives column taken from ranks "
                    "[--range-min, --range-max) that excludes the positive and anything scoring within a margin "
                    "of it (false-negative guard, as sentence-transformers' mine_hard_negatives / NV-Retriever).")
    add_dataclass_args(parser, MineConfig)
    parser.set_defaults(func=run_mine)


def run_index_build(args: argparse.Namespace) -> int:
    config = dataclass_from_args(IndexBuildConfig, args)  # every option checked before anything loads
    encode = dataclass_from_args(EncodeConfig, args)
    shard = dataclass_from_args(ShardConfig, args)
    ray_cfg = dataclass_from_args(RayBuildConfig, args)
    wait = _check_wait(args)
    if ray_cfg.engine == "ray":  # before resolve_shard: --num-shards alone is how many shards the actors build
        from twotower.index.ray_build import ray_build_index

        _notice_stale_temp_dirs(args.out)
        _print_info(ray_build_index(args.towers, args.corpus, args.out, config, encode, shard, ray_cfg, wait=wait))
        return 0
    from twotower.index.build import build_index, check_build_out
    from twotower.index.corpus import check_corpus
    from twotower.index.shard import build_shard, check_shard_out, resolve_shard
    from twotower.towers.inference import result_encoder
    from twotower.towers.model import TwoTower, read_towers_meta

    shard, encode = resolve_shard(shard, encode)  # under torchrun: shard RANK of WORLD_SIZE
    if shard.sharded and config.index_options_given():
        raise ValueError(f"{', '.join(config.index_options_given())}: the index is built once from all shards, so "
                         f"pass index options to `twotower index merge`, not to a shard's build")
    meta = read_towers_meta(args.towers)  # inputs and outputs checked before the towers load
    if config.dim and meta.get("dim") and config.dim > int(meta["dim"]):
        raise ValueError(f"--dim {config.dim} is larger than the towers' dim {meta['dim']} ({args.towers})")
    check_corpus(args.corpus)
    if shard.sharded:
        check_shard_out(args.out, shard, encode, args.corpus, args.towers)
    else:
        check_build_out(args.out, args.corpus, args.towers, config, encode)
    _notice_stale_temp_dirs(args.out)
    encoder = result_encoder(TwoTower.load(args.towers), encode.device, max_length=encode.result_max_length)
    if shard.sharded:
        out = build_shard(encoder, args.corpus, args.out, shard, encode, towers_dir=args.towers,
                          overwrite=config.overwrite)
        print(f"shard {shard.shard_id} of {shard.num_shards}: {out}\nwhen all {shard.num_shards} are done: "
              f"twotower index merge --shards {args.out} --out INDEX")
    else:
        _print_info(build_index(encoder, args.corpus, args.out, config, encode, towers_dir=args.towers, wait=wait))
    return 0


def _notice_stale_temp_dirs(out: str | Path) -> None:
    """One line on stderr naming leftovers of killed writes of ``out`` (listed for the user, never deleted)."""
    from twotower.index.store import STALE_AFTER_S, stale_temp_dirs

    stale = stale_temp_dirs(out)
    if stale:
        listed = ", ".join(f"{path} ({age / 3600:.1f} h)" for path, age in stale)
        print(f"twotower index build: notice: {len(stale)} temp dir(s) of interrupted writes beside '{out}', "
              f"unchanged for over {STALE_AFTER_S / 3600:g} h; delete them if no twotower process is still "
              f"writing there: {listed}", file=sys.stderr)


def run_index_merge(args: argparse.Namespace) -> int:
    config, merge = dataclass_from_args(IndexBuildConfig, args), dataclass_from_args(MergeConfig, args)
    wait = _check_wait(args)
    from twotower.index.merge import merge_shards

    out = merge_shards(args.shards, args.out, config, merge, towers_dir=args.towers, wait=wait)
    _print_info(out)
    return 0


def run_index_add(args: argparse.Namespace) -> int:
    config = dataclass_from_args(EncodeConfig, args)
    wait = _check_wait(args)
    from twotower.index.corpus import check_corpus
    from twotower.index.mutate import add_docs
    from twotower.index.store import read_manifest, recorded_towers_dir
    from twotower.towers.inference import result_encoder
    from twotower.towers.model import TwoTower, read_towers_meta

    towers = args.towers or recorded_towers_dir(args.index, read_manifest(args.index))
    read_towers_meta(towers)  # inputs checked before the towers load
    check_corpus(args.corpus)
    def load_encoder() -> Any:  # called by add_docs once it holds the index's writer lock
        return result_encoder(TwoTower.load(towers), config.device, max_length=config.result_max_length)

    n = add_docs(args.index, load_encoder, args.corpus, config, wait=wait)
    print(f"added {n} docs to {args.index}")
    _print_info(args.index)
    return 0


def run_index_remove(args: argparse.Namespace) -> int:
    wait = _check_wait(args)
    from twotower.common.jsonl import read_text_lines
    from twotower.index.mutate import remove_docs

    ids = list(args.ids)
    if args.ids_file:
        ids += [line.strip() for _, line in read_text_lines(args.ids_file, "--ids-file") if line.strip()]
    if not ids:
        raise ValueError("nothing to remove: pass --ids ID [ID ...] or --ids-file FILE")
    n = remove_docs(args.index, ids, wait=wait)
    print(f"removed {n} docs from {args.index}")
    return 0


def run_index_info(args: argparse.Namespace) -> int:
    _print_info(args.index, as_json=args.json)
    return 0


def _print_info(index_dir: str | Path, as_json: bool = False) -> None:
    from twotower.common.jsonl import dumps_strict
    from twotower.index.factory import format_bytes
    from twotower.index.store import index_info

    info = index_info(index_dir)
    if as_json:
        print(dumps_strict(info, sort_keys=True))
        return
    info["size_bytes"] = f"{format_bytes(info['size_bytes'])} ({info['size_bytes']} bytes)"
    info["index_bytes"] = format_bytes(info["index_bytes"])
    width = max(map(len, info))
    for key, value in info.items():
        print(f"{key:<{width}}  {value}")


def run_mine(args: argparse.Namespace) -> int:
    from twotower.index.mine import mine

    out, stats = mine(dataclass_from_args(MineConfig, args))
    print(stats.summary())
    print(f"wrote {out}")
    return 0
