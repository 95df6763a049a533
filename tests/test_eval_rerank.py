"""The bench system towers+rerank: parsing, the towers' top N reordered (ranks past N kept), shared vectors."""
from __future__ import annotations

import pytest

from tests.test_eval_report import tiny_suite, tiny_towers  # noqa: F401  (fixtures)
from twotower.eval.systems import parse_systems


@pytest.fixture
def tiny_reranker(tiny_bert_dir, tmp_path):
    from twotower.towers.reranker import Reranker

    path = tmp_path / "reranker"
    Reranker.from_base(tiny_bert_dir, 48, device="cpu", seed=1).save(path, {"base": "tiny"})
    return path


def test_parse_towers_rerank() -> None:
    (a, b) = parse_systems("towers+rerank=runs/t:runs/r,towers+rerank:r100=runs/t:runs/r:100")
    assert (a.kind, a.label, a.value, a.reranker, a.rerank) == ("towers+rerank", "towers+rerank", "runs/t",
                                                                "runs/r", 20)
    assert (b.label, b.rerank) == ("r100", 100)
    for bad in ("towers+rerank=runs/t", "towers+rerank", "towers+rerank=a:b:c:d", "towers+rerank=a:b:0"):
        with pytest.raises(ValueError, match="towers\\+rerank needs TOWERS:RERANKER|must be >= 1"):
            parse_systems(bad)


def test_rerank_rows_reorder_only_the_top_n(tiny_suite, tiny_towers, tiny_reranker, tmp_path) -> None:  # noqa: F811
    from twotower.eval.bench import run_bench
    from twotower.eval.config import BenchConfig

    systems = (f"towers={tiny_towers},towers+rerank:n1={tiny_towers}:{tiny_reranker}:1,"
               f"towers+rerank:n10={tiny_towers}:{tiny_reranker}:10")
    cfg = BenchConfig(suite=str(tiny_suite), systems=systems, out=str(tmp_path / "R"), k_max=10, batch_size=8,
                      device="cpu", n_random=5)
    rows = run_bench(cfg, show_progress=False)["systems"]
    towers, n1, n10 = rows["towers"]["metrics"], rows["n1"]["metrics"], rows["n10"]["metrics"]
    assert n1 == towers, "reordering one candidate changes nothing"
    assert n10["recall@10"] == towers["recall@10"], "the top 10 holds the same docs, reordered"
    assert n10["ndcg@10"] != towers["ndcg@10"], "a random cross-encoder reorders them"
    assert rows["n10"]["config"]["kind"] == "towers+rerank" and rows["n10"]["config"]["rerank"] == 10
    assert rows["n10"]["timings"]["rerank_ms_per_query"] > 0 and rows["n10"]["config"]["max_length"] == 48
    assert "| n10 |" in (tmp_path / "R" / "report.md").read_text()


def test_a_reranker_that_does_not_fit_is_refused_before_load(tiny_towers, tiny_bert_dir) -> None:  # noqa: F811
    from twotower.eval.config import BenchConfig
    from twotower.eval.systems import build_systems

    with pytest.raises(ValueError, match="not a one-label cross-encoder"):
        build_systems(parse_systems(f"towers+rerank={tiny_towers}:{tiny_bert_dir}"), BenchConfig(suite="s"))


def test_demo_reranker_step_is_cached_or_retrained(tiny_towers, tiny_bert_dir, tmp_path, capsys) -> None:  # noqa: F811
    import dataclasses
    import json

    from twotower.eval.demo import _pair_sample, _train_reranker
    from twotower.towers.reranker_config import RerankerTrainConfig

    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"query": f"q{i}", "positive": f"about thing {i}"}) + "\n" for i in range(30)))
    sample = _pair_sample(train, 12, tmp_path / "sample.jsonl")
    rows = sample.read_text().splitlines()
    assert len(rows) == 12 and len(set(rows)) == 12 and set(rows) <= set(train.read_text().splitlines())
    assert _pair_sample(train, 12, tmp_path / "sample2.jsonl").read_text() == sample.read_text(), "seeded"
    cfg = RerankerTrainConfig(pairs=str(sample), towers=str(tiny_towers), out=str(tmp_path / "rr"),
                              base=str(tiny_bert_dir), dev="none", hard_negatives=2, relative_margin=None,
                              max_steps=2, batch_size=4, max_length=32, device="cpu", progress=False)
    assert _train_reranker(cfg, tmp_path / "rr") == "trained"
    assert _train_reranker(cfg, tmp_path / "rr") == "cached"
    assert _train_reranker(dataclasses.replace(cfg, lr=1e-3), tmp_path / "rr") == "trained"
    assert json.loads((tmp_path / "rr" / "reranker.json").read_text())["train_config"]["lr"] == 1e-3
