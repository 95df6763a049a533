"""Config dataclasses of the query-time verbs (light module: imported by the CLI before any heavy package).

The ``twotower search`` / ``twotower serve`` options are generated from these fields
(``common.cliargs.add_dataclass_args``), so names, defaults and help live in one place; the query options
(k, mode, fusion, filter, ...) come from ``index.query.QueryOptions``.
"""
from __future__ import annotations

from dataclasses import dataclass

from twotower.common.cliargs import check_range, field
from twotower.index.query import MAX_K_CAP, query_fields

DEFAULT_MAX_K = 1000  # the cap on k: beyond it a request is an export, not a search
MAX_THREADS = 4096  # torch.set_num_threads overflows on absurd values
MAX_LIMIT = 2**31 - 1  # the other limits: far above any use, below what queues and faiss take


@dataclass
@query_fields("search")
class SearchConfig:
    """``twotower search`` options; the query options (-k, --mode, --filter, ...) are generated from
    ``index.query.QueryOptions``."""

    index: str = field("", "INDEX dir (output of `twotower index build`)")
    towers: str | None = field(None, "TOWERS dir (None: the one recorded in the index manifest)")
    json: bool = field(False, "print one JSON line per query instead of the readable listing")
    queries_file: str | None = field(None, "read queries from FILE, one per line ('-' = stdin)")
    device: str = field("auto", "query tower device: auto, cpu, cuda, cuda:N")
    precision: str = field("fp32", "query encoding: fp32, bf16/fp16 autocast (faster on hardware with bf16/fp16 "
                                   "units), or onnx (fp32 in ONNX Runtime on the CPU; extra .[onnx])",
                           choices=["fp32", "bf16", "fp16", "onnx"])
    batch_size: int = field(64, "queries encoded per forward pass")
    query_max_length: int | None = field(None, "tokens per query (default: the inference length recorded in the "
                                               "TOWERS dir)")
    allow_mixed_towers: bool = field(False, "accept a query tower whose weights are not the ones twotower.json "
                                            "records for its run (a tower swapped in from another run)")

    def __post_init__(self) -> None:
        check_range(self, "batch_size", 1, MAX_LIMIT)  # the query options: index.query, at run time (k's cap first)
        if self.query_max_length is not None:
            check_range(self, "query_max_length", 1, MAX_LIMIT)


@dataclass
class ServeConfig:
    """``twotower serve`` options: where to listen, the micro-batcher, and the request limits."""

    index: str = field("", "INDEX dir (output of `twotower index build`)")
    towers: str | None = field(None, "TOWERS dir (None: the one recorded in the index manifest)")
    allow_mixed_towers: bool = field(False, "accept a query tower whose weights are not the ones twotower.json "
                                            "records for its run (a tower swapped in from another run)")
    host: str = field("127.0.0.1", "address to listen on (0.0.0.0 exposes the service to the network)")
    port: int = field(8000, "TCP port")
    device: str = field("auto", "query tower device: auto, cpu, cuda, cuda:N")
    precision: str = field("fp32", "query encoding: fp32, bf16/fp16 autocast (faster on hardware with bf16/fp16 "
                                   "units), or onnx (fp32 in ONNX Runtime on the CPU; extra .[onnx])",
                           choices=["fp32", "bf16", "fp16", "onnx"])
    threads: int = field(0, "torch threads for query encoding (0 = torch's default, one per core)")
    max_batch: int = field(64, "most queries merged into one encode + search")
    max_wait_ms: float = field(2.0, "longest a request waits for others to join its batch (ms)")
    max_queue: int = field(1024, "most requests waiting for the batcher; beyond it: 503")
    max_queries: int = field(64, "most queries in one request")
    max_query_chars: int = field(2048, "longest query in characters (the tower truncates tokens anyway)")
    max_k: int = field(DEFAULT_MAX_K, "the cap on k")
    max_body_bytes: int = field(0, "largest request body in bytes, beyond it 413 (0 = room for max_queries "
                                   "queries of max_query_chars characters, JSON-escaped)")
    read_timeout: float = field(10.0, "seconds a client has to send a request's headers, and again its whole body; "
                                      "beyond it 408 and the connection is closed (a client that promises more "
                                      "body than it sends cannot hold a connection)")
    keep_alive: float = field(5.0, "seconds an idle keep-alive connection stays open between requests")
    max_connections: int = field(1024, "most connections served at once; beyond it new ones get 503 (uvicorn's "
                                       "limit_concurrency)")
    access_log: bool = field(False, "log every request (costs throughput)")
    log_level: str = field("info", "uvicorn log level", choices=["critical", "error", "warning", "info", "debug"])
    reload_interval: float = field(2.0, "seconds between checks of the INDEX dir for a new version (index add, "
                                        "remove, build --overwrite), which is then loaded and swapped in between "
                                        "batches; 0 = serve the version loaded at start")
    query_max_length: int | None = field(None, "tokens per query (default: the inference length recorded in the "
                                               "TOWERS dir)")

    def __post_init__(self) -> None:
        """Every limit checked before the index or the towers load (a typo is one line, not a half-started server)."""
        check_range(self, "port", 1, 65535)
        check_range(self, "threads", 0, MAX_THREADS)
        for name in ("max_batch", "max_queue", "max_queries", "max_query_chars"):
            check_range(self, name, 1, MAX_LIMIT)
        check_range(self, "max_k", 1, MAX_K_CAP)
        check_range(self, "max_body_bytes", 0, MAX_LIMIT)
        check_range(self, "max_wait_ms", 0, 60_000)
        check_range(self, "reload_interval", 0, 86_400)
        check_range(self, "read_timeout", 0.001, 3600)
        check_range(self, "keep_alive", 0.001, 3600)
        check_range(self, "max_connections", 1, MAX_LIMIT)
        if self.query_max_length is not None:
            check_range(self, "query_max_length", 1, MAX_LIMIT)

    def body_limit(self) -> int:
        """``max_body_bytes``, or when 0 the worst case of a valid request (every char a 12-byte surrogate pair
        escape)."""
        return self.max_body_bytes or self.max_queries * (12 * self.max_query_chars + 8) + 4096


ENGINES = ("local", "ray")


@dataclass
class RayServeConfig:
    """``twotower serve --shards SHARD_DIR... --engine ray``: one Ray Serve deployment per index shard, a router
    that encodes each query once and merges the shards' top-k."""

    engine: str = field("local", "local: this process serves one --index; ray: Ray Serve serves the --shards, one "
                                 "deployment per shard behind a router", choices=list(ENGINES))
    shards: list[str] = field([], "SHARD dirs (or dirs holding them: the --shards-dir of `index build --engine "
                                  "ray`, the --out of `index build --num-shards`); with --engine ray")
    ray_address: str = field("", "Ray cluster to run on: auto, HOST:6379, ray://HOST:10001 ('': start a local Ray)")
    replicas: int = field(1, "replicas of each shard's deployment (each holds the shard in memory)")
    router_replicas: int = field(1, "replicas of the router (query encoding + merge)")
    cpus_per_replica: float = field(0.0, "CPUs per replica, also its threads (0 = the cluster's CPUs shared by all "
                                         "replicas, at most 1)")
    gpus_per_shard: float = field(0.0, "GPUs per shard replica (Flat search in torch on the GPU)")

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise ValueError(f"unknown engine '{self.engine}': choose {', '.join(ENGINES)}")
        check_range(self, "replicas", 1, 1024)
        check_range(self, "router_replicas", 1, 1024)
        check_range(self, "cpus_per_replica", 0, 4096)
        check_range(self, "gpus_per_shard", 0, 64)
        if self.engine == "ray" and not self.shards:
            raise ValueError("--engine ray serves SHARD dirs: pass --shards SHARD_DIR [...] (and no --index)")
        if self.engine == "local" and self.shards:
            raise ValueError("--shards: serving shards needs --engine ray (or merge them with `twotower index merge` "
                             "and serve --index)")
