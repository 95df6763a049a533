"""Load and validate (query, positive[, negatives]) training pairs through ``datasets``.

Accepted inputs: a local ``.jsonl``/``.json`` (one object per line), ``.csv`` (header row) or ``.parquet`` file,
or a ``datasets`` hub name (only when the argument is not a local path). Every row is validated before any
training starts; errors name the file, the row (JSONL: the line) and the column, because a bad row found
an hour into training is a wasted hour.

JSONL and CSV are parsed line by line here (``common.jsonl``, the one text reader: a BOM and CRLF line ends
from spreadsheet tools are dropped) rather than by ``datasets``' builders: their errors do not say which line
is broken, and they choke on blank lines and mixed types. CSV cells are read as text (CSV has no types), so a
query that reads "null" or "NA" stays a query. A bare name that is not a file must look like a hub dataset id
(``owner/name``), else it fails at once instead of after the hub client's retries.
"""
from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import datasets
import numpy as np

from twotower.common.jsonl import iter_csv_rows, iter_utf8_lines, lone_surrogate_at, parse_json_line
from twotower.common.text import is_blank

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
CSV_SUFFIXES = (".csv",)
PARQUET_SUFFIXES = (".parquet", ".pq")
SUFFIXES = JSONL_SUFFIXES + CSV_SUFFIXES + PARQUET_SUFFIXES
DEFAULT_NEGATIVES = "negatives"
HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")  # owner/name, as the hub spells dataset ids


def load_pairs(
    path_or_name: str | Path,
    query_column: str = "query",
    positive_column: str = "positive",
    negatives_column: str = DEFAULT_NEGATIVES,
    split: str = "train",
) -> datasets.Dataset:
    """Load a pairs file (or hub dataset) and validate every row.

    Args:
        path_or_name: ``.jsonl``/``.json``/``.csv``/``.parquet`` file, or a ``datasets`` hub name.
        query_column, positive_column: source column names (renamed to ``query`` / ``positive``).
        negatives_column: optional column holding a list of hard-negative texts (renamed to ``negatives``).
            When it is absent under its default name there are simply no hard negatives; a column named
            explicitly (not the default) must exist.
        split: split to take from a hub dataset.

    Returns:
        A ``datasets.Dataset`` with columns ``query``, ``positive`` and, when present, ``negatives``.

    Raises:
        FileNotFoundError: a local path that does not exist (or a hub name that cannot be loaded).
        ValueError: unsupported extension, missing column, empty/non-string text, bad negatives, zero rows,
            malformed JSON (with the line number).
    """
    source = str(path_or_name)
    path = Path(source).expanduser()
    wanted = {"query": query_column, "positive": positive_column, "negatives": negatives_column}
    if path.exists() or _looks_like_path(source):
        if not path.exists():
            raise FileNotFoundError(f"pairs file '{source}' does not exist")
        if path.is_dir():
            raise ValueError(f"pairs path '{source}' is a directory; give a {', '.join(SUFFIXES)} file")
        suffix = path.suffix.lower()
        if suffix in JSONL_SUFFIXES:
            ds = _load_jsonl(path, wanted)
        elif suffix in CSV_SUFFIXES:
            ds = _load_csv(path, wanted)
        elif suffix in PARQUET_SUFFIXES:
            ds = _select(_load_builder("parquet", path), wanted, source)
        else:
            raise ValueError(f"pairs file '{source}' has unsupported extension '{suffix}': choose "
                             f"{', '.join(SUFFIXES)}")
    elif not HUB_NAME.fullmatch(source):  # fail now, not after the hub client's retries (~30 s offline)
        raise FileNotFoundError(f"no such file '{source}'; a hub dataset needs owner/name (e.g. "
                                f"sentence-transformers/natural-questions)")
    else:
        ds = _select(_load_hub(source, split), wanted, source)
    _validate(ds, source, wanted)
    return ds


def count_overlap(pairs: datasets.Dataset, dev: datasets.Dataset) -> int:
    """Rows of ``dev`` whose (query, positive) pair is also in ``pairs``: dev recall over them measures
    memorisation, not retrieval of unseen queries."""
    seen = set(zip(pairs["query"], pairs["positive"]))
    return sum((q, p) in seen for q, p in zip(dev["query"], dev["positive"]))


def pairs_fingerprint(ds: datasets.Dataset) -> str:
    """sha256 over every text of a validated pairs dataset: detects a changed pairs file on ``--resume``."""
    h = hashlib.sha256()
    for col in ds.column_names:
        for value in ds[col]:
            h.update(json.dumps(value, ensure_ascii=False).encode())
            h.update(b"\n")
    return h.hexdigest()[:16]


# ---- loaders -----------------------------------------------------------------------------------------
def _looks_like_path(source: str) -> bool:
    """A missing local file must say 'does not exist', not 'not on the hub'."""
    suffix = Path(source).suffix[1:]
    return (suffix.isalpha() and len(suffix) <= 8) or source.startswith(("/", "./", "../", "~", "\\")) \
        or (len(source) > 1 and source[1] == ":")


def _load_jsonl(path: Path, wanted: dict[str, str]) -> datasets.Dataset:
    """Rows of a JSONL pairs file. Its columns are decided by the whole file, not by row 1: a negatives column
    present on any row must be on every row (``[]`` for a row without hard negatives), and the first row that
    breaks that shape is an error naming its line and the line that set the shape."""
    objects: list[tuple[int, dict[str, Any]]] = []
    negatives_at: int | None = None  # first line with a negatives column: it makes the column part of the shape
    for lineno, line in iter_utf8_lines(path):
        if not line.strip():
            continue  # blank lines (e.g. a trailing newline pair) carry no row
        obj = parse_json_line(line, f"{path}: line {lineno}")
        if not isinstance(obj, dict):
            raise ValueError(f"{path}: line {lineno}: expected a JSON object, got {type(obj).__name__}")
        if negatives_at is None and wanted["negatives"] in obj:
            negatives_at = lineno
        objects.append((lineno, obj))
    if not objects:
        raise ValueError(f"{path}: zero rows (the file has no JSON lines)")
    _check_columns(list(dict.fromkeys(k for _, obj in objects for k in obj)), wanted, str(path))
    names = ("query", "positive") + (("negatives",) if negatives_at is not None else ())
    columns: dict[str, list[Any]] = {name: [] for name in names}
    for lineno, obj in objects:
        for name in names:
            if wanted[name] in obj:
                continue
            if name == "negatives":
                raise ValueError(f"{path}: line {lineno}: no column '{wanted[name]}', but line {negatives_at} "
                                 f"has one; every row gives it or none does (write [] for no hard negatives)")
            raise ValueError(f"{path}: line {lineno}: missing column '{wanted[name]}' "
                             f"(columns found: {', '.join(obj) or 'none'})")
        row = {name: obj[wanted[name]] for name in names}
        _check_row(row, f"{path}: line {lineno}", wanted)
        for name, value in row.items():
            columns[name].append(value)
    return datasets.Dataset.from_dict(columns, features=_features(negatives_at is not None))


def _load_csv(path: Path, wanted: dict[str, str]) -> datasets.Dataset:
    """A CSV file with a header row, read through ``common.jsonl.iter_csv_rows`` like every text file (BOM and
    CRLF dropped, bad bytes named by line); every cell is text (CSV has no types, so "null" stays "null")."""
    rows = iter_csv_rows(path)
    _, header = next(rows, (0, []))
    if not header:
        raise ValueError(f"{path}: zero rows (empty CSV file, not even a header)")
    if len(set(header)) != len(header):
        raise ValueError(f"{path}: the header names a column twice: {', '.join(header)}")
    _check_columns(header, wanted, str(path))
    if wanted["negatives"] in header:
        raise ValueError(f"{path}: column '{wanted['negatives']}' cannot hold a list of negatives in CSV; "
                         "use a JSONL or Parquet file for hard negatives")
    columns: dict[str, list[str]] = {c: [] for c in header}
    n = 0
    for line, fields in rows:
        if not fields:
            continue  # a blank line
        n += 1
        if len(fields) != len(header):
            raise ValueError(f"{path}: row {n} has {len(fields)} fields but the header has {len(header)} "
                             f"(line {line})")
        for name, value in zip(header, fields):
            columns[name].append(value)
    if n == 0:
        raise ValueError(f"{path}: zero rows (only a header)")
    features = datasets.Features({c: datasets.Value("string") for c in header})
    return _select(datasets.Dataset.from_dict(columns, features=features), wanted, str(path))


def _load_builder(builder: str, path: Path) -> datasets.Dataset:
    if path.stat().st_size == 0:
        raise ValueError(f"{path}: zero rows (empty file)")
    try:
        return datasets.load_dataset(builder, data_files=str(path), split="train")
    except datasets.exceptions.DatasetGenerationError as exc:
        raise ValueError(f"{path}: cannot read {builder} file: {exc.__cause__ or exc}") from exc


def _load_hub(name: str, split: str) -> datasets.Dataset:
    try:
        ds = datasets.load_dataset(name, split=split)
    except (FileNotFoundError, ConnectionError, datasets.exceptions.DatasetNotFoundError) as exc:
        raise FileNotFoundError(f"pairs '{name}' is not a local file and could not be loaded as a datasets "
                                f"hub name ({exc}); give a {', '.join(SUFFIXES)} file") from exc
    if not isinstance(ds, datasets.Dataset):
        raise ValueError(f"hub dataset '{name}' split '{split}' is not a plain Dataset ({type(ds).__name__})")
    return ds


def _select(ds: datasets.Dataset, wanted: dict[str, str], source: str) -> datasets.Dataset:
    """Keep only the pair columns and rename them to query / positive / negatives."""
    _check_columns(ds.column_names, wanted, source)
    keep = [n for n in ("query", "positive", "negatives") if wanted[n] in ds.column_names]
    ds = ds.select_columns([wanted[n] for n in keep])
    return ds.rename_columns({wanted[n]: n for n in keep if wanted[n] != n})


def _features(has_negatives: bool) -> datasets.Features:
    feats = {"query": datasets.Value("string"), "positive": datasets.Value("string")}
    if has_negatives:
        feats["negatives"] = datasets.Sequence(datasets.Value("string"))  # List in datasets>=4
    return datasets.Features(feats)


# ---- validation --------------------------------------------------------------------------------------
def _check_columns(found: Sequence[str], wanted: dict[str, str], source: str) -> None:
    required = [wanted["query"], wanted["positive"]]
    if wanted["negatives"] != DEFAULT_NEGATIVES:  # named explicitly: the user expects it to be there
        required.append(wanted["negatives"])
    for col in required:
        if col not in found:
            raise ValueError(f"{source}: no column '{col}' (columns found: {', '.join(found) or 'none'}); "
                             "map columns with --query-column / --positive-column / --negatives-column")


def _check_row(row: dict[str, Any], where: str, wanted: dict[str, str]) -> None:
    for name in ("query", "positive"):
        value = row[name]
        if not isinstance(value, str):
            raise ValueError(f"{where}: column '{wanted[name]}' must be a string, got "
                             f"{type(value).__name__} {value!r:.60}")
        if is_blank(value):
            raise ValueError(f"{where}: column '{wanted[name]}' is empty (no visible character)")
        _check_encodable(value, where, wanted[name])
    if "negatives" in row:
        negs = row["negatives"]
        if not isinstance(negs, list) or not all(isinstance(n, str) and not is_blank(n) for n in negs):
            raise ValueError(f"{where}: column '{wanted['negatives']}' must be a list of non-empty strings, "
                             f"got {negs!r:.80}")
        for n in negs:
            _check_encodable(n, where, wanted["negatives"])


def _check_encodable(text: str, where: str, column: str) -> None:
    at = lone_surrogate_at(text)
    if at is not None:
        raise ValueError(f"{where}: column '{column}' is not valid text: lone UTF-16 surrogate {text[at]!r} at "
                         f"character {at}")


def _validate(ds: datasets.Dataset, source: str, wanted: dict[str, str]) -> None:
    """Check every row of a loaded dataset (rows count from 1; CSV rows exclude the header)."""
    if len(ds) == 0:
        raise ValueError(f"{source}: zero rows")
    names = ds.column_names
    cols: list[Iterable[Any]] = [ds[c] for c in names]
    for i, values in enumerate(zip(*cols), 1):
        _check_row(dict(zip(names, values)), f"{source}: row {i}", wanted)


# ---- the automatic dev split -----------------------------------------------------------------------------
DEV_FRACTION = 0.02  # of the pairs held out by --dev auto ...
DEV_CAP = 1000  # ... at most: enough for a stable recall@10 / nDCG@10, cheap to encode at every evaluation
DEV_MIN = 20  # fewer held-out pairs than this measure nothing (recall@10 among <= 20 positives is near 1)


def split_dev(queries: Sequence[str], positives: Sequence[str], seed: int, fraction: float = DEV_FRACTION,
              cap: int = DEV_CAP) -> tuple[list[int], list[int]]:
    """Rows of (train, dev) for ``--dev auto``: min(``fraction`` of the rows, ``cap``) rows held out, taken as whole
    groups of rows linked by a shared query or a shared positive text, so no query and no positive is on both
    sides (a dev query whose positive was trained on measures memorisation).

    The groups are the connected components of rows joined by equal query or positive texts (union-find); they
    are visited in a seeded random order and a group is held out when it fits what is left of the budget.

    Returns:
        (train rows, dev rows), each ascending; dev is empty when the budget is 0.
    """
    n = len(queries)
    want = min(int(round(fraction * n)), cap)
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first: dict[tuple[int, str], int] = {}
    for i, (q, p) in enumerate(zip(queries, positives)):
        for key in ((0, q), (1, p)):
            j = first.setdefault(key, i)
            if j != i:
                parent[find(i)] = find(j)
    groups: dict[int, list[int]] = {}
    for i in range(n):
        groups.setdefault(find(i), []).append(i)
    order = list(groups.values())
    np.random.default_rng(seed).shuffle(order)
    dev: list[int] = []
    for rows in order:
        if len(dev) >= want:
            break
        if len(dev) + len(rows) <= want:
            dev += rows
    held = set(dev)
    return [i for i in range(n) if i not in held], sorted(dev)
