"""Array-in, array-out FAISS helpers (faiss vocabulary: ``xb`` base, ``xq`` queries, ``xt`` training, ``D I k``).

Every index uses the inner-product metric on L2-normalised vectors (= cosine). Search parameters
(``nprobe``, ``efSearch``) and excluded ids go through a per-call ``SearchParameters`` object, so one CPU
index can be searched from many threads at once with different settings.
"""
from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from twotower.index.binary import BinarySignIndex, is_binary_factory, is_binary_file, read_binary
from twotower.index.factory import DEFAULT_EF_SEARCH, default_nprobe
from twotower.index.topk import first_kept


def make_index(factory: str, d: int) -> Any:
    """An untrained inner-product index from an ``index_factory`` string; a bad string names itself.

    Binary factory strings (``BFlat``, ``BIVF1024``) give a :class:`index.binary.BinarySignIndex` (sign bits,
    Hamming search) that takes and returns float arrays like the others.
    """
    if is_binary_factory(factory):
        return BinarySignIndex.from_factory(factory, d)
    try:
        index = faiss.index_factory(int(d), factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        detail = str(exc).strip().splitlines()[-1].split("Error: ")[-1]
        raise ValueError(
            f"faiss rejected factory string '{factory}' for dim {d}: {detail}. Examples: Flat, IVF1024,Flat, "
            f"IVF1024,PQ32, IVF1024,SQ8, HNSW32, OPQ32,IVF1024,PQ32 (or 'auto')") from None
    _no_polysemous_training(index)
    return index


def _no_polysemous_training(index: faiss.Index) -> None:
    """index_factory turns on polysemous training for PQ codes (``PQ16`` = ``PQ16`` + Hamming re-ordering of
    codes); it costs 20-50x the PQ training time and only helps polysemous search, which we never use."""
    index = faiss.downcast_index(index)
    if hasattr(index, "do_polysemous_training"):
        index.do_polysemous_training = False
    for child in ("index", "storage"):  # IndexPreTransform.index, IndexHNSW.storage
        if isinstance(index, (faiss.IndexPreTransform, faiss.IndexHNSW)) and hasattr(index, child):
            _no_polysemous_training(getattr(index, child))


def as_matrix(x: np.ndarray, d: int | None, name: str = "xq") -> np.ndarray:
    """Validate (n, d) and return a C-contiguous float32 copy-if-needed (faiss needs exactly that)."""
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array (n, d), got shape {x.shape}")
    if d is not None and x.shape[1] != d:
        raise ValueError(f"{name} has dim {x.shape[1]} but the index has dim {d}")
    return np.ascontiguousarray(x, dtype=np.float32)


def min_train_points(index: Any) -> tuple[int, str]:
    """The fewest training vectors faiss's k-means accepts for ``index``, and why: one per IVF list, and
    ``2^nbits`` per PQ sub-quantizer (an OPQ rotation trains a PQ too). (1, "") for indexes with no k-means."""
    need, why = 1, ""
    nlist = nlist_of(index)
    if nlist:
        need, why = nlist, "one per IVF list"
    if isinstance(index, BinarySignIndex):
        return need, why
    parts = [faiss.downcast_index(index)]
    while parts:
        part = parts.pop()
        if isinstance(part, faiss.IndexPreTransform):
            parts.append(faiss.downcast_index(part.index))
            for i in range(part.chain.size()):
                vt = faiss.downcast_VectorTransform(part.chain.at(i))
                ksub = int(vt.pq.ksub) if isinstance(vt, faiss.OPQMatrix) and vt.pq else 256  # faiss's default
                if isinstance(vt, faiss.OPQMatrix) and ksub > need:
                    need, why = ksub, f"{ksub} per OPQ sub-quantizer"
        elif isinstance(part, faiss.IndexHNSW):
            parts.append(faiss.downcast_index(part.storage))
        pq = getattr(part, "pq", None)
        if pq is not None and int(pq.ksub) > need:
            need, why = int(pq.ksub), f"{int(pq.ksub)} per PQ sub-quantizer (2^{int(pq.nbits)} codes)"
    return need, why


def check_trainable(index: Any, n: int, factory: str = "") -> None:
    """Refuse training ``index`` on ``n`` vectors when faiss's k-means would (a raw faiss RuntimeError).

    Raises:
        ValueError: naming the factory, the vectors needed and why, and what to use instead.
    """
    need, why = min_train_points(index)
    if n < need:
        name = f"--factory '{factory}'" if factory else "the index"
        raise ValueError(f"{name} needs at least {need} training vectors ({why}) but has {n}: use fewer IVF lists "
                         f"or fewer PQ bits (e.g. IVF{max(1, n // 39)},Flat), Flat, or more docs")


def train_index(index: faiss.Index, xt: np.ndarray) -> None:
    """Train (k-means for IVF, codebooks for PQ/SQ, rotation for OPQ) on a sample ``xt`` (nt, d).

    With faiss GPUs, the IVF k-means (the expensive part) assigns points on all GPUs through the
    ``clustering_index`` hook, as faiss's own benchmarks do; the trained index stays a CPU index.
    """
    if index.is_trained:
        return
    xt = as_matrix(xt, index.d, "xt")
    check_trainable(index, len(xt))
    if isinstance(index, BinarySignIndex):
        index.train(xt)
        return
    ivf = ivf_of(index)
    on_gpu = ivf is not None and faiss.get_num_gpus() > 0
    if on_gpu:
        flat = faiss.IndexFlatIP(ivf.d) if ivf.metric_type == faiss.METRIC_INNER_PRODUCT else faiss.IndexFlatL2(ivf.d)
        ivf.clustering_index = faiss.index_cpu_to_all_gpus(flat)
    try:
        index.train(xt)
    finally:
        if on_gpu:
            ivf.clustering_index = None


def build_faiss(xb: np.ndarray, factory: str = "Flat", xt: np.ndarray | None = None) -> faiss.Index:
    """Build an inner-product index over ``xb`` (n, d), trained on ``xt`` (default: ``xb`` itself).

    Returns:
        The CPU index with ``ntotal == n``; row i of ``xb`` has id i.
    """
    xb = as_matrix(xb, None, "xb")
    index = make_index(factory, xb.shape[1])
    train_index(index, xb if xt is None else xt)
    index.add(xb)
    return index


def search_defaults(index: faiss.Index) -> dict[str, int]:
    """The ``nprobe`` / ``efSearch`` this index should search with by default (stored in the manifest)."""
    out: dict[str, int] = {}
    nlist = nlist_of(index)
    if nlist:
        out["nprobe"] = default_nprobe(nlist)
    if isinstance(index, BinarySignIndex):
        return out
    if isinstance(unwrap(index), faiss.IndexHNSW):
        out["ef_search"] = DEFAULT_EF_SEARCH
    return out


def nlist_of(index: Any) -> int | None:
    """The IVF list count of a float or binary IVF index; None for other indexes."""
    if isinstance(index, BinarySignIndex):
        return index.nlist
    ivf = ivf_of(index)
    return int(ivf.nlist) if ivf is not None else None


def ivf_of(index: Any) -> faiss.IndexIVF | None:
    """The float IVF index inside ``index`` (None for non-IVF and binary indexes)."""
    if isinstance(index, BinarySignIndex):
        return None
    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:  # not an IVF index: faiss signals that by raising
        return None


def unwrap(index: Any) -> Any:
    """The index under any pre-transform (OPQ, PCA), downcast to its concrete class (e.g. IndexHNSWFlat)."""
    if isinstance(index, BinarySignIndex):
        return index.index
    index = faiss.downcast_index(index)
    while isinstance(index, faiss.IndexPreTransform):
        index = faiss.downcast_index(index.index)
    return index


def search_params(index: faiss.Index, nprobe: int | None = None, ef_search: int | None = None,
                  sel: faiss.IDSelector | None = None) -> faiss.SearchParameters | None:
    """A per-call parameter object for ``index``, or None when its class does not take one (e.g. IndexPQ)."""
    if isinstance(index, BinarySignIndex):
        return None  # it filters tombstones itself (faiss's binary IVF takes no IDSelector)
    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexPreTransform):
        sub = search_params(index.index, nprobe, ef_search, sel)
        if sub is None:
            return None
        params = faiss.SearchParametersPreTransform(index_params=sub)
        params.referenced_objects = [sub]  # SWIG holds a bare pointer to sub: keep it alive with params
        return params
    if isinstance(index, faiss.IndexIVF):
        return faiss.SearchParametersIVF(sel=sel, nprobe=int(nprobe or index.nprobe))
    if isinstance(index, faiss.IndexHNSW):
        return faiss.SearchParametersHNSW(sel=sel, efSearch=int(ef_search or index.hnsw.efSearch))
    if isinstance(index, (faiss.IndexFlat, faiss.IndexScalarQuantizer)):
        return faiss.SearchParameters(sel=sel)
    return None


def exclusion_selector(excluded: np.ndarray) -> faiss.IDSelector | None:
    """A selector that rejects the ids in ``excluded`` (tombstoned rows); None when nothing is excluded.

    The returned object keeps a reference to its inner selector (SWIG would otherwise free it).
    """
    if len(excluded) == 0:
        return None
    inner = faiss.IDSelectorBatch(np.ascontiguousarray(excluded, dtype=np.int64))
    sel = faiss.IDSelectorNot(inner)
    sel.referenced_objects = [inner]
    return sel


def allow_selector(allowed: np.ndarray) -> faiss.IDSelector:
    """A selector that accepts exactly the rows where ``allowed`` (bool (ntotal,)) is True (a metadata filter).

    Sparse sets (under 1 row in 64) go into an ``IDSelectorBatch`` (a hash set, smaller than the bitmap); denser
    ones into an ``IDSelectorBitmap`` of ntotal bits (one bit test per candidate). The selector keeps a reference
    to the bits it reads (SWIG holds a bare pointer).
    """
    allowed = np.asarray(allowed, bool)
    rows = np.flatnonzero(allowed)
    if len(rows) * 64 < len(allowed):
        return faiss.IDSelectorBatch(rows.astype(np.int64))
    bits = np.packbits(allowed, bitorder="little")  # faiss: bit i = (bitmap[i >> 3] >> (i & 7)) & 1
    sel = faiss.IDSelectorBitmap(len(allowed), faiss.swig_ptr(bits))
    sel.referenced_objects = [bits]
    return sel


def widened(value: int | None, cap: int, fraction: float) -> int | None:
    """``value / fraction`` (at most ``cap``, at least ``value``): the nprobe / efSearch of a filtered search.

    An IVF search that visits ``nprobe`` lists sees about ``fraction`` of their vectors pass a filter, so it
    visits ``nprobe / fraction`` lists to score about as many allowed vectors as an unfiltered search scores.
    """
    if not value:
        return value
    return int(max(value, min(cap, np.ceil(value / max(fraction, 1e-9)))))


def search_allowed_post(index: faiss.Index, xq: np.ndarray, k: int, allowed: np.ndarray,
                        n_allowed: int) -> tuple[np.ndarray, np.ndarray]:
    """Filtered search for indexes that take no selector (GPU clones): fetch more and more results and keep the
    allowed ones, until every query has ``k`` of them or the fetch covers the whole index."""
    ntotal = int(index.ntotal)
    frac = max(n_allowed / max(ntotal, 1), 1e-9)
    fetch = int(min(ntotal, max(2 * k, np.ceil(2 * k / frac))))
    while True:
        D, I = index.search(xq, max(min(fetch, 2048 if not _is_cpu(index) else fetch), 1))
        ok = (I >= 0) & allowed[np.clip(I, 0, None)]
        if fetch >= ntotal or (ok.sum(1) >= min(k, n_allowed)).all() or I.shape[1] < fetch:
            break
        fetch = min(ntotal, fetch * 4)
    return first_kept(D, I, ok, k)


def search(index: faiss.Index, xq: np.ndarray, k: int, nprobe: int | None = None, ef_search: int | None = None,
           excluded: np.ndarray | None = None, sel: faiss.IDSelector | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` inner-product search.

    Args:
        index: any faiss index (CPU; GPU indexes work when ``excluded`` is empty and params are unset).
        xq: queries (nq, d), float32 (converted if needed).
        k: results per query (padded with id -1 / score -inf when fewer exist).
        nprobe / ef_search: override the index's own setting for this call only.
        excluded: int64 ids that must never be returned (tombstones); ``sel`` is a prebuilt selector for them.

    Returns:
        D float32 (nq, k) scores (descending), I int64 (nq, k) ids.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    xq = as_matrix(xq, index.d, "xq")
    excluded = np.empty(0, np.int64) if excluded is None else np.asarray(excluded, np.int64)
    if isinstance(index, BinarySignIndex):
        return index.search(xq, k, nprobe, excluded)
    if sel is None and len(excluded):
        sel = exclusion_selector(excluded)
    params = search_params(index, nprobe, ef_search, sel) if _is_cpu(index) else None
    if params is not None:
        return index.search(xq, k, params=params)
    if nprobe or ef_search:
        _set_params(index, nprobe, ef_search)
    if not len(excluded):
        return index.search(xq, k)
    return _search_post_filter(index, xq, k, excluded)


def _search_post_filter(index: faiss.Index, xq: np.ndarray, k: int,
                        excluded: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For indexes without selector support: fetch ``k + len(excluded)`` and drop excluded ids."""
    kk = int(min(index.ntotal, k + len(excluded)))
    D, I = index.search(xq, max(kk, 1))
    keep = ~np.isin(I, excluded) & (I >= 0)  # (nq, kk)
    return first_kept(D, I, keep, k)


def takes_params(index: faiss.Index) -> bool:
    """True when ``index`` is a CPU index whose class takes a per-call ``SearchParameters`` object (then
    ``index.search(xq, k, params=search_params(index, ...))`` is the whole search, tombstones included)."""
    return _is_cpu(index) and search_params(index) is not None


def _is_cpu(index: Any) -> bool:
    """False for GPU indexes and multi-GPU shards/replicas (they take no per-call parameter objects)."""
    if isinstance(index, BinarySignIndex):
        return True
    if type(faiss.downcast_index(index)).__name__.startswith("Gpu"):
        return False
    return not isinstance(index, (faiss.IndexShards, faiss.IndexReplicas))


def _set_params(index: faiss.Index, nprobe: int | None, ef_search: int | None) -> None:
    """Set search parameters on the index object itself (GPU/sharded forms and classes that take no
    parameter object); only the parameters the index has are set. Callers serialise this (not thread-safe)."""
    space = faiss.ParameterSpace() if _is_cpu(index) else faiss.GpuParameterSpace()
    name = type(unwrap(index)).__name__
    if nprobe and "IVF" in name:
        space.set_index_parameter(index, "nprobe", int(nprobe))
    if ef_search and "HNSW" in name:
        space.set_index_parameter(index, "efSearch", int(ef_search))


def read_index(path: str | Path, ondisk: bool = False) -> faiss.Index:
    """``faiss.read_index`` with a clear error naming the file when it is missing, truncated or corrupt.

    Args:
        ondisk: the IVF lists live in a ``.ivfdata`` file (``index merge --method ondisk``); it is looked up next
            to ``path`` (``IO_FLAG_ONDISK_SAME_DIR``), wherever it was written (INDEX dirs are built in a temp dir).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"faiss index file '{path}' does not exist")
    try:
        if is_binary_file(path):
            return read_binary(path)
        if ondisk:
            with c_stdout_to_stderr():  # faiss printf()s where it found the lists: keep stdout for `--json`
                return faiss.read_index(str(path), faiss.IO_FLAG_ONDISK_SAME_DIR)
        return faiss.read_index(str(path))
    except RuntimeError as exc:
        detail = str(exc).strip().splitlines()[-1].split("Error: ")[-1]
        raise ValueError(f"cannot read faiss index '{path}' (truncated or corrupt; rebuild it): {detail}") from None


@contextmanager
def c_stdout_to_stderr() -> Iterator[None]:
    """Send C-level stdout (file descriptor 1) to stderr for the duration (the C stdio buffer is flushed)."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        ctypes.CDLL(None).fflush(None)  # printf output still buffered in C goes to stderr, not to the real stdout
        os.dup2(saved, 1)
        os.close(saved)


def serialize(index: Any) -> bytes:
    """The index file's bytes (CPU form), for ``common.atomic.write_bytes_atomic``."""
    if isinstance(index, BinarySignIndex):
        return index.serialize()
    return faiss.serialize_index(index).tobytes()


def write_index(index: Any, path: str | Path) -> None:
    """``faiss.write_index`` (``write_index_binary`` for sign-bit indexes)."""
    if isinstance(index, BinarySignIndex):
        index.write(path)
    else:
        faiss.write_index(index, str(path))


def to_gpu(index: faiss.Index, float16: bool = False) -> Any:
    """Clone a CPU index to every visible GPU (sharded across several); needs faiss built with GPU support.

    Raises:
        ValueError: faiss sees no GPU, or has no GPU version of this index type (e.g. HNSW).
    """
    ngpu = faiss.get_num_gpus()
    if isinstance(index, BinarySignIndex):
        raise ValueError("binary (sign-bit) indexes search on the CPU only; load them with device='cpu' or 'auto'")
    if ngpu == 0:
        raise ValueError("faiss sees no GPU (install faiss-gpu; torch CUDA alone only serves exact Flat search)")
    try:
        if ngpu == 1:
            co = faiss.GpuClonerOptions()
            co.useFloat16 = float16
            res = faiss.StandardGpuResources()
            gpu = faiss.index_cpu_to_gpu(res, 0, index, co)
            gpu.referenced_objects = [res]
            return gpu
        mco = faiss.GpuMultipleClonerOptions()
        mco.useFloat16 = float16
        mco.shard = True  # each GPU holds 1/ngpu of the vectors; results are merged by faiss
        return faiss.index_cpu_to_all_gpus(index, co=mco)
    except RuntimeError as exc:
        raise ValueError(f"faiss cannot move a {type(unwrap(index)).__name__} to the GPU "
                         f"({str(exc).strip().splitlines()[-1]}); load it with device='cpu'") from None
