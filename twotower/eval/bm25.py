"""BM25 lexical baseline of ``twotower bench``: the INDEX dir's own BM25 side (``index.bm25``, bm25s), so the
bench row and ``search --mode bm25`` rank alike.

Tokenisation is bm25s' default (lowercase, ``\\w\\w+`` words, English stopwords, no stemmer). Scoring is
Lucene's BM25 with k1 = 1.5, b = 0.75. Docs that share no term with the query score 0; they are not
returned (``-1`` in ``I``, as faiss marks missing results) rather than ranked in arbitrary order.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from twotower.index.bm25 import BM25Index


class BM25Retriever:
    """``index(corpus_texts)`` then ``search(query_texts, k) -> (D, I)`` (faiss-style arrays)."""

    def __init__(self, k1: float = 1.5, b: float = 0.75, stopwords: str = "en") -> None:
        self.k1 = k1
        self.b = b
        self.stopwords = stopwords
        self._index: BM25Index | None = None
        self.ntotal = 0

    def config(self) -> dict[str, Any]:
        import bm25s

        return {"package": "bm25s", "version": bm25s.__version__, "method": "lucene", "k1": self.k1, "b": self.b,
                "stopwords": self.stopwords, "stemmer": None, "lowercase": True}

    def index(self, corpus: Sequence[str], show_progress: bool = False) -> None:
        """Tokenise and index the corpus (row i of ``corpus`` = doc id i)."""
        self._index = BM25Index.build(corpus, self.k1, self.b, self.stopwords, show_progress=show_progress)
        self.ntotal = len(corpus)

    def search(self, queries: Sequence[str], k: int, show_progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Top-k docs per query.

        Returns:
            D float32 (nq, k) BM25 scores, I int64 (nq, k) doc rows, ``-1`` where fewer than k docs match.
        """
        if self._index is None:
            raise ValueError("BM25Retriever.search called before index()")
        return self._index.search(list(queries), k)
