"""Files from real tools and odd Unicode: a UTF-8 BOM and CRLF line ends (Excel, Notepad) are read as the text
they hold, in every file twotower reads (pairs JSONL/CSV, corpora, .gz, BEIR suites, ids and queries files);
a query or doc of only invisible characters is refused like an empty one; doc ids that could not travel
through an ids file or a qrels TSV (tabs, newlines) are refused at index time."""
from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import pytest

from tests.conftest import build_tiny_index
from twotower import cli as twotower_cli

BOM = "\ufeff".encode()


def windows(text: str) -> bytes:
    """``text`` as a Windows tool saves it: BOM first, CRLF line ends."""
    return BOM + text.replace("\n", "\r\n").encode()


def both(tmp: Path, name: str, text: str) -> tuple[Path, Path]:
    clean, saved = tmp / "clean" / name, tmp / "saved" / name
    for p, data in ((clean, text.encode()), (saved, windows(text))):
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
    return clean, saved


PAIRS = [{"query": "sort a list", "positive": "use sorted(xs)"}, {"query": "open, read", "positive": "a\nb"}]


@pytest.mark.parametrize("name", ["pairs.jsonl", "pairs.csv"])
def test_pairs_saved_by_windows_tools_read_as_their_text(name, tmp_path):
    from twotower.towers.data import load_pairs

    if name.endswith(".jsonl"):
        text = "".join(json.dumps(r) + "\n" for r in PAIRS)
    else:  # a quoted field with a comma, one with a line break inside (kept as the CSV holds it)
        text = 'query,positive\n"sort a list",use sorted(xs)\n"open, read","a\nb"\n'
    clean, saved = both(tmp_path, name, text)
    a, b = load_pairs(clean).to_list(), load_pairs(saved).to_list()
    assert a == b and a[0]["query"] == "sort a list" and a[1]["query"] == "open, read"


@pytest.mark.parametrize("name", ["corpus.jsonl", "corpus.jsonl.gz"])
def test_corpus_saved_by_windows_tools_reads_the_same_docs(name, tmp_path):
    from twotower.index.corpus import count_rows, iter_docs

    rows = [{"_id": "d1", "title": "T", "text": "first"}, {"_id": "d2", "text": "second line"}]
    clean, saved = both(tmp_path, name, "".join(json.dumps(r) + "\n" for r in rows))
    assert list(iter_docs(saved)) == list(iter_docs(clean)) and count_rows(saved) == 2


def test_beir_suite_saved_by_windows_tools_loads_the_same(tmp_path):
    from twotower.eval.suites.beir import load_beir

    files = {"corpus.jsonl": '{"_id": "d1", "text": "sort a list"}\n{"_id": "d2", "text": "open a file"}\n',
             "queries.jsonl": '{"_id": "q1", "text": "sorting"}\n',
             "qrels/test.tsv": "query-id\tcorpus-id\tscore\nq1\td1\t1\n"}
    for name, text in files.items():
        both(tmp_path, name, text)
    a, b = load_beir(tmp_path / "clean"), load_beir(tmp_path / "saved")
    assert (a.corpus_ids, a.query_texts, a.qrels) == (b.corpus_ids, b.query_texts, b.qrels)


@pytest.fixture(scope="module")
def tiny(_tiny_models, tmp_path_factory) -> tuple[Path, Path]:
    return build_tiny_index(tmp_path_factory.mktemp("text"), _tiny_models["bert"], n_docs=12)


def test_ids_and_queries_files_saved_by_windows_tools(tiny, tmp_path, capsys):
    import shutil

    towers, built = tiny
    idx = tmp_path / "idx"
    shutil.copytree(built, idx)
    _, queries = both(tmp_path, "queries.txt", "sort a list\n\nopen a json file\n")
    assert twotower_cli.main(["search", "--index", str(idx), "--device", "cpu", "--json", "--queries-file",
                              str(queries)]) == 0
    got = [json.loads(line)["query"] for line in capsys.readouterr().out.splitlines()]
    assert got == ["sort a list", "open a json file"]
    _, ids = both(tmp_path, "ids.txt", "doc-1\ndoc-2\n")
    assert twotower_cli.main(["index", "remove", str(idx), "--ids-file", str(ids)]) == 0
    assert "removed 2 docs" in capsys.readouterr().out


@pytest.mark.parametrize("option", ["--ids-file", "--queries-file"])
def test_a_directory_given_for_a_file_is_one_line(option, tiny, tmp_path, capsys):
    _, idx = tiny
    argv = (["index", "remove", str(idx), "--ids-file", str(tmp_path)] if option == "--ids-file" else
            ["search", "--index", str(idx), "--queries-file", str(tmp_path)])
    assert twotower_cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"{option} '{tmp_path}' is a directory; expected a file" in err, err


INVISIBLE = ["\u200b", "\x00", "\ufeff", " \u2060\u200d ", "\t\r", "\u3164", "\u202e\u200e", "\xad", "\ufe0f"]
VISIBLE = ["a", "a\u200b", "café\x00", "😀", "検索", "\u0301x", "-"]


def test_what_counts_as_blank():
    from twotower.common.text import is_blank

    assert all(is_blank(t) for t in INVISIBLE + [""]), [t for t in INVISIBLE if not is_blank(t)]
    assert not any(is_blank(t) for t in VISIBLE), [t for t in VISIBLE if is_blank(t)]


@pytest.mark.parametrize("query", INVISIBLE)
def test_invisible_query_is_refused_like_an_empty_one(query, tiny, capsys):
    from fastapi.testclient import TestClient

    from twotower.retrieval.config import ServeConfig
    from twotower.retrieval.retriever import Retriever
    from twotower.retrieval.server import create_app

    _, idx = tiny
    assert twotower_cli.main(["search", "--index", str(idx), "--device", "cpu", "ok", query]) == 2
    assert "query 1 is empty (no visible character)" in capsys.readouterr().err
    with TestClient(create_app(ServeConfig(index=str(idx), reload_interval=0), Retriever.load(idx, device="cpu"))) as c:
        r = c.post("/search", json={"queries": ["ok", query]})
    assert r.status_code == 422 and r.json()["error"] == "body.queries.1: query 1 is empty (no visible character)"


def test_invisible_text_is_refused_in_every_file(tiny, tmp_path, capsys):
    from twotower.eval.suites.beir import load_beir
    from twotower.index.corpus import iter_docs
    from twotower.towers.data import load_pairs

    pairs = tmp_path / "p.jsonl"
    pairs.write_text(json.dumps({"query": "ok", "positive": "fine"}) + "\n" + json.dumps(
        {"query": "\u200b\u200b", "positive": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"p\.jsonl: line 2: column 'query' is empty \(no visible character\)"):
        load_pairs(pairs)
    with pytest.raises(ValueError, match=r"row 1: document 'b' has empty 'title' and 'text' \(no visible character\)"):
        list(iter_docs([{"_id": "a", "text": "fine"}, {"_id": "b", "title": "\ufeff", "text": "\x00"}]))
    queries = tmp_path / "q.txt"
    queries.write_text("fine\n\u200b\n")
    _, idx = tiny
    assert twotower_cli.main(["search", "--index", str(idx), "--queries-file", str(queries)]) == 2
    assert re.search(r"q\.txt: line 2: the query has no visible character", capsys.readouterr().err)
    suite = tmp_path / "suite"
    (suite / "qrels").mkdir(parents=True)
    (suite / "corpus.jsonl").write_text('{"_id": "d1", "text": "sort"}\n')
    (suite / "queries.jsonl").write_text('{"_id": "q1", "text": "\\u2060"}\n')
    (suite / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\n")
    with pytest.raises(ValueError, match=r"queries\.jsonl:1: field 'text' is empty \(no visible character\)"):
        load_beir(suite)


@pytest.mark.parametrize("doc_id, problem", [
    ("a\tb", "holds the control character '\\\\t'"), ("a\nb", "holds the control character '\\\\n'"),
    ("a\rb", "control character"), ("a\x00b", "control character"), ("a\u2028b", "control character"),
    (" a", "starts or ends with whitespace"), ("a ", "starts or ends with whitespace"),
    ("\u200b", "is empty or only invisible characters"),
])
def test_doc_ids_that_cannot_travel_through_line_files_are_refused(doc_id, problem, tiny, tmp_path, capsys):
    towers, _ = tiny
    corpus = tmp_path / "c.jsonl"
    corpus.write_text(json.dumps({"_id": "fine id ü", "text": "x"}) + "\n" + json.dumps({"_id": doc_id, "text": "y"})
                      + "\n")
    assert twotower_cli.main(["index", "build", "--towers", str(towers), "--corpus", str(corpus), "--out",
                              str(tmp_path / "out"), "--device", "cpu", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.search(rf"c\.jsonl: line 2: field '_id' .* {problem}", err), err
    assert not (tmp_path / "out").exists()
