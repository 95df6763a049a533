"""Hard-negative mining: rank range, positive exclusion, margin false-negative guard, CLI with real towers."""
from __future__ import annotations

import json

import numpy as np
import pytest

faiss = pytest.importorskip("faiss")

from twotower.index.mine import MineConfig, mine_negatives, select_negatives  # noqa: E402
from twotower.index.synthetic import TableEncoder, clustered_vectors  # noqa: E402


def test_select_negatives_range_positives_and_margins():
    D = np.array([[0.99, 0.9, 0.8, 0.7, 0.6, 0.5]], np.float32)
    I = np.array([[7, 3, 4, 5, 6, -1]])
    pos = [{3}]
    pos_score = np.array([0.9])
    cfg = MineConfig(num_negatives=2, range_min=0, range_max=6, relative_margin=None)
    assert select_negatives(D, I, pos, pos_score, cfg)[0] == [[7, 4]]
    # relative margin 0.05: drop scores above 0.855 (row 7 scores 0.99: a likely false negative)
    chosen, stats = select_negatives(D, I, pos, pos_score, MineConfig(num_negatives=2, range_max=6))
    assert chosen == [[4, 5]] and stats.skipped_margin == 1
    # absolute margin 0.15: drop scores above 0.75
    cfg = MineConfig(num_negatives=3, range_max=6, relative_margin=None, absolute_margin=0.15)
    chosen, stats = select_negatives(D, I, pos, pos_score, cfg)
    assert chosen == [[5, 6]] and stats.short == 1 and stats.skipped_margin == 2
    # ranks [3, 6) only, max_score 0.65
    cfg = MineConfig(num_negatives=1, range_min=3, range_max=6, relative_margin=None, max_score=0.65)
    chosen, stats = select_negatives(D, I, pos, pos_score, cfg)
    assert chosen == [[6]] and stats.skipped_max_score == 1
    cfg = MineConfig(num_negatives=2, range_max=6, relative_margin=None, sampling="random", seed=1)
    sample = select_negatives(D, I, pos, pos_score, cfg)[0][0]
    assert len(sample) == 2 and set(sample) <= {7, 4, 5, 6}


@pytest.mark.parametrize("bad,match", [
    (dict(num_negatives=0), "num_negatives must be >= 1"),
    (dict(range_min=5, range_max=5), "range_min < range_max"),
    (dict(num_negatives=10, range_min=45), r"cannot mine 10 negatives from ranks \[45, 50\)"),
])
def test_config_validation(bad, match):
    with pytest.raises(ValueError, match=match):
        MineConfig(**bad).validate()


def test_mine_negatives_matches_brute_force_reference():
    X = clustered_vectors(200, 16, seed=7)
    X[150] = X[0] + 0.01  # a near-copy of query 0's positive: must be guarded out as a false negative
    X[150] /= np.linalg.norm(X[150])
    Q = X[:10].copy()
    queries = [f"query {j}" for j in range(10)]
    positives = [f"doc {j}" for j in range(10)]
    extra = [f"doc {i}" for i in range(10, 200)]
    cfg = MineConfig(num_negatives=3, range_max=30, progress=False)
    negatives, stats = mine_negatives(TableEncoder(Q), TableEncoder(X), queries, positives, cfg, extra)
    scores = Q @ X.T  # (10, 200) reference ranking
    for j in range(10):
        order = [i for i in np.argsort(-scores[j], kind="stable")[:30]
                 if i != j and scores[j, i] <= scores[j, j] * 0.95]
        assert negatives[j] == [f"doc {i}" for i in order[:3]]
    assert "doc 150" not in negatives[0] and stats.skipped_margin >= 1


def test_rows_sharing_a_query_share_negatives_and_skip_all_its_positives():
    X = clustered_vectors(50, 8, seed=8)
    queries = ["query 0", "query 0", "query 2"]
    positives = ["doc 0", "doc 1", "doc 2"]
    cfg = MineConfig(num_negatives=4, range_max=20, relative_margin=None, progress=False)
    negatives, _ = mine_negatives(TableEncoder(X), TableEncoder(X), queries, positives, cfg,
                                  [f"doc {i}" for i in range(3, 50)])
    assert negatives[0] == negatives[1] and not {"doc 0", "doc 1"} & set(negatives[0])
    assert "doc 2" not in negatives[2] and all(len(n) == 4 for n in negatives)


def test_cli_mine_with_real_towers(tiny_bert_dir, tmp_path, capsys):
    from twotower.cli import main
    from twotower.towers.data import load_pairs
    from twotower.towers.model import TwoTower

    towers = tmp_path / "towers"
    TwoTower.from_base(str(tiny_bert_dir)).save(towers)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"q": f"question {i} about topic {i % 5}",
                                         "positive": f"answer {i} on topic {i % 5} " + "text " * (i % 4)}) + "\n"
                             for i in range(30)))
    out = tmp_path / "mined.jsonl"
    assert main(["mine", "--towers", str(towers), "--pairs", str(pairs), "--out", str(out), "--query-column", "q",
                 "--num-negatives", "3", "--range-max", "20", "--no-progress", "--relative-margin", "0.0"]) == 0
    assert "mean positive score" in capsys.readouterr().out
    mined = load_pairs(out)
    assert mined.column_names == ["query", "positive", "negatives"] and len(mined) >= 1
    for row in mined:
        assert len(row["negatives"]) == 3 and row["positive"] not in row["negatives"]
    assert main(["mine", "--towers", str(towers), "--pairs", str(pairs), "--out", str(tmp_path / "x.csv"),
                 "--query-column", "q"]) == 2
    assert "must end in .jsonl or .parquet" in capsys.readouterr().err


def test_mine_refuses_existing_out_without_overwrite(tiny_bert_dir, tmp_path, capsys):
    """A file at --out that mine did not write is never replaced silently: exit 2 naming --overwrite."""
    from twotower.cli import main
    from twotower.towers.model import TwoTower

    towers = tmp_path / "towers"
    TwoTower.from_base(str(tiny_bert_dir)).save(towers)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"query": f"question {i}", "positive": f"answer {i} " + "text " * (i % 4)})
                             + "\n" for i in range(12)))
    out = tmp_path / "notes.jsonl"
    out.write_text("my own notes\n")
    args = ["mine", "--towers", str(towers), "--pairs", str(pairs), "--out", str(out), "--num-negatives", "1",
            "--keep-short", "--no-progress"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "--out" in err and "--overwrite" in err and "Traceback" not in err
    assert out.read_text() == "my own notes\n"
    assert main(args + ["--overwrite"]) == 0
    assert out.read_text() != "my own notes\n" and out.read_text().count("\n") >= 1
