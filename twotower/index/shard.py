"""Sharded corpus encoding: ``twotower index build --shard-id i --num-shards n`` (or one shard per torchrun rank).

Shard ``i`` of ``n`` encodes the contiguous corpus rows ``[i * N // n, (i + 1) * N // n)`` (N = corpus rows),
so the shards in id order are the corpus in order and ``index merge`` gives faiss id i = corpus row i, as a
single-machine build does. A shard parses and validates only its own rows (earlier JSONL lines / Parquet
batches are skipped unparsed); ``index merge`` checks ids across shards. Every shard records the corpus
identity (rows + sha256 of the file's bytes, or of every doc for hub streams and in-memory rows), which
``index merge`` compares, so shards of different corpora are never mixed.

SHARD dir, written under ``--out`` as ``shard-00001-of-00004/``::

    shard.json          shard id, num shards, row range, corpus rows + sha256, fingerprint, dim, chunk sizes
    emb-000000.npy ...  embeddings (rows, dim), float32|float16, in corpus order
    docs-000000.arrow   the same rows' id, title, text, metadata (Arrow stream)
    chunk-000000.json   completion records; state.json: the encoder/dim/dtype/row range they were made with

The chunks are encoded into a work dir beside it (``.shard-00001-of-00004.work``) with ``index.encode``'s
resume mechanism; when all are done they are hard-linked into a temp dir with ``shard.json`` and renamed onto
the SHARD dir: a SHARD dir exists only when complete. Rerunning a finished shard with the same encoder and
corpus does nothing, so relaunching a whole torchrun job after one rank failed encodes only what is missing.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from twotower.common.atomic import atomic_dir, write_json_atomic
from twotower.common.encoder import Encoder
from twotower.common.outputs import check_out_dir, check_work_dir, remove_work_dir
from twotower.index.config import EncodeConfig, ShardConfig
from twotower.index.corpus import Corpus, corpus_identity, describe, iter_docs
from twotower.index.encode import default_work_dir, encode_corpus, encoder_fingerprint, encoder_name
from twotower.index.store import link_or_copy

SHARD_MANIFEST = "shard.json"
SHARD_KIND = "twotower-index-shard"
SHARD_FORMAT_VERSION = 1
SLICING = "contiguous"


def shard_range(n_rows: int, shard_id: int, num_shards: int) -> tuple[int, int]:
    """Rows ``[lo, hi)`` of shard ``shard_id`` of ``num_shards`` (sizes differ by at most one)."""
    assert 0 <= shard_id < num_shards, f"shard {shard_id} of {num_shards}"
    return n_rows * shard_id // num_shards, n_rows * (shard_id + 1) // num_shards


def shard_dir_name(shard_id: int, num_shards: int) -> str:
    return f"shard-{shard_id:05d}-of-{num_shards:05d}"


def shard_dir(out: str | Path, shard_id: int, num_shards: int) -> Path:
    """Where shard ``shard_id`` of a build with ``--out out`` is written."""
    return Path(out) / shard_dir_name(shard_id, num_shards)


def resolve_shard(config: ShardConfig, encode: EncodeConfig,
                  env: Mapping[str, str] = os.environ) -> tuple[ShardConfig, EncodeConfig]:
    """``config`` with ``shard_id``/``num_shards`` checked, or taken from torchrun's RANK/WORLD_SIZE when unset.

    Under torchrun a ``cuda``/``auto`` device of ``encode`` becomes ``cuda:LOCAL_RANK`` (one GPU per process).

    Raises:
        ValueError: only one of the two options given, or a shard id outside ``[0, num_shards)``.
    """
    shard_id, num_shards = config.shard_id, config.num_shards
    torchrun = "RANK" in env and "WORLD_SIZE" in env
    if shard_id < 0 and num_shards == 0 and torchrun:
        shard_id, num_shards = int(env["RANK"]), int(env["WORLD_SIZE"])
    if (shard_id >= 0) != (num_shards > 0):
        raise ValueError(f"--shard-id {shard_id} and --num-shards {num_shards} go together: give both (shard i of "
                         f"n, 0 <= i < n), or neither (under torchrun they default to RANK and WORLD_SIZE)")
    if num_shards and not 0 <= shard_id < num_shards:
        raise ValueError(f"--shard-id {shard_id} is outside 0..{num_shards - 1} (--num-shards {num_shards})")
    device = encode.device
    if torchrun and device in ("auto", "cuda"):
        if torch.cuda.is_available():
            device = f"cuda:{int(env.get('LOCAL_RANK', '0'))}"
    return ShardConfig(shard_id, num_shards), dataclasses.replace(encode, device=device)


def build_shard(encoder: Encoder, corpus: Corpus, out: str | Path, shard: ShardConfig,
                encode: EncodeConfig | None = None, towers_dir: str | Path | None = None,
                overwrite: bool = False) -> Path:
    """Encode shard ``shard.shard_id`` of ``shard.num_shards`` of ``corpus`` into ``out/shard-I-of-N``.

    Args:
        encoder: must have a ``fingerprint()`` (towers do), so ``index merge`` can check all shards match.
        out: the shards dir (shared by all shards of the build; ``index merge --shards out`` finds them).
        shard: which shard; encode: the encoding options. The index options (``--factory`` ...) belong to
            ``index merge``.
        overwrite: re-encode a SHARD dir that exists from another corpus or encoder.

    Returns:
        The SHARD dir (complete; an existing identical one is kept as it is).

    Raises:
        ValueError: bad shard options, an encoder without fingerprint, fewer corpus rows than shards, or a
            corpus that changed while it was read.
        FileExistsError: the SHARD dir exists from another corpus/encoder and ``overwrite`` is off.
    """
    config = encode or EncodeConfig()
    shard_id, num_shards = shard.shard_id, shard.num_shards
    if not 0 <= shard_id < num_shards:
        raise ValueError(f"--shard-id {shard_id} is outside 0..{num_shards - 1} (--num-shards {num_shards})")
    fingerprint = encoder_fingerprint(encoder)
    if fingerprint is None:
        raise ValueError(f"encoder {encoder_name(encoder)} has no fingerprint(): shards must be checked to come from "
                         f"the same towers; index with towers (`towers.inference.result_encoder`)")
    path = shard_dir(out, shard_id, num_shards)
    work = check_shard_out(out, shard, config, corpus, towers_dir)
    if not isinstance(corpus, (str, Path)) and not hasattr(corpus, "__len__"):
        raise ValueError("a sharded build reads the corpus more than once: pass a file, dir, hf:NAME or a list of "
                         "rows, not a one-shot iterator")
    identity = corpus_identity(corpus, config.corpus_split)
    total = identity["rows"]
    if total < num_shards:
        raise ValueError(f"corpus '{describe(corpus)}' has {total} rows, fewer than --num-shards {num_shards}")
    lo, hi = shard_range(total, shard_id, num_shards)
    expected = expected_shard(shard, (lo, hi), fingerprint, int(encoder.dim), config.dtype)
    if not overwrite and is_complete(path, expected, identity):
        return path
    t0 = time.time()
    enc = encode_corpus(encoder, corpus, work, config, hi - lo, docs=iter_docs(corpus, config.corpus_split, lo, hi),
                        state_extra={"shard": [shard_id, num_shards], "rows": [lo, hi]})
    if enc.n != hi - lo or (identity["hashed"] == "file bytes"
                            and corpus_identity(corpus, config.corpus_split) != identity):
        raise ValueError(f"corpus '{describe(corpus)}' changed while shard {shard_id} was encoded (had {total} rows, "
                         f"read {enc.n} of rows [{lo}, {hi})); rebuild every shard from the final corpus")
    manifest = {
        "kind": SHARD_KIND, "format_version": SHARD_FORMAT_VERSION, **expected, "slicing": SLICING,
        "n": enc.n, "normalized": enc.normalized, "encoder": encoder_name(encoder),
        "towers_dir": str(Path(towers_dir).resolve()) if towers_dir else None,
        "corpus": {**identity, "split": config.corpus_split},
        "chunks": [{"rows": _npy_rows(e), "emb_bytes": e.stat().st_size, "docs_bytes": d.stat().st_size}
                   for e, d in zip(enc.emb_paths(), enc.docs_paths())],
        "build_config": {**dataclasses.asdict(config), **dataclasses.asdict(shard), "overwrite": overwrite,
                         "encode_seconds": round(time.time() - t0, 1)},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    with atomic_dir(path) as tmp:
        for src in work.iterdir():
            if src.is_file() and not src.name.startswith("."):
                link_or_copy(src, tmp / src.name)
        write_json_atomic(tmp / SHARD_MANIFEST, manifest)  # last: its presence is what `merge` checks
    if not config.keep_work:
        remove_work_dir(work)
    return path


def check_shard_out(out: str | Path, shard: ShardConfig, encode: EncodeConfig, corpus: Corpus | None = None,
                    towers_dir: str | Path | None = None) -> Path:
    """Refuse a shards dir, SHARD dir or work dir a sharded build could damage (``common.outputs``); returns
    the shard's work dir (one per shard, also under an explicit --work-dir: torchrun gives every rank the same
    options)."""
    inputs = {"--towers": towers_dir, "--corpus": corpus if isinstance(corpus, (str, Path)) else None}
    check_out_dir(out, ("shards",), verb="a sharded index build", inputs=inputs)
    path = shard_dir(out, shard.shard_id, shard.num_shards)
    check_out_dir(path, ("shard",), flag="shard dir", verb="a sharded index build")
    if encode.work_dir:
        check_work_dir(encode.work_dir, out)
        return check_work_dir(Path(encode.work_dir) / path.name)
    return check_work_dir(default_work_dir(path))


def read_shard(path: str | Path) -> dict[str, Any]:
    """``shard.json`` of a SHARD dir, after checking that every chunk file it lists is there, whole.

    Raises:
        FileNotFoundError: no ``shard.json`` (not a shard dir, or a shard whose build has not finished).
        ValueError: malformed or newer manifest, or a chunk file missing or of the wrong size (a partial copy).
    """
    path = Path(path)
    manifest_path = path / SHARD_MANIFEST
    if not manifest_path.is_file():
        raise FileNotFoundError(f"'{path}' is not a finished shard: no {SHARD_MANIFEST} (a shard dir appears only "
                                f"when its build completes; rerun the build command of that shard to resume it)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{manifest_path}: malformed JSON at line {exc.lineno}: {exc.msg}") from None
    if manifest.get("kind") != SHARD_KIND:
        raise ValueError(f"{manifest_path}: not a twotower index shard (kind {manifest.get('kind')!r})")
    if manifest.get("format_version", 0) > SHARD_FORMAT_VERSION:
        raise ValueError(f"{manifest_path}: format_version {manifest['format_version']} is newer than this twotower "
                         f"supports ({SHARD_FORMAT_VERSION}); upgrade twotower")
    for i, chunk in enumerate(manifest["chunks"]):
        for name, size in ((f"emb-{i:06d}.npy", chunk["emb_bytes"]), (f"docs-{i:06d}.arrow", chunk["docs_bytes"])):
            file = path / name
            have = file.stat().st_size if file.is_file() else None
            if have != size:
                state = "is missing" if have is None else f"has {have} bytes, expected {size}"
                raise ValueError(f"shard '{path}' is damaged: {name} {state} (an interrupted copy?); copy it again or "
                                 f"rebuild that shard with --overwrite")
    return manifest


def _npy_rows(path: Path) -> int:
    return int(np.load(path, mmap_mode="r").shape[0])


def expected_shard(shard: ShardConfig, rows: tuple[int, int], fingerprint: str, dim: int,
                   dtype: str) -> dict[str, Any]:
    """The ``shard.json`` fields a finished shard of this build must have (a rerun keeps a shard that has them)."""
    return {"shard_id": shard.shard_id, "num_shards": shard.num_shards, "rows": list(rows),
            "fingerprint": fingerprint, "dim": int(dim), "dtype": dtype}


def is_complete(path: Path, expected: dict[str, Any], identity: dict[str, Any]) -> bool:
    """True when ``path`` is a finished shard made from the same corpus and encoder (a rerun: keep it), False
    when it does not exist yet.

    Raises:
        FileExistsError: ``path`` exists but is unfinished, damaged, or from another corpus or encoder.
    """
    if not path.exists():
        return False
    _keep_existing(path, expected, identity)
    return True


def _keep_existing(path: Path, expected: dict[str, Any], identity: dict[str, Any]) -> None:
    """Accept an existing SHARD dir made from the same corpus and encoder (a rerun); otherwise refuse."""
    try:
        manifest = read_shard(path)
    except (FileNotFoundError, ValueError) as exc:
        raise FileExistsError(f"'{path}' exists but is not a usable shard ({exc}); pass --overwrite to rebuild "
                              f"it") from None
    differ = [f"{k} {manifest.get(k)} (now {v})" for k, v in expected.items() if manifest.get(k) != v]
    old = manifest["corpus"]
    if (old["rows"], old["sha256"]) != (identity["rows"], identity["sha256"]):
        differ.append(f"corpus {old['name']} ({old['rows']} rows, sha256 {old['sha256'][:12]}; now "
                      f"{identity['rows']} rows, {identity['sha256'][:12]})")
    if differ:
        raise FileExistsError(f"shard dir '{path}' already exists with {'; '.join(differ)}; pass --overwrite to "
                              f"re-encode it")
    print(f"index build: shard {expected['shard_id']} of {expected['num_shards']} is already complete in "
          f"'{path}' (same encoder and corpus); nothing to do", file=sys.stderr)
