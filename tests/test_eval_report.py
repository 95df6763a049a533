"""run_bench end to end on a tiny BEIR suite: every system through the same path, every report file written."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from twotower.eval.report import format_table, similarity_summary

TOPICS = ["cat", "dog", "fish", "bird", "tree", "rock", "boat", "car"]


@pytest.fixture
def tiny_suite(tmp_path):
    from twotower.eval.suites.beir import write_beir

    corpus = [{"_id": f"d{i}", "title": "", "text": f"the {t} number {i} is about {t}s and more {t}"}
              for i, t in enumerate(TOPICS * 3)]
    queries = [{"_id": f"q{i}", "text": f"what about the {t}"} for i, t in enumerate(TOPICS)]
    # Several relevant docs per query, graded.
    qrels = {f"q{i}": {f"d{i}": 2, f"d{i + len(TOPICS)}": 1} for i in range(len(TOPICS))}
    return write_beir(tmp_path / "tiny-suite", corpus, queries, qrels)


@pytest.fixture
def tiny_towers(tiny_bert_dir, tmp_path):
    from twotower.towers.model import TwoTower

    path = tmp_path / "towers"
    TwoTower.from_base(str(tiny_bert_dir), query_max_length=16, result_max_length=32).save(path)
    return path


def test_run_bench_writes_every_file(tiny_suite, tiny_towers, tiny_llama_dir, tmp_path, monkeypatch) -> None:
    from twotower.eval.bench import run_bench
    from twotower.eval.config import BenchConfig

    monkeypatch.setenv("TWOTOWER_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "REPORT"
    systems = f"towers={tiny_towers},raw-llm:llm={tiny_llama_dir}:last+logits,bm25"
    results = run_bench(BenchConfig(suite=str(tiny_suite), systems=systems, out=str(out), k_max=10, batch_size=8,
                                    device="cpu", doc_max_length=32, n_random=5), show_progress=False)
    assert sorted(p.name for p in out.iterdir()) == [
        "recall_at_k.png", "report.md", "results.json", "similarity.npz", "similarity.png"]
    for png in ("recall_at_k.png", "similarity.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((out / "results.json").read_text())
    assert saved == json.loads(json.dumps(results))
    assert list(saved["systems"]) == ["towers", "llm-last", "llm-logits", "bm25"]
    for name, row in saved["systems"].items():
        # k_max 10: only the metrics a top 10 can give (no recall@20/100, no map@100)
        assert set(row["metrics"]) == {"recall@1", "recall@5", "recall@10", "mrr@10", "ndcg@10"}
        assert len(row["recall_curve"]) == 10 and row["config"]["kind"] in ("towers", "raw-llm", "bm25")
    # BM25 matches the topic word: 3 docs per topic, so both relevant docs are in every top 10.
    assert saved["systems"]["bm25"]["metrics"]["recall@10"] == 1.0
    vocab = json.loads((tiny_llama_dir / "config.json").read_text())["vocab_size"]
    assert saved["systems"]["llm-logits"]["dim"] == vocab
    assert saved["systems"]["llm-last"]["dim"] == 32
    assert saved["systems"]["towers"]["config"]["fingerprint"]
    assert saved["suite"]["corpus"] == 24 and saved["suite"]["queries"] == 8 and len(saved["suite"]["checksum"]) == 64
    env = saved["environment"]
    assert env["device"] == "cpu" and env["packages"]["torch"] and env["packages"]["bm25s"]
    md = (out / "report.md").read_text()
    assert "| system | recall@1 |" in md and "**1.000**" in md and "bm25" in md
    assert saved["suite"]["checksum"][:16] in md
    npz = np.load(out / "similarity.npz", allow_pickle=False)
    assert set(npz.files) == {f"{r}/{k}" for r in ("towers", "llm-last", "llm-logits") for k in ("relevant", "random")}
    assert len(npz["towers/relevant"]) == 16  # 8 queries x 2 relevant docs


def test_rerun_replaces_the_report_atomically(tiny_suite, tmp_path) -> None:
    from twotower.eval.bench import run_bench
    from twotower.eval.config import BenchConfig

    out = tmp_path / "R"
    cfg = BenchConfig(suite=str(tiny_suite), systems="bm25", out=str(out), k_max=5, device="cpu")
    run_bench(cfg, show_progress=False)
    (out / "stale.txt").write_text("from an older run")
    run_bench(dataclasses.replace(cfg, max_queries=3), show_progress=False)
    assert not (out / "stale.txt").exists()
    assert json.loads((out / "results.json").read_text())["suite"]["queries"] == 3
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".R")]  # no temp dirs left behind


def test_similarity_auc() -> None:
    assert similarity_summary({"relevant": np.array([0.9, 0.8]), "random": np.array([0.1, 0.2])})["auc"] == 1.0
    assert similarity_summary({"relevant": np.array([0.5]), "random": np.array([0.5])})["auc"] == 0.5
    assert similarity_summary({"relevant": np.array([0.1]), "random": np.array([0.2, 0.0])})["auc"] == 0.5


def test_table_bolds_best_per_column() -> None:
    cols = ("recall@10", "mrr@10")
    results = {"systems": {"a": {"metrics": {"recall@10": 0.5, "mrr@10": 0.9}},
                           "b": {"metrics": {"recall@10": 0.7, "mrr@10": 0.1}}}}
    table = format_table(results, cols).splitlines()
    assert table[2] == "| a | 0.500 | **0.900** |" and table[3] == "| b | **0.700** | 0.100 |"


def test_hybrid_systems_fuse_towers_and_bm25(tiny_suite, tiny_towers, tmp_path) -> None:
    """hybrid=TOWERS gives one row per fusion; weighted with alpha 1 ranks exactly as the towers row."""
    from twotower.eval.bench import run_bench
    from twotower.eval.config import BenchConfig

    systems = f"towers={tiny_towers},bm25,hybrid={tiny_towers},hybrid:h1={tiny_towers}:weighted"
    cfg = BenchConfig(suite=str(tiny_suite), systems=systems, out=str(tmp_path / "R"), k_max=10, batch_size=8,
                      device="cpu", n_random=5, hybrid_alpha=1.0, hybrid_depth=2)
    results = run_bench(cfg, show_progress=False)
    rows = results["systems"]
    assert list(rows) == ["towers", "bm25", "hybrid-rrf", "hybrid-weighted", "h1-weighted"]
    assert rows["hybrid-weighted"]["metrics"] == rows["towers"]["metrics"] == rows["h1-weighted"]["metrics"]
    assert rows["hybrid-rrf"]["config"]["fusion"] == "rrf"
    assert rows["hybrid-rrf"]["timings"]["candidates_per_side"] == 20
    # RRF of a perfect (bm25 here) and a weak (random tiny towers) ranking keeps both relevant docs in the top 10
    assert rows["bm25"]["metrics"]["recall@10"] == 1.0 and rows["hybrid-rrf"]["metrics"]["recall@10"] == 1.0
    assert "| hybrid-rrf |" in (tmp_path / "R" / "report.md").read_text()
