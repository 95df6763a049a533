"""Offline indexing job: encode a corpus with the result tower, build a FAISS index, write an INDEX dir.

``build_index(encoder, corpus, out)`` streams the corpus through the encoder into embedding chunks on disk
(resumable, see ``index.encode``), trains the index on a sample, adds the chunks one at a time, and writes
``index.faiss`` + ``docs/`` + ``manifest.json`` into a temp dir that is renamed onto ``out`` only when
complete: a crash at any point leaves a previous INDEX dir as it was.
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from tqdm.auto import tqdm

from twotower.common.atomic import atomic_dir
from twotower.common.encoder import Encoder, TruncatedEncoder
from twotower.common.lock import exclusive
from twotower.common.outputs import check_out_dir, check_work_dir, remove_work_dir
from twotower.index.bm25 import BM25_DIR, BM25Index
from twotower.index.config import EncodeConfig, IndexBuildConfig
from twotower.index.corpus import Corpus, count_rows, describe, doc_text
from twotower.index.encode import EncodedCorpus, default_work_dir, encode_corpus, encoder_fingerprint, encoder_name
from twotower.index.factory import auto_factory, parse_memory
from twotower.index.faiss_utils import check_trainable, make_index, nlist_of, search_defaults, train_index, write_index
from twotower.index.filters import FILTERS_FILE, build_filter_table, describe_fields, save_filter_table
from twotower.index.query import QUERY_DEFAULTS
from twotower.index.store import (
    DOCS_DIR,
    FORMAT_VERSION,
    INDEX_FILE,
    VECTORS_FILE,
    link_or_copy,
    load_docs,
    next_generation,
    save_docs,
    write_manifest,
    write_vectors,
)


def build_index(encoder: Encoder, corpus: Corpus, out: str | Path, config: IndexBuildConfig | None = None,
                encode: EncodeConfig | None = None, towers_dir: str | Path | None = None, wait: float = 0.0) -> Path:
    """Encode ``corpus`` with ``encoder`` and write a complete INDEX dir at ``out``.

    Args:
        encoder: any Encoder-protocol object (``result_encoder(TwoTower.load(dir))`` for towers).
        corpus: corpus.jsonl / .parquet / BEIR dir / saved dataset dir / ``hf:NAME`` / list of row dicts.
        out: the INDEX dir to create (or replace, with ``config.overwrite``; a symlink is followed and swapped,
            see ``common.atomic``).
        config: the index options; encode: how the corpus is read and encoded (see ``index.encode``).
        towers_dir: recorded in the manifest so search can load the matching query tower.
        wait: seconds to wait for another writer of ``out`` (``common.lock``); 0 refuses at once.

    Returns:
        ``out`` as a Path. (A sharded build writes SHARD dirs instead: ``index.shard.build_shard``.)
    """
    config = config or IndexBuildConfig()
    encode = encode or EncodeConfig()
    out = Path(out)
    check_build_out(out, corpus, towers_dir, config, encode)
    with exclusive(out, wait):
        check_build_out(out, corpus, towers_dir, config, encode)  # again: another writer may have been first
        _build(encoder, corpus, out, config, encode, towers_dir)
    return out


def check_build_out(out: str | Path, corpus: Corpus, towers_dir: str | Path | None, config: IndexBuildConfig,
                    encode: EncodeConfig) -> Path:
    """Refuse an ``--out`` / ``--work-dir`` a build could damage (``common.outputs``); the work dir it will use."""
    inputs = {"--towers": towers_dir, "--corpus": corpus if isinstance(corpus, (str, Path)) else None}
    check_out_dir(out, ("index",), verb="index build", inputs=inputs, overwrite=config.overwrite)
    work = Path(encode.work_dir) if encode.work_dir else default_work_dir(out)
    return check_work_dir(work, out)


def truncating(encoder: Encoder, dim: int) -> Encoder:
    """``encoder`` cut to its first ``dim`` coordinates, re-normalised (``--dim``); as is for 0 or its own dim."""
    return encoder if not dim or dim == int(encoder.dim) else TruncatedEncoder(encoder, dim)


def _build(encoder: Encoder, corpus: Corpus, out: Path, config: IndexBuildConfig, encode: EncodeConfig,
           towers_dir: str | Path | None) -> None:
    budget = parse_memory(config.memory_budget)
    full_dim = int(encoder.dim)
    encoder = truncating(encoder, config.dim)  # a --dim above the towers' fails here, before any encoding
    dim = int(encoder.dim)
    total = count_rows(corpus, encode.corpus_split)
    if config.factory != "auto":  # a bad factory string, or one the corpus is too small to train, fails now,
        probe = make_index(config.factory, dim)  # not after hours of encoding
        if total and not probe.is_trained:
            check_trainable(probe, min(total, config.train_size or total), config.factory)
    if config.factory == "auto" and total:
        auto_factory(total, dim, budget)  # a budget even IVF-PQ cannot meet fails before encoding too
    work = Path(encode.work_dir) if encode.work_dir else default_work_dir(out)
    t0 = time.time()
    enc = encode_corpus(encoder, corpus, work, encode, total)
    t_encode = time.time() - t0
    if config.factory == "auto":
        choice = auto_factory(enc.n, dim, budget)
        factory, reason, auto_rescore = choice.factory, choice.reason, choice.rescore
    else:
        factory, reason, auto_rescore = config.factory, "given", 0
    rescore, vectors = config.resolve_rescore(auto_rescore)
    index, defaults, t_train = train_and_add(enc, factory, config, encode.progress)
    manifest = new_manifest(
        dim=dim, factory=factory, ntotal=int(index.ntotal), search_defaults=defaults,
        fingerprint=encoder_fingerprint(encoder), encoder=encoder_name(encoder), towers_dir=towers_dir,
        corpus=describe(corpus), normalized=enc.normalized,
        build={**dataclasses.asdict(config), **dataclasses.asdict(encode), "factory_reason": reason,
               "memory_budget_bytes": budget, "encode_seconds": round(t_encode, 1), "index_seconds": round(t_train, 1)})
    set_memory_fields(manifest, rescore, vectors, dim, full_dim)
    manifest["generation"] = next_generation(out)
    manifest["query_defaults"] = config.query_defaults()
    write_index_dir(out, index, [*enc.docs_paths()], manifest, bm25=config.bm25,
                    vectors=enc.iter_embeddings() if vectors else None)
    if not encode.keep_work:
        remove_work_dir(work)


def train_and_add(enc: EncodedCorpus, factory: str, config: IndexBuildConfig,
                  progress: bool = True) -> tuple[Any, dict[str, int], float]:
    """Make the index, train it on a sample of the chunks, add every chunk. Returns (index, defaults, seconds)."""
    t0 = time.time()
    index = train_empty(enc, factory, config)
    add_chunks(index, enc, progress)
    return index, tuned_defaults(index, config), time.time() - t0


def train_empty(enc: EncodedCorpus, factory: str, config: IndexBuildConfig) -> Any:
    """The index ``factory`` trained on ``config.train_size`` vectors drawn uniformly from ``enc`` (still empty)."""
    index = make_index(factory, enc.dim)
    if not index.is_trained:
        nlist = nlist_of(index) or 0
        nt = config.train_size or auto_train_size(enc.n, nlist, enc.dim, parse_memory(config.memory_budget))
        check_trainable(index, min(nt, enc.n), factory)
        train_index(index, enc.sample(min(nt, enc.n), config.seed))
    return index


def auto_train_size(n: int, nlist: int, dim: int, budget: int) -> int:
    """Vectors to train on when ``--train-size 0``: 64 per IVF list and >= 50k (k-means quality), but the
    float32 sample may take at most a quarter of the memory budget (never below faiss's 39 per list)."""
    want = max(64 * nlist, 50_000)
    cap = max(budget // 4 // (4 * dim), 39 * nlist, 1)
    return min(want, cap, n)


def add_chunks(index: Any, enc: EncodedCorpus, progress: bool = True, desc: str = "add") -> None:
    """Add the vectors of ``enc`` to ``index`` chunk by chunk, in order (ids continue from ``index.ntotal``)."""
    with tqdm(total=enc.n, desc=desc, unit="vec", disable=not progress) as bar:
        for xb in enc.iter_embeddings():
            index.add(xb)
            bar.update(len(xb))


def tuned_defaults(index: Any, config: IndexBuildConfig) -> dict[str, int]:
    """The search defaults for the manifest: faiss_utils' defaults, overridden by ``--nprobe``/``--ef-search``."""
    defaults = search_defaults(index)
    if config.nprobe and "nprobe" in defaults:
        defaults["nprobe"] = config.nprobe
    if config.ef_search and "ef_search" in defaults:
        defaults["ef_search"] = config.ef_search
    return defaults


def new_manifest(*, dim: int, factory: str, ntotal: int, search_defaults: dict[str, int], fingerprint: str | None,
                 encoder: str, towers_dir: str | Path | None, corpus: str, normalized: bool,
                 build: dict[str, Any]) -> dict[str, Any]:
    """The manifest.json contents of a freshly built index."""
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return {
        "format_version": FORMAT_VERSION, "dim": dim, "metric": "inner_product", "normalized": normalized,
        "factory": factory, "ntotal": ntotal, "n_removed": 0, "search_defaults": search_defaults,
        "fingerprint": fingerprint, "encoder": encoder,
        "towers_dir": str(Path(towers_dir).resolve()) if towers_dir else None,
        "corpus": corpus, "build_config": build, "created": now, "faiss_version": faiss.__version__,
        "generation": 1, "history": [{"op": "build", "time": now, "rows": ntotal}],
    }


def write_query_sides(tmp: Path, docs: Any, manifest: dict[str, Any], bm25: bool = True,
                      previous: Path | None = None) -> None:
    """Write the metadata filter map and (``bm25``) the BM25 side of the doc store ``docs`` into ``tmp``, and
    describe them in ``manifest`` (row i of each = doc row i = faiss id i)."""
    table = docs.data
    t0 = time.time()
    fmap = build_filter_table(table.column("metadata").to_pylist())
    save_filter_table(fmap, tmp / FILTERS_FILE)
    manifest["filters"] = {"file": FILTERS_FILE, "fields": describe_fields(fmap)}
    manifest.pop("bm25", None)
    if bm25:
        old = None
        if previous is not None and (previous / BM25_DIR).is_dir():
            old = BM25Index.load(previous / BM25_DIR, mmap=True)
            old = old if old.ntotal <= table.num_rows else None
        start = old.ntotal if old is not None else 0
        titles = table.column("title").slice(start).to_pylist()
        texts = [doc_text(t or "", x) for t, x in zip(titles, table.column("text").slice(start).to_pylist())]
        side = old.extend(texts) if old is not None else BM25Index.build(texts)
        side.save(tmp / BM25_DIR)
        manifest["bm25"] = side.config()
    manifest.setdefault("query_defaults", dict(QUERY_DEFAULTS))
    manifest["sides_seconds"] = round(time.time() - t0, 2)


def set_memory_fields(manifest: dict[str, Any], rescore: int, vectors: str | None, dim: int, full_dim: int) -> None:
    """Record re-scoring (default factor, vectors.npy dtype) and Matryoshka truncation in a new manifest."""
    manifest["rescore"] = int(rescore)
    manifest["vectors"] = vectors  # dtype of vectors.npy, or None: no float vectors kept
    manifest["truncate_dim"] = dim if dim != full_dim else None  # queries are cut to this many dims too
    manifest["towers_dim"] = full_dim


def write_index_dir(out: Path, index: Any, doc_parts: list[Any], manifest: dict[str, Any],
                    extra_files: dict[str, Path] | None = None, bm25: bool = True, previous: Path | None = None,
                    vectors: Iterable[np.ndarray] | None = None) -> None:
    """Write index.faiss, docs/, the query-time sides (bm25/, filters.arrow), the optional vectors.npy and
    manifest.json to a temp dir and rename it onto ``out`` (atomic: a crash leaves the previous INDEX dir whole,
    every side in step with it).

    Args:
        bm25: store the BM25 side; previous: the INDEX dir this one extends (``index add``): its BM25 side is
            extended with the new rows instead of re-tokenising every row.
        vectors: row chunks of the (ntotal, dim) vectors, written to vectors.npy in the manifest's ``vectors``
            dtype (for re-scoring); None: none kept.
    """
    assert (vectors is None) == (not manifest.get("vectors")), "vectors given iff the manifest keeps them"
    with atomic_dir(out) as tmp:
        write_index(index, tmp / INDEX_FILE)
        if vectors is not None:
            write_vectors(tmp / VECTORS_FILE, vectors, int(manifest["ntotal"]), int(manifest["dim"]),
                          manifest["vectors"])
        save_docs(doc_parts, tmp / DOCS_DIR)
        write_query_sides(tmp, load_docs(tmp), manifest, bm25, previous)
        for name, src in (extra_files or {}).items():
            link_or_copy(src, tmp / name)
        manifest["index_bytes"] = (tmp / INDEX_FILE).stat().st_size
        write_manifest(tmp, manifest)
