"""Pairs loading/validation (every bad-input case names its file, row and column) and the batch sampler."""
from __future__ import annotations

import json
from pathlib import Path

import datasets
import numpy as np
import pytest

from twotower.towers.data import load_pairs
from twotower.towers.sampler import NoDuplicatesBatchSampler, conflict_keys

ROWS = [{"query": f"q{i}", "positive": f"p{i}", "negatives": [f"n{i}", f"m{i}"]} for i in range(5)]


def _jsonl(path: Path, rows: list, raw: str = "") -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + raw)
    return path


# ---- loading -----------------------------------------------------------------------------------------
def test_jsonl_csv_parquet_load_the_same_pairs(tmp_path):
    ds = load_pairs(_jsonl(tmp_path / "p.jsonl", ROWS))
    assert ds.column_names == ["query", "positive", "negatives"]
    assert ds[1] == ROWS[1]
    csv = tmp_path / "p.csv"
    csv.write_text("q,pos,extra\n" + "".join(f"{r['query']},{r['positive']},x\n" for r in ROWS) + "null,NA,x\n")
    ds = load_pairs(csv, query_column="q", positive_column="pos")
    assert ds.column_names == ["query", "positive"]
    assert ds["query"][:2] == ["q0", "q1"] and ds[5] == {"query": "null", "positive": "NA"}  # text, not NaN
    pq = tmp_path / "p.parquet"
    renamed = [{"a": r["query"], "b": r["positive"], "c": r["negatives"]} for r in ROWS]
    datasets.Dataset.from_list(renamed).to_parquet(pq)
    ds = load_pairs(pq, "a", "b", "c")
    assert ds.column_names == ["query", "positive", "negatives"] and ds[4] == ROWS[4]


def test_blank_lines_are_skipped_and_negatives_are_optional(tmp_path):
    path = _jsonl(tmp_path / "p.jsonl", [{"query": "a", "positive": "b"}], raw="\n\n" + json.dumps(
        {"query": "c", "positive": "d"}) + "\n")
    ds = load_pairs(path)
    assert len(ds) == 2 and ds.column_names == ["query", "positive"]


@pytest.mark.parametrize("content,message", [
    ('{"query": "a", "positive": "b"}\n{"query": "a", "positive": \n', r"bad\.jsonl: line 2: malformed JSON"),
    ('{"query": "a", "positive": "b"}\n\n{"query": 3, "positive": "c"}\n',
     r"bad\.jsonl: line 3: column 'query' must be a string, got int"),
    ('{"query": "a", "positive": "  "}\n', r"bad\.jsonl: line 1: column 'positive' is empty"),
    ('{"question": "a", "positive": "b"}\n', r"no column 'query' \(columns found: question, positive\)"),
    ('{"query": "a", "positive": "b", "negatives": ["x"]}\n{"query": "c", "positive": "d", "negatives": "x"}\n',
     r"line 2: column 'negatives' must be a list of non-empty strings"),
    ('{"query": "a", "positive": "b", "negatives": ["x", ""]}\n', r"line 1: column 'negatives' must be a list"),
    ('\n\n', r"bad\.jsonl: zero rows"),
    ('["query", "positive"]\n', r"line 1: expected a JSON object, got list"),
])
def test_bad_jsonl_names_file_line_and_column(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        load_pairs(path)


def test_bad_csv_and_parquet_name_the_row(tmp_path):
    csv = tmp_path / "bad.csv"
    csv.write_text("query,positive\na,b\nc,\n")
    with pytest.raises(ValueError, match=r"bad\.csv: row 2: column 'positive' is empty"):
        load_pairs(csv)
    csv.write_text("query,positive\n")
    with pytest.raises(ValueError, match=r"bad\.csv: zero rows"):
        load_pairs(csv)
    csv.write_text("text,label\na,b\n")
    with pytest.raises(ValueError, match=r"no column 'query' \(columns found: text, label\)"):
        load_pairs(csv)
    pq = tmp_path / "bad.parquet"
    datasets.Dataset.from_dict({"query": ["a", "b"], "positive": [1, 2]}).to_parquet(pq)
    with pytest.raises(ValueError, match=r"bad\.parquet: row 1: column 'positive' must be a string, got int"):
        load_pairs(pq)
    datasets.Dataset.from_dict({"query": ["a", "b"], "positive": ["x", None]}).to_parquet(pq)
    with pytest.raises(ValueError, match=r"bad\.parquet: row 2: column 'positive' must be a string, got NoneType"):
        load_pairs(pq)


def test_missing_file_unknown_extension_and_explicit_negatives_column(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"pairs file '.*nope\.jsonl' does not exist"):
        load_pairs(tmp_path / "nope.jsonl")
    with pytest.raises(FileNotFoundError, match=r"'pairs\.txt' does not exist"):
        load_pairs("pairs.txt")
    (tmp_path / "p.txt").write_text("x")
    with pytest.raises(ValueError, match=r"unsupported extension '\.txt': choose \.jsonl"):
        load_pairs(tmp_path / "p.txt")
    path = _jsonl(tmp_path / "p.jsonl", [{"query": "a", "positive": "b"}])
    with pytest.raises(ValueError, match=r"no column 'hard' \(columns found: query, positive\)"):
        load_pairs(path, negatives_column="hard")


# ---- sampler -----------------------------------------------------------------------------------------
def _dup_heavy(n: int = 200, seed: int = 0) -> tuple[list[str], list[str]]:
    rng = np.random.default_rng(seed)
    positives = [f"p{int(x)}" for x in rng.integers(0, n // 3, n)]  # every positive ~3 times
    queries = [f"q{int(x)}" for x in rng.integers(0, n // 2, n)]
    return queries, positives


def test_sampler_never_repeats_a_positive_or_query_and_covers_every_row():
    queries, positives = _dup_heavy()
    sampler = NoDuplicatesBatchSampler(conflict_keys(queries, positives), batch_size=16, seed=3, drop_last=False)
    for epoch in range(3):
        batches = sampler.batches(epoch)
        for b in batches:
            assert len({positives[i] for i in b}) == len(b) and len({queries[i] for i in b}) == len(b)
        assert sorted(np.concatenate(batches).tolist()) == list(range(len(queries)))
    full = NoDuplicatesBatchSampler(conflict_keys(queries, positives), batch_size=16, seed=3).batches(0)
    assert full and all(len(b) == 16 for b in full)  # drop_last: only full batches


def test_sampler_is_deterministic_per_seed_and_epoch():
    keys = conflict_keys(*_dup_heavy())
    a = NoDuplicatesBatchSampler(keys, 16, seed=1).batches(0)
    b = NoDuplicatesBatchSampler(keys, 16, seed=1).batches(0)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not np.array_equal(np.concatenate(a), np.concatenate(NoDuplicatesBatchSampler(keys, 16, seed=2).batches(0)))
    assert not np.array_equal(np.concatenate(a), np.concatenate(NoDuplicatesBatchSampler(keys, 16, seed=1).batches(1)))


def test_sampler_resumes_mid_epoch_and_shards_global_batches():
    keys = conflict_keys(*_dup_heavy())
    straight = NoDuplicatesBatchSampler(keys, 16, seed=5)
    stream = [straight.next_batch() for _ in range(30)]  # crosses epoch boundaries (~10 batches per epoch)
    first = NoDuplicatesBatchSampler(keys, 16, seed=5)
    for _ in range(13):
        first.next_batch()
    resumed = NoDuplicatesBatchSampler(keys, 16, seed=5)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert all(np.array_equal(resumed.next_batch(), b) for b in stream[13:])
    with pytest.raises(ValueError, match="saved with seed=5, this run has 6"):
        NoDuplicatesBatchSampler(keys, 16, seed=6).load_state_dict(first.state_dict())
    ranks = [NoDuplicatesBatchSampler(keys, 16, seed=5, rank=r, world_size=4) for r in range(4)]
    for global_batch in stream[:12]:
        shards = [s.next_batch() for s in ranks]
        assert all(len(s) == 4 for s in shards) and np.array_equal(np.concatenate(shards), global_batch)


def test_too_few_rows_for_a_batch_is_a_clear_error(tmp_path):
    from twotower.towers.train import TrainConfig, train

    path = _jsonl(tmp_path / "p.jsonl", [{"query": "a", "positive": "same"}, {"query": "b", "positive": "same"}])
    with pytest.raises(ValueError, match=r"2 rows make no batch of 2 pairs with distinct queries and positives"):
        train(TrainConfig(pairs=str(path), out=str(tmp_path / "out"), batch_size=2, device="cpu"))
    assert not (tmp_path / "out").exists()
