"""Sharded encoding (``index build --shard-id/--num-shards``) and ``index merge``: the merged index answers as a
single-machine build; bad shard sets are refused naming the shard; a killed shard build resumes."""
from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

faiss = pytest.importorskip("faiss")

from twotower.index.build import build_index, train_empty  # noqa: E402
from twotower.index.config import EncodeConfig, IndexBuildConfig, MergeConfig, ShardConfig  # noqa: E402
from twotower.index.load import load_index  # noqa: E402
from twotower.index.merge import index_shards, merge_shards, open_shards, shard_indexes  # noqa: E402
from twotower.index.mutate import add_docs, remove_docs  # noqa: E402
from twotower.index.shard import build_shard, read_shard, resolve_shard, shard_dir, shard_range  # noqa: E402
from twotower.index.synthetic import TableEncoder, ann_recall, brute_force, clustered_vectors  # noqa: E402

ENC = EncodeConfig(progress=False)
QUIET = dict(progress=False)
N = 3000
XB = clustered_vectors(N, 16, seed=11)



def rows(n: int = N) -> list[dict]:
    return [{"_id": f"d{i}", "title": "T" if i % 2 else "", "text": f"doc {i}"} for i in range(n)]


def build_shards(root: Path, n_shards: int = 3, encoder: TableEncoder | None = None, corpus: list | Path | None = None,
                 ids: range | None = None) -> Path:
    for i in ids if ids is not None else range(n_shards):
        build_shard(encoder or TableEncoder(XB), corpus or rows(), root, ShardConfig(i, n_shards),
                    EncodeConfig(chunk_size=400, progress=False))
    return root


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """3 shards of the N-row corpus (shared read-only by the tests that only merge)."""
    return build_shards(tmp_path_factory.mktemp("sharded") / "shards")


def test_shard_ranges_tile_the_corpus():
    for n_rows, n in [(10, 3), (3000, 3), (7, 7), (100, 8)]:
        ranges = [shard_range(n_rows, i, n) for i in range(n)]
        assert ranges[0][0] == 0 and ranges[-1][1] == n_rows
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
        assert max(hi - lo for lo, hi in ranges) - min(hi - lo for lo, hi in ranges) <= 1


@pytest.mark.parametrize("method", ["add", "merge_from"])
def test_flat_merge_equals_single_build(tmp_path, shards, method):
    single = load_index(build_index(TableEncoder(XB), rows(), tmp_path / "single", IndexBuildConfig(), ENC), "cpu")
    out = merge_shards([shards], tmp_path / "merged", IndexBuildConfig(), MergeConfig(method, **QUIET))
    merged = load_index(out, "cpu")  # the load checks (ntotal = docs = manifest) pass
    assert merged.manifest["factory"] == "Flat" and merged.ntotal == N
    assert merged.docs["id"] == single.docs["id"] == [f"d{i}" for i in range(N)]  # faiss id i = corpus row i
    assert merged.docs[7] == single.docs[7]
    merged.check_fingerprint(TableEncoder(XB).fingerprint())
    D0, I0 = single.search(XB[:200], 10)
    D1, I1 = merged.search(XB[:200], 10)
    np.testing.assert_array_equal(I1, I0)
    np.testing.assert_array_equal(D1, D0)
    m = merged.manifest
    assert [s["shard_id"] for s in m["shards"]] == [0, 1, 2] and m["shards"][1]["rows"] == [1000, 2000]
    assert m["history"][0]["op"] == "merge" and m["build_config"]["method"] == method


@pytest.mark.parametrize("method", ["add", "merge_from", "ondisk"])
def test_ivf_merge_trains_once_and_equals_single_ivf_build(tmp_path, shards, method):
    # train_size < N: the sample drawn across shards is the very sample a single build with the same seed draws
    cfg = IndexBuildConfig(factory="IVF32,Flat", train_size=1500, seed=3)
    single = load_index(build_index(TableEncoder(XB), rows(), tmp_path / "single", cfg, ENC), "cpu")
    merged = load_index(merge_shards([shards], tmp_path / "merged", cfg, MergeConfig(method, **QUIET)), "cpu")
    np.testing.assert_array_equal(faiss.extract_index_ivf(merged.cpu_index).quantizer.reconstruct_n(0, 32),
                                  faiss.extract_index_ivf(single.cpu_index).quantizer.reconstruct_n(0, 32))
    xq = XB[::15] + 0.01
    D0, I0 = single.search(xq, 10)
    D1, I1 = merged.search(xq, 10)
    np.testing.assert_array_equal(I1, I0)
    np.testing.assert_array_equal(D1, D0)
    gt = brute_force(XB, xq, 10)[1]
    assert ann_recall(I1, gt, 10) == ann_recall(I0, gt, 10) > 0.8
    assert merged.search_defaults == single.search_defaults
    if method == "ondisk":
        assert (tmp_path / "merged" / "index.ivfdata").is_file() and merged.manifest["ivfdata"] == "index.ivfdata"
        assert not (tmp_path / ".merged.work").exists()


def test_ondisk_index_moves_supports_remove_and_refuses_add(tmp_path, shards):
    cfg = IndexBuildConfig(factory="IVF16,Flat")
    out = merge_shards([shards], tmp_path / "a", cfg, MergeConfig("ondisk", **QUIET))
    moved = tmp_path / "elsewhere" / "idx"
    moved.parent.mkdir()
    shutil.move(str(out), moved)  # the lists are found next to index.faiss, not at the path they were written to
    D0, I0 = load_index(moved, "cpu").search(XB[:20], 5)
    assert (I0[:, 0] == np.arange(20)).all()
    remove_docs(moved, ["d3"])
    index = load_index(moved, "cpu")
    assert index.n_live == N - 1 and 3 not in index.search(XB[:20], 5)[1]
    with pytest.raises(ValueError, match="keeps its IVF lists on disk"):
        add_docs(moved, TableEncoder(XB), [{"_id": "new", "text": "doc 0"}], ENC)


def test_index_shards_serves_per_shard_indexes_like_the_merged_index(tmp_path, shards):
    cfg = IndexBuildConfig(factory="IVF32,Flat")
    merged = load_index(merge_shards([shards], tmp_path / "m", cfg, MergeConfig(**QUIET)), "cpu")
    whole = open_shards([shards])
    assert whole.n == N and [p.n for p in whole.parts] == [1000, 1000, 1000]
    served = index_shards(list(shard_indexes(train_empty(whole, "IVF32,Flat", cfg), whole.parts, progress=False)))
    D0, I0 = merged.search(XB[:100], 10, nprobe=4)
    D1, I1 = served.search(XB[:100], 10, params=faiss.SearchParametersIVF(nprobe=4))
    np.testing.assert_array_equal(I1, I0)
    np.testing.assert_array_equal(D1, D0)


def test_missing_duplicate_and_foreign_shards_are_named(tmp_path, shards):
    s = [shard_dir(shards, i, 3) for i in range(3)]
    cfg = IndexBuildConfig()
    with pytest.raises(ValueError, match=r"shard\(s\) 2 of 3 missing \(have 0, 1\)"):
        merge_shards(s[:2], tmp_path / "m", cfg)
    with pytest.raises(ValueError, match=rf"shard 1 of 3 given twice: '{s[1]}' and '{s[1]}'"):
        merge_shards([*s, s[1]], tmp_path / "m", cfg)
    # shard 2 encoded by other towers (another fingerprint)
    other = build_shards(tmp_path / "other", encoder=TableEncoder(XB * -1), ids=range(2, 3))
    with pytest.raises(ValueError, match="differ in result tower fingerprint"):
        merge_shards([*s[:2], shard_dir(other, 2, 3)], tmp_path / "m", cfg)
    # shard 2 encoded from an edited corpus
    edited = rows()
    edited[5]["text"] = "doc 6"
    changed = build_shards(tmp_path / "changed", corpus=edited, ids=range(2, 3))
    with pytest.raises(ValueError, match="come from different corpora: .* sha256"):
        merge_shards([*s[:2], shard_dir(changed, 2, 3)], tmp_path / "m", cfg)
    # shards of a 4-way split do not complete a 3-way one
    four = build_shards(tmp_path / "four", n_shards=4, ids=range(3, 4))
    with pytest.raises(ValueError, match="differ in --num-shards: 3 vs 4"):
        merge_shards([*s, four], tmp_path / "m", cfg)
    with pytest.raises(FileNotFoundError, match="holds no finished shard"):
        merge_shards([tmp_path], tmp_path / "m", cfg)
    towers = tmp_path / "towers"  # --towers of another pair (only its twotower.json is read)
    towers.mkdir()
    (towers / "twotower.json").write_text(json.dumps({"format_version": 1, "dim": 32, "fingerprint": "0123abcd"}))
    with pytest.raises(ValueError, match="has result tower fingerprint 0123abcd but the shards were encoded with"):
        merge_shards(s, tmp_path / "m", cfg, towers_dir=towers)
    assert not (tmp_path / "m").exists()


def test_duplicate_id_across_shards_is_named_at_merge(tmp_path):
    dup = rows()
    dup[2500]["_id"] = "d5"  # each shard's own rows are fine; shards 0 and 2 share an id
    corpus = tmp_path / "corpus.jsonl"  # a file: a shard reads only its own rows of it
    corpus.write_text("".join(json.dumps(r) + "\n" for r in dup))
    root = build_shards(tmp_path / "shards", corpus=corpus)
    with pytest.raises(ValueError, match=r"duplicate id 'd5' at corpus row 5 \(shard 0\) and row 2500 \(shard 2\)"):
        merge_shards([root], tmp_path / "m", IndexBuildConfig(), MergeConfig(**QUIET))


def test_row_slices_of_every_corpus_format(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from twotower.index.corpus import corpus_identity, iter_docs

    items = rows(50)
    jsonl = tmp_path / "c.jsonl"  # blank lines do not count as rows
    jsonl.write_text("\n".join(json.dumps(r) + ("\n" if i % 7 == 0 else "") for i, r in enumerate(items)) + "\n")
    pq.write_table(pa.Table.from_pylist(items), tmp_path / "c.parquet", row_group_size=8)
    import datasets

    datasets.Dataset.from_list(items).save_to_disk(str(tmp_path / "saved"))
    many = tmp_path / "many"  # a dir of files read in name order: JSONL, JSONL.gz, Parquet
    (many / "sub").mkdir(parents=True)
    (many / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in items[:12]))
    with gzip.open(many / "b.jsonl.gz", "wt") as fh:
        fh.write("".join(json.dumps(r) + "\n" for r in items[12:30]))
    pq.write_table(pa.Table.from_pylist(items[30:]), many / "sub" / "c.parquet", row_group_size=8)
    (many / "README.txt").write_text("not a corpus file")
    full = [d.id for d in iter_docs(items)]
    for corpus in (items, jsonl, tmp_path / "c.parquet", tmp_path / "saved", many):
        for lo, hi in [(0, 50), (0, 17), (17, 34), (34, 50), (49, 50), (50, 50)]:
            assert [d.id for d in iter_docs(corpus, "train", lo, hi)] == full[lo:hi], (corpus, lo, hi)
        assert corpus_identity(corpus)["rows"] == 50
    assert corpus_identity(jsonl)["hashed"] == "file bytes" and corpus_identity(items)["hashed"] == "docs"
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in items[:10]) + "{broken\n")
    assert len(list(iter_docs(bad, "train", 0, 10))) == 10  # a shard that ends before the bad line never parses it
    with pytest.raises(ValueError, match="bad.jsonl: line 11: malformed JSON"):
        list(iter_docs(bad, "train", 5, 11))
    (many / "b2.jsonl").write_text(json.dumps({"_id": "x", "text": 3}) + "\n")  # row 30 now, after b.jsonl.gz
    with pytest.raises(ValueError, match="many: b2.jsonl: line 1: field 'text' must be a string"):
        list(iter_docs(many, "train", 25, 35))
    (many / "b2.jsonl").write_text(json.dumps(items[30]) + "\n")  # the id of the Parquet file's first row
    with pytest.raises(ValueError, match="many: sub/c.parquet: row 0: duplicate id 'd30' .first at b2.jsonl: line 1"):
        list(iter_docs(many))


def test_damaged_or_unfinished_shards_are_refused(tmp_path, shards):
    copy = tmp_path / "copy"
    shutil.copytree(shards, copy)
    emb = shard_dir(copy, 1, 3) / "emb-000001.npy"
    emb.write_bytes(emb.read_bytes()[:100])  # an interrupted copy
    with pytest.raises(ValueError, match=r"shard '.*shard-00001-of-00003' is damaged: emb-000001.npy has 100 bytes"):
        merge_shards([copy], tmp_path / "m", IndexBuildConfig(), MergeConfig(**QUIET))
    # a shard whose build was killed leaves only its work dir: merge says which shard and where it is
    shutil.rmtree(shard_dir(copy, 1, 3))
    (copy / ".shard-00001-of-00003.work").mkdir()
    with pytest.raises(ValueError, match=r"shard\(s\) 1 of 3 missing .*unfinished: .*shard-00001-of-00003.work"):
        merge_shards([copy], tmp_path / "m", IndexBuildConfig(), MergeConfig(**QUIET))
    with pytest.raises(FileNotFoundError, match="is not a finished shard: no shard.json"):
        merge_shards([copy / ".shard-00001-of-00003.work"], tmp_path / "m", IndexBuildConfig(), MergeConfig(**QUIET))


def test_killed_shard_build_resumes_and_rerun_is_a_no_op(tmp_path, capsys):
    root = tmp_path / "shards"
    crashing = TableEncoder(XB, fail_after=900)  # shard 1 = rows 1000..1999: chunks of 400 and 400 finish
    with pytest.raises(RuntimeError, match="simulated crash"):
        build_shards(root, encoder=crashing, ids=range(1, 2))
    assert not shard_dir(root, 1, 3).exists() and (root / ".shard-00001-of-00003.work").is_dir()
    rerun = TableEncoder(XB)
    build_shards(root, encoder=rerun, ids=range(1, 2))
    assert rerun.encoded == [("T " if i % 2 else "") + f"doc {i}" for i in range(1800, 2000)]
    assert not (root / ".shard-00001-of-00003.work").exists()
    manifest = read_shard(shard_dir(root, 1, 3))
    assert manifest["rows"] == [1000, 2000] and [c["rows"] for c in manifest["chunks"]] == [400, 400, 200]
    again = TableEncoder(XB)
    build_shards(root, encoder=again, ids=range(1, 2))
    assert again.encoded == [] and "already complete" in capsys.readouterr().err
    edited = rows()
    edited[0]["text"] = "doc 1"
    with pytest.raises(FileExistsError, match="already exists with corpus .*pass --overwrite"):
        build_shards(root, corpus=edited, ids=range(1, 2))
    build_shards(root, ids=(0, 2))
    merged = load_index(merge_shards([root], tmp_path / "idx", IndexBuildConfig(), MergeConfig(**QUIET)), "cpu")
    np.testing.assert_array_equal(merged.search(XB, 1)[1][:, 0], np.arange(N))


def test_shard_options_are_checked_before_encoding(tmp_path, capsys):
    from twotower.cli import main

    enc = TableEncoder(XB)
    cli = ["index", "build", "--towers", str(tmp_path / "no-towers"), "--corpus", "c.jsonl", "--out", str(tmp_path)]
    assert main([*cli, "--shard-id", "0", "--num-shards", "3", "--factory", "IVF8,Flat"]) == 2
    assert "--factory: the index is built once from all shards" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--shard-id 3 is outside 0..2"):
        build_shard(enc, rows(), tmp_path, ShardConfig(3, 3), ENC)
    with pytest.raises(ValueError, match="has 5 rows, fewer than --num-shards 8"):
        build_shard(enc, rows(5), tmp_path, ShardConfig(0, 8), ENC)
    with pytest.raises(ValueError, match="one-shot iterator"):
        build_shard(enc, iter(rows(5)), tmp_path, ShardConfig(0, 2), ENC)

    class Plain:
        dim = 16

        def encode(self, texts, batch_size=64, show_progress=False):
            return XB[: len(texts)]

    with pytest.raises(ValueError, match="has no fingerprint"):
        build_shard(Plain(), rows(), tmp_path, ShardConfig(0, 3), ENC)
    assert enc.encoded == [] and list(tmp_path.iterdir()) == []


def test_shard_from_torchrun_environment():
    base = ShardConfig()
    assert resolve_shard(base, ENC, {}) == (base, ENC)  # not sharded
    got, _ = resolve_shard(base, ENC, {"RANK": "2", "WORLD_SIZE": "4", "LOCAL_RANK": "0"})
    assert (got.shard_id, got.num_shards) == (2, 4)
    explicit, _ = resolve_shard(ShardConfig(shard_id=1, num_shards=8), ENC, {"RANK": "2", "WORLD_SIZE": "4"})
    assert (explicit.shard_id, explicit.num_shards) == (1, 8)
    with pytest.raises(ValueError, match="--shard-id 1 and --num-shards 0 go together"):
        resolve_shard(ShardConfig(shard_id=1), ENC, {})


def test_cli_sharded_build_and_merge_with_real_towers(tiny_bert_dir, tmp_path, monkeypatch, capsys):
    from twotower.cli import main
    from twotower.towers.model import TwoTower

    towers = tmp_path / "towers"
    TwoTower.from_base(str(tiny_bert_dir), shared=False).save(towers)
    docs = [{"_id": f"p{i}", "title": "Title" if i % 3 == 0 else "", "text": f"passage {i} " + "word " * (i % 7)}
            for i in range(40)]
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(d) + "\n" for d in docs))
    common = ["index", "build", "--towers", str(towers), "--corpus", str(corpus), "--chunk-size", "8",
              "--batch-size", "8", "--no-progress"]
    assert main([*common, "--out", str(tmp_path / "single")]) == 0
    for i in (0, 2):
        assert main([*common, "--out", str(tmp_path / "shards"), "--shard-id", str(i), "--num-shards", "3"]) == 0
    with monkeypatch.context() as env:  # what each process of `torchrun --nproc_per_node 3` sees (rank 1)
        env.setenv("RANK", "1")
        env.setenv("WORLD_SIZE", "3")
        env.setenv("LOCAL_RANK", "1")
        assert main([*common, "--out", str(tmp_path / "shards")]) == 0
    assert "twotower index merge --shards" in capsys.readouterr().out
    assert main(["index", "merge", "--shards", str(tmp_path / "shards"), "--out", str(tmp_path / "merged"),
                 "--towers", str(towers), "--no-progress"]) == 0
    single, merged = load_index(tmp_path / "single", "cpu"), load_index(tmp_path / "merged", "cpu")
    model = TwoTower.load(towers)
    merged.check_fingerprint(model.fingerprint())
    assert merged.towers_dir == towers.resolve() and merged.docs["id"] == [d["_id"] for d in docs]
    np.testing.assert_allclose(merged.cpu_index.reconstruct_n(0, 40), single.cpu_index.reconstruct_n(0, 40), atol=1e-6)
    xq = model.encode_queries(["passage 7", "title word"])
    np.testing.assert_array_equal(merged.search(xq, 10)[1], single.search(xq, 10)[1])
    capsys.readouterr()
    assert main(["index", "merge", "--shards", str(tmp_path / "shards"), "--out", str(tmp_path / "m2"),
                 "--factory", "HNSW16", "--method", "merge_from"]) == 2
    assert "cannot merge_from HNSW" in capsys.readouterr().err
    assert main(["index", "merge", "--shards", str(tmp_path / "shards"), "--out", str(tmp_path / "m2"),
                 "--method", "ondisk"]) == 2
    assert "--method ondisk needs an IVF factory" in capsys.readouterr().err


@pytest.mark.slow
def test_torchrun_one_shard_per_rank(tiny_bert_dir, tmp_path):
    """`torchrun --nproc_per_node 2 -m twotower.cli index build ...`: each rank writes its shard; the merge
    equals a single build."""
    import os
    import subprocess
    import sys

    from twotower.towers.model import TwoTower

    towers = tmp_path / "towers"
    TwoTower.from_base(str(tiny_bert_dir)).save(towers)
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"_id": f"p{i}", "text": f"passage {i} " + "w " * (i % 5)}) + "\n"
                              for i in range(30)))
    args = ["index", "build", "--towers", str(towers), "--corpus", str(corpus), "--no-progress", "--device", "cpu"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "twotower.cli", *args, "--out", str(tmp_path / "shards")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == ["shard-00000-of-00002", "shard-00001-of-00002"]
    merged = load_index(merge_shards([tmp_path / "shards"], tmp_path / "merged", IndexBuildConfig(),
                                     MergeConfig(**QUIET)), "cpu")
    single = load_index(_cli_single(args, tmp_path / "single"), "cpu")
    np.testing.assert_allclose(merged.cpu_index.reconstruct_n(0, 30), single.cpu_index.reconstruct_n(0, 30), atol=1e-6)
    assert merged.docs["id"] == single.docs["id"]


def _cli_single(args: list[str], out: Path) -> Path:
    from twotower.cli import main

    assert main([*args, "--out", str(out)]) == 0
    return out
