"""Reading JSON Lines and text files the same way everywhere (pairs, corpora, BEIR suites, id lists, queries),
and writing strict JSON.

Every reader of the project goes through these helpers, so a broken file is always reported the same way:
the file, the 1-based line, and what was expected. Files saved by real tools are read as their text: a UTF-8
byte order mark (Excel, Notepad) is dropped, and so is the CR of CRLF line ends (Windows).

Everything twotower writes as JSON (files, ``--json`` lines, HTTP bodies) is RFC 8259 JSON: Python's
``json`` would write ``NaN``/``Infinity``, which strict parsers (browsers, ``jq``, Go, Java) refuse.
"""
from __future__ import annotations

import csv
import gzip
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

BOM = "\ufeff"


def parse_json_line(line: str, where: str) -> Any:
    """One JSON Lines row, parsed; malformed or too deeply nested JSON is a ValueError naming ``where``
    ("FILE: line N"). Every JSONL reader of the project (pairs, corpora, BEIR suites) goes through here."""
    try:
        return json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{where}: malformed JSON ({exc.msg} at column {exc.colno}); expected JSON Lines, "
                         "one object per line") from None
    except RecursionError:  # json recurses per nesting level: [[[[...]]]] deeper than the stack
        raise ValueError(f"{where}: JSON nested too deeply") from None


def check_readable_file(path: str | Path, what: str) -> Path:
    """``path`` as a Path when it is an existing file; otherwise a one-line error naming ``what`` (an option
    such as ``--ids-file``, or "corpus") and what it is instead (missing, a directory)."""
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"{what} '{path}' is a directory; expected a file")
    if not p.exists():
        raise FileNotFoundError(f"{what} '{path}' does not exist")
    return p


def iter_utf8_lines(path: str | Path) -> Iterator[tuple[int, str]]:
    """(1-based line number, text) of each line, line end included (plain or ``.gz``); a UTF-8 BOM opening
    the file is dropped. A byte that is not UTF-8 is a ValueError naming file:line (decoding the whole stream
    would say only 'position 123456' of some block)."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as fh:
        yield from _decode_lines(fh, path)


def iter_json_rows(path: str | Path, limit: int | None = None) -> Iterator[Any]:
    """The parsed rows of a JSON Lines file in order (blank lines skipped; only the first ``limit`` rows when
    given), each through :func:`parse_json_line`: a broken row is a ValueError naming "FILE: line N"."""
    if limit is not None and limit <= 0:
        return
    count = 0
    for lineno, line in iter_utf8_lines(path):
        if not line.strip():
            continue
        yield parse_json_line(line, f"{path}: line {lineno}")
        count += 1
        if limit is not None and count >= limit:
            return


def _decode_lines(fh: IO[bytes], path: str | Path) -> Iterator[tuple[int, str]]:
    for lineno, raw in enumerate(fh, 1):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"{path}: line {lineno}: not UTF-8 text ({exc.reason} at byte {exc.start} of the "
                             "line)") from None
        yield lineno, text[1:] if lineno == 1 and text.startswith(BOM) else text


def read_text_lines(path: str | Path, what: str) -> list[tuple[int, str]]:
    """(line number, line) of the non-blank lines of a plain text file (an ids file, a queries file), each
    without its line end (LF or CRLF) or a BOM; ``what`` names the option in errors."""
    check_readable_file(path, what)
    return [(n, line.rstrip("\r\n")) for n, line in iter_utf8_lines(path) if line.strip()]


def iter_csv_rows(path: str | Path) -> Iterator[tuple[int, list[str]]]:
    """(1-based line where the record starts, fields) of each record of a CSV file, read through
    :func:`iter_utf8_lines` (so BOM, CRLF and bad bytes are handled as for every text file). Quoted fields may
    span lines (a line break inside one reads as LF whatever the file used); a broken quote is a ValueError
    naming the line."""
    lines = iter_utf8_lines(path)
    numbers: list[int] = []

    def text() -> Iterator[str]:
        for n, line in lines:
            numbers.append(n)
            yield line[:-2] + "\n" if line.endswith("\r\n") else line  # CRLF -> LF, inside quoted cells too

    reader = csv.reader(text(), strict=True)
    while True:
        start = len(numbers) + 1
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise ValueError(f"{path}: line {numbers[-1] if numbers else 1}: cannot read CSV: {exc}") from None
        yield start, row


def lone_surrogate_at(text: str) -> int | None:
    """Index of the first lone UTF-16 surrogate in ``text`` (JSON can spell ``"\\ud800"``; Arrow and the
    tokenizers cannot take it), or None for valid text."""
    if text.isascii():
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return exc.start
    return None


def dumps_strict(obj: Any, **kwargs: Any) -> str:
    """``json.dumps`` that always gives RFC 8259 JSON: a NaN or infinite float (a diverged loss, an undefined
    metric) is written as ``null``. The common case costs one plain ``dumps``."""
    try:
        return json.dumps(obj, allow_nan=False, **kwargs)
    except ValueError:  # "Out of range float values are not JSON compliant" (or a circular reference: re-raised)
        return json.dumps(finite_or_none(obj), allow_nan=False, **kwargs)


def finite_or_none(obj: Any) -> Any:
    """``obj`` with every NaN/infinite float (nested in dicts, lists, tuples; numpy scalars too) replaced by
    None."""
    if type(obj).__module__ == "numpy" and getattr(obj, "ndim", None) == 0:
        obj = obj.item()  # a numpy scalar (float32 metrics): as the Python number ``default=`` would give
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    return obj


def non_finite_path(obj: Any, path: str = "") -> str | None:
    """Where the first NaN/infinite float sits in ``obj`` (``"a.b[2]"``, ``""`` for ``obj`` itself), or None."""
    if isinstance(obj, float):
        return None if math.isfinite(obj) else path
    if isinstance(obj, dict):
        items: Any = ((f"{path}.{k}" if path else str(k), v) for k, v in obj.items())
    elif isinstance(obj, (list, tuple)):
        items = ((f"{path}[{i}]", v) for i, v in enumerate(obj))
    else:
        return None
    for sub, value in items:
        found = non_finite_path(value, sub)
        if found is not None:
            return found
    return None
