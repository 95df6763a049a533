"""Training data whose shape changes down the file (issue 24, class 6): a pairs file's columns are decided by the
whole file, not by row 1, and a row that breaks the file's shape is an error naming its line."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from twotower.towers.data import load_pairs


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_a_negatives_column_first_seen_on_row_2_is_not_dropped(tmp_path: Path) -> None:
    path = _write(tmp_path / "p.jsonl", [{"query": "a", "positive": "b", "negatives": []},
                                         {"query": "c", "positive": "d", "negatives": ["e", "f"]}])
    path2 = _write(tmp_path / "p2.jsonl", [{"query": "a", "positive": "b"},
                                           {"query": "c", "positive": "d", "negatives": ["e"]}])
    assert load_pairs(path)["negatives"] == [[], ["e", "f"]]
    with pytest.raises(ValueError, match=r"p2\.jsonl: line 1: no column 'negatives', but line 2 has one"):
        load_pairs(path2)


def test_a_row_without_negatives_after_rows_with_them_is_named(tmp_path: Path) -> None:
    rows = [{"query": f"q{i}", "positive": f"p{i}", "negatives": [f"n{i}"]} for i in range(3)]
    rows.insert(2, {"query": "x", "positive": "y"})
    with pytest.raises(ValueError, match=r"line 3: no column 'negatives', but line 1 has one"):
        load_pairs(_write(tmp_path / "p.jsonl", rows))


def test_a_renamed_column_is_looked_up_over_the_whole_file(tmp_path: Path) -> None:
    rows = [{"q": "a", "positive": "b"}, {"q": "c", "positive": "d", "hard": ["e"]}]
    path = _write(tmp_path / "p.jsonl", rows)
    with pytest.raises(ValueError, match=r"line 1: no column 'hard', but line 2 has one"):
        load_pairs(path, query_column="q", negatives_column="hard")
    rows[0]["hard"] = []
    ds = load_pairs(_write(path, rows), query_column="q", negatives_column="hard")
    assert ds["negatives"] == [[], ["e"]] and ds["query"] == ["a", "c"]


def test_a_file_without_negatives_still_loads_without_the_column(tmp_path: Path) -> None:
    ds = load_pairs(_write(tmp_path / "p.jsonl", [{"query": "a", "positive": "b", "extra": 1},
                                                  {"query": "c", "positive": "d"}]))
    assert ds.column_names == ["query", "positive"] and len(ds) == 2
