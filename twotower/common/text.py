"""What counts as text: a query, a doc or a pair made only of invisible characters is empty, and a doc id
must survive the line- and tab-based files it travels through (ids files, qrels TSV).

One rule for every reader (pairs, corpora, BEIR suites, CLI queries, HTTP queries), so "empty" means the same
thing everywhere.
"""
from __future__ import annotations

import unicodedata

# Characters that render as nothing although they are not whitespace: Hangul fillers, the braille blank,
# variation selectors (they only modify the character before them), the combining grapheme joiner.
_INVISIBLE = frozenset("\u115f\u1160\u3164\uffa0\u2800\u034f") | frozenset(map(chr, range(0xFE00, 0xFE10)))
# Unicode categories that never show a glyph: controls (NUL, ESC, ...), formats (zero-width space/joiners,
# BOM, bidi marks, soft hyphen), separators (spaces, line and paragraph separators).
_INVISIBLE_CATEGORIES = frozenset(("Cc", "Cf", "Zs", "Zl", "Zp"))


def is_blank(text: str) -> bool:
    """True when ``text`` shows nothing: empty, or only whitespace, control and zero-width characters (NUL,
    BOM, U+200B, ...). Such a query or doc is refused like an empty one: the tower would encode padding."""
    if text.isascii():
        return not text.strip() or all(c.isspace() or unicodedata.category(c) == "Cc" for c in text)
    return all(c in _INVISIBLE or unicodedata.category(c) in _INVISIBLE_CATEGORIES for c in text)


def id_problem(doc_id: str) -> str | None:
    """Why ``doc_id`` cannot be a doc id (None when it can): empty or blank, a control character (tab, newline,
    NUL: ids files and qrels TSV are line- and tab-separated), or whitespace at either end (an ids file line
    is stripped, so such an id could never be named again)."""
    if is_blank(doc_id):
        return "is empty or only invisible characters"
    bad = next((c for c in doc_id if unicodedata.category(c) in ("Cc", "Zl", "Zp")), None)
    if bad is not None:
        return f"holds the control character {bad!r} (ids travel through line- and tab-separated files)"
    if doc_id != doc_id.strip():
        return "starts or ends with whitespace (an ids file could not name it)"
    return None
