"""Valid output only: every JSON twotower writes (files, ``--json`` lines, HTTP bodies) is RFC 8259 JSON, parsed
here with a strict parser that refuses NaN/Infinity; NaN/Infinity in a corpus's metadata is refused at index
time naming the row; a NaN score or a diverged loss is written as null (``common.jsonl.dumps_strict``)."""
from __future__ import annotations

import json
import math
import re
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import QUERIES, build_tiny_index
from twotower import cli as twotower_cli


def _refuse(constant: str) -> Any:
    raise ValueError(f"not RFC 8259 JSON: {constant}")


def strict(text: str | bytes) -> Any:
    """``json.loads`` that refuses NaN, Infinity and -Infinity (as browsers, jq, Go and Java do)."""
    return json.loads(text, parse_constant=_refuse)


def test_strict_parser_refuses_what_python_would_write():
    with pytest.raises(ValueError, match="NaN"):
        strict(json.dumps({"x": float("nan")}))
    from twotower.common.jsonl import dumps_strict

    assert strict(dumps_strict({"x": float("nan"), "y": [1.5, float("-inf")], "z": (float("inf"),)})) == {
        "x": None, "y": [1.5, None], "z": [None]}


def _run(argv: list[str], capsys) -> str:
    assert twotower_cli.main(argv) == 0, capsys.readouterr().err
    return capsys.readouterr().out


def test_every_json_output_of_the_pipeline_is_strict(_tiny_models, tmp_path, capsys):
    from twotower.eval.suites.beir import write_beir

    base = _tiny_models["bert"]
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"query": f"query {w}", "positive": f"text about {w}"}) + "\n"
                             for w in "abcdefgh"))
    dev = tmp_path / "dev.jsonl"
    dev.write_text("".join(json.dumps({"query": f"find {w}", "positive": f"notes on {w}"}) + "\n" for w in "xyz"))
    towers = tmp_path / "towers"
    _run(["train", "--pairs", str(pairs), "--dev", str(dev), "--out", str(towers), "--base", str(base),
          "--batch-size", "2", "--max-steps", "2", "--checkpoint-every", "1", "--log-every", "1", "--device", "cpu",
          "--query-max-length", "16", "--result-max-length", "16", "--allow-no-gain"], capsys)
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"_id": f"d{i}", "text": f"doc {i}", "score": i / 3, "tags": ["a", None],
                                          "nested": {"big": 1e308, "small": -1e-308}}) + "\n" for i in range(12)))
    idx, work = tmp_path / "idx", tmp_path / "work"
    _run(["index", "build", "--towers", str(towers), "--corpus", str(corpus), "--out", str(idx), "--device", "cpu",
          "--no-progress", "--work-dir", str(work), "--keep-work"], capsys)
    _run(["index", "build", "--towers", str(towers), "--corpus", str(corpus), "--out", str(tmp_path / "shards"),
          "--shard-id", "0", "--num-shards", "2", "--device", "cpu", "--no-progress"], capsys)
    lines = _run(["search", "--index", str(idx), "--device", "cpu", "--json", "-k", "3", *QUERIES], capsys)
    assert len(lines.splitlines()) == len(QUERIES)
    for line in lines.splitlines():
        assert strict(line)["hits"][0]["metadata"]["nested"]["big"] == 1e308
    strict(_run(["index", "info", str(idx), "--json"], capsys))
    suite = write_beir(tmp_path / "suite", [{"_id": "d1", "title": "", "text": "sort a list"},
                                            {"_id": "d2", "title": "", "text": "open a file"}],
                       [{"_id": "q1", "text": "sorting"}], {"q1": {"d1": 1}})
    strict(_run(["data", "info", str(suite), "--json"], capsys))
    _run(["bench", "--suite", str(suite), "--systems", f"bm25,towers={towers}", "--out", str(tmp_path / "report"),
          "--device", "cpu"], capsys)

    files = [p for p in tmp_path.rglob("*") if p.suffix in (".json", ".jsonl") and p.is_file()]
    names = {p.name for p in files}
    for expected in ("twotower.json", "train_log.jsonl", "state.json", "COMPLETE.json", "manifest.json",
                     "shard.json", "chunk-000000.json", "results.json"):
        assert expected in names, f"{expected} not written: {sorted(names)}"
    for path in files:
        text = path.read_text(encoding="utf-8")
        rows = text.splitlines() if path.suffix == ".jsonl" else [text]
        for row in rows:
            if row.strip():
                strict(row)


def test_http_bodies_are_strict(_tiny_models, tmp_path):
    from fastapi.testclient import TestClient

    from twotower.retrieval.config import ServeConfig
    from twotower.retrieval.retriever import Retriever
    from twotower.retrieval.server import create_app

    _, idx = build_tiny_index(tmp_path, _tiny_models["bert"], n_docs=10)
    app = create_app(ServeConfig(index=str(idx), reload_interval=0), Retriever.load(idx, device="cpu"))
    with TestClient(app) as client:
        responses = [client.post("/search", json={"queries": QUERIES, "k": 5}), client.get("/health"),
                     client.get("/info"), client.get("/openapi.json"), client.post("/search", json={"queries": []}),
                     client.post("/search", content=b"{", headers={"content-type": "application/json"}),
                     client.post("/search", json={"queries": ["a"], "k": "10"}), client.get("/nope")]
    for r in responses:
        assert r.headers["content-type"].startswith("application/json"), r.headers
        strict(r.content)
    assert [r.status_code for r in responses] == [200, 200, 200, 200, 422, 422, 422, 404]


def test_non_finite_scores_and_metadata_are_written_as_null():
    from twotower.retrieval.retriever import Hit
    from twotower.retrieval.server import _hits_json

    body = _hits_json([[Hit("a", float("nan"), "t", "", {"x": float("inf")}, 1)]])
    assert strict(body) == [[{"id": "a", "score": None, "text": "t", "title": "", "metadata": {"x": None},
                              "rank": 1}]]
    assert math.isnan(json.loads(json.dumps(float("nan"))))  # what Python would have written otherwise


def test_a_diverged_loss_is_logged_as_null(tmp_path):
    from twotower.towers.checkpoint import TrainLog

    log = TrainLog(tmp_path / "train_log.jsonl", None)
    log.write({"step": 1, "loss": float("nan"), "lr": 1e-4})
    assert strict((tmp_path / "train_log.jsonl").read_text()) == {"step": 1, "loss": None, "lr": 1e-4}


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_nan_or_infinity_in_corpus_metadata_is_refused_naming_the_row(fmt, _tiny_models, tmp_path, capsys):
    towers, _ = build_tiny_index(tmp_path, _tiny_models["bert"], n_docs=5)
    if fmt == "jsonl":
        path = tmp_path / "c.jsonl"
        path.write_text('{"_id": "a", "text": "fine", "score": 1.0}\n{"_id": "b", "text": "x", "meta": {"w": NaN}}\n')
        where, field = r"c\.jsonl: line 2", "meta.w"
    else:
        path = tmp_path / "c.parquet"
        pq.write_table(pa.table({"_id": ["a", "b", "c"], "text": ["x", "y", "z"], "score": [1.0, 2.0, math.inf]}),
                       path)
        where, field = r"c\.parquet: row 2", "score"
    rc = twotower_cli.main(["index", "build", "--towers", str(towers), "--corpus", str(path), "--out",
                            str(tmp_path / "out"), "--device", "cpu", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 2 and "Traceback" not in err
    assert re.search(rf"{where}: metadata field '{field}' is NaN or infinite, which JSON cannot hold; write null "
                     rf"for a missing value", err), err
    assert not (tmp_path / "out").exists()


def test_non_finite_option_values_are_refused_before_anything_runs(capsys):
    for argv in (["serve", "--index", "x", "--max-wait-ms", "nan"], ["train", "--pairs", "p", "--out", "o",
                                                                     "--max-grad-norm", "inf"],
                 ["index", "add", "x", "--corpus", "c", "--wait=-inf"]):
        with pytest.raises(SystemExit) as exc:
            twotower_cli.main(argv)
        assert exc.value.code == 2
        assert "expected a finite number" in capsys.readouterr().err
