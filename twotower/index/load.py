"""Open an INDEX dir for search: ``load_index(dir, device) -> LoadedIndex`` with ``search(xq, k) -> (D, I)``.

Device choice (faiss contrib style, one code path): ``faiss.get_num_gpus() > 0`` -> the faiss GPU clone
(sharded over all GPUs); else CUDA torch and a Flat index -> exact torch search on the GPU; else the CPU
index. ``index.faiss`` on disk is always the CPU form.

Re-scoring (``index.rescore``): an INDEX dir that keeps ``vectors.npy`` memory-maps it; ``search(..., rescore=N)``
(default: the manifest's ``rescore``) fetches ``k * N`` candidates from the index and returns the best ``k`` by
their exact inner product.
"""
from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch

from twotower.index import faiss_utils
from twotower.index.binary import BinarySignIndex
from twotower.index.bm25 import BM25_DIR, BM25Index
from twotower.index.faiss_utils import ivf_of, read_index, unwrap
from twotower.index.filters import FILTERS_FILE, FilterMap
from twotower.index.rescore import open_vectors
from twotower.index.rescore import rescore as rescore_candidates
from twotower.index.store import (
    INDEX_FILE,
    VECTORS_FILE,
    check_counts,
    live_rows,
    load_docs,
    read_manifest,
    read_removed,
)
from twotower.index.torch_search import TorchFlatSearcher

LOAD_DEVICES = ("auto", "cpu", "cuda")


class LoadedIndex:
    """A searchable INDEX dir. Row i of ``docs`` is faiss id i; rows in ``removed`` are never returned."""

    def __init__(self, path: Path, index: Any, manifest: dict[str, Any], docs: Any, removed: np.ndarray,
                 device: str = "cpu", float16: bool = False, vectors: np.ndarray | None = None) -> None:
        self.path = path
        self.manifest = manifest
        self.docs = docs
        self.removed = removed
        self.cpu_index = index
        self.dim = int(manifest["dim"])
        self.ntotal = int(index.ntotal)
        self.search_defaults: dict[str, int] = dict(manifest.get("search_defaults") or {})
        self.vectors = vectors  # (ntotal, dim) memmap of vectors.npy, or None
        self.default_rescore = int(manifest.get("rescore") or 0) if vectors is not None else 0
        self._lock = threading.Lock()  # GPU indexes and parameter setting are not thread-safe
        self._sel = faiss_utils.exclusion_selector(removed)
        # Per-call parameter objects by (nprobe, ef_search), built once: faiss only reads them, so threads
        # share them, and a fast IVF search (tens of microseconds) no longer pays for building one each call.
        self._cpu_takes_params = faiss_utils.takes_params(index)
        self._params: dict[tuple[int | None, int | None], Any] = {}
        self._gpu_index = None
        self._torch = None
        self._sides: dict[str, Any] = {}  # the BM25 side and the filter map, loaded on first use
        self._live = np.ones(self.ntotal, bool)
        self._live[removed] = False
        self.device = device
        if device == "faiss-gpu":
            self._gpu_index = faiss_utils.to_gpu(index, float16)
        elif device == "torch-cuda":
            self._torch = TorchFlatSearcher(index.reconstruct_n(0, index.ntotal), "cuda", float16, removed)

    @property
    def towers_dir(self) -> Path | None:
        value = self.manifest.get("towers_dir")
        return Path(value) if value else None

    @property
    def n_live(self) -> int:
        return self.ntotal - len(self.removed)

    @property
    def bm25(self) -> BM25Index:
        """The BM25 side (``index.bm25``), loaded on first use. ValueError when the index has none."""
        side = self._sides.get("bm25")
        if side is None:
            path = _bm25_dir(self.path, self.manifest, "bm25 or hybrid")
            with self._lock:
                side = self._sides.get("bm25") or BM25Index.load(path, mmap=True)
            if side.ntotal != self.ntotal:
                raise ValueError(f"index '{self.path}': the BM25 side has {side.ntotal} rows, index.faiss "
                                 f"{self.ntotal}; the index dir is inconsistent, rebuild it")
            self._sides["bm25"] = side
        return side

    @property
    def filters(self) -> FilterMap:
        """The metadata filter map (``index.filters``), loaded on first use. ValueError when the index has none."""
        fmap = self._sides.get("filters")
        if fmap is None:
            fmap = self._sides["filters"] = FilterMap.load(_filters_file(self.path), self.ntotal)
        return fmap

    def allowed(self, filter: dict[str, Any] | None) -> np.ndarray | None:
        """Live rows matching ``filter`` (bool (ntotal,)), or None for no filter. FilterError on a bad filter."""
        if not filter:
            if filter is not None and not isinstance(filter, dict):
                self.filters.allowed(filter)  # raises, naming what a filter must be
            return None
        mask = self.filters.allowed(filter)
        return None if mask is None else mask & self._live

    def check_rescore(self, rescore: int | None) -> int:
        """The re-scoring factor a search uses: ``rescore`` (None: the manifest default); 0 = off.

        Raises:
            ValueError: a factor > 0 for an index that keeps no vectors.npy.
        """
        if rescore is None:
            return self.default_rescore
        if rescore > 0 and self.vectors is None:
            raise ValueError(f"rescore={rescore}: index '{self.path}' keeps no float vectors (vectors.npy) to "
                             f"re-score with; rebuild it with --keep-vectors float32 (or rescore 0)")
        return int(rescore)

    def search(self, xq: np.ndarray, k: int, nprobe: int | None = None, ef_search: int | None = None,
               allowed: np.ndarray | None = None, rescore: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` docs per query by inner product. Thread-safe.

        Args:
            xq: query vectors (nq, dim) (float32; other float dtypes are converted).
            nprobe / ef_search: override the manifest's search defaults (ignored by indexes without IVF/HNSW).
            allowed: bool (ntotal,): only these rows may be returned (a metadata filter, see :meth:`allowed`);
                faiss searches them through an ``IDSelector``, visiting ``nprobe / selectivity`` IVF lists and
                ``ef_search / selectivity`` HNSW candidates (capped) so a selective filter still finds k rows;
                an HNSW whose graph walk would cost more than scanning the allowed rows scans them (exact).
            rescore: fetch ``k * rescore`` candidates and re-score them with the exact vectors (None: the
                manifest's default; 0: off).

        Returns:
            D float32 (nq, k) scores, I int64 (nq, k) doc rows; -1 where fewer than k live docs exist.
        """
        xq = faiss_utils.as_matrix(xq, self.dim, "xq")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        factor = self.check_rescore(rescore)
        if factor > 0:
            assert self.vectors is not None, "check_rescore refuses a factor without vectors"
            kk = max(k, min(k * factor, self.ntotal))
            _, I = self._search(xq, kk, nprobe, ef_search, allowed)
            return rescore_candidates(xq, I, self.vectors, k)
        return self._search(xq, k, nprobe, ef_search, allowed)

    def _search(self, xq: np.ndarray, k: int, nprobe: int | None, ef_search: int | None,
                allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        nprobe = nprobe or self.search_defaults.get("nprobe")
        ef_search = ef_search or self.search_defaults.get("ef_search")
        if allowed is not None:
            return self._search_allowed(xq, k, nprobe, ef_search, np.asarray(allowed, bool) & self._live)
        if self._torch is not None:
            return self._torch.search(xq, k)
        if self._gpu_index is not None:
            with self._lock:
                return faiss_utils.search(self._gpu_index, xq, k, nprobe, ef_search, excluded=self.removed)
        if self._cpu_takes_params:
            params = self._params.get((nprobe, ef_search))
            if params is None:
                params = faiss_utils.search_params(self.cpu_index, nprobe, ef_search, self._sel)
                if len(self._params) < 256:  # bounded: nprobe comes from callers
                    self._params[(nprobe, ef_search)] = params
            return self.cpu_index.search(xq, k, params=params)
        return faiss_utils.search(self.cpu_index, xq, k, nprobe, ef_search, excluded=self.removed, sel=self._sel)

    def _search_allowed(self, xq: np.ndarray, k: int, nprobe: int | None, ef_search: int | None,
                        allowed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n_ok = int(allowed.sum())
        if n_ok == 0:
            return np.full((len(xq), k), -np.inf, np.float32), np.full((len(xq), k), -1, np.int64)
        if self._torch is not None:
            return self._torch.search(xq, k, allowed=allowed)
        if self._gpu_index is not None:
            with self._lock:
                if nprobe or ef_search:
                    faiss_utils._set_params(self._gpu_index, nprobe, ef_search)
                return faiss_utils.search_allowed_post(self._gpu_index, xq, k, allowed, n_ok)
        fraction = n_ok / max(self.n_live, 1)
        ivf = ivf_of(self.cpu_index)
        nprobe = faiss_utils.widened(nprobe, ivf.nlist if ivf is not None else 0, fraction)
        ef_search = faiss_utils.widened(ef_search, max(self.ntotal, ef_search or 0), fraction)
        sel = faiss_utils.allow_selector(allowed)
        # a binary index is no faiss.Index (downcast_index raises TypeError): it goes to the post-filter below
        inner = None if isinstance(self.cpu_index, BinarySignIndex) else faiss.downcast_index(self.cpu_index)
        if isinstance(inner, faiss.IndexHNSW) and n_ok < (ef_search or 0) * inner.hnsw.nb_neighbors(1):
            # A graph walk visits about efSearch * M nodes, allowed or not; a scan of the allowed rows in the
            # HNSW's own storage (flat or SQ codes) costs n_ok distances and is exact: cheaper below that.
            storage = faiss.downcast_index(inner.storage)
            params = faiss_utils.search_params(storage, sel=sel)
            if params is not None:
                return storage.search(xq, k, params=params)
        params = faiss_utils.search_params(self.cpu_index, nprobe, ef_search, sel)
        if params is None:  # index classes without selector support
            with self._lock:
                return faiss_utils.search_allowed_post(self.cpu_index, xq, k, allowed, n_ok)
        return self.cpu_index.search(xq, k, params=params)

    def check_fingerprint(self, fingerprint: str) -> None:
        """Refuse a query tower from a different towers pair than the result tower the index was built with.

        Raises:
            ValueError: naming both fingerprints (or saying the index recorded none).
        """
        expected = self.manifest.get("fingerprint")
        if expected is None:
            raise ValueError(f"index '{self.path}' records no result-tower fingerprint (built with encoder "
                             f"{self.manifest.get('encoder')}); cannot verify towers with fingerprint {fingerprint}")
        if str(fingerprint) != expected:
            raise ValueError(f"towers fingerprint {fingerprint} does not match index '{self.path}' (built with result "
                             f"tower {expected}, towers dir {self.manifest.get('towers_dir')}); search with the "
                             f"towers the index was built from, or rebuild the index")

    def rows_of(self, ids: Sequence[str]) -> np.ndarray:
        """Live doc rows for ``ids`` (int64, same order). Raises KeyError naming ids that are not live."""
        return live_rows(self.docs, self.removed, ids, self.path)


def index_placement(index: Any, device: str) -> str:
    """``cpu`` | ``faiss-gpu`` | ``torch-cuda`` for ``index`` under the requested ``auto|cpu|cuda``."""
    if device not in LOAD_DEVICES:
        raise ValueError(f"unknown device '{device}': choose {', '.join(LOAD_DEVICES)}")
    if device == "cpu":
        return "cpu"
    if isinstance(index, BinarySignIndex):
        if device == "cuda":
            raise ValueError("device 'cuda' requested but binary (sign-bit) indexes search on the CPU only; use "
                             "device 'auto' or 'cpu'")
        return "cpu"
    inner = unwrap(index)
    if faiss.get_num_gpus() > 0:
        if isinstance(inner, faiss.IndexHNSW) and device == "auto":
            return "cpu"  # faiss has no GPU HNSW; auto keeps it on the CPU (device='cuda' raises in to_gpu)
        return "faiss-gpu"
    is_flat = isinstance(faiss.downcast_index(index), faiss.IndexFlat)
    if torch.cuda.is_available() and is_flat:
        return "torch-cuda"
    if device == "cuda":
        reason = "torch sees no CUDA GPU" if not torch.cuda.is_available() else \
            f"without faiss-gpu only Flat indexes search on the GPU, this one is {index_kind(index)}"
        raise ValueError(f"device 'cuda' requested but {reason}; use device 'auto' or 'cpu'")
    return "cpu"


def index_kind(index: Any) -> str:
    return type(unwrap(index) if isinstance(index, BinarySignIndex) else faiss.downcast_index(index)).__name__


def load_index(index_dir: str | Path, device: str = "auto", float16: bool = False) -> LoadedIndex:
    """Open an INDEX dir, verifying the manifest, the faiss file and the doc store agree.

    Args:
        device: ``auto`` (GPU when possible, see module doc), ``cpu`` or ``cuda`` (error if impossible).
        float16: store vectors in half precision on the GPU.

    Raises:
        FileNotFoundError: not an INDEX dir. ValueError: corrupt/truncated index.faiss, newer format,
        or counts that disagree (each message names the file).
    """
    path = Path(index_dir)
    manifest = read_manifest(path)
    index = read_index(path / INDEX_FILE, ondisk=bool(manifest.get("ivfdata")))
    docs = load_docs(path)
    check_counts(path, manifest, index.d, index.ntotal, len(docs))
    removed = read_removed(path, manifest)  # unique rows below ntotal (== index.ntotal, checked above)
    vectors = open_vectors(path / VECTORS_FILE, index.ntotal, index.d) if manifest.get("vectors") else None
    return LoadedIndex(path, index, manifest, docs, removed, index_placement(index, device), float16, vectors)


def check_query_sides(index_dir: str | Path, mode: str | None, filter: dict[str, Any] | None) -> None:
    """Fail fast (before any model loads) when the INDEX dir cannot serve ``mode`` (None: its default) or
    ``filter``: no BM25 side, no filter map, an unknown filter field or a bad operator."""
    path = Path(index_dir)
    manifest = read_manifest(path)
    mode = mode or (manifest.get("query_defaults") or {}).get("mode", "dense")
    if mode != "dense":
        _bm25_dir(path, manifest, mode)
    if filter:
        FilterMap.load(_filters_file(path), int(manifest["ntotal"])).allowed(filter)


def _bm25_dir(path: Path, manifest: dict[str, Any], mode: str) -> Path:
    """The INDEX dir's BM25 side, or the one-line refusal to search it with ``mode``."""
    if not manifest.get("bm25") or not (path / BM25_DIR).is_dir():
        raise ValueError(f"index '{path}' has no BM25 side (built with --no-bm25 or by an older twotower): rebuild "
                         f"it with `twotower index build` to search with mode {mode}")
    return path / BM25_DIR


def _filters_file(path: Path) -> Path:
    """The INDEX dir's metadata filter map, or the one-line refusal to filter it."""
    if not (path / FILTERS_FILE).is_file():
        raise ValueError(f"index '{path}' has no metadata filter map ({FILTERS_FILE}; built by an older twotower): "
                         f"rebuild it with `twotower index build` to search with a filter")
    return path / FILTERS_FILE


def load_shard(shard_dir: str | Path, device: str = "cpu") -> LoadedIndex:
    """One SHARD dir (``index.shard``) as an exact (Flat) searchable index of its rows: what a shard server of
    ``serve --shards --engine ray`` holds. Ids are local (0..n-1); ``manifest["rows"][0]`` is the corpus row of
    local id 0 (contiguous shards). Flat gives each shard's exact top-k, so merging the shards' top-k gives the
    exact top-k of the whole corpus.

    Raises:
        FileNotFoundError / ValueError: not a finished shard, or a damaged one (``index.shard.read_shard``).
    """
    import datasets

    from twotower.index.build import add_chunks
    from twotower.index.encode import EncodedCorpus
    from twotower.index.faiss_utils import make_index
    from twotower.index.shard import read_shard

    path = Path(shard_dir)
    shard = read_shard(path)
    enc = EncodedCorpus(path, int(shard["n"]), int(shard["dim"]), len(shard["chunks"]), bool(shard["normalized"]))
    index = make_index("Flat", enc.dim)
    add_chunks(index, enc, progress=False)
    docs = datasets.concatenate_datasets([datasets.Dataset.from_file(str(p)) for p in enc.docs_paths()])
    manifest = {**{k: shard[k] for k in ("shard_id", "num_shards", "rows", "fingerprint", "dim", "encoder",
                                          "towers_dir", "corpus", "normalized")},
                "factory": "Flat", "metric": "inner_product", "ntotal": enc.n, "search_defaults": {}, "n_removed": 0}
    return LoadedIndex(path, index, manifest, docs, np.empty(0, np.int64), index_placement(index, device))
