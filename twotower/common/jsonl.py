"""Reading JSON Lines and text files the same way everywhere (pairs, corpora, BEIR suites, id lists, queries),
and writing strict JSON.

Every reader of the project goes through these helpers, so a broken file is always reported the same way:
the file, the 1-based line, and what was expected. Files saved by real tools are read as their text: a UTF-8
byte order mark (Excel, Notepad) is dropped, and so is the CR of CRLF line ends (Windows).

Everything twotower writes as JSON (files, ``--json`` lines, HTTP bodies) is RFC 8259 JSON: Python's
``json`` would write ``NaN``/``Infinity``, which strict parsers (browsers, ``jq``, Go, Java) refuse.

Input is bounded: no line (and so no field) of a text file may be longer than :func:`max_line_bytes` (8 MiB, set
with the ``TWOTOWER_MAX_LINE_BYTES`` environment variable). Lines are read in chunks of at most that many bytes,
so a 50 MB line costs 8 MiB of memory and an error naming its line, not gigabytes.
"""
from __future__ import annotations

import csv
import gzip
import json
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

BOM = "\ufeff"
MAX_LINE_ENV = "TWOTOWER_MAX_LINE_BYTES"
DEFAULT_MAX_LINE_BYTES = 8 << 20  # far above any real doc, query or pair row; far below what a runaway line costs


def max_line_bytes() -> int:
    """The most bytes one line (or one CSV record) of an input file may hold: ``TWOTOWER_MAX_LINE_BYTES`` when
    set (a positive integer), else 8 MiB. The one limit on line and field size of every reader here."""
    text = os.environ.get(MAX_LINE_ENV, "").strip()
    if not text:
        return DEFAULT_MAX_LINE_BYTES
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise ValueError(f"{MAX_LINE_ENV}={text!r} is not a positive whole number of bytes (default "
                         f"{DEFAULT_MAX_LINE_BYTES})")
    return value


def _too_long(path: str | Path, lineno: int, limit: int, what: str = "line") -> ValueError:
    """The error for a line (or CSV record) over the limit: one line naming the file, line and limit."""
    return ValueError(f"{path}: line {lineno}: {what} longer than {limit} bytes, the limit on one line; split it, "
                      f"or raise {MAX_LINE_ENV}")


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
        yield from iter_binary_lines(fh, path)


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


def iter_binary_lines(fh: IO[bytes], path: str | Path) -> Iterator[tuple[int, str]]:
    """(1-based line number, text) of each line of an open binary stream (a file, stdin), read in bounded
    chunks (:func:`max_line_bytes`); a BOM opening the stream is dropped; ``path`` names it in errors."""
    limit = max_line_bytes()
    lineno = 0
    while raw := fh.readline(limit + 1):  # bounded: never more than limit + 1 bytes in memory for one line
        lineno += 1
        if len(raw) > limit and not (len(raw) == limit + 1 and raw.endswith(b"\n")):
            raise _too_long(path, lineno, limit)
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
    limit = max_line_bytes()
    pending, lines_in_record = [0], [0]  # bytes and lines read into the record being parsed: bounded by the limit

    def text() -> Iterator[str]:
        for n, line in lines:
            numbers.append(n)
            lines_in_record[0] += 1
            pending[0] += len(line)
            if pending[0] > limit:
                raise _too_long(path, numbers[-lines_in_record[0]], limit,
                                f"CSV record (running on to line {n}: a quote left open?)")
            yield line[:-2] + "\n" if line.endswith("\r\n") else line  # CRLF -> LF, inside quoted cells too

    reader = csv.reader(text(), strict=True)
    csv.field_size_limit(max(csv.field_size_limit(), limit))  # the record limit above is the one that applies
    while True:
        start = len(numbers) + 1
        pending[0] = lines_in_record[0] = 0
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
