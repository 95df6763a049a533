"""Reading JSON Lines and text files the same way everywhere (pairs, corpora, BEIR suites, id lists).

Every reader of the project goes through these helpers, so a broken file is always reported the same way:
the file, the 1-based line, and what was expected.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any


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


def iter_utf8_lines(path: str | Path) -> Iterator[tuple[int, str]]:
    """(1-based line number, text) of each line; a byte that is not UTF-8 is a ValueError naming file:line
    (decoding the whole stream would say only 'position 123456' of some block)."""
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            try:
                yield lineno, raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ValueError(f"{path}: line {lineno}: not UTF-8 text ({exc.reason} at byte {exc.start} of the "
                                 "line)") from None


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
