"""``twotower index merge``: one INDEX dir from the SHARD dirs of a sharded build (see ``index.shard``).

The shards are checked first: all finished and whole, one corpus (rows + sha256), one result tower
(fingerprint), every row covered exactly once. The index is then trained ONCE on a sample drawn uniformly
across all shards (the very rows a single-machine build with the same ``--seed`` samples) and filled in corpus
order, so faiss id i = corpus row i and the result answers exactly as a single-machine build. Methods:

- ``add`` (default): one index; every shard's chunks are added in order. Peak RAM: the index.
- ``merge_from``: each shard is added to its own copy of the trained empty index (what each machine of a
  cluster would build), and faiss's ``Index.merge_from`` appends them in order (IVF lists or flat codes).
  Any factory but HNSW. Peak RAM: the index + one shard's index.
- ``ondisk``: IVF only. The per-shard indexes go to disk and ``faiss.contrib.ondisk.merge_ondisk`` writes
  their inverted lists into one ``index.ivfdata`` file next to ``index.faiss``, memory-mapped when searched:
  for corpora whose codes do not fit in RAM. Peak RAM: one shard's index. Such an index cannot be appended to
  (``index add``); rebuild or merge again.

Per-shard indexes can also be served without merging, as one ``faiss.IndexShards`` (``index_shards``).
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from faiss.contrib.ondisk import merge_ondisk

from twotower.common.lock import exclusive
from twotower.common.outputs import check_out_dir, check_work_dir, mark_work_dir, remove_work_dir
from twotower.index.binary import BinarySignIndex
from twotower.index.build import (
    add_chunks,
    new_manifest,
    set_memory_fields,
    train_empty,
    tuned_defaults,
    write_index_dir,
)
from twotower.index.config import MERGE_METHODS, IndexBuildConfig, MergeConfig
from twotower.index.encode import EncodedCorpus, default_work_dir
from twotower.index.factory import auto_factory, parse_memory
from twotower.index.faiss_utils import c_stdout_to_stderr, ivf_of, make_index, unwrap
from twotower.index.shard import SHARD_MANIFEST, read_shard, shard_dir_name, shard_range
from twotower.index.store import IVFDATA_FILE, next_generation
from twotower.towers.model import read_towers_meta


@dataclass
class ShardedCorpus(EncodedCorpus):
    """The embedding chunks of several SHARD dirs, chained in shard order (= corpus order)."""

    parts: list[EncodedCorpus] = dataclasses.field(default_factory=list)  # one per shard, in order
    manifests: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # their shard.json

    def emb_paths(self) -> list[Path]:
        return [p for part in self.parts for p in part.emb_paths()]

    def docs_paths(self) -> list[Path]:
        return [p for part in self.parts for p in part.docs_paths()]


def open_shards(paths: Sequence[str | Path]) -> ShardedCorpus:
    """The checked shards of one corpus (``find_shards`` + ``check_shards`` + ``check_unique_ids``) as one
    ``EncodedCorpus`` over all rows (``.parts``: each shard's own)."""
    ordered = check_shards([(p, read_shard(p)) for p in find_shards(paths)])
    check_unique_ids(ordered)
    dim = int(ordered[0][1]["dim"])
    parts = [EncodedCorpus(p, m["n"], dim, len(m["chunks"]), m["normalized"]) for p, m in ordered]
    return ShardedCorpus(parts[0].work_dir, int(ordered[0][1]["corpus"]["rows"]), dim,
                         sum(p.n_chunks for p in parts), all(p.normalized for p in parts), parts=parts,
                         manifests=[m for _, m in ordered])


def find_shards(paths: Sequence[str | Path]) -> list[Path]:
    """SHARD dirs from ``paths``: each a SHARD dir, or a dir holding ``shard-I-of-N`` dirs (a build's ``--out``)."""
    found: list[Path] = []
    for path in map(Path, paths):
        subs = sorted(d for d in path.glob("shard-*-of-*") if d.is_dir()) if path.is_dir() else []
        if (path / SHARD_MANIFEST).is_file():
            found.append(path)
        elif subs:
            found += subs
        elif not path.exists():
            raise FileNotFoundError(f"shard dir '{path}' does not exist")
        elif path.name.startswith("shard-") or path.name.endswith(".work"):
            read_shard(path)  # raises, saying the shard is unfinished
        else:
            raise FileNotFoundError(f"'{path}' holds no finished shard (no {SHARD_MANIFEST}, no shard-I-of-N dirs); "
                                    f"pass the --out dir of `twotower index build --num-shards N` or its shard dirs")
    return found


def check_shards(shards: Sequence[tuple[Path, dict[str, Any]]]) -> list[tuple[Path, dict[str, Any]]]:
    """(dir, shard.json) pairs sorted by shard id, after checking they make up one corpus exactly once.

    Raises:
        ValueError: naming the shard dirs that differ (towers, corpus, dim, shard count), a duplicate shard
            id, the missing shard ids, or rows covered twice or not at all.
    """
    if not shards:
        raise ValueError("no shards to merge")
    ref_path, ref = shards[0]
    for path, m in shards[1:]:
        for key, what, fix in (("fingerprint", "result tower fingerprint", "encode every shard with the same towers"),
                               ("num_shards", "--num-shards", "encode every shard with the same --num-shards"),
                               ("dim", "dim", "encode every shard with the same towers"),
                               ("slicing", "slicing", "rebuild the shards with one twotower version")):
            if m.get(key) != ref.get(key):
                raise ValueError(f"shards '{ref_path}' and '{path}' differ in {what}: {ref.get(key)} vs "
                                 f"{m.get(key)}; {fix}")
        a, b = ref["corpus"], m["corpus"]
        if (a["rows"], a["sha256"]) != (b["rows"], b["sha256"]):
            raise ValueError(f"shards '{ref_path}' and '{path}' come from different corpora: '{a['name']}' "
                             f"({a['rows']} rows, sha256 {a['sha256'][:12]}) vs '{b['name']}' ({b['rows']} rows, "
                             f"sha256 {b['sha256'][:12]}); encode every shard from the same corpus")
    n_shards, n_rows = ref["num_shards"], ref["corpus"]["rows"]
    by_id: dict[int, tuple[Path, dict[str, Any]]] = {}
    for path, m in shards:
        if m["shard_id"] in by_id:
            raise ValueError(f"shard {m['shard_id']} of {n_shards} given twice: '{by_id[m['shard_id']][0]}' and "
                             f"'{path}'")
        by_id[m["shard_id"]] = (path, m)
    missing = [i for i in range(n_shards) if i not in by_id]
    if missing:
        raise ValueError(f"shard(s) {', '.join(map(str, missing))} of {n_shards} missing (have "
                         f"{', '.join(map(str, sorted(by_id)))}){_unfinished_hint(shards, missing, n_shards)}; "
                         f"build them with `twotower index build ... --shard-id I --num-shards {n_shards}`")
    ordered = [by_id[i] for i in range(n_shards)]
    for i, (path, m) in enumerate(ordered):
        lo, hi = shard_range(n_rows, i, n_shards)
        rows = sum(c["rows"] for c in m["chunks"])
        if m["rows"] != [lo, hi] or m["n"] != hi - lo or rows != hi - lo:
            raise ValueError(f"shard '{path}' holds rows {m['rows']} ({rows} vectors) but shard {i} of {n_shards} "
                             f"must hold exactly rows [{lo}, {hi}) of the {n_rows}; rebuild it with --overwrite")
    return ordered


def check_unique_ids(ordered: Sequence[tuple[Path, dict[str, Any]]]) -> None:
    """Doc ids unique across all shards (each shard's build checked only its own rows).

    Raises:
        ValueError: naming one duplicated id, its corpus rows and the shards that hold them.
    """
    tables = [pa.ipc.open_stream(pa.memory_map(str(p / f"docs-{i:06d}.arrow"))).read_all()
              for p, m in ordered for i in range(len(m["chunks"]))]  # memory-mapped: only "id" is read
    ids = pa.chunked_array([t.column("id") for t in tables])
    if pc.count_distinct(ids).as_py() == len(ids):
        return
    counts = pc.value_counts(ids)  # struct array: values, counts
    dup = pc.filter(counts.field("values"), pc.greater(counts.field("counts"), 1))[0].as_py()
    rows = np.flatnonzero(pc.equal(ids, dup).to_numpy(zero_copy_only=False))
    where = [f"row {r} (shard {next(m['shard_id'] for _, m in ordered if m['rows'][0] <= r < m['rows'][1])})"
             for r in rows[:2]]
    raise ValueError(f"duplicate id '{dup}' at corpus {' and '.join(where)}; doc ids must be unique across the "
                     f"corpus: fix the corpus and rebuild the shards")


def _unfinished_hint(shards: Sequence[tuple[Path, dict[str, Any]]], missing: list[int], n_shards: int) -> str:
    parents = {p.parent for p, _ in shards}
    work = [w for i in missing for parent in parents
            if (w := parent / f".{shard_dir_name(i, n_shards)}.work").is_dir()]
    return f"; unfinished: {', '.join(map(str, work))} (rerun that shard's build to resume it)" if work else ""


def shard_indexes(trained: Any, parts: Sequence[EncodedCorpus], progress: bool = True) -> Iterator[Any]:
    """For each shard in order, a copy of the ``trained`` empty index holding that shard's vectors (local ids
    0..n_shard-1)."""
    for i, part in enumerate(parts):
        index = faiss.clone_index(trained)
        add_chunks(index, part, progress, desc=f"shard {i}")
        yield index


def index_shards(parts: Sequence[Any]) -> Any:
    """Serve per-shard indexes as one ``faiss.IndexShards``: searched in parallel threads, top-k merged.

    With ``successive_ids`` faiss offsets shard j's local ids by the rows of the shards before it, which with
    contiguous shards is the corpus row. Per-call ``SearchParameters`` (nprobe) reach every shard.
    """
    shards = faiss.IndexShards(parts[0].d, True, True)  # threaded, successive_ids
    for part in parts:
        shards.add_shard(part)
    shards.referenced_objects = list(parts)  # SWIG would free the parts with the Python list
    return shards


def merge_shards(shards: Sequence[str | Path], out: str | Path, config: IndexBuildConfig | None = None,
                 merge: MergeConfig | None = None, towers_dir: str | Path | None = None, wait: float = 0.0) -> Path:
    """Build one INDEX dir at ``out`` from the SHARD dirs of a sharded build (atomically).

    Args:
        shards: SHARD dirs, or dirs holding them (the ``--out`` of the sharded builds).
        config: the index options (factory, memory_budget, train_size, nprobe, ef_search, seed, overwrite).
        merge: the method (``add`` | ``merge_from`` | ``ondisk``).
        towers_dir: recorded in the manifest (checked against the shards' fingerprint); default: the towers dir
            the shards recorded.
        wait: seconds to wait for another writer of ``out`` (``common.lock``); 0 refuses at once.

    Returns:
        ``out`` as a Path.
    """
    config, merge = config or IndexBuildConfig(), merge or MergeConfig()
    if merge.method not in MERGE_METHODS:
        raise ValueError(f"unknown merge method '{merge.method}': choose {', '.join(MERGE_METHODS)}")
    out = check_merge_out(out, shards, towers_dir, config)
    with exclusive(out, wait):
        check_merge_out(out, shards, towers_dir, config)  # again: another writer may have been first
        _merge(shards, out, config, merge, towers_dir)
    return out


def check_merge_out(out: str | Path, shards: Sequence[str | Path], towers_dir: str | Path | None,
                    config: IndexBuildConfig) -> Path:
    """Refuse an ``--out`` the merge could damage (``common.outputs``), and a scratch dir not of ours."""
    out = check_out_dir(out, ("index",), verb="index merge", inputs={"--shards": list(shards), "--towers": towers_dir},
                        overwrite=config.overwrite)
    check_work_dir(default_work_dir(out), out, flag="scratch dir")
    return out


def _merge(shards: Sequence[str | Path], out: Path, config: IndexBuildConfig, merge: MergeConfig,
           towers_dir: str | Path | None) -> None:
    whole = open_shards(shards)
    parts, first, dim, n = whole.parts, whole.manifests[0], whole.dim, whole.n
    if towers_dir:
        _check_towers(towers_dir, first["fingerprint"])
    budget = parse_memory(config.memory_budget)
    if config.dim and config.dim != dim:
        raise ValueError(f"--dim {config.dim}: a merge cannot truncate the shards' {dim}-dim vectors; build the "
                         f"shards as they are and index them whole, or build one index with `index build --dim`")
    if config.factory == "auto":
        choice = auto_factory(n, dim, budget)
        factory, reason, auto_rescore = choice.factory, choice.reason, choice.rescore
    else:
        factory, reason, auto_rescore = config.factory, "given", 0
    rescore, vectors = config.resolve_rescore(auto_rescore)
    probe = make_index(factory, dim)  # a bad factory string or method fails before any training
    if merge.method == "ondisk" and ivf_of(probe) is None:
        raise ValueError(f"--method ondisk needs an IVF factory (e.g. IVF4096,Flat), got '{factory}'")
    if merge.method != "add" and isinstance(probe, BinarySignIndex):
        raise ValueError(f"binary factory '{factory}' merges with --method add only")
    if merge.method == "merge_from" and isinstance(unwrap(probe), faiss.IndexHNSW):
        raise ValueError(f"faiss cannot merge_from HNSW indexes ('{factory}'); use --method add")
    t0 = time.time()
    trained = train_empty(whole, factory, config)
    scratch = default_work_dir(out)
    extra: dict[str, Path] = {}
    if merge.method == "add":
        index = trained
        add_chunks(index, whole, merge.progress)
    elif merge.method == "merge_from":
        index = faiss.clone_index(trained)
        for part in shard_indexes(trained, parts, merge.progress):
            index.merge_from(part, index.ntotal if ivf_of(index) is not None else 0)  # IVF ids: shift to rows
    else:
        index, extra = _merge_ondisk(trained, parts, scratch, merge.progress), {IVFDATA_FILE: scratch / IVFDATA_FILE}
    assert index.ntotal == n, f"merged {index.ntotal} vectors for {n} corpus rows"
    manifest = new_manifest(
        dim=dim, factory=factory, ntotal=int(index.ntotal), search_defaults=tuned_defaults(index, config),
        fingerprint=first["fingerprint"], encoder=first["encoder"], towers_dir=towers_dir or first["towers_dir"],
        corpus=first["corpus"]["name"], normalized=whole.normalized,
        build={**dataclasses.asdict(config), **dataclasses.asdict(merge), "factory_reason": reason,
               "memory_budget_bytes": budget, "index_seconds": round(time.time() - t0, 1),
               "encode_seconds": sum(m["build_config"]["encode_seconds"] for m in whole.manifests)})
    manifest["history"] = [{"op": "merge", "time": manifest["created"], "rows": n, "shards": len(parts)}]
    manifest["corpus_sha256"] = first["corpus"]["sha256"]
    manifest["shards"] = [{"dir": str(p.work_dir.resolve()), "shard_id": m["shard_id"], "rows": m["rows"],
                           "created": m["created"], "encode_seconds": m["build_config"]["encode_seconds"]}
                          for p, m in zip(parts, whole.manifests)]
    if extra:
        manifest["ivfdata"] = IVFDATA_FILE
    set_memory_fields(manifest, rescore, vectors, dim, dim)  # shards keep the full dim
    manifest["generation"] = next_generation(out)
    manifest["query_defaults"] = config.query_defaults()
    write_index_dir(out, index, whole.docs_paths(), manifest, extra, bm25=config.bm25,
                    vectors=whole.iter_embeddings() if vectors else None)
    del index, trained  # unmaps the scratch ivfdata (the INDEX dir holds a hard link to it) before deleting it
    remove_work_dir(scratch)


def _merge_ondisk(trained: Any, parts: Sequence[EncodedCorpus], scratch: Path, progress: bool) -> Any:
    """Per-shard IVF indexes written to ``scratch``, joined by faiss ``merge_ondisk`` into
    ``scratch/index.ivfdata``; returns the index whose inverted lists live in that file."""
    remove_work_dir(scratch)  # an interrupted earlier merge's (only a dir of ours: checked by check_merge_out)
    mark_work_dir(scratch)
    files = []
    for i, part in enumerate(shard_indexes(trained, parts, progress)):
        files.append(str(scratch / f"shard-{i:05d}.faiss"))
        faiss.write_index(part, files[-1])
        del part  # one shard's index in RAM at a time
    index = faiss.clone_index(trained)
    with c_stdout_to_stderr():  # faiss printf()s the file size; stdout stays for the command's own output
        merge_ondisk(index, files, str(scratch / IVFDATA_FILE), shift_ids=True)  # ids: local + earlier shards' rows
    return index


def _check_towers(towers_dir: str | Path, fingerprint: str) -> None:
    have = read_towers_meta(towers_dir).get("fingerprint")
    if have != fingerprint:
        raise ValueError(f"towers dir '{towers_dir}' has result tower fingerprint {have} but the shards were encoded "
                         f"with {fingerprint}; pass the towers the shards were built with")
