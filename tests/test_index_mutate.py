"""``index add`` / ``index remove``: exact ids afterwards, atomic failure, tombstones on every index type."""
from __future__ import annotations

import numpy as np
import pytest

faiss = pytest.importorskip("faiss")

from twotower.index.build import build_index  # noqa: E402
from twotower.index.config import EncodeConfig, IndexBuildConfig  # noqa: E402
from twotower.index.load import load_index  # noqa: E402
from twotower.index.mutate import add_docs, remove_docs  # noqa: E402
from twotower.index.synthetic import TableEncoder, clustered_vectors  # noqa: E402

ENC = EncodeConfig(progress=False)



def rows(ids: range) -> list[dict]:
    return [{"_id": f"d{i}", "text": f"doc {i}"} for i in ids]


def self_hits(index, xb: np.ndarray) -> set[int]:
    """Rows whose own vector finds them at rank 1 (every live row; never a tombstone)."""
    _, I = index.search(xb, 1, nprobe=16, ef_search=64)
    return {int(r) for r, i in zip(I[:, 0], range(len(xb))) if r == i}


@pytest.mark.parametrize("factory", ["Flat", "IVF16,Flat", "HNSW16"])
def test_add_then_remove_leaves_exactly_the_expected_ids(tmp_path, factory):
    xb = clustered_vectors(700, 8, seed=1)
    enc = TableEncoder(xb)
    out = build_index(enc, rows(range(500)), tmp_path / "idx", IndexBuildConfig(factory=factory), ENC)
    assert add_docs(out, enc, rows(range(500, 700)), ENC) == 200
    removed = ["d3", "d499", "d500", "d650"]
    assert remove_docs(out, removed) == 4
    index = load_index(out, "cpu")
    assert index.ntotal == 700 and index.n_live == 696 and index.manifest["n_removed"] == 4
    assert index.manifest["factory"] == factory
    assert [h["op"] for h in index.manifest["history"]] == ["build", "add", "remove"]
    live = {f"d{i}" for i in range(700)} - set(removed)
    assert {index.docs[r]["id"] for r in self_hits(index, xb)} == live
    _, I = index.search(xb, 10, nprobe=16)
    assert not np.isin(I, [3, 499, 500, 650]).any()
    # an added doc is found by its own vector; a removed one never is
    _, I = index.search(xb[[600, 650]], 3, nprobe=16, ef_search=64)
    assert I[0, 0] == 600 and 650 not in I[1]
    np.testing.assert_array_equal(index.rows_of(["d600", "d2"]), [600, 2])
    with pytest.raises(KeyError, match="'d3'"):
        index.rows_of(["d3"])


def test_remove_is_all_or_nothing(tmp_path):
    xb = clustered_vectors(20, 8)
    out = build_index(TableEncoder(xb), rows(range(20)), tmp_path / "idx", IndexBuildConfig(), ENC)
    before = (out / "manifest.json").read_text()
    with pytest.raises(KeyError, match=r"1 id\(s\) not in index .*'nope'"):
        remove_docs(out, ["d1", "nope"])
    assert (out / "manifest.json").read_text() == before and not (out / "removed.npy").exists()
    remove_docs(out, ["d1"])
    with pytest.raises(KeyError, match="already removed.*'d1'"):
        remove_docs(out, ["d1"])
    assert load_index(out, "cpu").n_live == 19


def test_removed_id_can_be_added_again_and_live_ids_are_refused(tmp_path):
    xb = clustered_vectors(30, 8)
    enc = TableEncoder(xb)
    out = build_index(enc, rows(range(20)), tmp_path / "idx", IndexBuildConfig(), ENC)
    with pytest.raises(ValueError, match=r"1 id\(s\) .* already in index .*'d5'"):
        add_docs(out, enc, [{"_id": "d5", "text": "doc 25"}, {"_id": "x", "text": "doc 26"}], ENC)
    remove_docs(out, ["d5"])
    add_docs(out, enc, [{"_id": "d5", "text": "doc 25"}], ENC)
    index = load_index(out, "cpu")
    assert index.ntotal == 21 and index.n_live == 20
    np.testing.assert_array_equal(index.rows_of(["d5"]), [20])  # the live copy, not the tombstone
    _, I = index.search(xb[[25]], 1)
    assert I[0, 0] == 20


def test_add_with_other_towers_is_refused(tmp_path):
    xb = clustered_vectors(30, 8)
    out = build_index(TableEncoder(xb), rows(range(20)), tmp_path / "idx", IndexBuildConfig(), ENC)
    other = TableEncoder(xb * -1)
    with pytest.raises(ValueError, match=rf"encoder fingerprint {other.fingerprint()} differs"):
        add_docs(out, other, rows(range(20, 30)), ENC)
    assert other.encoded == [] and load_index(out, "cpu").ntotal == 20


def test_cli_remove_and_info(tmp_path, capsys):
    from twotower.cli import main

    xb = clustered_vectors(10, 8)
    out = build_index(TableEncoder(xb), rows(range(10)), tmp_path / "idx", IndexBuildConfig(), ENC)
    (tmp_path / "ids.txt").write_text("d1\n\nd2\n")
    assert main(["index", "remove", str(out), "--ids", "d0", "--ids-file", str(tmp_path / "ids.txt")]) == 0
    assert main(["index", "remove", str(out), "--ids", "d0"]) == 2
    assert "already removed" in capsys.readouterr().err
    assert main(["index", "info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "n_live" in text and " 7" in text and "Flat" in text


def test_cli_add_uses_the_towers_recorded_in_the_manifest(tiny_bert_dir, tmp_path, capsys):
    import json

    from twotower.cli import main
    from twotower.towers.model import TwoTower

    towers = tmp_path / "towers"
    TwoTower.from_base(str(tiny_bert_dir)).save(towers)
    for name, ids in (("a.jsonl", range(10)), ("b.jsonl", range(10, 15))):
        (tmp_path / name).write_text("".join(json.dumps({"_id": f"d{i}", "text": f"text {i}"}) + "\n" for i in ids))
    out = tmp_path / "idx"
    assert main(["index", "build", "--towers", str(towers), "--corpus", str(tmp_path / "a.jsonl"), "--out", str(out),
                 "--no-progress"]) == 0
    assert main(["index", "add", str(out), "--corpus", str(tmp_path / "b.jsonl"), "--no-progress"]) == 0
    assert "added 5 docs" in capsys.readouterr().out
    index = load_index(out, "cpu")
    assert index.ntotal == 15 and index.docs["id"][-1] == "d14"
    model = TwoTower.load(towers)
    np.testing.assert_allclose(index.cpu_index.reconstruct_n(10, 5), model.encode_results([f"text {i}" for i in
                                                                                          range(10, 15)]), atol=1e-5)
    assert main(["index", "add", str(out), "--corpus", str(tmp_path / "b.jsonl"), "--no-progress"]) == 2
    assert "already in index" in capsys.readouterr().err
