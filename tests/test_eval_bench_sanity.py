"""The bench reports only what it computed, and says how far to trust each difference: ``--k-max`` limits the
metrics, qrels with no relevant doc are refused or named, and every row gets a paired CI and p against the
reference row (per-query scores kept in results.json)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from twotower.cli import main
from twotower.common.metrics import evaluate
from twotower.eval.bench import run_bench
from twotower.eval.config import BenchConfig
from twotower.eval.suites.beir import load_beir, write_beir

TOPICS = ["cat", "dog", "fish", "bird", "tree", "rock", "boat", "car"]


def _suite(path, grades=None):
    """8 topic queries, 3 docs per topic; ``grades`` overrides a query's qrels grade (default 1)."""
    grades = grades or {}
    corpus = [{"_id": f"d{i}", "title": "", "text": f"the {t} number {i} is about {t}s and more {t}"}
              for i, t in enumerate(TOPICS * 3)]
    queries = [{"_id": f"q{i}", "text": f"what about the {t}"} for i, t in enumerate(TOPICS)]
    qrels = {f"q{i}": {f"d{i}": grades.get(f"q{i}", 1), f"d{i + len(TOPICS)}": grades.get(f"q{i}", 1)}
             for i in range(len(TOPICS))}
    return write_beir(path, corpus, queries, qrels)


@pytest.fixture
def towers(tiny_bert_dir, tmp_path):
    from twotower.towers.model import TwoTower

    path = tmp_path / "towers"
    TwoTower.from_base(str(tiny_bert_dir), query_max_length=16, result_max_length=32).save(path)
    return path


def test_k_max_limits_the_metrics_reported(tmp_path) -> None:
    out = tmp_path / "R"
    results = run_bench(BenchConfig(suite=str(_suite(tmp_path / "s")), systems="bm25", out=str(out), k_max=5,
                                    device="cpu"), show_progress=False)
    assert set(results["systems"]["bm25"]["metrics"]) == {"recall@1", "recall@5"}  # no recall@100 from a top 5
    assert len(results["systems"]["bm25"]["recall_curve"]) == 5
    md = (out / "report.md").read_text()
    assert "| system | recall@1 | recall@5 |" in md and "recall@100" not in md and "ndcg@10" not in md
    assert results["significance"]["metrics"] == []  # recall@10 and nDCG@10 were not computed: no CI on them


def test_queries_without_a_relevant_doc_are_named_and_left_out(tmp_path, capsys) -> None:
    suite = _suite(tmp_path / "s", grades={"q1": 0, "q5": -1})
    results = run_bench(BenchConfig(suite=str(suite), systems="bm25", out=str(tmp_path / "R"), k_max=10,
                                    device="cpu"), show_progress=False)
    err = [line for line in capsys.readouterr().err.splitlines() if "no relevant doc" in line]
    assert len(err) == 1 and "2 of 8 queries" in err[0] and "q1, q5" in err[0] and "qrels" in err[0]
    assert results["suite"]["queries_without_relevant"] == ["q1", "q5"]
    assert results["per_query"]["query_ids"] == ["q0", "q2", "q3", "q4", "q6", "q7"]
    assert len(results["per_query"]["systems"]["bm25"]["recall@10"]) == 6
    assert "2 queries have no relevant doc" in (tmp_path / "R" / "report.md").read_text()


def test_qrels_with_no_positive_grade_are_refused(tmp_path, capsys) -> None:
    suite = _suite(tmp_path / "s", grades={f"q{i}": 0 for i in range(len(TOPICS))})
    assert main(["bench", "--suite", str(suite), "--systems", "bm25", "--out", str(tmp_path / "R"),
                 "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "test.tsv" in err[0] and "no query has a relevant doc" in err[0]
    assert not (tmp_path / "R").exists()


def test_every_row_gets_a_ci_against_the_towers(tmp_path, towers) -> None:
    suite = _suite(tmp_path / "s")
    out = tmp_path / "R"
    results = run_bench(BenchConfig(suite=str(suite), systems=f"bm25,towers={towers},minilm", out=str(out),
                                    k_max=10, batch_size=8, device="cpu", n_random=3), show_progress=False)
    sig = results["significance"]
    assert sig["reference"] == "towers" and set(sig["rows"]) == {"bm25", "minilm"}
    assert sig["metrics"] == ["recall@10", "ndcg@10"] and sig["n_resamples"] == 10_000
    kept = results["per_query"]
    assert kept["query_ids"] == [f"q{i}" for i in range(8)]
    for name, row in results["systems"].items():  # the kept per-query scores are the ones the means came from
        for m in ("recall@10", "ndcg@10"):
            assert np.mean(kept["systems"][name][m]) == pytest.approx(row["metrics"][m])
    bm25 = sig["rows"]["bm25"]["recall@10"]
    assert bm25["diff"] == pytest.approx(results["systems"]["bm25"]["metrics"]["recall@10"]
                                         - results["systems"]["towers"]["metrics"]["recall@10"])
    assert bm25["ci_low"] <= bm25["diff"] <= bm25["ci_high"] and 0 < bm25["p_value"] <= 1
    saved = json.loads((out / "results.json").read_text())
    assert saved["significance"] == json.loads(json.dumps(sig)) and saved["per_query"] == kept
    md = (out / "report.md").read_text()
    assert "## Differences against the reference row" in md and "Each row minus **towers** on the same 8 queries" in md
    assert "| bm25 | " in md.split("## Differences against the reference row")[1]


def test_reference_names_a_row_and_is_checked_before_any_model_loads(tmp_path, towers) -> None:
    suite = _suite(tmp_path / "s")
    results = run_bench(BenchConfig(suite=str(suite), systems=f"bm25,towers={towers}", out=str(tmp_path / "R"),
                                    k_max=10, batch_size=8, device="cpu", n_random=3, reference="bm25"),
                        show_progress=False)
    assert results["significance"]["reference"] == "bm25" and list(results["significance"]["rows"]) == ["towers"]
    with pytest.raises(ValueError, match="--reference 'nope' is not a row of this bench: choose bm25, towers"):
        run_bench(BenchConfig(suite=str(suite), systems=f"bm25,towers={towers}", out=str(tmp_path / "R2"),
                              device="cpu", reference="nope"), show_progress=False)
    assert not (tmp_path / "R2").exists()


def test_metrics_skip_queries_without_relevant_docs_as_the_bench_does(tmp_path) -> None:
    """The means the bench reports equal the metrics of the suite with those queries removed."""
    suite = load_beir(_suite(tmp_path / "s", grades={"q1": 0}))
    I = np.tile(np.arange(10), (8, 1))
    rel = suite.relevant_rows()
    assert evaluate(I, rel, ["recall@10"]) == evaluate(I[[0, 2, 3, 4, 5, 6, 7]], rel[:1] + rel[2:], ["recall@10"])
