"""The query-time fast paths: cached per-call faiss parameters, blank doc columns skipped, hits built in bulk.

Each one must give exactly what the slow path gave: the nprobe a caller asks for (also after another value
was cached), tombstones never returned, titles/metadata when a corpus has them, fresh metadata dicts.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest


class VectorTable:
    """Encoder protocol over precomputed vectors: the text of doc i is ``"doc i"``."""

    def __init__(self, xb: np.ndarray) -> None:
        self.xb, self.dim = xb, int(xb.shape[1])

    def encode(self, texts: list[str], batch_size: int = 64, show_progress: bool = False) -> np.ndarray:
        return self.xb[[int(t.rsplit(" ", 1)[-1]) for t in texts]]


class NoTower:
    """A query tower stand-in for ``search_vectors`` tests (vectors come in ready-made)."""

    dim = 32

    def eval(self) -> NoTower:
        return self

    def encode(self, texts: list[str], batch_size: int = 64, amp_dtype: object = None) -> np.ndarray:
        return np.zeros((len(texts), self.dim), np.float32)


def _build(xb: np.ndarray, factory: str, out: Path, titles: bool = False) -> Path:
    from twotower.index.build import build_index
    from twotower.index.config import EncodeConfig, IndexBuildConfig

    corpus = [{"_id": f"d{i}", "title": f"t{i}" if titles and i % 2 else "", "text": f"doc {i}",
               **({"source": f"s{i}"} if titles and i == 3 else {})} for i in range(len(xb))]
    return build_index(VectorTable(xb), corpus, out, IndexBuildConfig(factory=factory), EncodeConfig(progress=False))


@pytest.fixture(scope="module")
def vectors() -> tuple[np.ndarray, np.ndarray]:
    from twotower.index.synthetic import clustered_vectors

    data = clustered_vectors(2000 + 20, 32, seed=3)
    return data[:2000], data[2000:]


@pytest.fixture(scope="module")
def ivf_dir(vectors, tmp_path_factory) -> Path:
    return _build(vectors[0], "IVF16,Flat", tmp_path_factory.mktemp("fast") / "ivf")


def test_cached_params_follow_the_requested_nprobe(vectors, ivf_dir) -> None:
    from twotower.index.load import load_index

    xb, xq = vectors
    exact = np.argsort(-(xq @ xb.T), axis=1)[:, :10]
    loaded = load_index(ivf_dir, device="cpu")
    narrow1 = loaded.search(xq, 10, nprobe=1)[1]
    full = loaded.search(xq, 10, nprobe=16)[1]  # every list: exact
    narrow2 = loaded.search(xq, 10, nprobe=1)[1]  # served from the cache
    np.testing.assert_array_equal(full, exact)
    np.testing.assert_array_equal(narrow1, narrow2)
    assert not np.array_equal(narrow1, full), "nprobe=1 of 16 lists should miss some neighbours here"
    default = loaded.search(xq, 10)[1]
    np.testing.assert_array_equal(default, loaded.search(xq, 10, nprobe=loaded.search_defaults["nprobe"])[1])


def test_tombstones_stay_excluded_with_cached_params(vectors, ivf_dir, tmp_path) -> None:
    import shutil

    from twotower.index.load import load_index
    from twotower.index.mutate import remove_docs

    xb, xq = vectors
    work = tmp_path / "ivf"
    shutil.copytree(ivf_dir, work)
    first = load_index(work, device="cpu").search(xq, 5, nprobe=16)[1]
    gone = sorted({f"d{i}" for i in first[:, 0]})
    remove_docs(work, gone)
    loaded = load_index(work, device="cpu")
    removed = {int(g[1:]) for g in gone}
    scores = xq @ xb.T
    scores[:, sorted(removed)] = -np.inf
    exact_live = np.argsort(-scores, axis=1)[:, :5]
    for _ in range(2):  # the second call uses the cached parameter object
        I = loaded.search(xq, 5, nprobe=16)[1]
        assert not removed & set(I.ravel().tolist())
        np.testing.assert_array_equal(I, exact_live)


def test_blank_columns_are_skipped_but_filled(vectors, ivf_dir) -> None:
    from twotower.index.load import load_index
    from twotower.retrieval.doctable import DocTable
    from twotower.retrieval.retriever import Retriever

    xq = vectors[1]
    retriever = Retriever(load_index(ivf_dir, device="cpu"), NoTower())
    assert retriever.docs.blank_columns == {"title", "metadata"}
    hits = retriever.search_vectors(xq[:3], 4)
    assert [[h.rank for h in row] for row in hits] == [[1, 2, 3, 4]] * 3
    assert all(h.title == "" and h.metadata == {} for row in hits for h in row)
    hits[0][0].metadata["x"] = 1  # each hit owns its dict
    assert hits[0][1].metadata == {}
    assert DocTable(retriever.index.docs, max_in_memory_bytes=0).blank_columns == {"title", "metadata"}


def test_titles_and_metadata_still_come_back(vectors, tmp_path) -> None:
    from twotower.index.load import load_index
    from twotower.retrieval.retriever import Retriever

    xb = vectors[0][:50]
    retriever = Retriever(load_index(_build(xb, "Flat", tmp_path / "flat", titles=True), device="cpu"), NoTower())
    assert retriever.docs.blank_columns == frozenset()
    hits = {h.id: h for h in retriever.search_vectors(xb[[1, 2, 3]], 1)[0] +
            retriever.search_vectors(xb[[2]], 1)[0] + retriever.search_vectors(xb[[3]], 1)[0]}
    assert hits["d1"].title == "t1" and hits["d2"].title == "" and hits["d3"].metadata == {"source": "s3"}


def test_hit_lists_with_fewer_live_docs_than_k(vectors, tmp_path) -> None:
    from twotower.index.load import load_index
    from twotower.retrieval.retriever import Retriever

    xb = vectors[0][:3]
    retriever = Retriever(load_index(_build(xb, "Flat", tmp_path / "three"), device="cpu"), NoTower())
    hits = retriever.search_vectors(vectors[1][:2], 10)
    assert [[h.rank for h in row] for row in hits] == [[1, 2, 3], [1, 2, 3]]
    assert all(sorted(h.id for h in row) == ["d0", "d1", "d2"] for row in hits)
