"""``twotower index build --engine ray``: the shards of a sharded build, encoded by a pool of Ray actors.

The corpus is cut into ``--num-shards`` contiguous shards (``index.shard``). Ray Data streams the shard ids
through a class-based ``map_batches`` UDF on an actor pool (``ActorPoolStrategy``): each actor loads the result
tower once and builds whole shards with ``index.shard.build_shard``, which reads only the shard's rows from the
corpus (JSONL, JSONL.gz, Parquet, a BEIR or saved-dataset dir, ``hf:NAME``), validates them, encodes them in
length-sorted batches and writes the SHARD dir atomically. The driver then runs ``index merge`` on the shards,
so the INDEX dir is the one a single-process build writes (faiss id i = corpus row i; Flat: same D and I).

What Ray adds over one process per machine (``--shard-id``/torchrun): a pool of actors that takes the next
shard when it finishes one (more shards than actors balance the load), retries on actors that die (Ray Data
restarts them and resubmits the shard, which resumes from its last finished chunk), CPU/GPU placement across
the nodes of a cluster, and its dashboard. A rerun after a killed driver keeps every finished shard (same
corpus rows + sha256, same result tower fingerprint) and resumes the others from their chunks.

Resources are sized from the cluster (``common.ray_cluster``): each actor asks for its share of the CPUs (or
``--cpus-per-encoder``) and ``--gpus-per-encoder`` GPUs, and runs that many torch threads. A request the
cluster cannot hold is refused at once; actors that do not start within ``--ray-timeout`` fail the job.
"""
from __future__ import annotations

import dataclasses
import importlib
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from twotower.common.lock import exclusive
from twotower.common.outputs import artefact_kind, check_out_dir
from twotower.common.ray_cluster import caused_by, check_fits, cluster_resources, connect, import_ray
from twotower.index.build import check_build_out
from twotower.index.config import EncodeConfig, IndexBuildConfig, MergeConfig, RayBuildConfig, ShardConfig
from twotower.index.corpus import check_corpus, corpus_identity, describe
from twotower.index.factory import auto_factory, parse_memory
from twotower.index.faiss_utils import make_index
from twotower.index.merge import merge_shards
from twotower.index.shard import build_shard, check_shard_out, expected_shard, is_complete, shard_dir, shard_range
from twotower.towers.model import read_towers_meta

# Errors of the input (a bad corpus row, a foreign shard dir, a full disk) that an actor hands back to the driver
# instead of raising: Ray would wrap them (its pickling drops the cause), and the user would get a traceback
# instead of the one line a local build prints.
USER_ERRORS = (ValueError, KeyError, OSError)
_ERROR_TYPES = {t.__name__: t for t in (ValueError, KeyError, OSError, FileExistsError, FileNotFoundError,
                                        PermissionError, IsADirectoryError, NotADirectoryError, TimeoutError)}
# default --num-shards: at least 2 per encoder (a finished actor takes the next shard, so the last one ends
# sooner) and at most SHARD_ROWS rows each (a shard is the unit of retry: minutes of work, not hours)
SHARDS_PER_ENCODER = 2
SHARD_ROWS = 100_000
CPUS_PER_CPU_ENCODER = 4  # default --num-encoders on CPUs: one actor (4 torch threads) per 4 CPUs


def default_shards_dir(out: str | Path) -> Path:
    """Where the shards of ``--out`` go without ``--shards-dir``: ``.<out>.shards`` beside it."""
    out = Path(out)
    return out.parent / f".{out.name}.shards"


class ShardEncoder:
    """The ``map_batches`` UDF: one result tower per actor; every input row is a shard id, built whole.

    Args:
        towers_dir, corpus, shards_dir: paths every node reads (or writes) at the same place.
        num_shards: the build's shard count; encode: the encoding options (progress bars off in actors).
        threads: torch threads (the actor's CPU share); device: cpu, cuda (the GPU Ray gave the actor).
    """

    def __init__(self, towers_dir: str, corpus: str, shards_dir: str, num_shards: int, encode: EncodeConfig,
                 threads: int, device: str) -> None:
        import torch

        torch.set_num_threads(threads)  # the actor's share: more threads than CPUs would fight the other actors
        from twotower.towers.inference import result_encoder
        from twotower.towers.model import TwoTower

        self.encoder = result_encoder(TwoTower.load(towers_dir), device)
        self.towers_dir, self.corpus, self.shards_dir = towers_dir, corpus, shards_dir
        self.num_shards, self.encode = num_shards, encode

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out: dict[str, list[Any]] = {"shard_id": [], "rows": [], "seconds": [], "error": []}
        for shard_id in batch["shard_id"].tolist():
            t0 = time.perf_counter()
            shard = ShardConfig(int(shard_id), self.num_shards)
            rows, error = 0, ""
            try:
                build_shard(self.encoder, self.corpus, self.shards_dir, shard, self.encode, towers_dir=self.towers_dir)
                rows = self._rows(shard)
            except USER_ERRORS as exc:  # the input's fault: retrying cannot help; the driver reports it
                error = f"{type(exc).__name__}|{exc}"
            out["shard_id"].append(shard.shard_id)
            out["rows"].append(rows)
            out["seconds"].append(time.perf_counter() - t0)
            out["error"].append(error)
        return {k: np.asarray(v) for k, v in out.items()}

    def _rows(self, shard: ShardConfig) -> int:
        from twotower.index.shard import read_shard

        return int(read_shard(shard_dir(self.shards_dir, shard.shard_id, shard.num_shards))["n"])


@dataclasses.dataclass
class RayPlan:
    """What a Ray build will do, decided before Ray starts: the shards, which are still to encode, the actors."""

    shards_dir: Path
    num_shards: int
    rows: int
    todo: list[int]


def plan_build(towers_dir: str | Path, corpus: str | Path, out: str | Path, config: IndexBuildConfig,
               encode: EncodeConfig, shard: ShardConfig, ray_cfg: RayBuildConfig) -> RayPlan:
    """Check every option, input and output (no model, no Ray yet) and find the shards still to encode.

    Raises:
        ValueError / FileExistsError: a bad option, an unusable output dir, a corpus with fewer rows than
            shards, or a finished shard from another corpus or towers (without ``--overwrite``).
    """
    if shard.shard_id >= 0:
        raise ValueError(f"--shard-id {shard.shard_id}: --engine ray builds every shard itself; leave --shard-id "
                         f"out (--num-shards sets how many shards the corpus is cut into)")
    if not isinstance(corpus, (str, Path)):
        raise ValueError("--engine ray: every actor reads its shard of the corpus, so pass a path (file, dir or "
                         "hf:NAME), not in-memory rows")
    meta = read_towers_meta(towers_dir)
    check_corpus(corpus)
    check_build_out(out, corpus, towers_dir, config, encode)
    shards_dir = Path(ray_cfg.shards_dir) if ray_cfg.shards_dir else default_shards_dir(out)
    check_out_dir(shards_dir, ("shards",), flag="--shards-dir", verb="index build --engine ray",
                  inputs={"--corpus": corpus, "--towers": towers_dir, "--out": out})
    check_out_dir(out, ("index",), verb="index build --engine ray", inputs={"--shards-dir": shards_dir},
                  overwrite=config.overwrite)
    if config.factory != "auto":
        make_index(config.factory, int(meta["dim"]))  # a bad factory string fails now, not after the encoding
    identity = corpus_identity(corpus, encode.corpus_split)
    rows = int(identity["rows"])
    if config.factory == "auto" and rows:
        auto_factory(rows, int(meta["dim"]), parse_memory(config.memory_budget))  # an impossible budget: now
    n = shard.num_shards or max(1, min(rows, max(SHARDS_PER_ENCODER * max(ray_cfg.num_encoders, 1),
                                                 math.ceil(rows / SHARD_ROWS))))
    if rows < n:
        raise ValueError(f"corpus '{describe(corpus)}' has {rows} rows, fewer than --num-shards {n}")
    todo = []
    for i in range(n):
        check_shard_out(shards_dir, ShardConfig(i, n), encode, corpus, towers_dir)
        path = shard_dir(shards_dir, i, n)
        expected = expected_shard(ShardConfig(i, n), shard_range(rows, i, n), meta["fingerprint"], int(meta["dim"]),
                                  encode.dtype)
        try:
            done = is_complete(path, expected, identity)
        except FileExistsError:
            if not config.overwrite:
                raise
            done = False
        if not done:
            todo.append(i)
    return RayPlan(shards_dir, n, rows, todo)


def ray_build_index(towers_dir: str | Path, corpus: str | Path, out: str | Path, config: IndexBuildConfig | None = None,
                    encode: EncodeConfig | None = None, shard: ShardConfig | None = None,
                    ray_cfg: RayBuildConfig | None = None, wait: float = 0.0) -> Path:
    """Encode ``corpus`` into shards on a Ray actor pool, then merge them into the INDEX dir ``out``.

    Args:
        towers_dir: the TOWERS dir (each actor loads its result tower).
        corpus: a path every actor can read (shared storage on a cluster).
        config: the index options (applied by the merge); encode: how shards are read and encoded;
            shard: ``num_shards`` (0 = 2 per encoder); ray_cfg: the Ray options (address, actors, shards dir).
        wait: seconds to wait for another writer of the shards dir or ``out`` (``common.lock``).

    Returns:
        ``out`` as a Path.
    """
    config, encode = config or IndexBuildConfig(), encode or EncodeConfig()
    shard, ray_cfg = shard or ShardConfig(), ray_cfg or RayBuildConfig(engine="ray")
    plan = plan_build(towers_dir, corpus, out, config, encode, shard, ray_cfg)
    with exclusive(plan.shards_dir, wait):
        plan = plan_build(towers_dir, corpus, out, config, encode, shard, ray_cfg)  # again, under the lock
        if plan.todo:
            started = connect(ray_cfg.ray_address)
            try:
                encode_shards(towers_dir, corpus, plan, encode, ray_cfg, overwrite=config.overwrite)
            finally:
                if started:
                    import_ray().shutdown()
        else:
            print(f"index build: all {plan.num_shards} shards in '{plan.shards_dir}' are already complete (same "
                  f"corpus and towers); merging", file=sys.stderr)
    merge_shards([plan.shards_dir], out, config, MergeConfig(ray_cfg.merge_method, encode.progress),
                 towers_dir=towers_dir, wait=wait)
    if not ray_cfg.shards_dir and not encode.keep_work and artefact_kind(plan.shards_dir) == "shards":
        shutil.rmtree(plan.shards_dir, ignore_errors=True)  # the default, hidden one: ours, and merged
    return Path(out)


def actor_resources(ray_cfg: RayBuildConfig, n_tasks: int) -> tuple[int, float, float]:
    """(actors, CPUs each, GPUs each) from the options and the connected cluster's resources."""
    cpus, gpus = cluster_resources()
    if ray_cfg.num_encoders:
        n = ray_cfg.num_encoders
    elif ray_cfg.gpus_per_encoder:
        n = max(1, math.floor(gpus / ray_cfg.gpus_per_encoder + 1e-9))
    else:
        n = max(1, int(cpus // CPUS_PER_CPU_ENCODER))
    cpu_each = ray_cfg.cpus_per_encoder or cpus / n  # the actors' share: Ray Data's reads need no CPU here
    check_fits("encoder actors", n, cpu_each, ray_cfg.gpus_per_encoder)
    return min(n, n_tasks), cpu_each, ray_cfg.gpus_per_encoder


def encode_shards(towers_dir: str | Path, corpus: str | Path, plan: RayPlan, encode: EncodeConfig,
                  ray_cfg: RayBuildConfig, overwrite: bool = False) -> list[dict[str, Any]]:
    """Build the shards ``plan.todo`` on an actor pool of the connected Ray; returns one record per shard.

    Raises:
        ValueError / OSError: the first error an actor hit (a bad corpus row, a full disk), as it was raised;
            or actors that could not start within ``--ray-timeout``.
    """
    ray = import_ray()
    importlib.import_module("ray.data")  # loads ray.data onto the checked module

    n_actors, cpu_each, gpu_each = actor_resources(ray_cfg, len(plan.todo))
    device = _actor_device(encode.device, gpu_each)
    if overwrite:  # the stale shards of another corpus/towers are replaced: drop them first, as build_shard would
        for i in plan.todo:
            path = shard_dir(plan.shards_dir, i, plan.num_shards)
            if artefact_kind(path) == "shard":
                shutil.rmtree(path)
    ctx = ray.data.DataContext.get_current()
    ctx.wait_for_min_actors_s = max(1, int(ray_cfg.ray_timeout))  # actors that cannot start: fail, not hang
    ctx.max_tasks_in_flight_per_actor = 1  # shards are long: queueing several on one actor unbalances the end
    ctx.enable_progress_bars = False  # one bar of ours (shards done) instead of Ray Data's operator bars
    ctx.print_on_execution_start = False
    ds = ray.data.from_items([{"shard_id": i} for i in plan.todo], override_num_blocks=len(plan.todo))
    ds = ds.map_batches(
        ShardEncoder, batch_size=1, compute=ray.data.ActorPoolStrategy(size=n_actors), num_cpus=cpu_each,
        num_gpus=gpu_each,
        fn_constructor_kwargs={"towers_dir": str(Path(towers_dir).resolve()), "corpus": _shared_path(corpus),
                               "shards_dir": str(plan.shards_dir.resolve()), "num_shards": plan.num_shards,
                               "encode": dataclasses.replace(encode, progress=False),
                               "threads": max(1, int(cpu_each)), "device": device})
    print(f"index build --engine ray: {len(plan.todo)} of {plan.num_shards} shards to encode ({plan.rows} corpus "
          f"rows) on {n_actors} actor(s) x {cpu_each:g} CPU, {gpu_each:g} GPU into '{plan.shards_dir}'",
          file=sys.stderr)
    records: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    try:
        with tqdm(total=len(plan.todo), desc="shards", unit="shard", disable=not encode.progress) as bar:
            for row in ds.iter_rows():
                record = {k: v.item() if hasattr(v, "item") else v for k, v in row.items()}
                if record["error"]:
                    name, _, message = str(record["error"]).partition("|")
                    raise _ERROR_TYPES.get(name, ValueError)(message)
                records.append(record)
                bar.update(1)
    except Exception as exc:
        if not caused_by(exc, "GetTimeoutError"):  # Ray Data's error when the pool's actors do not start in time
            raise
        raise TimeoutError(f"the {n_actors} encoder actor(s) did not start within --ray-timeout "
                           f"{ray_cfg.ray_timeout:g} s; the cluster may lack the CPUs/GPUs they ask for, or its nodes "
                           f"cannot load --towers '{towers_dir}' (see the actor errors above)") from None
    wall = time.perf_counter() - t0
    busy, capacity = sum(r["seconds"] for r in records), max(wall * n_actors, 1e-9)
    print(f"index build --engine ray: {len(records)} shards, {sum(r['rows'] for r in records)} docs encoded in "
          f"{wall:.1f} s; actors busy {busy:.1f} of {capacity:.1f} actor-seconds ({busy / capacity:.0%}; the rest: "
          f"actor start-up with the model load, and waiting for the last shard)", file=sys.stderr)
    return records


def _actor_device(device: str, gpus: float) -> str:
    """The torch device inside an actor: a GPU actor sees only the GPU(s) Ray gave it, as cuda:0."""
    if gpus > 0:
        return "cuda" if device in ("auto", "cuda") or device.startswith("cuda") else device
    if device.startswith("cuda"):
        raise ValueError(f"--device {device} needs --gpus-per-encoder > 0 with --engine ray (a CPU actor has no GPU)")
    return "cpu"


def _shared_path(corpus: str | Path) -> str:
    """The corpus as actors on other nodes see it: an absolute path (or an hf: name, as given)."""
    text = str(corpus)
    return text if text.startswith("hf:") else str(Path(text).resolve())
