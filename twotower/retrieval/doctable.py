"""Batched row fetch from the INDEX doc store: all hits of a search come back in one Arrow take.

A ``datasets.Dataset`` saved to disk is a memory-mapped Arrow table cut into ~1000-row record batches.
``Dataset.__getitem__(list)`` gathers row by row (~9 us a row) and ``pyarrow.Table.take`` on a chunked
table concatenates every chunk first (ms per call whatever the row count), so both would dominate a fast
IVF search. A doc store that fits ``max_in_memory_bytes`` is combined into one chunk at load (a take of
2,560 rows then costs ~0.3 ms); a larger one stays memory-mapped and is read with one take per touched
record batch.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

DEFAULT_MAX_IN_MEMORY_BYTES = 1 << 30  # combine doc stores up to 1 GiB (string offsets stay int32)


OPTIONAL_COLUMNS = ("title", "metadata")
BLANK_VALUES = ("", "{}")  # an empty title, an empty metadata object


def _all_blank(column: pa.ChunkedArray) -> bool:
    """True when every value of a string column is null, "" or "{}" (vectorised: one pass in Arrow)."""
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        return False
    blank = pc.or_kleene(pc.is_null(column), pc.is_in(column, value_set=pa.array(BLANK_VALUES, column.type)))
    return bool(pc.all(blank).as_py() if len(column) else True)


class DocTable:
    """Read rows of the doc store by faiss id (row i = faiss id i).

    Args:
        docs: the ``datasets.Dataset`` of an INDEX dir (columns id, text, title, metadata, ...).
        max_in_memory_bytes: doc stores up to this size are copied into one contiguous chunk.
    """

    def __init__(self, docs: Any, max_in_memory_bytes: int = DEFAULT_MAX_IN_MEMORY_BYTES) -> None:
        # ``with_format("arrow")[:]`` is a zero-copy slice that honours any indices mapping of ``docs``.
        table: pa.Table = docs.with_format("arrow")[:]
        self.num_rows = table.num_rows
        self.column_names = list(table.column_names)
        self.in_memory = table.nbytes <= max_in_memory_bytes
        if self.in_memory:
            self._batches = [b for b in table.combine_chunks().to_batches() if b.num_rows] or [
                pa.RecordBatch.from_pylist([], schema=table.schema)]
        else:
            self._batches = [b for b in table.to_batches() if b.num_rows]
        self._plans: dict[tuple[str, ...], tuple[tuple[str, ...], pa.RecordBatch | None]] = {}  # see _plan
        # Optional columns that are empty in every row (no titles, no metadata: the common corpus) are not
        # read at all; a take then fetches only id and text.
        self.blank_columns = frozenset(c for c in OPTIONAL_COLUMNS if c in self.column_names
                                       and _all_blank(table.column(c)))
        # offsets[c] = first row of record batch c; offsets[-1] = num_rows.
        self._offsets = np.cumsum([0] + [b.num_rows for b in self._batches], dtype=np.int64)
        assert self._offsets[-1] == self.num_rows, f"doc table batches hold {self._offsets[-1]} != {self.num_rows} rows"

    def take(self, rows: np.ndarray, columns: tuple[str, ...] = ("id", "text", "title", "metadata")
             ) -> dict[str, list[Any]]:
        """Rows ``rows`` (int64 (n,), duplicates allowed, order kept) as ``{column: list of n values}``.

        Columns in ``blank_columns`` are not read: their values come back as None (callers read "" / {}).
        """
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if rows.size and (rows.min() < 0 or rows.max() >= self.num_rows):
            bad = int(rows[(rows < 0) | (rows >= self.num_rows)][0])
            raise IndexError(f"doc row {bad} out of range: the doc store has {self.num_rows} rows")
        read, selected = self._plan(columns)
        out: dict[str, list[Any]] = {c: [None] * rows.size for c in columns if c not in read}
        if not read:
            return out
        if selected is not None:  # one in-memory batch: one take
            table = selected.take(pa.array(rows))
            out.update(zip(read, (col.to_pylist() for col in table.columns)))
            return {c: out[c] for c in columns}
        # Memory-mapped path: sort rows, take once per touched record batch, then restore input order.
        order = np.argsort(rows, kind="stable")
        sorted_rows = rows[order]
        chunk = np.searchsorted(self._offsets, sorted_rows, side="right") - 1
        parts = []
        for c in np.unique(chunk):
            local = sorted_rows[chunk == c] - self._offsets[c]
            parts.append(self._batches[c].select(list(read)).take(pa.array(local)))
        sorted_values = {c: [v for p in parts for v in p.column(c).to_pylist()] for c in read}
        for c in read:
            dst = out[c] = [None] * rows.size
            for pos, value in zip(order.tolist(), sorted_values[c]):
                dst[pos] = value
        return {c: out[c] for c in columns}

    def _plan(self, columns: tuple[str, ...]) -> tuple[tuple[str, ...], pa.RecordBatch | None]:
        """(columns to read, the in-memory batch cut to them or None), validated and cached per ``columns``."""
        plan = self._plans.get(columns)
        if plan is None:
            missing = [c for c in columns if c not in self.column_names]
            if missing:
                raise KeyError(f"doc store has no column(s) {missing}: it has {self.column_names}")
            read = tuple(c for c in columns if c not in self.blank_columns)
            selected = self._batches[0].select(list(read)) if len(self._batches) == 1 and read else None
            plan = self._plans[columns] = (read, selected)
        return plan
