"""Streamed, resumable corpus encoding: embeddings go to disk in chunks, so memory stays bounded.

The corpus is read row by row and cut into chunks of ``chunk_size`` docs. For each chunk the encoder runs
once (it length-sorts and batches inside, see ``common.encoder``), then three files are written, each
atomically, the completion record last::

    WORK/emb-000042.npy     float32|float16 (rows, dim)
    WORK/docs-000042.arrow  Arrow stream with id, title, text, metadata
    WORK/chunk-000042.json  {"rows": ..., "digest": sha256 of the chunk's docs,
                             "sha256": {"emb-000042.npy": ..., "docs-000042.arrow": ...}}

A rerun re-reads the corpus, and for every chunk whose record exists with the same digest and whose two
files still have the recorded sha256 it skips the encoder, so an interrupted build resumes from the last
finished chunk. A chunk whose docs changed, whose files were damaged, truncated or deleted on disk, or whose
record predates the ``sha256`` field is re-encoded (hashing a 50 MB chunk takes ~0.05 s; encoding it,
minutes). ``state.json`` pins the encoder fingerprint, dim, chunk size and dtype: a work dir written with
different ones is cleared (with a message) rather than mixed in. Only encoders with a ``fingerprint()``
(towers, via ``towers.inference.result_encoder``) resume; for others old chunks cannot be attributed to a model.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from twotower.common.atomic import write_json_atomic
from twotower.common.encoder import Encoder
from twotower.common.hashing import file_sha256
from twotower.common.outputs import check_work_dir, mark_work_dir
from twotower.index.config import EncodeConfig
from twotower.index.corpus import Corpus, Doc, hash_doc, iter_docs
from twotower.index.store import write_docs_chunk, write_npy_atomic

WORK_VERSION = 1


def default_work_dir(out: str | Path) -> Path:
    """Where the chunks of a build of ``out`` go unless ``--work-dir`` says otherwise: ``.<out>.work`` beside it."""
    out = Path(out)
    return out.parent / f".{out.name}.work"


@dataclass
class EncodedCorpus:
    """The finished chunks in a work dir: ``n`` vectors of ``dim`` in ``n_chunks`` files, in corpus order."""

    work_dir: Path
    n: int
    dim: int
    n_chunks: int
    normalized: bool

    def emb_path(self, i: int) -> Path:
        return self.work_dir / f"emb-{i:06d}.npy"

    def emb_paths(self) -> list[Path]:
        """The embedding chunk files in corpus order (``index.merge`` chains those of several shards)."""
        return [self.emb_path(i) for i in range(self.n_chunks)]

    def docs_paths(self) -> list[Path]:
        return [self.work_dir / f"docs-{i:06d}.arrow" for i in range(self.n_chunks)]

    def iter_embeddings(self) -> Iterator[np.ndarray]:
        """float32 (rows, dim) per chunk, in corpus order (one chunk in memory at a time)."""
        for path in self.emb_paths():
            yield np.ascontiguousarray(np.load(path, mmap_mode="r"), dtype=np.float32)

    def sample(self, nt: int, seed: int = 0) -> np.ndarray:
        """``nt`` vectors drawn uniformly without replacement: float32 (nt, dim), read chunk by chunk."""
        nt = min(nt, self.n)
        rows = np.sort(np.random.default_rng(seed).choice(self.n, size=nt, replace=False))
        out = np.empty((nt, self.dim), np.float32)
        start, filled = 0, 0
        for path in self.emb_paths():
            emb = np.load(path, mmap_mode="r")
            lo, hi = np.searchsorted(rows, [start, start + len(emb)])
            out[filled : filled + hi - lo] = emb[rows[lo:hi] - start]
            filled += hi - lo
            start += len(emb)
        assert filled == nt, f"sampled {filled} of {nt} rows"
        return out


def encoder_fingerprint(encoder: Encoder) -> str | None:
    """The encoder's ``fingerprint()`` (towers: result-tower weights hash), or None if it has none."""
    fp = getattr(encoder, "fingerprint", None)
    return str(fp()) if callable(fp) else None


def encoder_name(encoder: Encoder) -> str:
    return f"{type(encoder).__module__}.{type(encoder).__qualname__}"


def encode_corpus(encoder: Encoder, corpus: Corpus, work_dir: str | Path, config: EncodeConfig | None = None,
                  total: int | None = None, docs: Iterable[Doc] | None = None,
                  state_extra: dict[str, Any] | None = None) -> EncodedCorpus:
    """Encode every doc of ``corpus`` into chunk files under ``work_dir``, resuming finished chunks.

    Args:
        config: chunk_size, batch_size, dtype, corpus_split (a hub dataset's split) and progress (default:
            ``EncodeConfig()``; its work_dir, keep_work and device are the caller's).
        total: rows expected, for the progress bar (None: unknown).
        docs: the validated docs to encode instead of all of ``iter_docs(corpus)`` (a shard's slice, see
            ``index.shard``); ``corpus`` then only names the source in messages.
        state_extra: more keys pinned in ``state.json`` (a shard's row range): a work dir written under other
            values is cleared rather than resumed.

    Raises:
        ValueError: bad corpus row (named by line/row), empty corpus, or encoder output of the wrong shape.
    """
    config = config or EncodeConfig()  # its __post_init__ checked dtype, chunk_size and batch_size
    chunk_size, batch_size, dtype = config.chunk_size, config.batch_size, config.dtype
    work = Path(work_dir)
    dim = int(encoder.dim)
    fingerprint = encoder_fingerprint(encoder)
    _prepare_work_dir(work, {"version": WORK_VERSION, "encoder": fingerprint or encoder_name(encoder), "dim": dim,
                             "chunk_size": chunk_size, "dtype": dtype,
                             "max_length": getattr(encoder, "max_length", None),  # other lengths, other vectors
                             **(state_extra or {})},
                      resumable=fingerprint is not None)
    n, n_chunks, resumed, norms_ok = 0, 0, 0, True
    buf: list[Doc] = []
    with tqdm(total=total, desc="encode", unit="doc", disable=not config.progress, smoothing=0.05) as bar:
        def flush() -> None:
            nonlocal n, n_chunks, resumed, norms_ok
            done, ok = _finish_chunk(encoder, buf, work, n_chunks, dim, batch_size, dtype)
            resumed += done
            norms_ok &= ok
            n += len(buf)
            n_chunks += 1
            bar.update(len(buf))
            bar.set_postfix(chunks=n_chunks, resumed=resumed, refresh=False)
            buf.clear()

        for doc in iter_docs(corpus, config.corpus_split) if docs is None else docs:
            buf.append(doc)
            if len(buf) == chunk_size:
                flush()
        if buf:
            flush()
    if n == 0:
        raise ValueError(f"corpus '{corpus}' has no rows")
    _drop_chunks(work, first=n_chunks)  # left over from an earlier, longer version of the corpus
    return EncodedCorpus(work, n, dim, n_chunks, norms_ok)


def _prepare_work_dir(work: Path, state: dict[str, Any], resumable: bool) -> None:
    """Keep a work dir written under the same ``state``; otherwise clear it (saying why). Only a dir twotower
    made (``common.outputs.WORK_MARKER``) is ever cleared: any other non-empty dir is refused."""
    check_work_dir(work)
    state_path = work / "state.json"
    if state_path.exists():
        old = _read_json(state_path)
        if old == state and resumable:
            return
        if old is None:
            why = "has an unreadable state.json"
        elif old != state:
            why = f"was written with {old}, now {state}"
        else:
            why = f"cannot be trusted: encoder {state['encoder']} has no fingerprint() to tell its vectors apart"
        print(f"encode: work dir '{work}' {why}; starting over", file=sys.stderr)
        shutil.rmtree(work)
    mark_work_dir(work)
    write_json_atomic(state_path, state)


def _digest(docs: Sequence[Doc]) -> str:
    h = hashlib.sha256()
    for d in docs:
        hash_doc(h, d)
    return h.hexdigest()


def _finish_chunk(encoder: Encoder, docs: Sequence[Doc], work: Path, i: int, dim: int, batch_size: int,
                  dtype: str) -> tuple[bool, bool]:
    """Encode and write chunk ``i`` unless an intact identical one exists. Returns (resumed, unit_norms)."""
    record_path = work / f"chunk-{i:06d}.json"
    record: dict[str, Any] = {"rows": len(docs), "digest": _digest(docs)}
    emb_path, docs_path = work / f"emb-{i:06d}.npy", work / f"docs-{i:06d}.arrow"
    if _chunk_intact(record_path, record, (emb_path, docs_path)):
        return True, _unit_norms(np.load(emb_path, mmap_mode="r")[:64])
    record_path.unlink(missing_ok=True)  # the chunk is being rewritten: not finished until the record is back
    emb = _encode(encoder, [d.encode_text for d in docs], batch_size)
    if emb.shape != (len(docs), dim):
        raise ValueError(f"encoder {encoder_name(encoder)} returned shape {emb.shape} for {len(docs)} texts; "
                         f"expected ({len(docs)}, {dim})")
    if not np.isfinite(emb).all():
        raise ValueError(f"encoder {encoder_name(encoder)} returned NaN/inf for chunk {i} (docs '{docs[0].id}' ..)")
    write_npy_atomic(emb_path, emb.astype(dtype))
    write_docs_chunk(docs_path, docs)
    record["sha256"] = {p.name: file_sha256(p) for p in (emb_path, docs_path)}  # re-read from the page cache
    write_json_atomic(record_path, record)
    return False, _unit_norms(emb[:64])


def _chunk_intact(record_path: Path, record: dict[str, Any], files: Sequence[Path]) -> bool:
    """True when ``record_path`` holds ``record`` (same rows and docs digest) and every one of ``files`` has
    the sha256 it records. A record without sha256s (an older work dir) or with a damaged file is not."""
    found = _read_json(record_path) if record_path.exists() else None
    if not isinstance(found, dict) or {k: found.get(k) for k in record} != record:
        return False
    sums = found.get("sha256")
    if not isinstance(sums, dict) or set(sums) != {p.name for p in files}:
        return False
    for path in files:
        if not path.is_file() or file_sha256(path) != sums[path.name]:
            print(f"encode: chunk file '{path}' is missing or does not match its sha256; encoding the chunk again",
                  file=sys.stderr)
            return False
    return True


def _read_json(path: Path) -> Any:
    """The JSON in ``path``, or None when it is not valid JSON (a file damaged on disk is not trusted)."""
    try:
        return json.loads(path.read_bytes())
    except (ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return None


def _encode(encoder: Encoder, texts: list[str], batch_size: int) -> np.ndarray:
    with torch.inference_mode():  # no autograd state for any torch-based encoder
        return np.asarray(encoder.encode(texts, batch_size=batch_size), dtype=np.float32)


def _unit_norms(emb: np.ndarray) -> bool:
    return bool(np.allclose(np.linalg.norm(np.asarray(emb, np.float32), axis=1), 1.0, atol=1e-2))


def _drop_chunks(work: Path, first: int) -> None:
    for path in work.glob("*-*.*"):
        stem = path.stem.rsplit("-", 1)[-1]
        if stem.isdigit() and int(stem) >= first:
            path.unlink()
