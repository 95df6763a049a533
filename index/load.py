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

from index import faiss_utils
from index.binary import BinarySignIndex
from index.faiss_utils import read_index, unwrap
from index.rescore import open_vectors
from index.rescore import rescore as rescore_candidates
from index.store import INDEX_FILE, VECTORS_FILE, live_rows, load_docs, read_manifest, read_removed
from index.torch_search import TorchFlatSearcher

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
               rescore: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` docs per query by inner product. Thread-safe.

        Args:
            xq: query vectors (nq, dim) (float32; other float dtypes are converted).
            nprobe / ef_search: override the manifest's search defaults (ignored by indexes without IVF/HNSW).
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
            _, I = self._search(xq, kk, nprobe, ef_search)
            return rescore_candidates(xq, I, self.vectors, k)
        return self._search(xq, k, nprobe, ef_search)

    def _search(self, xq: np.ndarray, k: int, nprobe: int | None,
                ef_search: int | None) -> tuple[np.ndarray, np.ndarray]:
        nprobe = nprobe or self.search_defaults.get("nprobe")
        ef_search = ef_search or self.search_defaults.get("ef_search")
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
    if index.d != manifest["dim"]:
        raise ValueError(f"{path / INDEX_FILE}: dim {index.d} but manifest.json says {manifest['dim']}")
    if index.ntotal != manifest["ntotal"]:
        raise ValueError(f"{path / INDEX_FILE}: {index.ntotal} vectors but manifest.json says {manifest['ntotal']}")
    docs = load_docs(path)
    if len(docs) != index.ntotal:
        raise ValueError(f"index '{path}': index.faiss holds {index.ntotal} vectors but docs/ has {len(docs)} ids; "
                         f"the index dir is inconsistent, rebuild it")
    removed = read_removed(path)
    if len(removed) != manifest.get("n_removed", 0) or (len(removed) and removed.max() >= index.ntotal):
        raise ValueError(f"index '{path}': removed.npy ({len(removed)} rows) disagrees with manifest.json "
                         f"(n_removed={manifest.get('n_removed', 0)}, ntotal={index.ntotal})")
    vectors = open_vectors(path / VECTORS_FILE, index.ntotal, index.d) if manifest.get("vectors") else None
    return LoadedIndex(path, index, manifest, docs, removed, index_placement(index, device), float16, vectors)
