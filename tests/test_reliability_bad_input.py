"""The table of bad inputs a user can hand twotower: each gives one clear error line that names the file, row
or field (and the valid choices), exit status 2, no traceback, and leaves no partial output behind.

Most cases go through the CLI (``twotower_cli.main``), the user's surface; a few are library calls
(``LoadedIndex.search``, ``Retriever.search_vectors``) where the library is the surface. The table doubles as
the error reference in .notes/README-reliability.md.
"""
from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import build_tiny_index
from twotower import cli as twotower_cli


@dataclass
class Ctx:
    """Where a case writes its inputs; ``towers``/``index``/``suite`` are fresh copies (made on first use) that
    it may damage; ``other_towers`` has the same dim as ``towers`` but other weights (read-only)."""

    tmp: Path
    base: Path
    built: dict[str, Path]

    def _copy(self, name: str) -> Path:
        dst = self.tmp.parent / name
        if not dst.exists():
            shutil.copytree(self.built[name], dst)
        return dst

    @property
    def towers(self) -> Path:
        return self._copy("towers")

    @property
    def index(self) -> Path:  # its manifest names the original (undamaged) towers
        return self._copy("index")

    @property
    def suite(self) -> Path:
        return self._copy("suite")

    @property
    def other_towers(self) -> Path:
        return self.built["other_towers"]

    def write(self, name: str, content: str | bytes) -> str:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return str(path)

    def jsonl(self, name: str, *rows: object) -> str:
        return self.write(name, "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))

    @property
    def out(self) -> str:
        return str(self.tmp / "out")

    def train(self, pairs: str, *extra: str) -> list[str]:
        return ["train", "--pairs", pairs, "--out", self.out, "--base", str(self.base), "--batch-size", "2",
                "--max-steps", "1", "--device", "cpu", *extra]

    def build(self, corpus: str, *extra: str, towers: Path | None = None) -> list[str]:
        return ["index", "build", "--towers", str(towers or self.towers), "--corpus", corpus, "--out", self.out,
                "--device", "cpu", "--no-progress", *extra]

    def search(self, *extra: str) -> list[str]:
        return ["search", "--index", str(self.index), "--device", "cpu", "sort a list", *extra]

    def bench(self, systems: str, suite: Path | None = None) -> list[str]:
        return ["bench", "--suite", str(suite or self.suite), "--systems", systems, "--out", self.out,
                "--device", "cpu"]

    def manifest(self, **changes: object) -> None:
        path = self.index / "manifest.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


GOOD = {"query": "sort a list", "positive": "use sorted(xs)"}
PAIR2 = {"query": "open a file", "positive": "use open(path)"}
DOC = {"_id": "p1", "title": "", "text": "first passage"}


def _towers_without(ctx: Ctx, rel: str) -> Path:
    (ctx.towers / rel).unlink()
    return ctx.towers


def _edit_towers_meta(ctx: Ctx, **changes: object) -> Path:
    path = ctx.towers / "twotower.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    return ctx.towers


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _suite_with(ctx: Ctx, rel: str, content: str) -> Path:
    (ctx.suite / rel).write_text(content)
    return ctx.suite


def _data_info(ctx: Ctx, rel: str, content: str) -> list[str]:
    return ["data", "info", str(_suite_with(ctx, rel, content))]


# (id, argv builder, regex the error line must match). Errors are "twotower VERB: error: MESSAGE".
CLI_CASES: list[tuple[str, Callable[[Ctx], list[str]], str]] = [
    # -- training pairs -----------------------------------------------------------------------------------
    ("pairs-missing-file", lambda c: c.train(str(c.tmp / "nope.jsonl")), r"pairs file '.*nope\.jsonl' does not exist"),
    ("pairs-malformed-json-line", lambda c: c.train(c.jsonl("p.jsonl", GOOD, '{"query": "a", "positive"', PAIR2)),
     r"p\.jsonl: line 2: malformed JSON"),
    ("pairs-missing-column", lambda c: c.train(c.jsonl("p.jsonl", {"query": "a", "pos": "b"})),
     r"p\.jsonl: no column 'positive' \(columns found: query, pos\)"),
    ("pairs-missing-column-later-row", lambda c: c.train(c.jsonl("p.jsonl", GOOD, {"query": "b"})),
     r"p\.jsonl: line 2: missing column 'positive'"),
    ("pairs-empty-text", lambda c: c.train(c.jsonl("p.jsonl", GOOD, {"query": "  ", "positive": "x"})),
     r"p\.jsonl: line 2: column 'query' is empty"),
    ("pairs-non-string-text", lambda c: c.train(c.jsonl("p.jsonl", {"query": "a", "positive": 42})),
     r"p\.jsonl: line 1: column 'positive' must be a string, got int 42"),
    ("pairs-null-text", lambda c: c.train(c.jsonl("p.jsonl", GOOD, {"query": None, "positive": "x"})),
     r"p\.jsonl: line 2: column 'query' must be a string, got NoneType"),
    ("pairs-zero-rows", lambda c: c.train(c.write("p.jsonl", "\n\n")), r"p\.jsonl: zero rows"),
    ("pairs-bad-negatives-type", lambda c: c.train(c.jsonl("p.jsonl", {**GOOD, "negatives": "not a list"})),
     r"p\.jsonl: line 1: column 'negatives' must be a list of non-empty strings"),
    ("pairs-not-utf8", lambda c: c.train(c.write("p.jsonl", json.dumps(GOOD).encode() + b'\n{"query": "\xff"}\n')),
     r"p\.jsonl: line 2: not UTF-8 text"),
    ("pairs-lone-surrogate", lambda c: c.train(c.write("p.jsonl", '{"query": "a\\ud800", "positive": "b"}\n')),
     r"p\.jsonl: line 1: column 'query' is not valid text: lone UTF-16 surrogate"),
    ("pairs-csv-missing-header-column", lambda c: c.train(c.write("p.csv", "question,positive\na,b\n")),
     r"p\.csv: no column 'query' \(columns found: question, positive\)"),
    ("pairs-csv-ragged-row", lambda c: c.train(c.write("p.csv", "query,positive\na,b,c\n")),
     r"p\.csv: row 1 has 3 fields but the header has 2"),
    ("pairs-unsupported-extension", lambda c: c.train(c.write("p.txt", "query\tpositive\n")),
     r"unsupported extension '\.txt': choose \.jsonl"),
    ("pairs-too-few-rows-for-a-batch", lambda c: c.train(c.jsonl("p.jsonl", GOOD), "--batch-size", "4"),
     r"1 rows make no batch of 4 pairs"),
    ("train-unknown-base", lambda c: [*c.train(c.jsonl("p.jsonl", GOOD, PAIR2)), "--base", "bert-large"],
     r"unknown base model 'bert-large': choose minilm, smollm2, gemma3 or a local Hugging Face model dir"),
    ("train-unknown-pooling", lambda c: [*c.train(c.jsonl("p.jsonl", GOOD, PAIR2)), "--pooling", "avg"],
     r"argument --pooling: invalid choice: 'avg' \(choose from '?mean'?, '?cls'?, '?last'?, '?max'?\)"),
    ("train-batch-size-1", lambda c: c.train(c.jsonl("p.jsonl", GOOD), "--batch-size", "1"),
     r"--batch-size must be >= 2"),
    # -- corpus and index build ---------------------------------------------------------------------------
    ("corpus-missing-file", lambda c: c.build(str(c.tmp / "nope.jsonl")), r"corpus '.*nope\.jsonl' does not exist"),
    ("corpus-duplicate-ids", lambda c: c.build(c.jsonl("c.jsonl", DOC, {**DOC, "text": "again"})),
     r"c\.jsonl: line 2: duplicate id 'p1' \(first at line 1\)"),
    ("corpus-missing-text", lambda c: c.build(c.jsonl("c.jsonl", DOC, {"_id": "p2", "title": "t"})),
     r"c\.jsonl: line 2: missing field 'text' \(id 'p2'\)"),
    ("corpus-non-string-text", lambda c: c.build(c.jsonl("c.jsonl", {"_id": "p1", "text": ["a"]})),
     r"c\.jsonl: line 1: field 'text' must be a string, got list"),
    ("corpus-malformed-json", lambda c: c.build(c.jsonl("c.jsonl", DOC, "{oops")), r"c\.jsonl: line 2: malformed JSON"),
    ("corpus-zero-rows", lambda c: c.build(c.write("c.jsonl", "")), r"corpus '.*c\.jsonl' has no rows"),
    ("factory-faiss-rejects", lambda c: c.build(c.jsonl("c.jsonl", DOC), "--factory", "IVF8,Nope"),
     r"faiss rejected factory string 'IVF8,Nope' for dim 32"),
    ("memory-budget-too-small", lambda c: c.build(c.jsonl("c.jsonl", DOC), "--memory-budget", "10"),
     r"memory budget 10 B is too small for 1 vectors of dim 32"),
    ("memory-budget-unparsable", lambda c: c.build(c.jsonl("c.jsonl", DOC), "--memory-budget", "lots"),
     r"bad memory size 'lots'"),
    ("towers-missing-weights", lambda c: c.build(c.jsonl("c.jsonl", DOC),
                                                 towers=_towers_without(c, "result_tower/model.safetensors")),
     r"tower dir '.*result_tower' has no \.safetensors weights"),
    ("towers-missing-twotower-json", lambda c: c.build(c.jsonl("c.jsonl", DOC),
                                                       towers=_towers_without(c, "twotower.json")),
     r"towers dir '.*towers' has no twotower\.json"),
    ("towers-weights-do-not-match-fingerprint", lambda c: c.build(
        c.jsonl("c.jsonl", DOC), towers=_edit_towers_meta(c, fingerprint="0123456789abcdef")),
     r"result tower weights do not match the fingerprint in twotower\.json \(\w+ != 0123456789abcdef\)"),
    ("towers-newer-format", lambda c: c.build(c.jsonl("c.jsonl", DOC), towers=_edit_towers_meta(c, format_version=99)),
     r"twotower\.json: format_version 99 is newer than this twotower supports"),
    # -- a damaged INDEX dir, searched ------------------------------------------------------------------------
    ("index-truncated-faiss-file", lambda c: (_truncate(c.index / "index.faiss"), c.search())[1],
     r"cannot read faiss index '.*index\.faiss' \(truncated or corrupt"),
    ("index-manifest-newer-format", lambda c: (c.manifest(format_version=2), c.search())[1],
     r"manifest\.json: format_version 2 is newer than this twotower supports \(1\); upgrade twotower"),
    ("index-manifest-malformed", lambda c: ((c.index / "manifest.json").write_text("{"), c.search())[1],
     r"manifest\.json: malformed JSON at line 1"),
    ("index-manifest-ntotal-disagrees", lambda c: (c.manifest(ntotal=59), c.search())[1],
     r"index\.faiss: 60 vectors but manifest\.json says 59"),
    ("index-doc-store-missing", lambda c: (shutil.rmtree(c.index / "docs"), c.search())[1],
     r"index dir '.*' has no docs/ doc store"),
    ("index-not-an-index-dir", lambda c: ["search", "--index", str(c.tmp), "q"], r"is not an index dir: no manifest"),
    ("towers-index-fingerprint-mismatch", lambda c: c.search("--towers", str(c.other_towers)),
     r"towers fingerprint \w+ does not match index '.*' \(built with result tower \w+"),
    ("search-k-zero", lambda c: c.search("-k", "0"), r"k must be between 1 and 1000 \(the cap\), got 0"),
    ("search-k-negative", lambda c: c.search("-k", "-5"), r"k must be between 1 and 1000 \(the cap\), got -5"),
    ("search-k-above-cap", lambda c: c.search("-k", "1001"), r"k must be between 1 and 1000 \(the cap\), got 1001"),
    ("search-nprobe-zero", lambda c: c.search("--nprobe", "0"), r"nprobe must be a positive integer"),
    ("search-no-queries", lambda c: ["search", "--index", str(c.index)], r"no queries: give them as arguments"),
    ("serve-not-an-index", lambda c: ["serve", "--index", str(c.tmp / "nope"), "--port", "1"],
     r"is not an index dir: no manifest\.json"),
    # -- index add / remove -----------------------------------------------------------------------------------
    ("add-id-already-live", lambda c: ["index", "add", str(c.index), "--corpus",
                                       c.jsonl("c.jsonl", {"_id": "doc-3", "text": "x"}), "--no-progress"],
     r"1 id\(s\) of '.*c\.jsonl' are already in index '.*': 'doc-3'"),
    ("add-with-other-towers", lambda c: ["index", "add", str(c.index), "--corpus", c.jsonl("c.jsonl", DOC),
                                         "--towers", str(c.other_towers), "--no-progress"],
     r"encoder fingerprint \w+ differs from index '.*' \(built with \w+\)"),
    ("remove-unknown-id", lambda c: ["index", "remove", str(c.index), "--ids", "doc-1", "nope"],
     r"1 id\(s\) not in index '.*' \(unknown or already removed\): 'nope'"),
    ("remove-nothing", lambda c: ["index", "remove", str(c.index)], r"nothing to remove: pass --ids"),
    # -- bench and suites -------------------------------------------------------------------------------------
    ("bench-unknown-system", lambda c: c.bench("bm25,colbert"),
     r"unknown system 'colbert' in 'colbert': choose towers, raw-llm, minilm, bm25, hybrid, hybrid-minilm"),
    ("bench-towers-without-dir", lambda c: c.bench("towers"), r"'towers': towers needs a directory"),
    ("bench-value-on-valueless-system", lambda c: c.bench("bm25=fast"), r"'bm25=fast': bm25 takes no value"),
    ("bench-duplicate-label", lambda c: c.bench("bm25,bm25"), r"duplicate system label\(s\) bm25"),
    ("bench-towers-dir-missing", lambda c: c.bench(f"towers={c.tmp / 'nope'}"),
     r"towers dir '.*nope' has no twotower\.json"),
    ("bench-qrels-unknown-corpus-id", lambda c: c.bench("bm25", _suite_with(
        c, "qrels/test.tsv", "query-id\tcorpus-id\tscore\nq1\td1\t1\nq1\td404\t1\n")),
     r"qrels/test\.tsv: 1 corpus ids not in corpus\.jsonl, e\.g\. 'd404'"),
    ("bench-suite-file-missing", lambda c: (Path(c.suite / "queries.jsonl").unlink(), c.bench("bm25"))[1],
     r"BEIR suite file missing: .*queries\.jsonl"),
    ("suite-duplicate-corpus-ids", lambda c: _data_info(c, "corpus.jsonl",
                                                        '{"_id": "d1", "text": "a"}\n{"_id": "d1", "text": "b"}\n'),
     r"corpus\.jsonl: line 2: duplicate id 'd1' \(first at line 1\)"),
    ("suite-qrels-unknown-query", lambda c: _data_info(c, "qrels/test.tsv", "query-id\tcorpus-id\tscore\nq9\td1\t1\n"),
     r"qrels/test\.tsv: 1 query ids not in queries\.jsonl, e\.g\. 'q9'"),
    ("suite-qrels-missing-header", lambda c: _data_info(c, "qrels/test.tsv", "q1\td1\t1\n"),
     r"qrels/test\.tsv:1: header must be query-id<TAB>corpus-id<TAB>score"),
    ("suite-qrels-non-integer-score", lambda c: _data_info(c, "qrels/test.tsv",
                                                           "query-id\tcorpus-id\tscore\nq1\td1\thigh\n"),
     r"qrels/test\.tsv:2: field 'score' must be an integer, got 'high'"),
    ("suite-query-missing-text", lambda c: _data_info(c, "queries.jsonl", '{"_id": "q1"}\n'),
     r"queries\.jsonl:1: missing field 'text'"),
    ("mine-bad-pairs", lambda c: ["mine", "--towers", str(c.towers), "--pairs", c.jsonl("p.jsonl", {"query": 1}),
                                  "--out", str(c.tmp / "out.jsonl"), "--no-progress"],
     r"p\.jsonl: no column 'positive'"),
]


# Corpus text that is not UTF-8, holds a lone surrogate or nests too deep: named by file:line like any bad row.
CORPUS_TEXT_CASES: list[tuple[str, Callable[[Ctx], list[str]], str]] = [
    ("corpus-not-utf8", lambda c: c.build(c.write("c.jsonl", json.dumps(DOC).encode() + b'\n{"_id": "\xff"}\n')),
     r"c\.jsonl: line 2: .*UTF-8"),
    ("corpus-lone-surrogate", lambda c: c.build(c.jsonl("c.jsonl", DOC, '{"_id": "p2", "text": "a\\ud800"}')),
     r"c\.jsonl: line 2: .*surrogate"),
    ("corpus-nested-too-deep", lambda c: c.build(c.jsonl("c.jsonl", DOC, "[" * 100_000)),
     r"c\.jsonl: line 2: .*(nested|deep)"),
]


@pytest.fixture(scope="module")
def built(_tiny_models, tmp_path_factory) -> dict[str, Path]:
    from twotower.eval.suites.beir import write_beir
    from twotower.towers.model import TwoTower

    root = tmp_path_factory.mktemp("bad-input")
    towers, index = build_tiny_index(root, _tiny_models["bert"])
    other = root / "other-towers"
    TwoTower.from_base(str(_tiny_models["bert"]), proj_dim=32).save(other)  # same dim, another vector space
    suite = write_beir(root / "suite", [{"_id": "d1", "title": "", "text": "sort a list"},
                                        {"_id": "d2", "title": "Files", "text": "open a file"}],
                       [{"_id": "q1", "text": "sorting"}], {"q1": {"d1": 1}})
    return {"towers": towers, "index": index, "other_towers": other, "suite": suite}


@pytest.fixture
def ctx(built, _tiny_models, tmp_path) -> Ctx:
    work = tmp_path / "case"
    work.mkdir()
    return Ctx(work, _tiny_models["bert"], built)


def _run(argv: list[str]) -> int:
    try:
        return twotower_cli.main(argv)
    except SystemExit as exc:  # argparse rejects a value before any code runs (invalid choice)
        return int(exc.code or 0)


@pytest.mark.parametrize("make, message", [pytest.param(m, msg, id=i) for i, m, msg in CLI_CASES + CORPUS_TEXT_CASES])
def test_bad_input_is_one_clear_error_and_leaves_nothing(ctx: Ctx, make, message, capsys) -> None:
    argv = make(ctx)
    before = set(ctx.tmp.rglob("*"))
    rc = _run(argv)
    err = capsys.readouterr().err
    assert rc == 2, f"exit status {rc}; stderr:\n{err}"
    assert "Traceback" not in err, err
    line = err.strip().splitlines()[-1]
    assert re.match(rf"twotower {argv[0]}: error: ", line), line
    assert re.search(message, line), f"{message!r} not in {line!r}"
    # No partial output: no --out, and nothing new beside it (an index build's resumable work dir excepted,
    # it holds only finished chunks and is what a rerun resumes from).
    assert not (ctx.tmp / "out").exists() and not (ctx.tmp / "out.jsonl").exists()
    new = {p for p in set(ctx.tmp.rglob("*")) - before if ".out.work" not in p.parts}
    assert not new, sorted(map(str, new))


def test_the_table_has_at_least_20_distinct_cases() -> None:
    ids = [c[0] for c in CLI_CASES]
    assert len(ids) == len(set(ids)) >= 20


# ---- library surface: vectors of the wrong dim, k out of range -----------------------------------------------
@pytest.mark.parametrize("call, message", [
    (lambda idx, r: idx.search(np.zeros((2, 7), np.float32), 5), r"xq has dim 7 but the index has dim 32"),
    (lambda idx, r: idx.search(np.zeros(32, np.float32), 5), r"xq must be a 2-D array \(n, d\), got shape \(32,\)"),
    (lambda idx, r: idx.search(np.zeros((1, 32), np.float32), 0), r"k must be >= 1, got 0"),
    (lambda idx, r: r.search_vectors(np.zeros((2, 7), np.float32), 5), r"xq must have shape \(nq, 32\), got \(2, 7\)"),
    (lambda idx, r: r.search("q", k=0), r"k must be between 1 and 1000 \(the cap\), got 0"),
    (lambda idx, r: r.search("q", k=10**6), r"k must be between 1 and 1000 \(the cap\), got 1000000"),
    (lambda idx, r: r.search(["ok", 7], k=3), r"query 1 must be a str, got int"),
], ids=["index-wrong-dim", "index-1d-vector", "index-k-zero", "retriever-wrong-dim", "retriever-k-zero",
        "retriever-k-above-cap", "retriever-non-string-query"])
def test_library_calls_name_the_bad_value(built, call, message) -> None:
    from twotower.index.load import load_index
    from twotower.retrieval.retriever import Retriever
    from twotower.towers.model import Tower

    index = load_index(built["index"], "cpu")
    retriever = Retriever(index, Tower.load(built["towers"] / "query_tower"))
    with pytest.raises(ValueError, match=message):
        call(index, retriever)


# ---- index.corpus on its own: every source, every text field, the row count -----------------------------------
GOOD_LINE = json.dumps(DOC).encode() + b"\n"


@pytest.mark.parametrize("name, data, message", [
    ("c.jsonl.gz", GOOD_LINE + b'{"_id": "p2", "text": "caf\xe9"}\n', r"c\.jsonl\.gz: line 2: not UTF-8 text"),
    ("c.jsonl", GOOD_LINE + b'{"_id": "p2", "title": "\\udfff", "text": "a"}\n',
     r"c\.jsonl: line 2: field 'title' is not valid text: lone UTF-16 surrogate '\\udfff' at character 0"),
    ("c.jsonl", GOOD_LINE + b'{"_id": "p\\ud800", "text": "a"}\n', r"c\.jsonl: line 2: field '_id' is not valid text"),
    ("c.jsonl", GOOD_LINE + b'{"_id": "p2", "text": "a", "lang": ["\\ud800"]}\n',
     r"c\.jsonl: line 2: an extra \(metadata\) field is not valid text"),
    ("c.jsonl", GOOD_LINE + b"\n" + b"[" * 200_000 + b"\n", r"c\.jsonl: line 3: JSON nested too deeply"),
], ids=["gz-not-utf8", "title-surrogate", "id-surrogate", "metadata-surrogate", "nested-after-blank-line"])
def test_corpus_file_errors_name_file_and_line(tmp_path, name, data, message) -> None:
    import gzip

    from twotower.index.corpus import iter_docs

    path = tmp_path / name
    path.write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
    with pytest.raises(ValueError, match=message):
        list(iter_docs(path))


def test_corpus_row_count_names_the_line_that_is_not_utf8(tmp_path) -> None:
    from twotower.index.corpus import count_rows

    path = tmp_path / "c.jsonl"
    path.write_bytes(GOOD_LINE * 3 + b'{"_id": "\xff"}\n')
    with pytest.raises(ValueError, match=r"c\.jsonl: line 4: not UTF-8 text"):
        count_rows(path)


def test_in_memory_rows_with_a_lone_surrogate_name_the_row() -> None:
    from twotower.index.corpus import iter_docs

    with pytest.raises(ValueError, match=r"row 1: field 'text' is not valid text: lone UTF-16 surrogate .* \(id 'b'\)"):
        list(iter_docs([{"_id": "a", "text": "ok"}, {"_id": "b", "text": "x\ud83d"}]))
