"""Bounded input (issue 24, class 4): one limit on the size of a line (and so of a field) for every text reader
(corpus, queries file and stdin, pairs JSONL and CSV, qrels), set by ``TWOTOWER_MAX_LINE_BYTES``; a line over it
is an error naming the file and line, and reading it costs O(limit) memory, not O(line)."""
from __future__ import annotations

import io
import json
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import pytest

from twotower import cli as twotower_cli
from twotower.common.jsonl import DEFAULT_MAX_LINE_BYTES, MAX_LINE_ENV, max_line_bytes

LIMIT = 4096
BIG = "x" * (LIMIT * 25)


def _corpus(tmp: Path, text: str) -> tuple[Path, Callable[[], object]]:
    from twotower.index.corpus import iter_docs

    path = tmp / "corpus.jsonl"
    rows = [{"_id": "a", "text": "one"}, {"_id": "b", "text": "two"}, {"_id": "c", "text": text}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, lambda: list(iter_docs(str(path)))


def _pairs_jsonl(tmp: Path, text: str) -> tuple[Path, Callable[[], object]]:
    from twotower.towers.data import load_pairs

    path = tmp / "pairs.jsonl"
    rows = [{"query": "q", "positive": "p"}, {"query": "r", "positive": "s"}, {"query": "t", "positive": text}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, lambda: load_pairs(path)


def _pairs_csv(tmp: Path, text: str) -> tuple[Path, Callable[[], object]]:
    from twotower.towers.data import load_pairs

    path = tmp / "pairs.csv"  # the long field is quoted and spans lines: the record, not the line, is bounded
    chunk = text[: LIMIT // 4]
    spread = "\n".join(chunk for _ in range(len(text) // len(chunk)))
    path.write_text(f'query,positive\nq,p\nt,"{spread}"\n')
    return path, lambda: load_pairs(path)


def _qrels(tmp: Path, text: str) -> tuple[Path, Callable[[], object]]:
    from twotower.eval.suites.beir import read_qrels

    path = tmp / "test.tsv"
    path.write_text(f"query-id\tcorpus-id\tscore\nq1\td1\t1\nq2\t{text}\t1\n")
    return path, lambda: read_qrels(path)


def _queries_file(tmp: Path, text: str) -> tuple[Path, Callable[[], object]]:
    from twotower.retrieval.cli import read_queries

    path = tmp / "queries.txt"
    path.write_text(f"first\nsecond\n{text}\n")
    return path, lambda: read_queries(str(path))


def _queries_stdin(tmp: Path, text: str) -> tuple[str, Callable[[], object]]:
    from twotower.retrieval.cli import read_queries

    return "stdin", lambda: read_queries("-", io.BytesIO(f"first\nsecond\n{text}\n".encode()))


READERS = {"corpus": _corpus, "pairs-jsonl": _pairs_jsonl, "pairs-csv": _pairs_csv, "qrels": _qrels,
           "queries-file": _queries_file, "queries-stdin": _queries_stdin}


@pytest.mark.parametrize("reader", READERS)
def test_a_line_over_the_limit_is_refused_naming_its_line(reader: str, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv(MAX_LINE_ENV, str(LIMIT))
    where, read = READERS[reader](tmp_path, BIG)
    with pytest.raises(ValueError, match=rf"{where}: line [34]: .*longer than {LIMIT} bytes.*{MAX_LINE_ENV}") as exc:
        read()
    assert "\n" not in str(exc.value)
    monkeypatch.setenv(MAX_LINE_ENV, str(LIMIT * 100))  # the same file under a higher limit reads
    read()


@pytest.mark.parametrize("reader", ["corpus", "queries-file"])
def test_a_line_exactly_at_the_limit_reads(reader: str, tmp_path: Path, monkeypatch) -> None:
    where, read = READERS[reader](tmp_path, "y")
    longest = max(len(line) for line in Path(where).read_bytes().splitlines())
    monkeypatch.setenv(MAX_LINE_ENV, str(longest))
    read()
    monkeypatch.setenv(MAX_LINE_ENV, str(longest - 1))
    with pytest.raises(ValueError, match="longer than"):
        read()


def test_memory_is_bounded_by_the_limit_not_by_the_line(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv(MAX_LINE_ENV, str(1 << 20))
    where, read = _corpus(tmp_path, "z" * (48 << 20))  # a 48 MB line
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match="line 3: line longer than"):
            read()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, f"reading a 48 MB line under a 1 MiB limit peaked at {peak / 2**20:.1f} MiB"


def test_the_limit_is_configurable_and_checked(monkeypatch) -> None:
    monkeypatch.delenv(MAX_LINE_ENV, raising=False)
    assert max_line_bytes() == DEFAULT_MAX_LINE_BYTES
    monkeypatch.setenv(MAX_LINE_ENV, "123")
    assert max_line_bytes() == 123
    for bad in ("0", "-5", "lots", "1e6"):
        monkeypatch.setenv(MAX_LINE_ENV, bad)
        with pytest.raises(ValueError, match=f"{MAX_LINE_ENV}='{bad}' is not a positive whole number"):
            max_line_bytes()


def test_the_cli_gives_one_line_and_exit_2(tmp_path: Path, monkeypatch, capsys) -> None:
    suite = tmp_path / "suite"
    (suite / "qrels").mkdir(parents=True)
    (suite / "corpus.jsonl").write_text(json.dumps({"_id": "d1", "text": BIG}) + "\n")
    (suite / "queries.jsonl").write_text(json.dumps({"_id": "q1", "text": "hi"}) + "\n")
    (suite / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\n")
    monkeypatch.setenv(MAX_LINE_ENV, str(LIMIT))
    assert twotower_cli.main(["data", "info", str(suite)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "corpus.jsonl: line 1: line longer than 4096 bytes" in err, err
