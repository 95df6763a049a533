"""Metadata filters: a per-field inverted map of the doc store's ``metadata``, stored in the INDEX dir as Arrow.

Every scalar metadata value becomes an entry ``(field, kind, value) -> rows``: strings, numbers (int and float
alike) and booleans; the elements of a list each count (a doc tagged ``["a", "b"]`` matches ``"a"`` and ``"b"``);
a nested object is flattened with dots (``{"repo": {"org": "x"}}`` -> field ``repo.org``); null is not indexed.

A filter (MongoDB / Qdrant / LanceDB style) is a JSON object; its fields are ANDed::

    {"package": "numpy"}                        equality (same as {"package": {"$eq": "numpy"}})
    {"lang": {"$in": ["py", "java"]}}           any of
    {"year": {"$gte": 2020, "$lt": 2024}}       ranges (numbers; strings compare as text, e.g. ISO dates)
    {"package": {"$ne": "numpy"}}               $ne / $nin: every row without that value (rows lacking the
                                                field included, as MongoDB does)

``FilterMap.allowed(filter)`` returns the bool mask (ntotal,) of matching rows; search then hands faiss an
``IDSelector`` (bitmap or batch) of the allowed live rows, so IVF / HNSW / Flat only ever score those rows.

On disk: ``filters.arrow``, one Arrow IPC file with columns ``field`` (string), ``kind`` (``str`` | ``num`` |
``bool``), ``text`` (string value), ``number`` (float64 value; 0/1 for bools), ``rows`` (list<int64>, sorted),
sorted by field, kind, value.
"""
from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from twotower.common.schemas import check_arrow_schema

FILTERS_FILE = "filters.arrow"
KINDS = ("bool", "num", "str")  # the kinds of metadata value _flatten records
OPERATORS = ("$eq", "$ne", "$in", "$nin", "$gt", "$gte", "$lt", "$lte")
_RANGE = ("$gt", "$gte", "$lt", "$lte")
_SCHEMA = pa.schema([("field", pa.string()), ("kind", pa.string()), ("text", pa.string()),
                     ("number", pa.float64()), ("rows", pa.list_(pa.int64()))])


class FilterError(ValueError):
    """A filter the index cannot apply: unknown field, bad operator or operand (one line, names the field)."""


def _ops_hint() -> str:
    return f"valid operators: {', '.join(OPERATORS)}"


# ---- building ------------------------------------------------------------------------------------------
def _flatten(prefix: str, value: Any, out: list[tuple[str, str, Any]]) -> None:
    if value is None:
        return
    if isinstance(value, Mapping):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    elif isinstance(value, (list, tuple)):
        for v in value:
            if not isinstance(v, (list, tuple)):
                _flatten(prefix, v, out)
    elif isinstance(value, bool):
        out.append((prefix, "bool", value))
    elif isinstance(value, (int, float)):
        out.append((prefix, "num", float(value)))
    else:
        out.append((prefix, "str", str(value)))


def build_filter_table(metadata: Iterable[str | None]) -> pa.Table:
    """The inverted map of a doc store's ``metadata`` column (JSON object strings, row i = faiss id i)."""
    entries: dict[tuple[str, str, Any], list[int]] = {}
    for row, text in enumerate(metadata):
        if not text or text == "{}":
            continue
        found: list[tuple[str, str, Any]] = []
        _flatten("", json.loads(text), found)
        for key in dict.fromkeys(found):  # a value listed twice in one row counts once
            entries.setdefault(key, []).append(row)
    keys = sorted(entries, key=lambda e: (e[0], e[1], e[2] if e[1] == "str" else float(e[2])))
    return pa.table({
        "field": pa.array([k[0] for k in keys], pa.string()),
        "kind": pa.array([k[1] for k in keys], pa.string()),
        "text": pa.array([k[2] if k[1] == "str" else None for k in keys], pa.string()),
        "number": pa.array([None if k[1] == "str" else float(k[2]) for k in keys], pa.float64()),
        "rows": pa.array([entries[k] for k in keys], pa.list_(pa.int64())),
    }, schema=_SCHEMA)


def save_filter_table(table: pa.Table, path: str | Path) -> None:
    """Write ``table`` as an Arrow IPC file (inside an INDEX temp dir that is renamed when complete)."""
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)


def describe_fields(table: pa.Table) -> dict[str, dict[str, Any]]:
    """``{field: {"kinds": [...], "values": distinct values}}`` for the manifest and ``index info``."""
    out: dict[str, dict[str, Any]] = {}
    for f, k in zip(table.column("field").to_pylist(), table.column("kind").to_pylist()):
        d = out.setdefault(f, {"kinds": [], "values": 0})
        d["values"] += 1
        if k not in d["kinds"]:
            d["kinds"].append(k)
    return out


# ---- query time ----------------------------------------------------------------------------------------
class _Field:
    """One field's entries by kind: sorted values and their row lists (flat rows + offsets)."""

    def __init__(self) -> None:
        self.values: dict[str, np.ndarray] = {}
        self.starts: dict[str, np.ndarray] = {}
        self.ends: dict[str, np.ndarray] = {}


class FilterMap:
    """The loaded inverted map: ``allowed(filter) -> bool (ntotal,)``.

    Args:
        table: the map (see module doc); ntotal: rows of the index.
    """

    def __init__(self, table: pa.Table, ntotal: int) -> None:
        self.ntotal = int(ntotal)
        table = table.combine_chunks()
        rows = table.column("rows").chunk(0) if table.num_rows else pa.array([], pa.list_(pa.int64()))
        self._rows = rows.values.to_numpy(zero_copy_only=False).astype(np.int64)
        offsets = rows.offsets.to_numpy(zero_copy_only=False).astype(np.int64)
        if len(self._rows) and (self._rows.min() < 0 or self._rows.max() >= self.ntotal):
            bad = int(self._rows.min()) if self._rows.min() < 0 else int(self._rows.max())
            raise ValueError(f"filter map holds row {bad} but the index has rows 0..{self.ntotal - 1}; rebuild the "
                             f"index")
        fields = table.column("field").to_pylist()
        kinds = table.column("kind").to_pylist()
        texts = table.column("text").to_pylist()
        numbers = table.column("number").to_numpy(zero_copy_only=False)
        self.fields: dict[str, _Field] = {}
        i, n = 0, len(fields)
        while i < n:  # runs of (field, kind): the table is sorted by them
            j = i
            while j < n and fields[j] == fields[i] and kinds[j] == kinds[i]:
                j += 1
            f = self.fields.setdefault(fields[i], _Field())
            kind = kinds[i]
            f.values[kind] = np.array(texts[i:j], dtype=object) if kind == "str" else numbers[i:j].astype(np.float64)
            f.starts[kind], f.ends[kind] = offsets[i:j], offsets[i + 1:j + 1]
            i = j

    @classmethod
    def load(cls, path: str | Path, ntotal: int) -> FilterMap:
        try:
            with pa.memory_map(str(path), "r") as source:
                table = pa.ipc.open_file(source).read_all()
        except (OSError, pa.ArrowInvalid) as exc:
            raise ValueError(f"filter map '{path}' is unreadable ({exc}); rebuild the index") from None
        check_arrow_schema(path, table.schema, _SCHEMA)
        kinds = set(table.column("kind").to_pylist()) - set(KINDS)
        if kinds:
            raise ValueError(f"{path}: column 'kind': found {sorted(map(str, kinds))}, expected one of "
                             f"{', '.join(KINDS)}")
        try:
            return cls(table, ntotal)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None

    def allowed(self, filter: Mapping[str, Any] | None) -> np.ndarray | None:
        """The rows matching ``filter`` as bool (ntotal,); None for no filter (``None`` or ``{}``).

        Raises:
            FilterError: not an object, unknown field, unknown operator, operand of the wrong type.
        """
        if filter is None:
            return None
        if not isinstance(filter, Mapping):
            raise FilterError(f"filter must be a JSON object {{field: value | {{operator: value}}}}, got "
                              f"{type(filter).__name__}")
        if not filter:
            return None
        mask = np.ones(self.ntotal, bool)
        for name, cond in filter.items():
            if not isinstance(name, str) or name not in self.fields:
                known = ", ".join(sorted(self.fields)) or "none: the corpus rows carry no metadata"
                raise FilterError(f"unknown filter field {name!r}: the index has fields {known} ({_ops_hint()})")
            ops = cond if isinstance(cond, Mapping) else {"$eq": cond}
            if not ops:
                raise FilterError(f"filter field {name!r}: empty condition {{}} ({_ops_hint()})")
            for op, operand in ops.items():
                mask &= self._match(name, op, operand)
        return mask

    def _match(self, name: str, op: Any, operand: Any) -> np.ndarray:
        if op not in OPERATORS:
            raise FilterError(f"filter field {name!r}: unknown operator {op!r} ({_ops_hint()})")
        if op in ("$in", "$nin"):
            if not isinstance(operand, (list, tuple)):
                raise FilterError(f"filter field {name!r}: {op} needs a list of values, got {_show(operand)}")
            hit = np.zeros(self.ntotal, bool)
            for v in operand:
                hit |= self._equal(name, op, v)
            return ~hit if op == "$nin" else hit
        if op in ("$eq", "$ne"):
            hit = self._equal(name, op, operand)
            return ~hit if op == "$ne" else hit
        return self._range(name, op, operand)

    def _equal(self, name: str, op: str, value: Any) -> np.ndarray:
        kind, key = _kind_of(name, op, value)
        f = self.fields[name]
        hit = np.zeros(self.ntotal, bool)
        values = f.values.get(kind)
        if values is None:
            return hit
        pos = int(np.searchsorted(values, key))
        if pos < len(values) and values[pos] == key:
            hit[self._rows[f.starts[kind][pos]:f.ends[kind][pos]]] = True
        return hit

    def _range(self, name: str, op: str, value: Any) -> np.ndarray:
        kind, key = _kind_of(name, op, value)
        if kind == "bool":
            raise FilterError(f"filter field {name!r}: {op} needs a number or a string, got {_show(value)}")
        f = self.fields[name]
        hit = np.zeros(self.ntotal, bool)
        values = f.values.get(kind)
        if values is None:
            return hit
        if op in ("$gt", "$gte"):
            lo, hi = int(np.searchsorted(values, key, side="right" if op == "$gt" else "left")), len(values)
        else:
            lo, hi = 0, int(np.searchsorted(values, key, side="left" if op == "$lt" else "right"))
        if lo < hi:
            starts, ends = f.starts[kind][lo:hi], f.ends[kind][lo:hi]
            hit[self._rows[starts[0]:ends[-1]]] = True  # entries are contiguous in the flat row array
        return hit


def _kind_of(name: str, op: str, value: Any) -> tuple[str, Any]:
    """(kind, comparable key) of a filter operand; FilterError for null, objects, lists, NaN."""
    if isinstance(value, bool):
        return "bool", float(value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise FilterError(f"filter field {name!r}: {op} needs a finite number, got {value!r}")
        return "num", float(value)
    if isinstance(value, str):
        return "str", value
    raise FilterError(f"filter field {name!r}: {op} needs a string, number or boolean, got {_show(value)} "
                      f"({_ops_hint()})")


def _show(value: Any) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, float) or math.isfinite(value) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def parse_filter(text: str, where: str = "--filter") -> dict[str, Any]:
    """A ``--filter`` JSON string as a dict (one-line error naming the option when it is not a JSON object)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise FilterError(f"{where}: not valid JSON ({exc.msg} at character {exc.pos}): {text[:80]!r}") from None
    if not isinstance(value, dict):
        raise FilterError(f"{where}: must be a JSON object {{field: value | {{operator: value}}}}, got {text[:80]!r} "
                          f"({_ops_hint()})")
    return value
