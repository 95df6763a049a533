"""index.faiss_utils / index.factory / index.torch_search on synthetic vectors with exact ground truth."""
from __future__ import annotations

import numpy as np
import pytest

faiss = pytest.importorskip("faiss")

from twotower.index.factory import EXACT_MAX, auto_factory, choose_nlist, default_nprobe, parse_memory  # noqa: E402
from twotower.index.faiss_utils import build_faiss, search, search_defaults  # noqa: E402
from twotower.index.synthetic import ann_recall, brute_force, clustered_vectors  # noqa: E402
from twotower.index.torch_search import TorchFlatSearcher  # noqa: E402


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    x = clustered_vectors(20_200, 32, seed=3)
    xb, xq = x[:20_000], x[20_000:]
    _, gt = brute_force(xb, xq, 10)
    return xb, xq, gt


def test_flat_equals_brute_force(data):
    xb, xq, _ = data
    D, I = search(build_faiss(xb[:3000], "Flat"), xq, 10)
    D0, I0 = brute_force(xb[:3000], xq, 10)
    np.testing.assert_array_equal(I, I0)
    np.testing.assert_allclose(D, D0, rtol=1e-5, atol=1e-5)
    assert D.dtype == np.float32 and I.dtype == np.int64


@pytest.mark.parametrize("factory", [f"IVF{choose_nlist(20_000)},Flat", "IVF128,SQ8", "HNSW32"])
def test_ann_recall_at_default_search_params(data, factory):
    xb, xq, gt = data
    index = build_faiss(xb, factory)
    _, I = search(index, xq, 10, **search_defaults(index))
    assert ann_recall(I, gt, 10) >= 0.9, factory


def test_ivf_pq_finds_the_nearest_neighbour():
    # PQ codes are lossy by design (8 bytes for 64 floats here), so the faiss measure for them is
    # 1-recall@10: how often the true nearest neighbour is among the 10 returned.
    x = clustered_vectors(20_100, 64, seed=3)
    xb, xq = x[:20_000], x[20_000:]
    _, gt = brute_force(xb, xq, 1)
    index = build_faiss(xb, "IVF128,PQ8")
    _, I = search(index, xq, 10, **search_defaults(index))
    assert np.mean([gt[q, 0] in I[q] for q in range(len(xq))]) >= 0.6


def test_search_defaults_recorded():
    xb = clustered_vectors(2000, 16)
    assert search_defaults(build_faiss(xb, "IVF32,Flat")) == {"nprobe": 8}
    assert search_defaults(build_faiss(xb, "HNSW16")) == {"ef_search": 64}
    assert search_defaults(build_faiss(xb, "Flat")) == {}


def test_opq_variant_builds_and_searches():
    xb = clustered_vectors(1000, 16, seed=1)
    index = build_faiss(xb, "OPQ2,IVF16,PQ2x4")
    D, I = search(index, xb[:5], 3, nprobe=16)
    assert I.shape == (5, 3) and (I >= 0).all()


@pytest.mark.parametrize("factory", ["Flat", "IVF16,Flat", "HNSW16", "PQ2x4", "OPQ2,IVF16,PQ2x4", "SQ8"])
def test_excluded_ids_never_returned(factory):
    xb = clustered_vectors(1500, 16, seed=2)
    index = build_faiss(xb, factory)
    excluded = np.arange(0, 1500, 3, dtype=np.int64)
    D, I = search(index, xb[:20], 10, nprobe=16, excluded=excluded)
    assert not np.isin(I, excluded).any()
    assert (I >= 0).all(), "k results are still returned when enough live vectors exist"
    assert (np.diff(D, axis=1) <= 1e-6).all()


def test_bad_factory_string_named():
    with pytest.raises(ValueError, match=r"factory string 'IVF10,Bogus'"):
        build_faiss(np.zeros((10, 8), np.float32), "IVF10,Bogus")


def test_wrong_query_dim_and_shape():
    index = build_faiss(clustered_vectors(100, 16), "Flat")
    with pytest.raises(ValueError, match="xq has dim 8 but the index has dim 16"):
        search(index, np.zeros((2, 8), np.float32), 5)
    with pytest.raises(ValueError, match="2-D"):
        search(index, np.zeros(16, np.float32), 5)
    with pytest.raises(ValueError, match="k must be >= 1"):
        search(index, np.zeros((1, 16), np.float32), 0)


def test_auto_factory_choices():
    d = 384
    assert auto_factory(50_000, d, parse_memory("8GB")).factory == "Flat"
    assert auto_factory(EXACT_MAX, d, parse_memory("8GB")).factory == f"IVF{choose_nlist(EXACT_MAX)},Flat"
    assert auto_factory(1_000_000, d, parse_memory("8GB")).factory == "IVF4096,Flat"
    # 1M x 384 floats = 1.5 GiB: with 1 GiB the float vectors no longer fit -> 1-byte scalars, then PQ
    assert auto_factory(1_000_000, d, parse_memory("1GB")).factory == "IVF4096,SQ8"
    assert auto_factory(1_000_000, d, parse_memory("200MB")).factory == "IVF4096,PQ64"
    assert auto_factory(1_000_000, d, parse_memory("40MB")).factory == "IVF4096,PQ24"
    assert 3 <= np.log2(choose_nlist(10_000)) and choose_nlist(10_000) <= 10_000 // 39
    assert [default_nprobe(n) for n in (4, 64, 1024, 4096, 65536)] == [4, 8, 16, 64, 256]


def test_memory_budget_too_small():
    with pytest.raises(ValueError,
                       match=r"memory budget .* too small for 1000000 vectors of dim 384: even 'IVF4096,PQ4'"):
        auto_factory(1_000_000, 384, parse_memory("5MB"))
    with pytest.raises(ValueError, match="bad memory size '8 parsecs'"):
        parse_memory("8 parsecs")
    assert parse_memory("1.5k") == 1536 and parse_memory("2GiB") == 2 * 2**30


def test_torch_exact_search_matches_flat_with_tombstones():
    xb = clustered_vectors(3000, 16, seed=4)
    xq = xb[:7] + 0.01
    excluded = np.array([0, 1, 2, 5], np.int64)
    D0, I0 = search(build_faiss(xb, "Flat"), xq, 10, excluded=excluded)
    # a tiny score block forces several database chunks and the running top-k merge
    D, I = TorchFlatSearcher(xb, "cpu", excluded=excluded, max_scores=7 * 500).search(xq.astype(np.float32), 10)
    np.testing.assert_array_equal(I, I0)
    np.testing.assert_allclose(D, D0, atol=1e-5)
    D, I = TorchFlatSearcher(xb[:4], "cpu", excluded=np.array([1])).search(xq[:1], 5)
    assert (I[0, 3:] == -1).all() and set(I[0, :3]) == {0, 2, 3}


@pytest.mark.gpu
def test_torch_cuda_search_matches_flat():
    xb = clustered_vectors(50_000, 64, seed=5)
    D0, I0 = search(build_faiss(xb, "Flat"), xb[:100], 10)
    D, I = TorchFlatSearcher(xb, "cuda").search(xb[:100], 10)
    assert ann_recall(I, I0, 10) > 0.999
    D16, I16 = TorchFlatSearcher(xb, "cuda", float16=True).search(xb[:100], 10)
    assert ann_recall(I16, I0, 10) > 0.95
