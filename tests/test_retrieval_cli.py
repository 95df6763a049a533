"""`twotower search`: readable listing, --json lines, batch queries from a file or stdin, clean errors."""
from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest

from tests.conftest import QUERIES, build_tiny_index, make_corpus
from twotower import cli as twotower_cli


@pytest.fixture(scope="module")
def built(_tiny_models, tmp_path_factory) -> tuple[Path, Path]:
    return build_tiny_index(tmp_path_factory.mktemp("cli"), _tiny_models["bert"])


@pytest.fixture(scope="module")
def expected(built):
    from twotower.retrieval.retriever import Retriever

    return Retriever.load(built[1], device="cpu").search(QUERIES, k=3)


def test_readable_listing(built, expected, capsys) -> None:
    _, index_dir = built
    assert twotower_cli.main(["search", "--index", str(index_dir), QUERIES[0], "-k", "3", "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"query: {QUERIES[0]}"
    by_id = {d["_id"]: d for d in make_corpus()}
    rows = [re.match(r"^\s+(\d+)\s+(-?\d+\.\d{4})\s+(\S+)\s+(.*)$", line) for line in lines[1:]]
    assert all(rows) and len(rows) == 3
    assert [m.group(3) for m in rows] == [h.id for h in expected[0]]
    assert [int(m.group(1)) for m in rows] == [1, 2, 3]
    for m, hit in zip(rows, expected[0]):
        assert float(m.group(2)) == pytest.approx(hit.score, abs=1e-4)
        assert m.group(4) == by_id[hit.id]["text"].splitlines()[0]  # the first line of text only
    # Columns are aligned: the text starts at the same offset on every row.
    assert len({line.index(m.group(4)) for line, m in zip(lines[1:], rows)}) == 1


def test_json_lines_for_several_queries(built, expected, capsys) -> None:
    _, index_dir = built
    argv = ["search", "--index", str(index_dir), *QUERIES, "-k", "3", "--json", "--device", "cpu"]
    assert twotower_cli.main(argv) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["query"] for r in records] == QUERIES
    assert [[h["id"] for h in r["hits"]] for r in records] == [[h.id for h in row] for row in expected]
    top, ref = records[1]["hits"][0], expected[1][0].to_dict()
    assert top["score"] == pytest.approx(ref["score"], abs=1e-5) and {**top, "score": 0} == {**ref, "score": 0}


def test_queries_from_file_and_stdin(built, expected, capsys, tmp_path, monkeypatch) -> None:
    _, index_dir = built
    qfile = tmp_path / "queries.txt"
    qfile.write_text("\n".join(QUERIES[:3]) + "\n\n")  # blank lines are skipped
    base = ["search", "--index", str(index_dir), "-k", "3", "--json", "--device", "cpu"]
    assert twotower_cli.main([*base, "--queries-file", str(qfile)]) == 0
    from_file = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["query"] for r in from_file] == QUERIES[:3]
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(("\n".join(QUERIES[3:]) + "\n").encode())))
    assert twotower_cli.main([*base, "--queries-file", "-"]) == 0
    from_stdin = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    got = [[h["id"] for h in r["hits"]] for r in from_file + from_stdin]
    assert got == [[h.id for h in row] for row in expected]


@pytest.mark.parametrize("extra, message", [
    ([], "no queries"),
    (["q", "-k", "0"], "k must be between 1 and 1000 (the cap), got 0"),
    (["q", "--towers", "{missing}"], "has no twotower.json"),
    (["q", "--filter", '{"lang": "py"}'], "unknown filter field 'lang': the index has fields source (valid operators"),
    (["q", "--filter", '{"source": {"$regex": "x"}}'], "filter field 'source': unknown operator '$regex'"),
    (["q", "--filter", "{bad"], "--filter: not valid JSON"),
    (["q", "--alpha", "2"], "--alpha must be a number between 0 and 1 (the dense side's weight), got 2.0"),
    (["q", "--depth", "0"], "--depth must be an integer between 1 and 100, got 0"),
    (["q", "--mode", "bm25", "--rescore", "1001"], "--rescore must be an integer between 0 and 1000 or None, got 1001"),
])
def test_errors_are_one_clean_line(built, capsys, tmp_path, extra, message) -> None:
    _, index_dir = built
    extra = [e.replace("{missing}", str(tmp_path / "nope")) for e in extra]
    assert twotower_cli.main(["search", "--index", str(index_dir), "--device", "cpu", *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("twotower search: error:") and message in err and len(err.splitlines()) == 1


def test_mode_and_filter_options(built, capsys) -> None:
    from twotower.retrieval.retriever import Retriever

    _, index_dir = built
    argv = ["search", "--index", str(index_dir), "--device", "cpu", "--json", "-k", "4", *QUERIES[:2]]
    flt = {"source": {"$in": ["src-0", "src-2"]}}
    assert twotower_cli.main([*argv, "--mode", "hybrid", "--fusion", "rrf", "--filter", json.dumps(flt)]) == 0
    got = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    want = Retriever.load(index_dir, device="cpu").search(QUERIES[:2], k=4, mode="hybrid", fusion="rrf", filter=flt)
    assert [[h["id"] for h in r["hits"]] for r in got] == [[h.id for h in row] for row in want]
    assert all(h["metadata"]["source"] in ("src-0", "src-2") for r in got for h in r["hits"])
