"""The INDEX dir's files: doc store (Arrow via ``datasets``), ``manifest.json``, tombstones, embedding chunks.

Layout::

    INDEX/
      index.faiss      CPU form of the faiss index; faiss id i = doc row i
      docs/            datasets.save_to_disk: columns id, title, text, metadata (JSON string); memory-mapped
      removed.npy      int64 rows removed by `index remove` (tombstones, never returned by search)
      bm25/            the BM25 side of the same rows (index.bm25: numpy arrays + JSON, no pickles)
      filters.arrow    per-field inverted map of the docs' metadata (index.filters), for filtered search
      index.ivfdata    only from `index merge --method ondisk`: the IVF lists, memory-mapped by index.faiss
      vectors.npy      optional (n, dim) float32/float16 vectors, memory-mapped to re-score compact-index
                       candidates exactly (``index.rescore``; manifest ``vectors``, ``rescore``)
      manifest.json    format_version, dim, metric, factory, ntotal, generation (+1 per change), search
                       defaults, fingerprint, ...
"""
from __future__ import annotations

import io
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from datasets.utils import logging as ds_logging

from twotower.common.atomic import write_bytes_atomic, write_json_atomic
from twotower.common.schemas import IndexManifest, check_removed, read_json_file
from twotower.index.corpus import Doc

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
INDEX_FILE = "index.faiss"
DOCS_DIR = "docs"
REMOVED_FILE = "removed.npy"
IVFDATA_FILE = "index.ivfdata"
VECTORS_FILE = "vectors.npy"
DOC_COLUMNS = ("id", "title", "text", "metadata")
STALE_AFTER_S = 3600  # a temp dir untouched this long is reported by `index build` as a likely leftover


def write_docs_chunk(path: str | Path, docs: Sequence[Doc]) -> None:
    """Write ``docs`` as one Arrow IPC stream file (the format ``datasets`` memory-maps), atomically."""
    table = pa.table({c: pa.array([getattr(d, c) for d in docs], pa.string()) for c in DOC_COLUMNS})
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    write_bytes_atomic(path, sink.getvalue().to_pybytes())


def save_docs(parts: Sequence[Any], out_dir: str | Path) -> None:
    """Concatenate doc chunk files and/or ``datasets.Dataset`` objects into one saved dataset at ``out_dir``."""
    loaded = [datasets.Dataset.from_file(str(p)) if isinstance(p, (str, Path)) else p for p in parts]
    assert loaded, "save_docs needs at least one part"
    ds = loaded[0] if len(loaded) == 1 else datasets.concatenate_datasets(loaded)
    was_enabled = ds_logging.is_progress_bar_enabled()
    ds_logging.disable_progress_bar()  # a copy of already-encoded rows: fast, and our own bars cover the job
    try:
        ds.save_to_disk(str(out_dir))
    finally:
        if was_enabled:
            ds_logging.enable_progress_bar()


def load_docs(index_dir: str | Path) -> Any:
    """The doc store as a memory-mapped ``datasets.Dataset`` (row i = faiss id i)."""
    path = Path(index_dir) / DOCS_DIR
    if not path.is_dir():
        raise FileNotFoundError(f"index dir '{index_dir}' has no {DOCS_DIR}/ doc store")
    ds = datasets.load_from_disk(str(path))
    missing = [c for c in DOC_COLUMNS if c not in ds.column_names]
    if missing:
        raise ValueError(f"doc store '{path}' lacks column(s) {', '.join(missing)} (has {', '.join(ds.column_names)})")
    return ds


def read_manifest(index_dir: str | Path) -> dict[str, Any]:
    """``manifest.json`` of an INDEX dir, checked against its schema (``common.schemas.IndexManifest``: every
    field's type and range, one line naming the field) and for a supported format version."""
    path = Path(index_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"'{index_dir}' is not an index dir: no {MANIFEST} "
                                "(build one with `twotower index build`)")
    manifest = read_json_file(path, IndexManifest)
    if manifest["format_version"] > FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {manifest['format_version']} is newer than this twotower supports "
                         f"({FORMAT_VERSION}); upgrade twotower")
    if manifest.get("n_removed", 0) > manifest["ntotal"]:
        raise ValueError(f"{path}: field 'n_removed': found {manifest['n_removed']}, expected at most ntotal "
                         f"{manifest['ntotal']}")
    return manifest


def recorded_towers_dir(index_dir: str | Path, manifest: dict[str, Any]) -> Path:
    """The TOWERS dir the index was built with (recorded in its manifest), checked to still be there.

    Raises:
        ValueError: no towers dir recorded. FileNotFoundError: it was moved or deleted; both say to pass
        ``--towers``.
    """
    value = manifest.get("towers_dir")
    if not value:
        raise ValueError(f"index '{index_dir}' records no towers dir: pass the TOWERS dir (--towers)")
    path = Path(value)
    if not (path / "twotower.json").is_file():
        state = "no longer exists" if not path.exists() else "holds no twotower.json"
        raise FileNotFoundError(f"index '{index_dir}' was built with towers dir '{value}', which {state} (moved or "
                                f"deleted?); pass --towers DIR with those towers (their fingerprint is checked)")
    return path


def next_generation(index_dir: str | Path) -> int:
    """The ``generation`` for the next version of an INDEX dir: one more than the current version's (1 for a
    new dir). Every publish (build --overwrite, add, remove) counts up, so a server can tell versions apart."""
    try:
        return int(read_manifest(index_dir).get("generation", 1)) + 1
    except (FileNotFoundError, ValueError, TypeError):
        return 1


def write_manifest(index_dir: str | Path, manifest: dict[str, Any]) -> None:
    write_json_atomic(Path(index_dir) / MANIFEST, manifest)


def write_npy_atomic(path: str | Path, array: np.ndarray) -> None:
    """``np.save`` to a temp file + rename (no pickles: object arrays are refused)."""
    assert array.dtype != object, "object arrays would need pickle"
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    write_bytes_atomic(path, buf.getvalue())


def write_vectors(path: str | Path, chunks: Any, n: int, d: int, dtype: str) -> None:
    """Write the (n, d) vectors arriving as row chunks into a new ``.npy`` file (``dtype`` float32/float16),
    one chunk in memory at a time. Callers write into a temp dir that is renamed when complete."""
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.dtype(dtype), shape=(n, d))
    filled = 0
    for chunk in chunks:
        out[filled : filled + len(chunk)] = chunk
        filled += len(chunk)
    assert filled == n, f"wrote {filled} vector rows, expected {n}"
    out.flush()
    del out


def check_counts(index_dir: str | Path, manifest: dict[str, Any], dim: int, ntotal: int, n_docs: int) -> None:
    """The cross-checks between an INDEX dir's files: index.faiss's dim and vector count against
    manifest.json, and the doc store's rows against both; a disagreement is one line with the two values."""
    path = Path(index_dir)
    if dim != manifest["dim"]:
        raise ValueError(f"{path / INDEX_FILE}: dim {dim} but {MANIFEST} says {manifest['dim']}")
    if ntotal != manifest["ntotal"]:
        raise ValueError(f"{path / INDEX_FILE}: {ntotal} vectors but {MANIFEST} says {manifest['ntotal']} (ntotal)")
    if n_docs != ntotal:
        raise ValueError(f"index '{path}': {INDEX_FILE} holds {ntotal} vectors but {DOCS_DIR}/ has {n_docs} ids; the "
                         f"index dir is inconsistent, rebuild it")


def read_removed(index_dir: str | Path, manifest: dict[str, Any] | None = None) -> np.ndarray:
    """Sorted int64 tombstoned rows (empty when nothing was removed), checked against ``manifest`` (read when
    not given): unique rows below ``ntotal``, ``n_removed`` of them (``common.schemas.check_removed``)."""
    manifest = manifest if manifest is not None else read_manifest(index_dir)
    path = Path(index_dir) / REMOVED_FILE
    n_removed = int(manifest.get("n_removed", 0))
    if not path.exists():
        if n_removed:
            raise ValueError(f"index '{index_dir}': manifest.json says n_removed {n_removed} but there is no "
                             f"{REMOVED_FILE}; the index dir is damaged, rebuild it")
        return np.empty(0, np.int64)
    return check_removed(path, int(manifest["ntotal"]), n_removed)


def live_rows(docs: Any, removed: np.ndarray, ids: Sequence[str], where: str | Path) -> np.ndarray:
    """Rows (int64, in the order of ``ids``) of the live docs with these ids, found with one Arrow scan.

    Raises:
        KeyError: naming (up to 10 of) the ids that no live row has.
    """
    ids = list(dict.fromkeys(str(i) for i in ids))
    if not ids:
        return np.empty(0, np.int64)
    pos = pc.index_in(docs.data.column("id"), value_set=pa.array(ids, pa.string()))  # per row: index in ids | null
    pos = pos.to_numpy(zero_copy_only=False)
    rows = np.flatnonzero(~np.isnan(pos.astype(np.float64)))
    rows = rows[~np.isin(rows, removed)]
    out = np.full(len(ids), -1, np.int64)
    out[pos[rows].astype(np.int64)] = rows
    missing = [ids[j] for j in np.flatnonzero(out < 0)]
    if missing:
        shown = ", ".join(repr(m) for m in missing[:10])
        shown += f" (+{len(missing) - 10} more)" if len(missing) > 10 else ""
        raise KeyError(f"{len(missing)} id(s) not in index '{where}' (unknown or already removed): {shown}")
    return out


def index_info(index_dir: str | Path) -> dict[str, Any]:
    """What is inside an INDEX dir, from its manifest and file sizes (does not load the index)."""
    path = Path(index_dir)
    m = read_manifest(path)
    size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    index_bytes = (path / INDEX_FILE).stat().st_size
    vectors = path / VECTORS_FILE
    n = max(int(m["ntotal"]), 1)
    return {
        "path": str(path), "format_version": m["format_version"], "factory": m["factory"], "dim": m["dim"],
        "metric": m["metric"], "ntotal": m["ntotal"], "n_removed": m.get("n_removed", 0),
        "n_live": m["ntotal"] - m.get("n_removed", 0), "search_defaults": m["search_defaults"],
        "fingerprint": m.get("fingerprint"), "towers_dir": m.get("towers_dir"), "encoder": m.get("encoder"),
        "corpus": m.get("corpus"), "size_bytes": size, "index_bytes": index_bytes,
        "created": m.get("created"), "faiss_version": m.get("faiss_version"), "generation": m.get("generation", 1),
        "factory_reason": (m.get("build_config") or {}).get("factory_reason"),
        "bm25": bool(m.get("bm25")), "filter_fields": sorted((m.get("filters") or {}).get("fields") or {}),
        "query_defaults": m.get("query_defaults"),
        "vectors": m.get("vectors"), "rescore": m.get("rescore", 0), "truncate_dim": m.get("truncate_dim"),
        # RAM: the faiss index is read whole into memory; docs/ and vectors.npy are memory-mapped (disk)
        "ram_bytes_per_doc": round(index_bytes / n, 1), "disk_bytes_per_doc": round(size / n, 1),
        "vectors_bytes_per_doc": round(vectors.stat().st_size / n, 1) if vectors.is_file() else 0,
    }


def link_or_copy(src: str | Path, dst: str | Path) -> None:
    """Hard-link ``src`` to ``dst`` (a copy where the filesystem has no hard links).

    Safe for every file of INDEX, SHARD and work dirs: they are never changed in place (each change writes a
    new file or dir), so two names for one inode never see a write.
    """
    try:
        os.link(src, dst)
    except OSError:  # filesystems without hard links, or src and dst on different devices
        shutil.copy2(src, dst)


def stale_temp_dirs(dest: str | Path, older_than_s: float = STALE_AFTER_S) -> list[tuple[Path, float]]:
    """Leftovers of interrupted writes of ``dest``: the ``.NAME.tmp-*`` / ``.NAME.old-*`` dirs beside it
    (``common.atomic`` names them so) in which nothing changed for ``older_than_s`` seconds.

    They are only reported, never deleted: a slow write of another live process may look just like that, and
    only the user can tell. Nothing reads them (``load_index`` and ``index info`` look inside ``dest`` only).

    Returns:
        (dir, seconds since its newest change) pairs, oldest first.
    """
    dest = Path(dest)
    if not dest.parent.is_dir():
        return []
    prefixes = (f".{dest.name}.tmp-", f".{dest.name}.old-")
    now, found = time.time(), []
    for path in dest.parent.iterdir():
        if not path.name.startswith(prefixes) or path.is_symlink() or not path.is_dir():
            continue
        try:  # the newest change anywhere inside: a live write keeps touching its files
            newest = max([path.stat().st_mtime] + [p.lstat().st_mtime for p in path.rglob("*")])
        except FileNotFoundError:  # being renamed or deleted right now: someone is on it
            continue
        if now - newest > older_than_s:
            found.append((path, now - newest))
    return sorted(found, key=lambda pair: -pair[1])
