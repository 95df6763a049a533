"""Configs of the ``twotower index`` verbs and ``twotower mine``: one dataclass per concern, a default and a
why per field; the CLI is generated from them. Kept free of faiss/torch imports so ``--help`` stays fast.

``EncodeConfig`` (how a corpus is read and encoded: build, add, a shard), ``IndexBuildConfig`` (which FAISS
index: build, merge), ``ShardConfig`` (which part of the corpus: a sharded build), ``MergeConfig`` (how shards
are joined), ``MineConfig`` (hard-negative mining).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from common.cliargs import field, flag_of
from common.device import check_device
from index.hybrid import FUSIONS, MODES, NORMS, QUERY_DEFAULTS

DTYPES = ("float32", "float16")
MERGE_METHODS = ("add", "merge_from", "ondisk")
SAMPLING = ("top", "random")
MAX_MINE_RANK = 100_000  # candidates searched per query when mining: faiss allocates nq x range_max results


@dataclass
class EncodeConfig:
    """How a corpus is read and encoded into chunks on disk (``index build``, ``index add``, a shard's build)."""

    batch_size: int = field(64, "texts per encoder forward pass")
    chunk_size: int = field(16384, "docs per embedding chunk on disk: the unit of resume and of encode memory")
    dtype: str = field("float32", "storage dtype of the embedding chunks (float16 halves the disk space)",
                       choices=DTYPES)
    corpus_split: str = field("train", "split to stream when --corpus is a hub dataset (hf:NAME[:CONFIG])")
    work_dir: str = field("", "embedding chunks while encoding (default: .<out>.work beside --out; sharded: one "
                              "subdir per shard); rerun resumes")
    keep_work: bool = field(False, "keep the embedding chunks after a successful build")
    device: str = field("auto", "device for the towers: auto (cuda if available), cpu, cuda, cuda:N")
    progress: bool = field(True, "show progress bars")

    def __post_init__(self) -> None:
        check_device(self.device)
        for name in ("batch_size", "chunk_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype '{self.dtype}': choose {', '.join(DTYPES)}")


@dataclass
class IndexBuildConfig:
    """Which FAISS index to build from encoded vectors (``index build``, ``index merge``)."""

    factory: str = field("auto", "faiss index_factory string (Flat, IVF4096,Flat, IVF4096,SQ8, IVF4096,PQ32, HNSW32, "
                                 "OPQ32,IVF4096,PQ32, ...) or 'auto' (from corpus size and --memory-budget)")
    memory_budget: str = field("", "RAM the index may take, e.g. 8GB (empty: half the RAM); drives --factory auto")
    train_size: int = field(0, "vectors sampled to train IVF/PQ/OPQ (0 = auto: 64 per IVF list, >= 50k, <= n, "
                                  "the sample within a quarter of --memory-budget)")
    nprobe: int = field(0, "default IVF lists probed per query, stored in the manifest (0 = auto)")
    ef_search: int = field(0, "default HNSW search breadth, stored in the manifest (0 = auto)")
    seed: int = field(0, "seed for the training sample")
    overwrite: bool = field(False, "replace an existing index dir at --out (atomically)")
    bm25: bool = field(True, "also store a BM25 (bm25s) index of the same docs, for `search --mode bm25|hybrid` "
                             "(seconds per 100k docs; --no-bm25 leaves it out)")
    default_mode: str = field("dense", "query mode recorded in the manifest, used when a search names none: dense "
                                       "(towers), bm25, or hybrid (both, fused)", choices=list(MODES))
    default_fusion: str = field("rrf", "hybrid fusion recorded in the manifest: rrf (reciprocal rank, k=60) or "
                                       "weighted (alpha * dense + (1 - alpha) * bm25 of normalised scores)",
                                choices=list(FUSIONS))
    default_alpha: float = field(0.5, "weight of the dense side in weighted fusion (0..1), recorded in the manifest")
    default_norm: str = field("minmax", "score normalisation of weighted fusion recorded in the manifest: minmax or "
                                        "zscore", choices=list(NORMS))

    def __post_init__(self) -> None:
        if self.default_mode not in MODES:
            raise ValueError(f"unknown --default-mode '{self.default_mode}': choose {', '.join(MODES)}")
        if self.default_fusion not in FUSIONS:
            raise ValueError(f"unknown --default-fusion '{self.default_fusion}': choose {', '.join(FUSIONS)}")
        if self.default_norm not in NORMS:
            raise ValueError(f"unknown --default-norm '{self.default_norm}': choose {', '.join(NORMS)}")
        if not 0.0 <= self.default_alpha <= 1.0:
            raise ValueError(f"--default-alpha must be between 0 and 1, got {self.default_alpha:g}")
        if self.default_mode != "dense" and not self.bm25:
            raise ValueError(f"--default-mode {self.default_mode} needs the BM25 side: drop --no-bm25")

    def query_defaults(self) -> dict[str, object]:
        """The manifest's ``query_defaults``: what a search without mode/fusion/alpha uses."""
        return {**QUERY_DEFAULTS, "mode": self.default_mode, "fusion": self.default_fusion,
                "alpha": self.default_alpha, "norm": self.default_norm}

    def index_options_given(self) -> list[str]:
        """Flags of the index options set away from their defaults (``--overwrite`` is not one)."""
        return [flag_of(f) for f in dataclasses.fields(self)
                if f.name != "overwrite" and getattr(self, f.name) != f.default]


@dataclass
class ShardConfig:
    """Which part of the corpus this process encodes (``index build --shard-id I --num-shards N``)."""

    shard_id: int = field(-1, "encode only shard i of --num-shards (contiguous rows) into OUT/shard-I-of-N; "
                              "merge the shards with `twotower index merge` (-1: under torchrun, RANK)")
    num_shards: int = field(0, "split the corpus into this many shards, one per machine or process (0: under "
                               "torchrun, WORLD_SIZE; else no sharding)")

    @property
    def sharded(self) -> bool:
        return self.num_shards > 0 or self.shard_id >= 0


@dataclass
class MergeConfig:
    """How ``twotower index merge`` puts the shards together (index options are ``IndexBuildConfig``'s)."""

    method: str = field("add", "add: one index, shards added in order; merge_from: one index per shard from the "
                               "shared trained index, joined by faiss merge_from; ondisk: IVF only, per-shard "
                               "indexes joined by faiss merge_ondisk into index.ivfdata (memory-mapped)",
                        choices=MERGE_METHODS)
    progress: bool = field(True, "show progress bars")


@dataclass
class MineConfig:
    """Where to mine and how to guard against false negatives (CLI: ``twotower mine``)."""

    towers: str = field("", "TOWERS dir: the query tower searches, the result tower encodes candidates",
                        required=True)
    pairs: str = field("", "pairs file (JSONL/CSV/Parquet) or dataset with query and positive columns", required=True)
    out: str = field("", "output file (.jsonl or .parquet): the pairs plus a negatives column", required=True)
    overwrite: bool = field(False, "replace --out if it exists (default: refuse)")
    corpus: str = field("", "extra corpus (BEIR corpus.jsonl / parquet) to mine from besides the positives")
    query_column: str = field("query", "query column of --pairs")
    positive_column: str = field("positive", "positive column of --pairs")
    negatives_column: str = field("negatives", "negatives column of --pairs (replaced by the mined ones)")
    num_negatives: int = field(5, "negatives per query (NV-Retriever: 10 or fewer)")
    range_min: int = field(0, "skip candidates ranked above this (0 = start at the top)")
    range_max: int = field(50, "consider candidates up to this rank (exclusive)")
    relative_margin: float | None = field(0.05, "drop candidates scoring above (1 - margin) * positive score "
                                                "(NV-Retriever TopK-PercPos: 0.05)")
    absolute_margin: float | None = field(None, "drop candidates scoring above positive score - margin")
    max_score: float | None = field(None, "drop candidates scoring above this")
    sampling: str = field("top", "take the top candidates or a random sample of them", choices=SAMPLING)
    keep_short: bool = field(False, "keep rows that got fewer than --num-negatives negatives (default: drop them)")
    factory: str = field("auto", "faiss index over the candidates ('auto': Flat below 100k, IVF beyond)")
    batch_size: int = field(64, "texts per encoder forward pass")
    device: str = field("auto", "device for the towers: auto, cpu, cuda, cuda:N")
    seed: int = field(0, "seed for --sampling random")
    progress: bool = field(True, "show progress bars")

    def validate(self) -> None:
        check_device(self.device)
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.num_negatives < 1:
            raise ValueError(f"num_negatives must be >= 1, got {self.num_negatives}")
        if self.range_max > MAX_MINE_RANK:
            raise ValueError(f"--range-max must be <= {MAX_MINE_RANK}, got {self.range_max}")
        if not 0 <= self.range_min < self.range_max:
            raise ValueError(f"need 0 <= range_min < range_max, got range_min={self.range_min}, "
                             f"range_max={self.range_max}")
        if self.num_negatives > self.range_max - self.range_min:
            raise ValueError(f"cannot mine {self.num_negatives} negatives from ranks [{self.range_min}, "
                             f"{self.range_max}): widen the range or lower num_negatives")
        if self.sampling not in SAMPLING:
            raise ValueError(f"unknown sampling '{self.sampling}': choose {', '.join(SAMPLING)}")
