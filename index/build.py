"""Offline indexing job: encode a corpus with the result tower, build a FAISS index, write an INDEX dir.

``build_index(encoder, corpus, out)`` streams the corpus through the encoder into embedding chunks on disk
(resumable, see ``index.encode``), trains the index on a sample, adds the chunks one at a time, and writes
``index.faiss`` + ``docs/`` + ``manifest.json`` into a temp dir that is renamed onto ``out`` only when
complete: a crash at any point leaves a previous INDEX dir as it was.
"""
from __future__ import annotations

import dataclasses
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from index.corpus import Corpus, count_rows, describe
from index.encode import DTYPES, EncodedCorpus, encode_corpus, encoder_fingerprint, encoder_name
from index.factory import auto_factory, parse_memory
from index.store import DOCS_DIR, FORMAT_VERSION, INDEX_FILE, link_or_copy, save_docs, write_manifest
from towers.atomic import atomic_dir
from towers.cliargs import field
from towers.encoder import Encoder

DEVICES = ("auto", "cpu", "cuda")


@dataclass
class IndexBuildConfig:
    """How to encode the corpus and which FAISS index to build (CLI: ``twotower index build``)."""

    factory: str = field("auto", "faiss index_factory string (Flat, IVF4096,Flat, IVF4096,SQ8, IVF4096,PQ32, HNSW32, "
                                 "OPQ32,IVF4096,PQ32, ...) or 'auto' (from corpus size and --memory-budget)")
    memory_budget: str = field("", "RAM the index may take, e.g. 8GB (empty: half the RAM); drives --factory auto")
    batch_size: int = field(64, "texts per encoder forward pass")
    chunk_size: int = field(16384, "docs per embedding chunk on disk: the unit of resume and of encode memory")
    dtype: str = field("float32", "storage dtype of the embedding chunks (float16 halves the disk space)",
                       choices=DTYPES)
    train_size: int = field(0, "vectors sampled to train IVF/PQ/OPQ (0 = auto: 64 per IVF list, >= 50k, <= n, "
                                  "the sample within a quarter of --memory-budget)")
    nprobe: int = field(0, "default IVF lists probed per query, stored in the manifest (0 = auto)")
    ef_search: int = field(0, "default HNSW search breadth, stored in the manifest (0 = auto)")
    corpus_split: str = field("train", "split to stream when --corpus is a hub dataset (hf:NAME[:CONFIG])")
    work_dir: str = field("", "embedding chunks while encoding (default: .<out>.work beside --out; sharded: one "
                              "subdir per shard); rerun resumes")
    keep_work: bool = field(False, "keep the embedding chunks after a successful build")
    overwrite: bool = field(False, "replace an existing index dir at --out (atomically)")
    device: str = field("auto", "device for the towers: auto (cuda if available), cpu, cuda", choices=DEVICES)
    seed: int = field(0, "seed for the training sample")
    progress: bool = field(True, "show progress bars")
    shard_id: int = field(-1, "encode only shard i of --num-shards (contiguous rows) into OUT/shard-I-of-N; "
                              "merge the shards with `twotower index merge` (-1: under torchrun, RANK)")
    num_shards: int = field(0, "split the corpus into this many shards, one per machine or process (0: under "
                               "torchrun, WORLD_SIZE; else no sharding)")


class TowerEncoder:
    """Encoder-protocol view of one side of a ``TwoTower``: on the GPU with bf16/fp16 autocast when present."""

    def __init__(self, two_tower: Any, side: str = "result", device: str = "auto") -> None:
        import torch

        if side not in ("result", "query"):
            raise ValueError(f"unknown tower side '{side}': choose result, query")
        if device not in DEVICES and not device.startswith("cuda:"):
            raise ValueError(f"unknown device '{device}': choose {', '.join(DEVICES)} or cuda:N")
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device '{device}' requested but torch sees no CUDA GPU; use --device cpu or auto")
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = two_tower.to(device)
        self.side = side
        self.dim = int(two_tower.result_tower.dim)
        self.amp_dtype = None
        if device.startswith("cuda"):
            self.amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        self._fingerprint = two_tower.fingerprint()  # hashing the weights once, not per chunk

    def encode(self, texts: Sequence[str], batch_size: int = 64, show_progress: bool = False) -> np.ndarray:
        fn = self.model.encode_results if self.side == "result" else self.model.encode_queries
        return fn(list(texts), batch_size, show_progress=show_progress, amp_dtype=self.amp_dtype)

    def fingerprint(self) -> str:
        return self._fingerprint


def result_encoder(two_tower: Any, device: str = "auto") -> TowerEncoder:
    """The encoder to index a corpus with: the result tower of ``two_tower``."""
    return TowerEncoder(two_tower, "result", device)


def default_work_dir(out: str | Path) -> Path:
    out = Path(out)
    return out.parent / f".{out.name}.work"


def build_index(encoder: Encoder, corpus: Corpus, out: str | Path, config: IndexBuildConfig | None = None,
                towers_dir: str | Path | None = None) -> Path:
    """Encode ``corpus`` with ``encoder`` and write a complete INDEX dir at ``out``.

    Args:
        encoder: any Encoder-protocol object (``result_encoder(TwoTower.load(dir))`` for towers).
        corpus: corpus.jsonl / .parquet / BEIR dir / saved dataset dir / ``hf:NAME`` / list of row dicts.
        out: the INDEX dir to create (or replace, with ``config.overwrite``).
        towers_dir: recorded in the manifest so search can load the matching query tower.

    Returns:
        ``out`` as a Path; with ``config.num_shards`` set, the SHARD dir written under ``out`` instead
        (``index.shard.build_shard``).
    """
    from index.faiss_utils import make_index

    config = config or IndexBuildConfig()
    if config.num_shards or config.shard_id >= 0:
        from index.shard import build_shard

        return build_shard(encoder, corpus, out, config, towers_dir=towers_dir)
    out = Path(out)
    if out.exists() and not config.overwrite:
        raise FileExistsError(f"index dir '{out}' already exists; pass --overwrite to replace it")
    budget = parse_memory(config.memory_budget)
    dim = int(encoder.dim)
    if config.factory != "auto":
        make_index(config.factory, dim)  # a bad factory string fails now, not after hours of encoding
    total = count_rows(corpus, config.corpus_split)
    if config.factory == "auto" and total:
        auto_factory(total, dim, budget)  # a budget even IVF-PQ cannot meet fails before encoding too
    work = Path(config.work_dir) if config.work_dir else default_work_dir(out)
    t0 = time.time()
    enc = encode_corpus(encoder, corpus, work, config.chunk_size, config.batch_size, config.dtype,
                        config.corpus_split, total, config.progress)
    t_encode = time.time() - t0
    if config.factory == "auto":
        choice = auto_factory(enc.n, dim, budget)
        factory, reason = choice.factory, choice.reason
    else:
        factory, reason = config.factory, "given"
    index, search_defaults, t_train = train_and_add(enc, factory, config)
    manifest = new_manifest(
        dim=dim, factory=factory, ntotal=int(index.ntotal), search_defaults=search_defaults,
        fingerprint=encoder_fingerprint(encoder), encoder=encoder_name(encoder), towers_dir=towers_dir,
        corpus=describe(corpus), normalized=enc.normalized,
        build={**dataclasses.asdict(config), "factory_reason": reason, "memory_budget_bytes": budget,
               "encode_seconds": round(t_encode, 1), "index_seconds": round(t_train, 1)})
    write_index_dir(out, index, [*enc.docs_paths()], manifest)
    if not config.keep_work:
        shutil.rmtree(work, ignore_errors=True)
    return out


def train_and_add(enc: EncodedCorpus, factory: str, config: IndexBuildConfig) -> tuple[Any, dict[str, int], float]:
    """Make the index, train it on a sample of the chunks, add every chunk. Returns (index, defaults, seconds)."""
    t0 = time.time()
    index = train_empty(enc, factory, config)
    add_chunks(index, enc, config.progress)
    return index, tuned_defaults(index, config), time.time() - t0


def train_empty(enc: EncodedCorpus, factory: str, config: IndexBuildConfig) -> Any:
    """The index ``factory`` trained on ``config.train_size`` vectors drawn uniformly from ``enc`` (still empty)."""
    from index.faiss_utils import ivf_of, make_index, train_index

    index = make_index(factory, enc.dim)
    if not index.is_trained:
        ivf = ivf_of(index)
        nlist = ivf.nlist if ivf is not None else 0
        nt = config.train_size or auto_train_size(enc.n, nlist, enc.dim, parse_memory(config.memory_budget))
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
    from tqdm.auto import tqdm

    with tqdm(total=enc.n, desc=desc, unit="vec", disable=not progress) as bar:
        for xb in enc.iter_embeddings():
            index.add(xb)
            bar.update(len(xb))


def tuned_defaults(index: Any, config: IndexBuildConfig) -> dict[str, int]:
    """The search defaults for the manifest: faiss_utils' defaults, overridden by ``--nprobe``/``--ef-search``."""
    from index.faiss_utils import search_defaults

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
    import faiss

    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return {
        "format_version": FORMAT_VERSION, "dim": dim, "metric": "inner_product", "normalized": normalized,
        "factory": factory, "ntotal": ntotal, "n_removed": 0, "search_defaults": search_defaults,
        "fingerprint": fingerprint, "encoder": encoder,
        "towers_dir": str(Path(towers_dir).resolve()) if towers_dir else None,
        "corpus": corpus, "build_config": build, "created": now, "faiss_version": faiss.__version__,
        "history": [{"op": "build", "time": now, "rows": ntotal}],
    }


def write_index_dir(out: Path, index: Any, doc_parts: list[Any], manifest: dict[str, Any],
                    extra_files: dict[str, Path] | None = None) -> None:
    """Write index.faiss, docs/ and manifest.json to a temp dir and rename it onto ``out`` (atomic)."""
    import faiss

    with atomic_dir(out) as tmp:
        faiss.write_index(index, str(tmp / INDEX_FILE))
        save_docs(doc_parts, tmp / DOCS_DIR)
        for name, src in (extra_files or {}).items():
            link_or_copy(src, tmp / name)
        manifest["index_bytes"] = (tmp / INDEX_FILE).stat().st_size
        write_manifest(tmp, manifest)
