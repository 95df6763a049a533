"""Compact indexes re-scored with the float vectors kept on disk (``vectors.npy``), and binary (sign-bit) codes.

Reference: exact Flat search over the same vectors. When ``k * rescore`` candidates cover every live doc,
re-scored results must equal exact search (ids and scores); add/remove keep ``vectors.npy`` row-aligned.
"""
from __future__ import annotations

import json
from pathlib import Path

import faiss
import numpy as np
import pytest

COMPACT = ["IVF4,PQ8", "IVF4,SQ8", "IVF4,SQ4", "HNSW8,SQ8", "BFlat", "BIVF4"]


class VectorTable:
    """Encoder protocol over precomputed vectors: the text of doc i is ``"doc i"``."""

    def __init__(self, xb: np.ndarray) -> None:
        self.xb, self.dim = xb, int(xb.shape[1])

    def encode(self, texts: list[str], batch_size: int = 64, show_progress: bool = False) -> np.ndarray:
        return self.xb[[int(t.rsplit(" ", 1)[-1]) for t in texts]]

    def fingerprint(self) -> str:
        return "vector-table"


def _corpus(rows: range) -> list[dict]:
    return [{"_id": f"d{i}", "title": "", "text": f"doc {i}"} for i in rows]


def _build(xb: np.ndarray, factory: str, out: Path, **config) -> Path:
    from twotower.index.build import build_index
    from twotower.index.config import EncodeConfig, IndexBuildConfig

    return build_index(VectorTable(xb), _corpus(range(len(xb))), out, IndexBuildConfig(factory=factory, **config),
                       EncodeConfig(progress=False))


def _exact(xb: np.ndarray, xq: np.ndarray, k: int, rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-k over ``xb`` (optionally only ``rows`` of it), ids in ``xb`` numbering."""
    rows = np.arange(len(xb)) if rows is None else rows
    flat = faiss.IndexFlatIP(xb.shape[1])
    flat.add(xb[rows])
    D, I = flat.search(xq, k)
    return D, rows[I]


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(7)
    x = rng.standard_normal((420, 32)).astype(np.float32)  # isotropic: no ties, and compact codes do err
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x[:400], x[400:]


def test_rescore_function_equals_exact_search_over_all_candidates(data) -> None:
    from twotower.index.rescore import rescore

    xb, xq = data
    k = 10
    cand = np.tile(np.random.default_rng(0).permutation(len(xb)), (len(xq), 1))  # every doc, shuffled
    cand[:, -5:] = -1  # padding slots (a compact index returning fewer) never win
    keep = np.sort(cand[0, :-5])
    D, I = rescore(xq, cand, xb.astype(np.float16).astype(np.float32), k)
    Dr, Ir = _exact(xb.astype(np.float16).astype(np.float32), xq, k, keep)
    np.testing.assert_array_equal(I, Ir)
    np.testing.assert_allclose(D, Dr, rtol=1e-5, atol=1e-6)
    D2, I2 = rescore(xq[:2], np.full((2, 3), -1, np.int64), xb, k)  # no candidate at all
    assert (I2 == -1).all() and np.isneginf(D2).all()


@pytest.mark.parametrize("factory", COMPACT)
def test_rescored_compact_index_equals_exact_search_when_n_covers_the_list(factory, data, tmp_path) -> None:
    from twotower.index.load import load_index

    xb, xq = data
    k, N = 10, 40  # k * N = 400 = every doc
    out = _build(xb, factory, tmp_path / "idx", rescore=N, nprobe=4, ef_search=400)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["rescore"] == N and manifest["vectors"] == "float32"
    vectors = np.load(out / "vectors.npy", mmap_mode="r")
    np.testing.assert_array_equal(vectors, xb)  # row i = doc i, float32 as encoded
    loaded = load_index(out, device="cpu")
    D, I = loaded.search(xq, k)  # the manifest default re-scores
    Dr, Ir = _exact(xb, xq, k)
    np.testing.assert_array_equal(I, Ir)
    np.testing.assert_allclose(D, Dr, rtol=1e-5, atol=1e-6)
    _, I0 = loaded.search(xq, k, rescore=0)  # per-call override: the compact codes alone are not exact
    assert (I0 != Ir).any(), f"{factory} without re-scoring matched exact search: the test would prove nothing"


def test_binary_codes_are_sign_bits_searched_by_hamming(data, tmp_path) -> None:
    from twotower.index.binary import pack_signs
    from twotower.index.load import load_index

    xb, xq = data
    loaded = load_index(_build(xb, "BFlat", tmp_path / "b", keep_vectors="none"), device="cpu")
    assert loaded.vectors is None and loaded.manifest["rescore"] == 0
    assert (tmp_path / "b" / "index.faiss").stat().st_size < xb.nbytes / 16  # 1 bit per dim (+ header)
    D, I = loaded.search(xq, 5)
    codes, qcodes = pack_signs(xb), pack_signs(xq)
    hamming = np.unpackbits(qcodes[:, None, :] ^ codes[None, :, :], axis=-1).sum(-1)  # (nq, n)
    np.testing.assert_array_equal(np.sort(hamming, 1)[:, :5], np.sort(np.take_along_axis(hamming, I, 1), 1))
    np.testing.assert_allclose(D, np.cos(np.pi * np.sort(hamming, 1)[:, :5] / xb.shape[1]), rtol=1e-6)
    with pytest.raises(ValueError, match="keeps no float vectors"):
        loaded.search(xq, 5, rescore=4)


def test_add_and_remove_keep_vectors_aligned(data, tmp_path) -> None:
    from twotower.index.load import load_index
    from twotower.index.mutate import add_docs, remove_docs

    xb, xq = data
    out = _build(xb[:300], "IVF4,SQ4", tmp_path / "m", rescore=100, nprobe=4)
    corpus = _corpus(range(300, 400))
    add_docs(out, VectorTable(xb), corpus, _encode_config(tmp_path))
    np.testing.assert_array_equal(np.load(out / "vectors.npy"), xb)
    removed = np.arange(0, 400, 7)
    remove_docs(out, [f"d{i}" for i in removed])
    loaded = load_index(out, device="cpu")
    assert loaded.vectors is not None and loaded.vectors.shape == (400, 32)
    live = np.setdiff1d(np.arange(400), removed)
    D, I = loaded.search(xq, 10, rescore=40)  # 400 candidates: all live docs
    Dr, Ir = _exact(xb, xq, 10, live)
    np.testing.assert_array_equal(I, Ir)
    assert not np.isin(I, removed).any()


def _encode_config(tmp_path: Path):
    from twotower.index.config import EncodeConfig

    return EncodeConfig(progress=False, work_dir=str(tmp_path / "work"))


def test_memory_options_are_checked(data, tmp_path) -> None:
    from twotower.index.config import IndexBuildConfig
    from twotower.index.factory import auto_factory, default_rescore

    with pytest.raises(ValueError, match="--rescore 4 needs the float vectors"):
        IndexBuildConfig(rescore=4, keep_vectors="none")
    with pytest.raises(ValueError, match="--rescore must be between"):
        IndexBuildConfig(rescore=-2)
    assert IndexBuildConfig(rescore=-1).resolve_rescore(10) == (10, "float32")
    assert IndexBuildConfig(rescore=-1, keep_vectors="none").resolve_rescore(10) == (0, None)
    assert IndexBuildConfig(rescore=0, keep_vectors="float16").resolve_rescore(10) == (0, "float16")
    assert [default_rescore(f) for f in ("Flat", "IVF64,Flat", "HNSW32", "IVF64,SQ8", "HNSW32,SQ8", "IVF64,PQ48",
                                         "OPQ16,IVF64,PQ16x4fs", "BIVF64")] == [0, 0, 0, 4, 4, 10, 10, 20]
    n, d = 1_000_000, 384
    floats = auto_factory(n, d, 8 * 2**30)
    assert floats.factory.endswith(",Flat") and floats.rescore == 0
    compact = auto_factory(n, d, 600 * 2**20)  # float32 needs 1.4 GiB: SQ8 (392 MB) fits
    assert compact.factory.endswith(",SQ8") and compact.rescore == 4 and "re-scoring" in compact.reason
    with pytest.raises(ValueError, match="multiple of 8"):
        _build(data[0][:, :12], "BFlat", tmp_path / "bad")


def test_rescore_override_through_retriever_cli_and_http(tiny_bert_dir, tmp_path, capsys) -> None:
    """k * rescore covering all 60 docs of a binary index gives the exact ranking, per call, in every front end."""
    from fastapi.testclient import TestClient

    from tests.conftest import QUERIES, make_corpus
    from twotower import cli as twotower_cli
    from twotower.index.build import build_index
    from twotower.index.config import EncodeConfig, IndexBuildConfig
    from twotower.retrieval.config import ServeConfig
    from twotower.retrieval.retriever import Retriever
    from twotower.retrieval.server import create_app
    from twotower.towers.inference import query_encoder, result_encoder
    from twotower.towers.model import TwoTower

    towers = tmp_path / "towers"
    TwoTower.from_base(str(tiny_bert_dir), shared=False, query_max_length=16, result_max_length=32).save(towers)
    model = TwoTower.load(towers)
    corpus = make_corpus(60)
    out = build_index(result_encoder(model), corpus, tmp_path / "index", IndexBuildConfig(factory="BFlat", rescore=0,
                      keep_vectors="float32"), EncodeConfig(progress=False), towers_dir=towers)
    xb = np.load(out / "vectors.npy")
    D_exact, exact = _exact(xb, query_encoder(model).encode(QUERIES), 5)
    want = [sorted(corpus[i]["_id"] for i in row) for row in exact]  # sets: a random tiny model makes near-ties

    def ids(results: list) -> list[list[str]]:
        return [sorted(h["id"] if isinstance(h, dict) else h.id for h in row) for row in results]

    r = Retriever.load(out, device="cpu")
    hits = r.search(QUERIES, k=5, rescore=12)
    assert ids(hits) == want
    np.testing.assert_allclose([[h.score for h in row] for row in hits], D_exact, rtol=1e-5)  # exact cosines
    assert ids(r.search(QUERIES, k=5)) != want  # default 0: Hamming ranking alone
    with pytest.raises(ValueError, match="rescore must be an integer between 0 and 1000"):
        r.search(QUERIES, k=5, rescore=-1)
    with TestClient(create_app(ServeConfig(index=""), r)) as client:
        got = client.post("/search", json={"queries": QUERIES, "k": 5, "rescore": 12}).json()["results"]
        assert ids(got) == want
        bad = client.post("/search", json={"queries": QUERIES, "k": 5, "rescore": 1001})
        assert bad.status_code == 422 and "rescore must be an integer between 0 and 1000" in bad.json()["error"]
    capsys.readouterr()
    assert twotower_cli.main(["search", "--index", str(out), QUERIES[0], "-k", "5", "--rescore", "12", "--json",
                              "--device", "cpu"]) == 0
    assert ids([json.loads(capsys.readouterr().out)["hits"]]) == want[:1]
    assert twotower_cli.main(["index", "info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["ram_bytes_per_doc"] < 32 / 8 + 2 and info["vectors_bytes_per_doc"] > 32 * 4  # header amortised


def test_auto_under_a_small_budget_builds_compact_codes_with_rescoring(data, tmp_path) -> None:
    from twotower.index.load import load_index

    xb, xq = data
    out = _build(xb, "auto", tmp_path / "auto", memory_budget="40KB")  # floats: 51 KB, SQ8 codes: 17 KB
    m = json.loads((out / "manifest.json").read_text())
    assert (m["factory"], m["rescore"], m["vectors"]) == ("IVF8,SQ8", 4, "float32"), m["factory"]
    assert "re-scoring 4x k" in m["build_config"]["factory_reason"]
    D, I = load_index(out, device="cpu").search(xq, 5, nprobe=8, rescore=80)  # 400 candidates: exact
    np.testing.assert_array_equal(I, _exact(xb, xq, 5)[1])
