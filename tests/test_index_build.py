"""Building, loading and validating INDEX dirs (index.build / index.load / index.corpus / index.encode)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

faiss = pytest.importorskip("faiss")

from twotower.index.build import build_index  # noqa: E402
from twotower.index.config import EncodeConfig, IndexBuildConfig  # noqa: E402
from twotower.index.corpus import iter_docs  # noqa: E402
from twotower.index.faiss_utils import build_faiss, search  # noqa: E402
from twotower.index.load import load_index  # noqa: E402
from twotower.index.store import FORMAT_VERSION, read_manifest  # noqa: E402
from twotower.index.synthetic import TableEncoder, brute_force, clustered_vectors  # noqa: E402

ENC = EncodeConfig(progress=False)



def rows(n: int, start: int = 0) -> list[dict]:
    return [{"_id": f"d{i}", "title": "T" if i % 2 else "", "text": f"doc {i}", "lang": "en"}
            for i in range(start, start + n)]


def write_jsonl(path: Path, items: list) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in items))
    return path


def test_flat_build_load_search_equals_brute_force(tmp_path):
    xb = clustered_vectors(1000, 16, seed=1)
    out = build_index(TableEncoder(xb), rows(1000), tmp_path / "idx", IndexBuildConfig(),
                      EncodeConfig(chunk_size=300, progress=False))
    index = load_index(out, device="cpu")
    assert index.ntotal == index.n_live == 1000 and index.dim == 16 and index.device == "cpu"
    m = index.manifest
    assert m["factory"] == "Flat" and m["metric"] == "inner_product" and m["format_version"] == FORMAT_VERSION
    assert m["fingerprint"] == TableEncoder(xb).fingerprint() and m["normalized"] is True
    assert index.docs[3] == {"id": "d3", "title": "T", "text": "doc 3", "metadata": '{"lang": "en"}'}
    assert index.docs["id"] == [f"d{i}" for i in range(1000)]  # row i = faiss id i
    D, I = index.search(xb[:20], 10)
    D0, I0 = brute_force(xb, xb[:20], 10)
    np.testing.assert_array_equal(I, I0)
    np.testing.assert_allclose(D, D0, atol=1e-5)
    with pytest.raises(ValueError, match="xq has dim 8 but the index has dim 16"):
        index.search(np.zeros((1, 8), np.float32), 3)


@pytest.mark.parametrize("factory", ["IVF32,Flat", "HNSW16"])
def test_save_load_round_trip_identical(tmp_path, factory):
    xb = clustered_vectors(3000, 16, seed=2)
    out = build_index(TableEncoder(xb), rows(3000), tmp_path / "idx", IndexBuildConfig(factory=factory), ENC)
    a, b = load_index(out, "cpu"), load_index(out, "cpu")
    D1, I1 = a.search(xb[:50], 10)
    D2, I2 = b.search(xb[:50], 10)
    np.testing.assert_array_equal(I1, I2)
    np.testing.assert_array_equal(D1, D2)
    # the same index built in memory (training sample = all rows, as n < train size) answers identically
    defaults = a.manifest["search_defaults"]
    D0, I0 = search(build_faiss(xb, factory), xb[:50], 10, defaults.get("nprobe"), defaults.get("ef_search"))
    np.testing.assert_array_equal(I1, I0)
    np.testing.assert_allclose(D1, D0, atol=1e-6)


def test_float16_chunks_and_auto_compressed_factory(tmp_path):
    xb = clustered_vectors(3000, 16, seed=3)
    # 3000 x 16 floats = 192 KB do not fit 100 KB, 1-byte scalar codes do
    cfg = IndexBuildConfig(memory_budget="100KB")
    enc = EncodeConfig(dtype="float16", progress=False)
    index = load_index(build_index(TableEncoder(xb), rows(3000), tmp_path / "idx", cfg, enc), "cpu")
    assert index.manifest["factory"] == "IVF64,SQ8" and index.search_defaults == {"nprobe": 8}
    assert "float vectors exceed the budget" in index.manifest["build_config"]["factory_reason"]
    _, I = index.search(xb[:100], 1)
    assert (I[:, 0] == np.arange(100)).mean() > 0.95


def test_jsonl_parquet_and_beir_dir_corpora(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    xb = clustered_vectors(40, 8)
    beir = tmp_path / "beir"
    beir.mkdir()
    write_jsonl(beir / "corpus.jsonl", rows(40))
    pq.write_table(pa.Table.from_pylist(rows(40)), tmp_path / "c.parquet")
    for i, corpus in enumerate([beir / "corpus.jsonl", beir, tmp_path / "c.parquet"]):
        index = load_index(build_index(TableEncoder(xb), corpus, tmp_path / f"i{i}", IndexBuildConfig(), ENC), "cpu")
        assert index.docs["id"] == [f"d{j}" for j in range(40)] and index.docs[1]["title"] == "T"


@pytest.mark.parametrize("lines,message", [
    ([{"_id": "a", "text": "x 0"}, "{not json", {"_id": "c", "text": "x 2"}], r"corpus.jsonl: line 2: malformed JSON"),
    ([{"_id": "a", "text": "x 0"}, {"_id": "a", "text": "x 1"}], r"line 2: duplicate id 'a' \(first at line 1\)"),
    ([{"_id": "a", "title": "t"}], r"line 1: missing field 'text' \(id 'a'\)"),
    ([{"text": "x 0"}], r"line 1: missing field '_id'"),
    ([{"_id": "a", "text": 5}], r"field 'text' must be a string, got int"),
    (["[1, 2]"], r"line 1: expected a JSON object, got list"),
])
def test_corpus_validation_names_line_and_field(tmp_path, lines, message):
    corpus = write_jsonl(tmp_path / "corpus.jsonl", lines)
    with pytest.raises(ValueError, match=message):
        list(iter_docs(corpus))
    with pytest.raises(ValueError, match=message):
        build_index(TableEncoder(np.eye(3, dtype=np.float32)), corpus, tmp_path / "idx", IndexBuildConfig(), ENC)
    assert not (tmp_path / "idx").exists()


def test_killed_build_keeps_previous_index_and_rerun_resumes(tmp_path):
    xb = clustered_vectors(350, 8, seed=4)
    out = tmp_path / "idx"
    build_index(TableEncoder(xb[:100]), rows(100), out, IndexBuildConfig(), ENC)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    cfg, enc = IndexBuildConfig(overwrite=True), EncodeConfig(chunk_size=100, progress=False)
    crashing = TableEncoder(xb, fail_after=250)  # chunks 0 and 1 finish, chunk 2 crashes
    with pytest.raises(RuntimeError, match="simulated crash"):
        build_index(crashing, rows(350), out, cfg, enc)
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert load_index(out, "cpu").ntotal == 100
    assert sorted(p.name for p in tmp_path.iterdir()) == [".idx.work", "idx"]  # no half-written index dir
    rerun = TableEncoder(xb)
    build_index(rerun, rows(350), out, cfg, enc)
    # finished chunks were not re-encoded (text encoded = title + " " + text when there is a title)
    assert rerun.encoded == [("T " if i % 2 else "") + f"doc {i}" for i in range(200, 350)]
    index = load_index(out, "cpu")
    assert index.ntotal == 350 and index.docs["id"] == [f"d{i}" for i in range(350)]
    np.testing.assert_array_equal(index.search(xb, 1)[1][:, 0], np.arange(350))
    assert not (tmp_path / ".idx.work").exists()


def test_resume_reencodes_a_changed_chunk(tmp_path):
    xb = clustered_vectors(300, 8, seed=5)
    cfg = EncodeConfig(chunk_size=100, keep_work=True, progress=False)
    build_index(TableEncoder(xb), rows(300), tmp_path / "a", IndexBuildConfig(), cfg)
    changed = rows(300)
    changed[150]["text"] = "doc 299"  # chunk 1 now differs
    enc = TableEncoder(xb)
    build_index(enc, changed, tmp_path / "a", IndexBuildConfig(overwrite=True),
                EncodeConfig(chunk_size=100, work_dir=str(tmp_path / ".a.work"), progress=False))
    assert len(enc.encoded) == 100 and "doc 299" in enc.encoded and "T doc 151" in enc.encoded


def test_errors_before_any_encoding(tmp_path):
    xb = clustered_vectors(10, 8)
    enc = TableEncoder(xb)
    with pytest.raises(ValueError, match="faiss rejected factory string 'IVF8,Nope'"):
        build_index(enc, rows(10), tmp_path / "a", IndexBuildConfig(factory="IVF8,Nope"), ENC)
    with pytest.raises(ValueError, match="memory budget 10 B is too small"):
        build_index(enc, rows(10), tmp_path / "a", IndexBuildConfig(memory_budget="10"), ENC)
    assert enc.encoded == []
    build_index(enc, rows(10), tmp_path / "a", IndexBuildConfig(), ENC)
    with pytest.raises(FileExistsError, match="already exists; pass --overwrite"):
        build_index(enc, rows(10), tmp_path / "a", IndexBuildConfig(), ENC)


@pytest.fixture
def small_index(tmp_path) -> Path:
    xb = clustered_vectors(50, 8)
    return build_index(TableEncoder(xb), rows(50), tmp_path / "idx", IndexBuildConfig(), ENC)


def test_truncated_or_corrupt_index_file_is_named(small_index):
    path = small_index / "index.faiss"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cannot read faiss index '.*index.faiss' \(truncated or corrupt"):
        load_index(small_index)
    path.write_bytes(b"garbage" * 10)
    with pytest.raises(ValueError, match=r"index.faiss' \(truncated or corrupt"):
        load_index(small_index)
    path.unlink()
    with pytest.raises(FileNotFoundError, match="index.faiss' does not exist"):
        load_index(small_index)


def test_manifest_checks(small_index, tmp_path):
    m = read_manifest(small_index)
    (small_index / "manifest.json").write_text(json.dumps({**m, "format_version": FORMAT_VERSION + 1}))
    with pytest.raises(ValueError, match="format_version 2 is newer than this twotower supports"):
        load_index(small_index)
    (small_index / "manifest.json").write_text(json.dumps({**m, "ntotal": 49}))
    with pytest.raises(ValueError, match="50 vectors but manifest.json says 49"):
        load_index(small_index)
    with pytest.raises(FileNotFoundError, match="not an index dir"):
        load_index(tmp_path)


def test_fingerprint_mismatch_names_both(small_index):
    index = load_index(small_index, "cpu")
    index.check_fingerprint(index.manifest["fingerprint"])
    with pytest.raises(ValueError, match=rf"fingerprint deadbeef does not match .*{index.manifest['fingerprint']}"):
        index.check_fingerprint("deadbeef")


def test_cuda_device_without_gpu_is_a_clear_error(small_index):
    import torch

    if torch.cuda.is_available():
        pytest.skip("has a GPU")
    with pytest.raises(ValueError, match="device 'cuda' requested but torch sees no CUDA GPU"):
        load_index(small_index, device="cuda")
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        load_index(small_index, device="tpu")


def test_cli_build_info_with_real_towers(tiny_bert_dir, tmp_path, capsys):
    from twotower.cli import main
    from twotower.towers.model import TwoTower

    towers = tmp_path / "towers"
    TwoTower.from_base(str(tiny_bert_dir)).save(towers)
    docs = [{"_id": f"p{i}", "title": "Title" if i % 3 == 0 else "", "text": f"passage number {i} " + "word " * (i % 7)}
            for i in range(40)]
    corpus = write_jsonl(tmp_path / "corpus.jsonl", docs)
    out = tmp_path / "idx"
    assert main(["index", "build", "--towers", str(towers), "--corpus", str(corpus), "--out", str(out),
                 "--chunk-size", "16", "--batch-size", "8", "--no-progress"]) == 0
    model = TwoTower.load(towers)
    index = load_index(out, "cpu")
    index.check_fingerprint(model.fingerprint())
    assert index.towers_dir == towers.resolve()
    texts = [f"{d['title']} {d['text']}" if d["title"] else d["text"] for d in docs]
    xb = model.encode_results(texts)
    np.testing.assert_allclose(index.cpu_index.reconstruct_n(0, 40), xb, atol=1e-5)
    _, I = index.search(model.encode_queries(["passage number 7"]), 5)
    assert I.shape == (1, 5) and (I >= 0).all()
    capsys.readouterr()
    assert main(["index", "info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["ntotal"] == 40 and info["factory"] == "Flat" and info["fingerprint"] == model.fingerprint()
    assert main(["index", "build", "--towers", str(towers), "--corpus", str(corpus), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err


def test_crash_while_writing_the_index_dir_keeps_previous(tmp_path, monkeypatch):
    import twotower.index.build

    xb = clustered_vectors(60, 8)
    out = build_index(TableEncoder(xb), rows(50), tmp_path / "idx", IndexBuildConfig(), ENC)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(twotower.index.build, "save_docs", crash)
    with pytest.raises(OSError, match="disk full"):
        build_index(TableEncoder(xb), rows(60), out, IndexBuildConfig(overwrite=True), ENC)
    assert load_index(out, "cpu").ntotal == 50
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".idx.tmp")] == []


def test_encoder_without_fingerprint_never_resumes(tmp_path, capsys):
    from twotower.index.encode import encode_corpus

    class Plain:  # the bare Encoder protocol: no fingerprint()
        dim = 8

        def __init__(self) -> None:
            self.calls = 0

        def encode(self, texts, batch_size=64, show_progress=False):
            self.calls += len(texts)
            return clustered_vectors(len(texts), 8)

    work = tmp_path / "work"
    encode_corpus(Plain(), rows(30), work, EncodeConfig(chunk_size=10, progress=False))
    again = Plain()
    enc = encode_corpus(again, rows(30), work, EncodeConfig(chunk_size=10, progress=False))
    assert again.calls == 30 and enc.n == 30
    assert "has no fingerprint() to tell its vectors apart" in capsys.readouterr().err


def test_concurrent_searches_with_different_params_match_serial(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    xb = clustered_vectors(4000, 16, seed=6)
    index = load_index(build_index(TableEncoder(xb), rows(4000), tmp_path / "idx",
                                   IndexBuildConfig(factory="IVF64,Flat"), ENC), "cpu")
    jobs = [(xb[i * 10 : i * 10 + 10], 1 + i % 8) for i in range(32)]
    serial = [index.search(xq, 5, nprobe=p) for xq, p in jobs]
    with ThreadPoolExecutor(8) as pool:
        parallel = list(pool.map(lambda job: index.search(job[0], 5, nprobe=job[1]), jobs))
    for (d0, i0), (d1, i1) in zip(serial, parallel):
        np.testing.assert_array_equal(i0, i1)
        np.testing.assert_array_equal(d0, d1)


@pytest.mark.gpu
def test_gpu_load_matches_cpu(tmp_path):
    xb = clustered_vectors(5000, 32, seed=7)
    out = build_index(TableEncoder(xb), rows(5000), tmp_path / "idx", IndexBuildConfig(), ENC)
    from twotower.index.mutate import remove_docs

    remove_docs(out, ["d1", "d2"])
    cpu, gpu = load_index(out, "cpu"), load_index(out, "cuda")
    assert gpu.device in ("faiss-gpu", "torch-cuda")
    D0, I0 = cpu.search(xb[:50], 10)
    D1, I1 = gpu.search(xb[:50], 10)
    np.testing.assert_array_equal(I0, I1)
    np.testing.assert_allclose(D0, D1, atol=1e-4)
    assert not np.isin(I1, [1, 2]).any()


def test_duplicate_ids_in_rows_and_in_a_generator():
    dup = [{"_id": "a", "text": "x"}, {"_id": "b", "text": "y"}, {"_id": "a", "text": "z"}]
    for corpus in (dup, (r for r in dup)):
        with pytest.raises(ValueError, match="row 2: duplicate id 'a'"):
            list(iter_docs(corpus))


def test_auto_train_sample_fits_a_quarter_of_the_memory_budget(tmp_path, monkeypatch):
    import twotower.index.build as build_module
    from twotower.index.build import auto_train_size

    gib = 1 << 30
    # Plenty of memory: 64 per list, at least 50k, never more than n.
    assert auto_train_size(10_000_000, 4096, 384, 64 * gib) == 64 * 4096
    assert auto_train_size(10_000_000, 256, 384, 64 * gib) == 50_000
    assert auto_train_size(30_000, 256, 384, 64 * gib) == 30_000
    # 64 MiB budget, dim 384: a quarter is 16 MiB = 10,922 float32 vectors; faiss's 39 per list is the floor.
    assert auto_train_size(10_000_000, 128, 384, 64 << 20) == (64 << 20) // 4 // (4 * 384)
    assert auto_train_size(10_000_000, 4096, 384, 64 << 20) == 39 * 4096
    # The build passes the budget through: the sample it trains on is the capped size.
    seen = []
    real = build_module.train_index
    monkeypatch.setattr(build_module, "train_index", lambda index, xt: (seen.append(len(xt)), real(index, xt))[1])
    xb = clustered_vectors(3000, 16, seed=1)
    build_index(TableEncoder(xb), rows(3000), tmp_path / "i",
                IndexBuildConfig(factory="IVF8,Flat", memory_budget="64K"), ENC)
    assert seen == [max((64 << 10) // 4 // (4 * 16), 39 * 8)]
