"""BEIR folder loader/writer: round trip, every validation error, deterministic subsample."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from twotower.eval.suites.beir import load_beir, write_beir

CORPUS = [
    {"_id": "d1", "title": "Alpha", "text": "first doc"},
    {"_id": "d2", "title": "", "text": "second doc", "metadata": {"k": 1}},
    {"_id": "d3", "text": "third doc (no title field)"},
    {"_id": "d4", "title": "Delta", "text": "fourth doc"},
]
QUERIES = [{"_id": "q1", "text": "find first"}, {"_id": "q2", "text": "find 2 and 4"},
           {"_id": "q3", "text": "dev only"}]
QRELS = {"q1": {"d1": 1}, "q2": {"d2": 2, "d4": 1, "d3": 0}}


@pytest.fixture
def suite_dir(tmp_path: Path) -> Path:
    return write_beir(tmp_path / "mini", CORPUS, QUERIES, QRELS)


def test_round_trip(suite_dir: Path) -> None:
    s = load_beir(suite_dir)
    assert s.name == "mini" and s.corpus_ids == ["d1", "d2", "d3", "d4"]
    assert s.corpus_titles == ["Alpha", "", "", "Delta"]
    assert s.query_ids == ["q1", "q2"]  # q3 is in no qrels row of this split
    assert s.qrels == QRELS
    assert s.doc_texts() == ["Alpha first doc", "second doc", "third doc (no title field)", "Delta fourth doc"]
    assert s.relevant_rows() == [{0: 1}, {1: 2, 3: 1, 2: 0}]
    assert len(s.checksum) == 64 and load_beir(suite_dir).checksum == s.checksum
    assert s.summary()["relevant_per_query"] == 1.5  # grade 0 rows are not relevant


def test_checksum_changes_with_content(suite_dir: Path) -> None:
    before = load_beir(suite_dir).checksum
    with open(suite_dir / "queries.jsonl", "a", encoding="utf-8") as fh:
        fh.write(json.dumps({"_id": "q4", "text": "extra"}) + "\n")
    assert load_beir(suite_dir).checksum != before


def _write(suite_dir: Path, rel: str, text: str) -> None:
    (suite_dir / rel).write_text(text, encoding="utf-8")


@pytest.mark.parametrize(
    ("rel", "content", "message"),
    [
        ("corpus.jsonl", '{"_id": "d1", "text": "a"}\n{"_id": "d2", "text": \n',
         r"corpus.jsonl: line 2: malformed JSON"),
        ("corpus.jsonl", '{"_id": "d1", "text": "a"}\n[1, 2]\n', r"corpus.jsonl: line 2: expected a JSON object"),
        ("corpus.jsonl", '{"text": "a"}\n', r"corpus.jsonl: line 1: missing field '_id'"),
        ("corpus.jsonl", '{"_id": [7], "text": "a"}\n',
         r"corpus.jsonl: line 1: field '_id' must be a non-empty string or"),
        ("corpus.jsonl", '{"_id": "d1", "title": 3, "text": "a"}\n', r"field 'title' must be a string"),
        ("corpus.jsonl", '{"_id": "d1", "title": " ", "text": ""}\n', r"corpus.jsonl: line 1: document 'd1' has empty"),
        ("corpus.jsonl", '{"_id": "d1", "text": "a"}\n\n{"_id": "d1", "text": "b"}\n',
         r"corpus.jsonl: line 3: duplicate id 'd1' \(first at line 1\)"),
        ("corpus.jsonl", "\n", r"empty corpus"),
        ("queries.jsonl", '{"_id": "q1", "text": "  "}\n', r"queries.jsonl:1: field 'text' is empty"),
        ("queries.jsonl", '{"_id": "q1"}\n', r"queries.jsonl:1: missing field 'text'"),
        ("queries.jsonl", '{"_id": "q1", "text": "a"}\n{"_id": "q1", "text": "b"}\n',
         r"queries.jsonl:2: duplicate query id"),
        ("qrels/test.tsv", "qid\tdid\tscore\n", r"test.tsv:1: header must be"),
        ("qrels/test.tsv", "query-id\tcorpus-id\tscore\nq1\td1\n", r"test.tsv:2: expected 3 tab-separated"),
        ("qrels/test.tsv", "query-id\tcorpus-id\tscore\nq1\td1\thigh\n",
         r"test.tsv:2: field 'score' must be an integer"),
        ("qrels/test.tsv", "query-id\tcorpus-id\tscore\nq1\td1\t1\nq1\td1\t2\n", r"test.tsv:3: duplicate qrels row"),
        ("qrels/test.tsv", "query-id\tcorpus-id\tscore\nq9\td1\t1\n", r"1 query ids not in queries.jsonl, e.g. 'q9'"),
        ("qrels/test.tsv", "query-id\tcorpus-id\tscore\nq1\td9\t1\n", r"1 corpus ids not in corpus.jsonl, e.g. 'd9'"),
        ("qrels/test.tsv", "query-id\tcorpus-id\tscore\n", r"no qrels rows for split 'test'"),
    ],
)
def test_validation_errors(suite_dir: Path, rel: str, content: str, message: str) -> None:
    _write(suite_dir, rel, content)
    with pytest.raises(ValueError, match=message):
        load_beir(suite_dir)


def test_corpus_rows_follow_the_index_reader(suite_dir: Path) -> None:
    """A suite accepts exactly what `index build` accepts: `id` for `_id`, integer ids (as strings)."""
    _write(suite_dir, "corpus.jsonl", '{"_id": 1, "text": "a"}\n{"id": "d2", "title": "T", "text": "b"}\n'
                                     '{"_id": "d3", "text": "c"}\n{"_id": "d4", "text": "d"}\n')
    _write(suite_dir, "qrels/test.tsv", "query-id\tcorpus-id\tscore\nq1\t1\t1\nq2\td2\t1\n")
    s = load_beir(suite_dir)
    assert s.corpus_ids == ["1", "d2", "d3", "d4"] and s.doc_texts()[:2] == ["a", "T b"]
    assert s.relevant_rows()[0] == {0: 1}


def test_missing_file_names_layout(suite_dir: Path) -> None:
    (suite_dir / "qrels" / "test.tsv").unlink()
    with pytest.raises(FileNotFoundError, match=r"qrels/test.tsv"):
        load_beir(suite_dir)
    with pytest.raises(FileNotFoundError, match=r"dev.tsv"):
        load_beir(suite_dir, split="dev")


def test_write_is_atomic_on_error(tmp_path: Path) -> None:
    out = write_beir(tmp_path / "s", CORPUS, QUERIES, QRELS)
    bad_rows = ({"_id": "x", "text": object()} for _ in range(1))  # not JSON-serialisable
    with pytest.raises(TypeError):
        write_beir(out, bad_rows, QUERIES, QRELS)
    assert load_beir(out).corpus_ids == ["d1", "d2", "d3", "d4"]  # the old folder is untouched
    assert [p.name for p in tmp_path.iterdir()] == ["s"]  # no temp dir left behind


def test_subsample_keeps_relevant_docs_and_is_deterministic(tmp_path: Path) -> None:
    corpus = [{"_id": f"d{i}", "text": f"doc {i}"} for i in range(100)]
    queries = [{"_id": f"q{i}", "text": f"query {i}"} for i in range(30)]
    qrels = {f"q{i}": {f"d{i}": 1, f"d{i + 50}": 1} for i in range(30)}
    s = load_beir(write_beir(tmp_path / "s", corpus, queries, qrels))
    small = s.subsample(max_queries=5, max_corpus=20, seed=1)
    assert len(small.query_ids) == 5 and len(small.corpus_ids) == 20
    kept_docs = set(small.corpus_ids)
    assert all(d in kept_docs for q in small.query_ids for d in small.qrels[q])
    assert small.corpus_ids == sorted(small.corpus_ids, key=lambda d: int(d[1:]))  # file order kept
    again = s.subsample(max_queries=5, max_corpus=20, seed=1)
    assert (again.query_ids, again.corpus_ids, again.checksum) == (small.query_ids, small.corpus_ids, small.checksum)
    assert s.subsample(max_queries=5, max_corpus=20, seed=2).query_ids != small.query_ids
    assert small.checksum != s.checksum
    tight = s.subsample(max_queries=10, max_corpus=3)  # relevant docs win over the cap
    assert len(tight.corpus_ids) == 20
    # rows still line up for the metrics
    rows = small.relevant_rows()
    assert all(small.corpus_ids[r] in small.qrels[q] for q, rel in zip(small.query_ids, rows) for r in rel)
    with pytest.raises(ValueError, match="max_queries must be >= 1"):
        s.subsample(max_queries=0)
