"""``index add`` and ``index remove``: change an INDEX dir atomically (temp dir + rename, like a build).

Removal uses tombstones: the removed rows go to ``removed.npy`` and search excludes them (a faiss
``IDSelector`` on the CPU, masking on the GPU). Nothing is renumbered, so "row i of docs = faiss id i"
holds for the index's whole life, HNSW (which has no ``remove_ids``) included. Adding appends rows at the
end; an id that was removed can be added again (it gets a new row). An index that keeps its float vectors
(``vectors.npy``, for re-scoring) gets the new rows' vectors in the same new dir (removal needs no change there:
tombstoned rows are simply never candidates).
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from itertools import chain
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from twotower.common.atomic import atomic_dir
from twotower.common.encoder import Encoder
from twotower.common.lock import exclusive
from twotower.common.outputs import check_work_dir, remove_work_dir
from twotower.index.build import add_chunks, truncating, write_index_dir
from twotower.index.config import EncodeConfig
from twotower.index.corpus import Corpus, describe, iter_docs
from twotower.index.encode import default_work_dir, encode_corpus, encoder_fingerprint
from twotower.index.faiss_utils import read_index
from twotower.index.rescore import open_vectors
from twotower.index.store import (
    INDEX_FILE,
    REMOVED_FILE,
    VECTORS_FILE,
    check_counts,
    link_or_copy,
    live_rows,
    load_docs,
    read_manifest,
    read_removed,
    write_manifest,
    write_npy_atomic,
)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def add_docs(index_dir: str | Path, encoder: Encoder | Callable[[], Encoder], corpus: Corpus,
             config: EncodeConfig | None = None, wait: float = 0.0) -> int:
    """Encode ``corpus`` with ``encoder`` (same towers as the index) and append it. Returns rows added.

    Holds the index's writer lock (``common.lock``) from reading the current version to publishing the new
    one, so two concurrent adds both land, one after the other; ``wait``: seconds to wait for another writer
    (0: refuse at once). ``encoder`` may be a function that loads it: it is then called once the lock is
    held, so a busy index is reported at once, not after a model load.

    Raises:
        ValueError: the encoder's fingerprint or dim differs from the index's, or an id is already live.
        common.lock.Busy: another process writes the index.
    """
    config = config or EncodeConfig()
    path = Path(index_dir)
    work = Path(config.work_dir) if config.work_dir else default_work_dir(path.with_name(path.name + ".add"))
    check_work_dir(work, path)
    with exclusive(path, wait):
        if not hasattr(encoder, "encode"):
            encoder = encoder()
        return _add(path, encoder, corpus, config, work)


def _add(path: Path, encoder: Encoder, corpus: Corpus, config: EncodeConfig, work: Path) -> int:
    manifest = read_manifest(path)
    if manifest.get("ivfdata"):
        raise ValueError(f"index '{path}' keeps its IVF lists on disk ({manifest['ivfdata']}, `index merge --method "
                         f"ondisk`), which faiss would change in place; rebuild the shards of the grown corpus and "
                         f"merge them, or merge with --method add to get an index that `index add` can extend")
    fp = encoder_fingerprint(encoder)
    encoder = truncating(encoder, int(manifest.get("truncate_dim") or 0))  # a Matryoshka index: cut alike
    if manifest.get("fingerprint") != fp:
        raise ValueError(f"encoder fingerprint {fp} differs from index '{path}' (built with "
                         f"{manifest.get('fingerprint')}); add docs with the towers the index was built from")
    if int(encoder.dim) != manifest["dim"]:
        raise ValueError(f"encoder dim {encoder.dim} != index '{path}' dim {manifest['dim']}")
    docs = load_docs(path)
    removed = read_removed(path, manifest)
    new_ids = [d.id for d in iter_docs(corpus, config.corpus_split)]  # validates every row before any encoding
    clash = _live_subset(docs, removed, new_ids, path)
    if clash:
        raise ValueError(f"{len(clash)} id(s) of '{describe(corpus)}' are already in index '{path}': "
                         f"{', '.join(repr(c) for c in clash[:10])}; remove them first to replace them")
    index = read_index(path / INDEX_FILE)
    check_counts(path, manifest, index.d, index.ntotal, len(docs))
    old_vectors = open_vectors(path / VECTORS_FILE, index.ntotal, manifest["dim"]) if manifest.get("vectors") else None
    enc = encode_corpus(encoder, corpus, work, config, len(new_ids))
    add_chunks(index, enc, config.progress)
    manifest["ntotal"] = int(index.ntotal)
    manifest["generation"] = int(manifest.get("generation", 1)) + 1
    manifest["history"] = [*manifest.get("history", []), {"op": "add", "time": _now(), "rows": enc.n,
                                                          "corpus": describe(corpus)}]
    extra = {REMOVED_FILE: path / REMOVED_FILE} if (path / REMOVED_FILE).exists() else {}
    # vectors.npy grows with the index in the same new dir: the published version always has one row per id.
    # The BM25 side is extended with the new rows (kept only when the index had one); the filter map is rebuilt.
    vectors = None if old_vectors is None else chain(_row_chunks(old_vectors), enc.iter_embeddings())
    write_index_dir(path, index, [docs, *enc.docs_paths()], manifest, extra, bm25=bool(manifest.get("bm25")),
                    previous=path, vectors=vectors)
    if not config.keep_work:
        remove_work_dir(work)
    return enc.n


def _row_chunks(array: np.ndarray, rows: int = 65536) -> Iterator[np.ndarray]:
    """``array`` (a memmap) in row blocks, so copying it never holds more than one block in RAM."""
    for start in range(0, len(array), rows):
        yield np.asarray(array[start : start + rows])


def _live_subset(docs: object, removed: np.ndarray, ids: Sequence[str], where: Path) -> list[str]:
    """The ids among ``ids`` that a live row of ``docs`` already has."""
    if not ids:
        return []
    hit = pc.is_in(docs.data.column("id"), value_set=pa.array(list(ids), pa.string())).to_numpy(zero_copy_only=False)
    rows = np.flatnonzero(hit)
    rows = rows[~np.isin(rows, removed)]
    return [str(x) for x in docs.select(rows.tolist())["id"]] if len(rows) else []


def remove_docs(index_dir: str | Path, ids: Sequence[str], wait: float = 0.0) -> int:
    """Tombstone the docs with ``ids`` (all must be live, else nothing changes). Returns rows removed.

    Every file of the INDEX dir but removed.npy and the manifest is hard-linked (not copied) into the new dir,
    so removal costs O(#removed). Holds the writer lock like :func:`add_docs`.
    """
    path = Path(index_dir)
    with exclusive(path, wait):
        return _remove(path, ids)


def _remove(path: Path, ids: Sequence[str]) -> int:
    manifest = read_manifest(path)
    docs = load_docs(path)
    removed = read_removed(path, manifest)
    rows = live_rows(docs, removed, ids, path)  # KeyError naming unknown / already removed ids
    new_removed = np.union1d(removed, rows).astype(np.int64)
    manifest["n_removed"] = int(len(new_removed))
    manifest["generation"] = int(manifest.get("generation", 1)) + 1
    manifest["history"] = [*manifest.get("history", []), {"op": "remove", "time": _now(), "rows": int(len(rows))}]
    with atomic_dir(path) as tmp:
        for src in path.rglob("*"):
            if src.is_file() and src.name not in (REMOVED_FILE, "manifest.json"):
                dst = tmp / src.relative_to(path)
                dst.parent.mkdir(parents=True, exist_ok=True)
                link_or_copy(src, dst)
        write_npy_atomic(tmp / REMOVED_FILE, new_removed)
        write_manifest(tmp, manifest)
    return int(len(rows))
