"""Configs of the ``twotower index`` verbs and ``twotower mine``: one dataclass per concern, a default and a
why per field; the CLI is generated from them. Kept free of faiss/torch imports so ``--help`` stays fast.

``EncodeConfig`` (how a corpus is read and encoded: build, add, a shard), ``IndexBuildConfig`` (which FAISS
index: build, merge), ``ShardConfig`` (which part of the corpus: a sharded build), ``MergeConfig`` (how shards
are joined), ``MineConfig`` (hard-negative mining).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from twotower.common.cliargs import check_range, field, flag_of
from twotower.common.device import check_device
from twotower.index.query import MAX_RESCORE, QUERY_DEFAULTS, check_config_options, query_fields, surface_fields
from twotower.towers.config import MAX_TOKENS, MINE_RANGE_MAX, MINE_RELATIVE_MARGIN

DTYPES = ("float32", "float16")
KEEP_VECTORS = ("auto", "none", "float32", "float16")
MERGE_METHODS = ("add", "merge_from", "ondisk")
SAMPLING = ("top", "random")
MAX_MINE_RANK = 100_000  # candidates searched per query when mining: faiss allocates nq x range_max results
# faiss keeps nprobe / efSearch in a size_t (nprobe) or int (efSearch): a value stored in the manifest outside
# 0..2^31-1 would overflow inside faiss at every search, in the CLI and the server alike
MAX_SEARCH_PARAM = 2**31 - 1


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
    result_max_length: int | None = field(None, "tokens per doc for the result tower (default: the inference "
                                                "length recorded in the TOWERS dir)")

    def __post_init__(self) -> None:
        check_device(self.device)
        if self.result_max_length is not None:  # the tokenizer keeps it in a usize: 2^64 overflows there
            check_range(self, "result_max_length", 1, MAX_TOKENS)
        for name in ("batch_size", "chunk_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype '{self.dtype}': choose {', '.join(DTYPES)}")


@dataclass
@query_fields("manifest", prefix="default_")
class IndexBuildConfig:
    """Which FAISS index to build from encoded vectors (``index build``, ``index merge``)."""

    factory: str = field("auto", "faiss index_factory string (Flat, IVF4096,Flat, IVF4096,SQ8, IVF4096,PQ32, HNSW32, "
                                 "OPQ32,IVF4096,PQ32, ...) or 'auto' (from corpus size and --memory-budget)")
    memory_budget: str = field("", "RAM the index may take, e.g. 8GB (empty: half the RAM); drives --factory auto")
    train_size: int = field(0, "vectors sampled to train IVF/PQ/OPQ (0 = auto: 64 per IVF list, >= 50k, <= n, "
                                  "the sample within a quarter of --memory-budget)")
    nprobe: int = field(0, "default IVF lists probed per query, stored in the manifest (0 = auto)")
    ef_search: int = field(0, "default HNSW search breadth, stored in the manifest (0 = auto)")
    rescore: int = field(-1, "default re-scoring: search the index for k x N candidates and re-score them exactly "
                             "with the float vectors kept on disk (vectors.npy, memory-mapped); override per search "
                             "with --rescore / rescore=; 0 = off; -1 = auto (what --factory auto picks: 0 when the "
                             "float vectors fit --memory-budget, else 4 for SQ codes and 10 for PQ; 0 for a given "
                             "--factory)")
    keep_vectors: str = field("auto", "keep the vectors in vectors.npy for re-scoring: float32, float16 (half the "
                                      "disk, scores to ~1e-3), none; auto = float32 when the default --rescore is on",
                              choices=KEEP_VECTORS)
    dim: int = field(0, "index only the first DIM coordinates of each vector, re-normalised (towers trained with "
                        "--matryoshka-dims); queries are truncated alike at search; 0 = the towers' dim")
    seed: int = field(0, "seed for the training sample")
    overwrite: bool = field(False, "replace an existing index dir at --out (atomically)")
    bm25: bool = field(True, "also store a BM25 (bm25s) index of the same docs, for `search --mode bm25|hybrid` "
                             "(seconds per 100k docs; --no-bm25 leaves it out)")
    def __post_init__(self) -> None:
        check_config_options(self, "manifest", prefix="default_")
        if self.default_mode != "dense" and not self.bm25:
            raise ValueError(f"--default-mode {self.default_mode} needs the BM25 side: drop --no-bm25")
        if not -1 <= self.rescore <= MAX_RESCORE:
            raise ValueError(f"--rescore must be between -1 (auto) and {MAX_RESCORE}, got {self.rescore}")
        if self.keep_vectors not in KEEP_VECTORS:
            raise ValueError(f"unknown --keep-vectors '{self.keep_vectors}': choose {', '.join(KEEP_VECTORS)}")
        if self.rescore > 0 and self.keep_vectors == "none":
            raise ValueError(f"--rescore {self.rescore} needs the float vectors: drop --keep-vectors none")
        if self.dim < 0:
            raise ValueError(f"--dim must be >= 0 (0 = the towers' dim), got {self.dim}")
        for name in ("nprobe", "ef_search", "train_size"):  # 0 = auto; stored in the manifest, read at every search
            check_range(self, name, 0, MAX_SEARCH_PARAM)

    def query_defaults(self) -> dict[str, object]:
        """The manifest's ``query_defaults``: what a search without mode/fusion/alpha uses (a default left None,
        such as no reranker, is not recorded)."""
        given = {f.name: getattr(self, "default_" + f.name) for f in surface_fields("manifest")}
        return {**QUERY_DEFAULTS, **{k: v for k, v in given.items() if v is not None}}

    def resolve_rescore(self, auto_rescore: int) -> tuple[int, str | None]:
        """(default re-scoring factor, dtype of vectors.npy or None) given what ``--factory auto`` picked."""
        rescore = auto_rescore if self.rescore == -1 else self.rescore
        if self.keep_vectors == "none":
            rescore = 0  # only reachable from auto: an explicit --rescore N with none is refused above
        keep = self.keep_vectors if self.keep_vectors != "auto" else ("float32" if rescore > 0 else "none")
        return rescore, (None if keep == "none" else keep)

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
                               "torchrun, WORLD_SIZE; with --engine ray, 2 per encoder and at most 100k rows each; "
                               "else no sharding)")

    @property
    def sharded(self) -> bool:
        return self.num_shards > 0 or self.shard_id >= 0


ENGINES = ("local", "ray")


@dataclass
class RayBuildConfig:
    """``index build --engine ray``: the corpus is cut into --num-shards shards (default: 2 per encoder, at most
    100k rows each) that a pool of Ray encoder actors (Ray Data ``map_batches``, one result tower each) writes in
    the SHARD format; ``index merge`` then builds --out."""

    engine: str = field("local", "local: encode in this process (or one shard per torchrun rank); ray: a pool of "
                                 "Ray encoder actors builds every shard, then the shards are merged into --out",
                        choices=ENGINES)
    ray_address: str = field("", "Ray cluster to run on: auto (the one `ray start` made on this node), HOST:6379, "
                                 "ray://HOST:10001 ('': start a local Ray on this machine)")
    num_encoders: int = field(0, "encoder actors (0 = one per --gpus-per-encoder GPUs, or on CPUs one per 4 CPUs "
                                 "of the cluster, at least 1)")
    gpus_per_encoder: float = field(0.0, "GPUs per encoder actor (0: CPU actors; 1: one GPU each; 0.5: two per GPU)")
    cpus_per_encoder: float = field(0.0, "CPUs per encoder actor, also its torch threads (0 = the cluster's CPUs / "
                                         "--num-encoders)")
    shards_dir: str = field("", "where the SHARD dirs go; on a cluster a path every node shares (default: "
                                ".<out>.shards beside --out, deleted after the merge unless --keep-work)")
    merge_method: str = field("add", "how the shards are merged into --out (see `index merge --method`)",
                              choices=MERGE_METHODS)
    ray_timeout: float = field(600.0, "seconds to wait for the encoder actors to start (model load included) "
                                      "before failing")

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise ValueError(f"unknown engine '{self.engine}': choose {', '.join(ENGINES)}")
        for name in ("num_encoders", "gpus_per_encoder", "cpus_per_encoder"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name):g}")
        if self.ray_timeout <= 0:
            raise ValueError(f"--ray-timeout must be > 0 seconds, got {self.ray_timeout:g}")
        if self.merge_method not in MERGE_METHODS:
            raise ValueError(f"unknown merge method '{self.merge_method}': choose {', '.join(MERGE_METHODS)}")
        if self.engine == "local":
            given = [flag_of(f) for f in dataclasses.fields(self)
                     if f.name != "engine" and getattr(self, f.name) != f.default]
            if given:
                raise ValueError(f"{', '.join(given)}: only with --engine ray")


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
    range_max: int = field(MINE_RANGE_MAX, "consider candidates up to this rank (exclusive)")
    relative_margin: float | None = field(MINE_RELATIVE_MARGIN, "drop candidates scoring above (1 - margin) * "
                                                                "positive score (NV-Retriever TopK-PercPos: 0.05)")
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
