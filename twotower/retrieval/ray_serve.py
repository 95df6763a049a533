"""``twotower serve --shards SHARD_DIR... --engine ray``: sharded search on Ray Serve.

An index too large for one machine's RAM is served where its shards live: one Ray Serve deployment per SHARD
dir (``--replicas`` each) holds that shard's vectors in an exact (Flat) index with its docs, and a router
deployment runs today's HTTP app (``retrieval.server.create_app``: the same JSON, 4xx table, /health, /info and
micro-batching) over a :class:`ShardedRetriever`. The router encodes each batch of queries once with the query
tower, sends the vectors to every shard, and merges the shards' top-k by score, ties broken by corpus row:
since every shard returns its exact top-k, the merge is the exact top-k of the whole corpus, the answer of one
merged Flat index (tested).

Ray is imported only by the functions that deploy; the merge and the shard loading work without it.
"""
from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from twotower.common.ray_cluster import check_fits, cluster_resources, connect
from twotower.index.load import load_shard
from twotower.index.merge import open_shards
from twotower.index.query import QueryOptions, check_k
from twotower.retrieval.config import RayServeConfig, ServeConfig
from twotower.retrieval.doctable import DocTable
from twotower.retrieval.retriever import (
    Hit,
    PartialRow,
    Retriever,
    ShardsFailed,
    check_retrieval_precision,
    hits_from,
    load_query_tower,
)
from twotower.towers.model import read_towers_meta

APP_NAME = "twotower"


class ShardServer:
    """One SHARD dir in memory, searched exactly (the body of each shard deployment).

    Args:
        shard_dir: a finished SHARD dir (every node that may run this replica reads it at this path).
        device: ``cpu`` or ``auto`` (a GPU replica searches with torch on its GPU); threads: faiss/torch threads.
    """

    def __init__(self, shard_dir: str, device: str = "cpu", threads: int = 1) -> None:
        import faiss
        import torch

        torch.set_num_threads(threads)
        faiss.omp_set_num_threads(threads)
        self.index = load_shard(shard_dir, device)
        self.lo = int(self.index.manifest["rows"][0])  # corpus row of local id 0
        self.docs = DocTable(self.index.docs)

    def search(self, xq: np.ndarray, k: int, nprobe: int | None = None
               ) -> tuple[np.ndarray, np.ndarray, list[list[Hit]]]:
        """(D float32 (nq, k), corpus rows int64 (nq, k) with -1 = none, the valid hits per query in order)."""
        D, I = self.index.search(xq, k, nprobe=nprobe)
        return D, np.where(I >= 0, I + self.lo, -1), hits_from(self.docs, D, I)

    def stats(self) -> dict[str, Any]:
        return {"shard_id": self.index.manifest["shard_id"], "rows": self.index.manifest["rows"],
                "ntotal": self.index.ntotal, "device": self.index.device}


def merge_topk(parts: Sequence[tuple[np.ndarray, np.ndarray, list[list[Hit]]]], k: int) -> list[list[Hit]]:
    """The top-``k`` hits per query across shards, by score (descending), ties by corpus row (ascending);
    ranks renumbered 1..k. ``parts``: each shard's ``ShardServer.search`` output for the same queries."""
    nq = len(parts[0][2])
    out: list[list[Hit]] = []
    for q in range(nq):
        scored: list[tuple[float, int, Hit]] = []
        for D, rows, hits in parts:
            valid = rows[q] >= 0
            scored += zip((-D[q][valid]).tolist(), rows[q][valid].tolist(), hits[q])
        scored.sort(key=lambda t: (t[0], t[1]))
        best = []
        for rank, (_, _, hit) in enumerate(scored[:k], 1):
            hit.rank = rank
            best.append(hit)
        out.append(best)
    return out


@dataclass
class ShardSet:
    """What the router knows of the sharded index (the ``index`` of its :class:`ShardedRetriever`): no vectors,
    no docs; a manifest for /info and /health."""

    manifest: dict[str, Any]
    dim: int
    ntotal: int
    path: str = "shards"
    docs: Any = field(default=None)

    @classmethod
    def from_shards(cls, shards: Sequence[str | Path]) -> ShardSet:
        """Check the shards make up one corpus exactly once with one result tower (``index.merge.open_shards``)."""
        whole = open_shards(shards)
        first = whole.manifests[0]
        manifest = {
            "kind": "ray-serve-shards", "dim": whole.dim, "metric": "inner_product", "factory": "Flat",
            "ntotal": whole.n, "n_removed": 0, "search_defaults": {}, "fingerprint": first["fingerprint"],
            "encoder": first["encoder"], "towers_dir": first["towers_dir"], "corpus": first["corpus"]["name"],
            "corpus_sha256": first["corpus"]["sha256"], "normalized": whole.normalized, "generation": 1,
            "shards": [{"dir": str(p.work_dir.resolve()), "shard_id": m["shard_id"], "rows": m["rows"]}
                       for p, m in zip(whole.parts, whole.manifests)],
        }
        return cls(manifest, whole.dim, whole.n)


class ShardedRetriever(Retriever):
    """A :class:`~retrieval.retriever.Retriever` whose search fans out to shard servers and merges their top-k.

    Args:
        shards: one callable per shard, ``(xq, k, nprobe) -> ShardServer.search output`` (a Ray Serve handle
            call, or a local ``ShardServer.search``); the rest as ``Retriever``.
    """

    def __init__(self, shards: Sequence[Any], index: ShardSet, tower: Any, **kwargs: Any) -> None:
        super().__init__(index, tower, **kwargs)
        self.shards = list(shards)

    def check_rescore(self, rescore: Any) -> int | None:
        if rescore:
            raise ValueError(f"rescore={rescore} is not served by --engine ray (its shards search exact float "
                             f"vectors already); use rescore 0 or leave it out")
        return None

    def options(self, options: QueryOptions | None = None, **fields: Any) -> QueryOptions:
        """Sharded serving answers dense queries without filters (shards hold vectors and docs only, searched
        exactly): any other mode, a filter or a re-scoring factor is refused with one line (a 422 over HTTP).
        The other options are still checked (QueryOptions), so a bad one gets the same 422 as today's serve."""
        if fields.get("k") is not None:
            check_k(fields["k"], self.max_k)
        given = (options or QueryOptions()).replace(**fields)
        _refuse_beyond_dense(given.mode, given.filter)
        self.check_rescore(given.rescore)
        opts = given.replace(mode="dense").resolve()
        check_k(opts.k, self.max_k)
        return opts

    def search_encoded(self, queries: Sequence[str], xq: np.ndarray | None, opts: QueryOptions) -> list[list[Hit]]:
        _refuse_beyond_dense(opts.mode, opts.filter)
        assert xq is not None, "sharded search is dense: the router encodes every query"
        xq = np.ascontiguousarray(xq)
        parts, failed = self._fan_out(xq, opts)
        if not parts:
            raise ShardsFailed("every shard failed: " + "; ".join(failed))
        rows = merge_topk(parts, opts.k)
        return [PartialRow(row, failed) for row in rows] if failed else rows

    def _fan_out(self, xq: np.ndarray, opts: QueryOptions) -> tuple[list[Any], list[str]]:
        """Every shard's answer (all calls in flight at once), and one line per shard that failed: one shard's
        failure is named in the answer, the others still answer (not a 500 for everyone)."""
        names = [f"shard {s['shard_id']} ({s['dir']})" for s in self.index.manifest.get("shards", [])]
        names += [f"shard {i}" for i in range(len(names), len(self.shards))]
        pending: list[tuple[str, Any]] = []
        failed: list[str] = []
        for name, call in zip(names, self.shards):
            try:
                pending.append((name, call(xq, opts.k, opts.nprobe)))
            except Exception as exc:  # noqa: BLE001 (any failure of a shard is that shard's, named below)
                failed.append(f"{name}: {type(exc).__name__}: {exc}")
        parts = []
        for name, p in pending:
            try:
                parts.append(p.result() if hasattr(p, "result") else p)
            except Exception as exc:  # noqa: BLE001
                failed.append(f"{name}: {type(exc).__name__}: {exc}")
        return parts, failed


def _refuse_beyond_dense(mode: str | None, filter: dict[str, Any] | None) -> None:
    if mode not in (None, "dense"):
        raise ValueError(f"mode '{mode}' is not served by --engine ray (its shards hold no BM25 side); valid: dense")
    if filter:
        raise ValueError("filter is not served by --engine ray (its shards hold no filter map); serve a merged "
                         "INDEX dir for filtered search")


class Router:
    """The router deployment's body: the query tower + handles of the shard deployments, behind today's app."""

    def __init__(self, shard_handles: list[Any], towers_dir: str, shard_set: ShardSet, config: ServeConfig,
                 threads: int) -> None:
        import torch

        torch.set_num_threads(threads)
        meta = read_towers_meta(towers_dir)
        tower = load_query_tower(towers_dir, meta, config.device, config.precision, config.query_max_length,
                                 config.allow_mixed_towers)
        meta = {**meta, "path": str(towers_dir)}
        calls = [lambda xq, k, nprobe, h=h: h.search.remote(xq, k, nprobe) for h in shard_handles]
        self.config = dataclasses.replace(config, reload_interval=0)  # shards are fixed: no INDEX dir to watch
        self.retriever = ShardedRetriever(calls, shard_set, tower, towers_meta=meta, max_k=config.max_k,
                                          precision=config.precision)

    def __serve_build_asgi_app__(self) -> Any:  # Ray Serve: the ASGI app this replica serves
        from twotower.retrieval.server import create_app

        return create_app(self.config, self.retriever)


def check_serve_inputs(config: ServeConfig, ray_cfg: RayServeConfig) -> tuple[ShardSet, str]:
    """Everything checked before Ray starts: the shard set, the towers (fingerprint), the precision.

    Returns:
        (the shard set, the TOWERS dir).
    """
    if config.index:
        raise ValueError("--index and --shards: serve one INDEX dir (--engine local) or SHARD dirs (--engine ray)")
    check_retrieval_precision(config.precision)
    shard_set = ShardSet.from_shards(ray_cfg.shards)
    towers = config.towers or shard_set.manifest["towers_dir"]
    if not towers:
        raise ValueError("the shards record no towers dir: pass --towers")
    have = read_towers_meta(towers).get("fingerprint")
    if have != shard_set.manifest["fingerprint"]:
        raise ValueError(f"towers dir '{towers}' has fingerprint {have} but the shards were encoded with result "
                         f"tower {shard_set.manifest['fingerprint']}; pass the towers the shards were built with")
    return shard_set, str(Path(towers).resolve())


def deploy(config: ServeConfig, ray_cfg: RayServeConfig) -> ShardSet:
    """Check the inputs, connect to Ray, and deploy the shard deployments and the router on Ray Serve, listening
    on ``config.host:config.port`` (returns once every replica is up; ``serve.shutdown()`` stops them)."""
    shard_set, towers = check_serve_inputs(config, ray_cfg)
    connect(ray_cfg.ray_address)
    from ray import serve

    shard_dirs = [s["dir"] for s in shard_set.manifest["shards"]]
    n_replicas = len(shard_dirs) * ray_cfg.replicas + ray_cfg.router_replicas
    cpus, _ = cluster_resources()
    share = ray_cfg.cpus_per_replica or min(1.0, cpus / n_replicas)
    check_fits("Ray Serve replicas", n_replicas, share, 0.0)
    check_fits("shard replicas", len(shard_dirs) * ray_cfg.replicas, share, ray_cfg.gpus_per_shard)
    threads = max(1, int(share))
    shard_device = "auto" if ray_cfg.gpus_per_shard > 0 else "cpu"
    shard_deployment = serve.deployment(ShardServer, name="shard")
    handles = [shard_deployment.options(name=f"shard-{i:05d}", num_replicas=ray_cfg.replicas,
                                        ray_actor_options={"num_cpus": share, "num_gpus": ray_cfg.gpus_per_shard})
               .bind(d, shard_device, threads) for i, d in enumerate(shard_dirs)]
    router = serve.deployment(serve.ingress()(Router), name="router", num_replicas=ray_cfg.router_replicas,
                              ray_actor_options={"num_cpus": share},
                              max_ongoing_requests=max(config.max_queue, 1))
    serve.start(http_options={"host": config.host, "port": config.port})
    serve.run(router.bind(handles, towers, shard_set, config, threads), name=APP_NAME, route_prefix="/")
    return shard_set


def serve_shards(config: ServeConfig, ray_cfg: RayServeConfig) -> None:
    """``twotower serve --engine ray``: deploy, then keep serving until interrupted (Ctrl-C stops the app)."""
    shard_set = deploy(config, ray_cfg)
    from ray import serve

    print(f"twotower serve: {shard_set.ntotal} docs in {len(shard_set.manifest['shards'])} shards on Ray Serve, on "
          f"http://{config.host}:{config.port} (docs at /docs)", file=sys.stderr)
    try:
        while True:
            time.sleep(3600)
    finally:
        serve.delete(APP_NAME)
