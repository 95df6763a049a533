"""Deterministic, resumable batch sampler that keeps false negatives out of a batch.

With in-batch negatives every other row's positive is a negative for a query. Two rows that share a
positive text (or a query text) in one batch would teach the model that a right answer is wrong, so the
sampler never places them together (sbert's ``NoDuplicatesBatchSampler`` does the same).

Order is a pure function of ``(seed, epoch)``, and the position is ``(epoch, batch_index)``, so a run
restored from a checkpoint sees exactly the batches an uninterrupted run would have seen. Batches are
built *globally* first and only then split per rank (``rank``/``world_size``), so a data-parallel run
sees the same global batches as a single process, and every rank agrees on them without talking.
"""
from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

import numpy as np


def conflict_keys(queries: Sequence[str], positives: Sequence[str]) -> list[tuple[int, ...]]:
    """Per row, integer ids of the texts that must not repeat inside one batch (its query and positive).

    Ids come from a dict in row order, so they do not depend on Python's per-process string hashing.
    """
    ids: dict[tuple[str, str], int] = {}
    return [(ids.setdefault(("q", q), len(ids)), ids.setdefault(("p", p), len(ids)))
            for q, p in zip(queries, positives, strict=True)]


class NoDuplicatesBatchSampler:
    """Shuffled batches of row indices with no shared key inside a batch.

    Args:
        keys: per row, the hashable keys that may appear at most once per batch (see :func:`conflict_keys`).
        batch_size: global batch size (all ranks together).
        seed: shuffling seed; epoch ``e`` uses the permutation drawn from ``(seed, e)``.
        drop_last: drop batches smaller than ``batch_size`` (the tail, and the leftovers of rows that
            conflict with everything else); full batches keep the loss's number of negatives constant
            and split evenly across ranks.
        rank, world_size: this process's share of each global batch (contiguous slice).
    """

    def __init__(self, keys: Sequence[Sequence[Hashable]], batch_size: int, seed: int = 0, drop_last: bool = True,
                 rank: int = 0, world_size: int = 1) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if drop_last and batch_size % world_size:
            raise ValueError(f"batch_size {batch_size} is not divisible by world_size {world_size}")
        self.keys = [tuple(k) for k in keys]
        self.batch_size = batch_size
        self.seed = seed
        self.drop_last = drop_last
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.batch_index = 0  # next global batch to hand out within self.epoch
        self._cache: tuple[int, list[np.ndarray]] | None = None

    # ---- global batches ------------------------------------------------------------------------------
    def batches(self, epoch: int) -> list[np.ndarray]:
        """All global batches (int64 row indices) of ``epoch``, in order."""
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.keys))
        out: list[np.ndarray] = []
        pending: list[int] = []  # rows skipped for a conflict; tried first for the next batch (keeps order)
        pos = 0
        while pos < len(order) or pending:
            batch: list[int] = []
            used: set[Hashable] = set()
            carry: list[int] = []
            for i in pending:
                self._offer(i, batch, used, carry)
            while len(batch) < self.batch_size and pos < len(order):
                self._offer(int(order[pos]), batch, used, carry)
                pos += 1
            pending = carry
            assert batch, "a non-empty pending list always yields at least its first row"
            if len(batch) == self.batch_size or not self.drop_last:
                out.append(np.asarray(batch, dtype=np.int64))
        self._cache = (epoch, out)
        return out

    def _offer(self, i: int, batch: list[int], used: set[Hashable], carry: list[int]) -> None:
        if len(batch) < self.batch_size and used.isdisjoint(self.keys[i]):
            batch.append(i)
            used.update(self.keys[i])
        else:
            carry.append(i)

    def __len__(self) -> int:
        """Global batches in the current epoch."""
        return len(self.batches(self.epoch))

    def shard(self, batch: np.ndarray) -> np.ndarray:
        """This rank's contiguous slice of a global batch."""
        return np.array_split(batch, self.world_size)[self.rank]

    # ---- stream + resumable position -----------------------------------------------------------------
    def next_batch(self) -> np.ndarray:
        """This rank's rows of the next global batch; rolls over into the next epoch when one ends."""
        return self.shard(self.next_global_batch())

    def next_global_batch(self) -> np.ndarray:
        """The next global batch (all ranks' rows; :meth:`shard` gives this rank's); advances the position."""
        if self.batch_index >= len(self.batches(self.epoch)):
            self.epoch, self.batch_index = self.epoch + 1, 0
        batches = self.batches(self.epoch)
        if not batches:
            raise ValueError(f"{len(self.keys)} rows make no full batch of {self.batch_size} without repeating a "
                             "query or positive text; lower the batch size or add rows")
        batch = batches[self.batch_index]
        self.batch_index += 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "batch_index": self.batch_index, "seed": self.seed,
                "batch_size": self.batch_size, "num_rows": len(self.keys)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved position; the data, seed and batch size must be the ones it was saved with."""
        for name, mine in (("seed", self.seed), ("batch_size", self.batch_size), ("num_rows", len(self.keys))):
            if state[name] != mine:
                raise ValueError(f"sampler state was saved with {name}={state[name]}, this run has {mine}")
        self.epoch, self.batch_index = int(state["epoch"]), int(state["batch_index"])
