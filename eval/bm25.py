"""BM25 lexical baseline (the ``bm25s`` package): corpus in, ranked doc rows out, same metrics path as the rest.

Tokenisation is bm25s' default (lowercase, ``\\w\\w+`` words, English stopwords, no stemmer). Scoring is
Lucene's BM25 with k1 = 1.5, b = 0.75. Docs that share no term with the query score 0; they are not
returned (``-1`` in ``I``, as faiss marks missing results) rather than ranked in arbitrary order.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


class BM25Retriever:
    """``index(corpus_texts)`` then ``search(query_texts, k) -> (D, I)`` (faiss-style arrays)."""

    def __init__(self, k1: float = 1.5, b: float = 0.75, stopwords: str = "en") -> None:
        self.k1 = k1
        self.b = b
        self.stopwords = stopwords
        self._retriever: Any = None
        self._tokenizer: Any = None
        self.ntotal = 0

    def config(self) -> dict[str, Any]:
        import bm25s  # optional extra `.[bench]`: imported where used, so the other systems work without it

        return {"package": "bm25s", "version": bm25s.__version__, "method": "lucene", "k1": self.k1, "b": self.b,
                "stopwords": self.stopwords, "stemmer": None, "lowercase": True}

    def index(self, corpus: Sequence[str], show_progress: bool = False) -> None:
        """Tokenise and index the corpus (row i of ``corpus`` = doc id i)."""
        import bm25s
        from bm25s.tokenization import Tokenizer

        self._tokenizer = Tokenizer(stopwords=self.stopwords, stemmer=None)
        tokens = self._tokenizer.tokenize(list(corpus), show_progress=show_progress)
        self._retriever = bm25s.BM25(k1=self.k1, b=self.b, method="lucene")
        self._retriever.index(tokens, show_progress=show_progress)
        self.ntotal = len(corpus)

    def search(self, queries: Sequence[str], k: int, show_progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Top-k docs per query.

        Returns:
            D float32 (nq, k) BM25 scores, I int64 (nq, k) doc rows, ``-1`` where fewer than k docs match.
        """
        if self._retriever is None:
            raise ValueError("BM25Retriever.search called before index()")
        nq = len(queries)
        kk = min(k, self.ntotal)
        D = np.zeros((nq, k), dtype=np.float32)
        I = np.full((nq, k), -1, dtype=np.int64)
        if nq == 0 or kk == 0:
            return D, I
        # update_vocab=False: query words unseen in the corpus map to the empty token (scores nothing).
        tokens = self._tokenizer.tokenize(list(queries), update_vocab=False, show_progress=False)
        ids, scores = self._retriever.retrieve(tokens, k=kk, show_progress=show_progress, n_threads=1)
        matched = scores > 0  # (nq, kk)
        D[:, :kk] = np.where(matched, scores, 0.0)
        I[:, :kk] = np.where(matched, ids, -1)
        return D, I
