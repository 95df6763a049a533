"""``serve`` follows its INDEX dir: a new version (``index add``, ``index remove``, ``index build --overwrite``,
a swapped ``current -> index-vN`` link) is loaded in the background and swapped in between batches.

Every publish of an INDEX dir makes a new dir (``common.atomic``), so the dir's identity (device + inode, and
its manifest's inode + mtime) changes with every version; the watcher compares it every ``--reload-interval``
seconds (a stat, no read). On a change it loads the new version in a worker thread while the old one keeps
serving, then points the batcher at it: the batch running at that moment finishes on the old version (it
holds its own reference, see ``retrieval.batcher``), the next batch runs on the new one, no request is
dropped or fails. The old version is freed when the last batch using it ends. Memory: both versions are in
RAM while the new one loads.

A version that cannot be loaded (damaged, or built with other towers than an explicit ``--towers``) is
reported on stderr and the server keeps serving the version it has; it tries again when the dir changes next.
"""
from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Callable
from pathlib import Path

from twotower.common.device import resolve_device
from twotower.index.load import load_index
from twotower.index.store import MANIFEST, read_manifest
from twotower.retrieval.batcher import MicroBatcher
from twotower.retrieval.config import ServeConfig
from twotower.retrieval.retriever import Retriever

Identity = tuple[int, int, int, int]


def index_identity(index_dir: str | Path) -> Identity | None:
    """What changes with every published version of an INDEX dir (None while it is missing or mid-swap)."""
    try:
        d = os.stat(index_dir)  # follows a symlink: a swapped link shows the new target's inode
        m = os.stat(Path(index_dir) / MANIFEST)
    except OSError:
        return None
    return d.st_dev, d.st_ino, m.st_ino, m.st_mtime_ns


class IndexWatcher:
    """Swaps new versions of ``config.index`` into ``batcher`` (and reports them to ``on_swap``)."""

    def __init__(self, config: ServeConfig, batcher: MicroBatcher,
                 on_swap: Callable[[Retriever], None] | None = None) -> None:
        self.config, self.batcher, self.on_swap = config, batcher, on_swap
        self.reloads = 0
        ident = index_identity(config.index)
        try:  # the served version is the one on disk unless the dir changed since it was loaded
            same = read_manifest(config.index) == batcher.retriever.index.manifest
        except (OSError, ValueError):
            same = False
        self.loaded: Identity | None = ident if same else None
        self.failed: Identity | None = None

    def check(self) -> bool:
        """Load and swap in the dir's current version if it is not the one served. True when swapped.

        Runs in a worker thread (``run``) or directly (tests).
        """
        ident = index_identity(self.config.index)
        if ident is None or ident in (self.loaded, self.failed):
            return False
        try:
            new = self._load()
        except (ValueError, KeyError, OSError) as exc:  # a damaged or mismatched version: keep the one we have
            self.failed = ident
            print(f"twotower serve: not reloading '{self.config.index}': {exc}; still serving generation "
                  f"{self.generation}", file=sys.stderr, flush=True)
            return False
        if index_identity(self.config.index) != ident:
            return False  # published again while loading (files may mix versions): the next check loads it
        self.batcher.retriever = new  # the next batch runs on it; the running one keeps its own reference
        if self.on_swap is not None:
            self.on_swap(new)
        self.loaded, self.failed, self.reloads = ident, None, self.reloads + 1
        print(f"twotower serve: now serving generation {self.generation} of '{self.config.index}' "
              f"({new.index.n_live} live docs)", file=sys.stderr, flush=True)
        return True

    @property
    def generation(self) -> int:
        return int(self.batcher.retriever.index.manifest.get("generation", 1))

    def _load(self) -> Retriever:
        current, config = self.batcher.retriever, self.config
        device = "auto" if config.device == "auto" else str(resolve_device(config.device)).split(":")[0]
        index = load_index(config.index, device=device)
        fingerprint = current.towers_meta.get("fingerprint")
        if index.manifest.get("fingerprint") == fingerprint or config.towers:
            index.check_fingerprint(fingerprint)  # explicit --towers must fit every version served
            return current.with_index(index)
        # Rebuilt with other towers, which it records: load those (the served tower cannot read its vectors).
        return Retriever.load(config.index, None, config.device, max_k=config.max_k, precision=config.precision,
                              query_max_length=config.query_max_length,
                              allow_mixed_towers=config.allow_mixed_towers)

    async def run(self) -> None:
        """Check every ``reload_interval`` seconds until cancelled (the app's lifespan ends)."""
        while True:
            await asyncio.sleep(self.config.reload_interval)
            await asyncio.to_thread(self.check)
