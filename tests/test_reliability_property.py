"""Property tests (hypothesis): hostile files and HTTP bodies get a valid result or a clear error, never a crash.

- the pairs loader and the BEIR loader, on JSONL of arbitrary JSON (unicode with lone surrogates and NUL,
  huge strings, nulls, nesting, wrong types) and arbitrary bytes: a validated result or a ``ValueError`` that
  names the file, never another exception;
- ``POST /search`` of the FastAPI app on a tiny IVF index, with arbitrary JSON and byte bodies: 200 or 4xx,
  never 5xx, and ``/health`` still answers afterwards.

Examples are derandomized (the same inputs every run, so CI is reproducible) and bounded (max_examples)
so the file runs in seconds.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from tests.conftest import build_tiny_index

FAST = settings(max_examples=60, deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# Any code point, lone surrogates (category Cs) and NUL included; and text a tokenizer takes (no surrogates).
TEXT = st.text(st.characters(min_codepoint=0, max_codepoint=0x10FFFF, exclude_categories=()), max_size=40)
GOOD_TEXT = st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=40).filter(str.strip)
HUGE = st.sampled_from(["x" * 1_000_000, "é" * 300_000, "a\x00" * 10_000])
STRINGS = st.one_of(TEXT, st.sampled_from(["", "  ", "\x00", "ok"]), HUGE)
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), TEXT)
JSON = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                     st.dictionaries(TEXT, inner, max_size=4)), max_leaves=12)
ANY = st.one_of(STRINGS, JSON, st.lists(STRINGS, max_size=3))
DEEP = st.integers(1, 100_000).map(lambda n: "[" * n + "]" * n)  # json recurses once per level
GARBAGE_LINE = st.one_of(st.binary(max_size=30), DEEP.map(str.encode), JSON.map(lambda o: dump(o, True).encode()),
                         st.just(b""), st.just(b"  \t"))


def dump(obj: Any, ascii_only: bool = True) -> str:
    return json.dumps(obj, ensure_ascii=ascii_only)  # ASCII spells lone surrogates as "\ud800" escapes


@st.composite
def jsonl(draw: st.DrawFn, good_row: st.SearchStrategy[dict[str, Any]], bad_row: st.SearchStrategy[Any],
          max_rows: int = 6) -> bytes:
    """A JSONL file: mostly good rows; sometimes a bad row, a bad field value or a garbage line somewhere."""
    rows: list[Any] = draw(st.lists(good_row, min_size=0, max_size=max_rows))
    lines = [dump(r, draw(st.booleans())).encode("utf-8", "surrogatepass") for r in rows]
    for _ in range(draw(st.integers(0, 2))):  # 0-2 damages
        kind = draw(st.sampled_from(["row", "field", "line"]))
        at = draw(st.integers(0, len(lines)))
        if kind == "field" and rows:
            row = dict(rows[at % len(rows)])
            row[draw(st.sampled_from(sorted(row)))] = draw(ANY)
            lines[at % len(lines)] = dump(row).encode()
        elif kind == "row":
            lines.insert(at, dump(draw(bad_row)).encode())
        else:
            lines.insert(at, draw(GARBAGE_LINE))
    return b"\n".join(lines) + b"\n"


def _expect_value_error_naming(path: Path, exc: ValueError) -> None:
    assert str(path) in str(exc) or path.name in str(exc), f"error does not name the file: {exc}"


# ---- pairs -------------------------------------------------------------------------------------------------
@st.composite
def pairs_files(draw: st.DrawFn) -> bytes:
    fields = {"query": GOOD_TEXT, "positive": GOOD_TEXT}
    if draw(st.booleans()):  # the first row fixes whether the file has hard negatives
        fields["negatives"] = st.lists(GOOD_TEXT, max_size=3)
    bad = st.dictionaries(st.sampled_from(["query", "positive", "negatives", "extra"]), ANY, max_size=4)
    return draw(jsonl(st.fixed_dictionaries(fields), bad))


@FAST
@given(content=pairs_files())
def test_pairs_loader_gives_valid_pairs_or_a_value_error(content: bytes) -> None:
    from twotower.towers.data import load_pairs

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "pairs.jsonl"
        path.write_bytes(content)
        try:
            ds = load_pairs(path)
        except ValueError as exc:
            event("ValueError")
            _expect_value_error_naming(path, exc)
            return
    event("valid pairs")
    expected = [json.loads(line) for line in content.decode().splitlines() if line.strip()]
    assert len(ds) == len(expected) and {"query", "positive"} <= set(ds.column_names)
    for row, want in zip(ds, expected):
        assert row["query"] == want["query"] and row["positive"] == want["positive"]
        assert row.get("negatives", []) == want.get("negatives", [])
        row["query"].encode("utf-8")  # valid text: Arrow and the tokenizer take it


# ---- BEIR --------------------------------------------------------------------------------------------------
IDS = st.sampled_from(["d1", "d2", "d3", "q1", "q2", "", "d\x00", "d\ud800", 7, None])


@st.composite
def beir_dirs(draw: st.DrawFn) -> tuple[bytes, bytes, bytes]:
    """(corpus.jsonl, queries.jsonl, qrels/test.tsv): a valid suite, then 0-2 damages per file."""
    n_docs, n_queries = draw(st.integers(1, 4)), draw(st.integers(1, 3))
    docs = [{"_id": f"d{i}", "title": draw(GOOD_TEXT | st.just("")), "text": draw(GOOD_TEXT)} for i in range(n_docs)]
    queries = [{"_id": f"q{i}", "text": draw(GOOD_TEXT)} for i in range(n_queries)]
    corpus = draw(jsonl(st.sampled_from(docs),
                        st.fixed_dictionaries({"_id": IDS}, optional={"title": ANY, "text": ANY}),
                        max_rows=0)) if draw(st.booleans()) else b""
    corpus = b"".join(dump(d).encode() + b"\n" for d in docs) + corpus
    query_file = b"".join(dump(q).encode() + b"\n" for q in queries) + draw(
        jsonl(st.sampled_from(queries), st.fixed_dictionaries({"_id": IDS}, optional={"text": ANY}), max_rows=0))
    rels = [f"q{q}\td{draw(st.integers(0, n_docs - 1))}\t{draw(st.integers(0, 3))}" for q in range(n_queries)]
    rels += draw(st.lists(st.one_of(TEXT, st.tuples(IDS.map(str), IDS.map(str), st.sampled_from(["1", "x", "-2", ""]))
                                    .map("\t".join)), max_size=2))
    header = "query-id\tcorpus-id\tscore" if draw(st.integers(0, 9)) else draw(TEXT)
    return corpus, query_file, "\n".join([header, *rels]).encode("utf-8", "surrogatepass")


@FAST
@given(files=beir_dirs())
def test_beir_loader_gives_a_consistent_suite_or_a_value_error(files: tuple[bytes, bytes, bytes]) -> None:
    from twotower.eval.suites.beir import load_beir

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "qrels").mkdir()
        for rel, content in zip(("corpus.jsonl", "queries.jsonl", "qrels/test.tsv"), files):
            (root / rel).write_bytes(content)
        try:
            suite = load_beir(root)
        except ValueError as exc:
            event("ValueError")
            assert tmp in str(exc), f"error does not name the file: {exc}"
            return
    event("valid suite")
    assert len(set(suite.corpus_ids)) == len(suite.corpus_ids) >= 1
    assert set(suite.query_ids) == set(suite.qrels)
    assert all(set(rel) <= set(suite.corpus_ids) for rel in suite.qrels.values())
    assert len(suite.relevant_rows()) == len(suite.query_ids) and len(suite.doc_texts()) == len(suite.corpus_ids)
    "".join(suite.doc_texts() + suite.query_texts).encode("utf-8")  # no lone surrogates got through


# ---- HTTP request schema -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def client(_tiny_models, tmp_path_factory):
    from fastapi.testclient import TestClient

    from twotower.retrieval.config import ServeConfig
    from twotower.retrieval.retriever import Retriever
    from twotower.retrieval.server import create_app

    _, index_dir = build_tiny_index(tmp_path_factory.mktemp("property-http"), _tiny_models["bert"],
                                    factory="IVF4,Flat")  # IVF: nprobe reaches faiss
    app = create_app(ServeConfig(index="", max_queries=8, max_query_chars=256, max_wait_ms=0.0),
                     Retriever.load(index_dir, device="cpu"))
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c
        assert c.get("/health").status_code == 200  # still serving after every example of every test


EDGE_INTS = st.sampled_from([0, -1, 2**31 - 1, 2**31, 2**63 - 1, 2**63, 2**64, 10**30, -(2**63) - 1])  # C int limits
INTS = st.one_of(st.integers(-3, 1100), st.integers(), EDGE_INTS)
REQUEST = st.fixed_dictionaries(
    {}, optional={"queries": st.one_of(st.lists(STRINGS, max_size=10), st.lists(GOOD_TEXT, max_size=10), JSON),
                  "k": st.one_of(INTS, JSON), "nprobe": st.one_of(INTS, st.none(), JSON), "extra": JSON})
VALID = st.fixed_dictionaries({"queries": st.lists(GOOD_TEXT, min_size=1, max_size=4), "k": st.integers(1, 100)},
                              optional={"nprobe": st.integers(1, 8)})
ONE_BAD_FIELD = st.tuples(VALID, st.sampled_from(["queries", "k", "nprobe", "extra"]),
                          st.one_of(INTS, INTS, JSON, STRINGS, st.lists(STRINGS, max_size=3))
                          ).map(lambda t: {**t[0], t[1]: t[2]})
EDGE_FIELD = st.tuples(VALID, st.sampled_from(["k", "nprobe"]), EDGE_INTS).map(lambda t: {**t[0], t[1]: t[2]})
BODIES = st.one_of(
    VALID.map(dump).map(str.encode), ONE_BAD_FIELD.map(dump).map(str.encode), EDGE_FIELD.map(dump).map(str.encode),
    REQUEST.map(dump).map(str.encode), JSON.map(dump).map(str.encode),
    st.binary(max_size=200), DEEP.map(str.encode),
    st.lists(TEXT.filter(lambda t: t.strip()), min_size=1, max_size=3).map(
        lambda qs: json.dumps({"queries": qs, "k": 3}).encode()))


@settings(FAST, max_examples=150)
@given(body=BODIES)
@example(body=b'{"queries": ["a"], "nprobe": 18446744073709551616}')  # > size_t: overflowed inside faiss (was 500)
@example(body=b'{"queries": ["a"], "k": 18446744073709551616}')
@example(body=b"[" * 200_000)  # deeper than json's recursion limit
@example(body=b'{"queries": ["\\ud800"]}')  # a lone surrogate, which the tokenizer cannot take
@example(body=b'{"queries": ["\xff"]}')  # not UTF-8
def test_search_answers_200_or_4xx_never_5xx(client, body: bytes) -> None:
    resp = client.post("/search", content=body, headers={"content-type": "application/json"})
    event(f"HTTP {resp.status_code}")
    assert resp.status_code < 500, (resp.status_code, resp.text[:500])
    assert resp.status_code in (200, 400, 413, 422), (resp.status_code, resp.text[:500])
    if resp.status_code == 200:
        sent = json.loads(body)
        results = resp.json()["results"]
        assert len(results) == len(sent["queries"]) and all(len(r) <= sent.get("k", 10) for r in results)
    else:
        assert "detail" in resp.json()


def test_health_answers_after_hostile_requests(client) -> None:
    for body in (b"[" * 500_000, b"\xff" * 1000, b'{"queries": ["a"], "nprobe": 100000000000000000000000}'):
        assert client.post("/search", content=body, headers={"content-type": "application/json"}).status_code < 500
    health = client.get("/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"
