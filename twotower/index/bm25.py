"""The lexical side of an INDEX dir: a ``bm25s`` index of the same rows, stored as plain numpy arrays + JSON.

Tokenisation is bm25s' (lowercase, ``\\w\\w+`` words, English stopwords, no stemmer); scoring is Lucene's BM25
(k1 = 1.5, b = 0.75), computed by bm25s into its sparse (term x doc) score matrix. Row i of the BM25 side is
row i of the doc store (= faiss id i), so tombstones and filters apply to both sides alike. Docs sharing no
term with a query score 0 and are not returned (``-1`` in ``I``, as faiss marks missing results).

On disk (``INDEX/bm25/``, never pickled: every array is ``np.save(allow_pickle=False)``)::

    params.json        k1, b, method, stopwords, bm25s version, rows, vocabulary size
    vocab.json         the tokens, token id = position in the list
    tokens.npy         int32: every row's token ids, concatenated (what `index add` extends)
    token_offsets.npy  int64 (rows + 1): row i's tokens are tokens[offsets[i]:offsets[i+1]]
    data.npy, indices.npy, indptr.npy   bm25s' CSC score matrix (float32 scores, int32 doc rows, int64 per token)

``index add`` appends: only the new rows are tokenised (the vocabulary grows), then the score matrix is
recomputed from the stored tokens (document frequencies and the average length change with every row).
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from twotower.common.atomic import write_bytes_atomic, write_json_atomic
from twotower.common.jsonl import dumps_strict
from twotower.common.schemas import BM25Params, read_json_file

BM25_DIR = "bm25"
_ARRAYS = ("tokens", "token_offsets", "data", "indices", "indptr")


def _npy_save(path: Path, array: np.ndarray) -> None:
    with path.open("wb") as fh:  # inside a temp dir that is renamed when complete: no per-file atomicity needed
        np.save(fh, array, allow_pickle=False)


class BM25Index:
    """BM25 over doc rows: ``build(texts)``, ``extend(texts)``, ``search(queries, k, allowed) -> (D, I)``.

    Args:
        vocab: tokens in id order.
        tokens / offsets: the corpus as token ids (flat int32) and row offsets (int64, rows + 1).
        k1, b, stopwords: BM25 parameters and the bm25s stopword list name.
        scores: bm25s' score matrix ``{data, indices, indptr, num_docs}``; computed when None.
    """

    def __init__(self, vocab: list[str], tokens: np.ndarray, offsets: np.ndarray, k1: float = 1.5, b: float = 0.75,
                 stopwords: str = "en", scores: dict[str, Any] | None = None) -> None:
        import bm25s  # core dependency; imported here so `twotower --help` stays fast

        self.vocab = vocab
        self.tokens = np.asarray(tokens, np.int32)
        self.offsets = np.asarray(offsets, np.int64)
        self.k1, self.b, self.stopwords = float(k1), float(b), stopwords
        self.ntotal = len(self.offsets) - 1
        self._bm25 = bm25s.BM25(k1=self.k1, b=self.b, method="lucene")
        if scores is None:
            scores = self._score_matrix()
        self._bm25.scores = scores
        self._bm25.nonoccurrence_array = None  # lucene scoring has none; set here for a loaded matrix too
        self._tokenizer: Any = None
        self._empty = {w: i for i, w in enumerate(vocab)}.get("")  # bm25s' "no word" token: never a query term

    # ---- building ---------------------------------------------------------------------------------
    @classmethod
    def build(cls, texts: Sequence[str], k1: float = 1.5, b: float = 0.75, stopwords: str = "en",
              show_progress: bool = False) -> BM25Index:
        """Tokenise and score ``texts`` (row i = ``texts[i]``)."""
        empty = cls([], np.empty(0, np.int32), np.zeros(1, np.int64), k1, b, stopwords, scores=_no_scores())
        return empty.extend(texts, show_progress)

    def extend(self, texts: Sequence[str], show_progress: bool = False) -> BM25Index:
        """A new index with ``texts`` appended as rows ``ntotal..`` (this one is left unchanged)."""
        tok = self._new_tokenizer()
        ids = tok.tokenize(list(texts), update_vocab=True, show_progress=show_progress, return_as="ids")
        vocab = list(tok.word_to_id)  # bm25s assigns ids densely in insertion order, so position == id
        assert not vocab or tok.word_to_id[vocab[-1]] == len(vocab) - 1, "bm25s token ids are not dense"
        lengths = np.fromiter((len(d) for d in ids), np.int64, len(ids))
        flat = np.fromiter((t for d in ids for t in d), np.int32, int(lengths.sum()))
        offsets = np.concatenate([self.offsets, self.offsets[-1] + np.cumsum(lengths)])
        return BM25Index(vocab, np.concatenate([self.tokens, flat]), offsets, self.k1, self.b, self.stopwords)

    def _new_tokenizer(self) -> Any:
        from bm25s.tokenization import Tokenizer

        tok = Tokenizer(stopwords=self.stopwords, stemmer=None)
        tok.word_to_id = {w: i for i, w in enumerate(self.vocab)}
        return tok

    def _score_matrix(self) -> dict[str, Any]:
        if self.ntotal == 0 or not self.vocab:
            return _no_scores(self.ntotal)
        docs = [self.tokens[a:b].tolist() for a, b in zip(self.offsets[:-1], self.offsets[1:])]
        return self._bm25.build_index_from_ids(unique_token_ids=list(range(len(self.vocab))), corpus_token_ids=docs,
                                               show_progress=False)

    # ---- query time -------------------------------------------------------------------------------
    def query_ids(self, queries: Sequence[str]) -> list[np.ndarray]:
        """Token ids of each query (words unseen in the corpus are dropped: they score nothing)."""
        if self._tokenizer is None:
            self._tokenizer = self._new_tokenizer()
        ids = self._tokenizer.tokenize(list(queries), update_vocab=False, show_progress=False, return_as="ids",
                                       allow_empty=False)
        return [np.asarray([t for t in q if t != self._empty], np.int32) for q in ids]

    def scores(self, query_ids: np.ndarray) -> np.ndarray:
        """BM25 score of every row for one query's token ids: float32 (ntotal,)."""
        if len(query_ids) == 0 or self.ntotal == 0:
            return np.zeros(self.ntotal, np.float32)
        return self._bm25.get_scores_from_ids(query_ids)

    def search(self, queries: Sequence[str], k: int, allowed: np.ndarray | None = None,
               excluded: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` rows per query by BM25 score, ties by row.

        Args:
            allowed: bool (ntotal,) rows that may be returned (a filter); None = every row.
            excluded: int64 rows never returned (tombstones).

        Returns:
            D float32 (nq, k) scores (descending), I int64 (nq, k) rows; ``-1`` / 0 where fewer than k rows match.
        """
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        nq = len(queries)
        D = np.zeros((nq, k), np.float32)
        I = np.full((nq, k), -1, np.int64)
        keep = None
        if allowed is not None or (excluded is not None and len(excluded)):
            keep = np.ones(self.ntotal, bool) if allowed is None else np.asarray(allowed, bool).copy()
            if excluded is not None and len(excluded):
                keep[np.asarray(excluded, np.int64)] = False
        for q, ids in enumerate(self.query_ids(queries)):
            s = self.scores(ids)
            if keep is not None:
                s = np.where(keep, s, 0.0)
            hit = np.flatnonzero(s > 0)
            if len(hit) > k:
                hit = hit[np.argpartition(-s[hit], k - 1)[:k]]
            hit = hit[np.lexsort((hit, -s[hit]))]  # score descending, then row ascending
            D[q, :len(hit)], I[q, :len(hit)] = s[hit], hit
        return D, I

    # ---- persistence ------------------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        import bm25s

        return {"package": "bm25s", "version": bm25s.__version__, "method": "lucene", "k1": self.k1, "b": self.b,
                "stopwords": self.stopwords, "stemmer": None, "lowercase": True, "rows": self.ntotal,
                "vocab": len(self.vocab)}

    def save(self, out_dir: str | Path) -> None:
        """Write the arrays and JSON files into ``out_dir`` (a fresh dir inside an INDEX temp dir)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=False)
        s = self._bm25.scores
        arrays = {"tokens": self.tokens, "token_offsets": self.offsets, "data": np.asarray(s["data"], np.float32),
                  "indices": np.asarray(s["indices"], np.int32), "indptr": np.asarray(s["indptr"], np.int64)}
        for name, array in arrays.items():
            _npy_save(out / f"{name}.npy", array)
        write_bytes_atomic(out / "vocab.json", dumps_strict(self.vocab, ensure_ascii=False).encode())
        write_json_atomic(out / "params.json", self.config())

    @classmethod
    def load(cls, in_dir: str | Path, mmap: bool = False) -> BM25Index:
        """Read a saved BM25 side (``np.load(allow_pickle=False)``; ``mmap``: memory-mapped, read on demand); a
        missing or inconsistent file names itself."""
        path = Path(in_dir)
        params = read_json_file(path / "params.json", BM25Params)
        vocab = read_json_file(path / "vocab.json", list[str])
        if len(vocab) != params["vocab"]:
            raise ValueError(f"{path / 'vocab.json'}: {len(vocab)} tokens but params.json says vocab "
                             f"{params['vocab']}; rebuild the index")
        try:
            arrays = {name: np.load(path / f"{name}.npy", mmap_mode="r" if mmap else None, allow_pickle=False)
                      for name in _ARRAYS}
        except (OSError, ValueError) as exc:
            raise ValueError(f"BM25 side '{path}' is unreadable ({exc}); rebuild the index") from None
        rows = int(params["rows"])
        if len(arrays["token_offsets"]) != rows + 1 or len(arrays["indptr"]) != len(vocab) + 1:
            raise ValueError(f"BM25 side '{path}': arrays disagree with params.json ({rows} rows, {len(vocab)} "
                             f"tokens); rebuild the index")
        scores = {"data": arrays["data"], "indices": arrays["indices"], "indptr": arrays["indptr"], "num_docs": rows}
        return cls(vocab, arrays["tokens"], arrays["token_offsets"], params["k1"], params["b"], params["stopwords"],
                   scores=scores)


def _no_scores(num_docs: int = 0) -> dict[str, Any]:
    """The score matrix of an index with no tokens (every query scores 0)."""
    return {"data": np.empty(0, np.float32), "indices": np.empty(0, np.int32), "indptr": np.zeros(1, np.int64),
            "num_docs": num_docs}
