"""The encoder protocol every system implements, and the shared batching loop.

``encode(texts, batch_size=...) -> np.ndarray (n, d) float32`` (L2-normalised where the metric is cosine).
The trained towers, the raw-LLM baseline and the off-the-shelf encoder all implement it, so index building
and benchmarking take any of them.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol, TypeVar, runtime_checkable

import numpy as np
from tqdm.auto import tqdm

T = TypeVar("T")


@runtime_checkable
class Encoder(Protocol):
    """Anything that turns texts into a float32 matrix of shape (n, dim)."""

    dim: int

    def encode(self, texts: Sequence[str], batch_size: int = 64, show_progress: bool = False) -> np.ndarray:
        ...


def length_sorted_batches(texts: Sequence[object], batch_size: int, lengths: Sequence[int] | None = None
                          ) -> list[np.ndarray]:
    """Indices of ``texts`` grouped into batches of similar length (longest first).

    Sorting by length keeps padding (wasted compute) minimal; callers scatter results back by index,
    so the output order is the input order. ``lengths`` (e.g. token counts) overrides character length.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be > 0, got {batch_size}")
    keys = lengths if lengths is not None else [len(t) for t in texts]
    order = np.argsort(-np.asarray(keys, dtype=np.int64), kind="stable")
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def encode_batched(
    texts: Sequence[T],
    encode_batch: Callable[[list[T]], np.ndarray],
    dim: int,
    batch_size: int = 64,
    show_progress: bool = False,
    desc: str = "encode",
    lengths: Sequence[int] | None = None,
) -> np.ndarray:
    """Run ``encode_batch`` over length-sorted batches of ``texts`` and restore input order.

    Args:
        texts: the items to encode (strings, or anything ``encode_batch`` takes, e.g. pre-tokenised ids).
        encode_batch: maps a list of items to a float array (len(items), dim).
        lengths: sort key per item (e.g. token counts); character length of ``texts`` when None.

    Returns:
        float32 array (len(texts), dim).
    """
    out = np.empty((len(texts), dim), dtype=np.float32)
    batches = length_sorted_batches(texts, batch_size, lengths)
    with tqdm(total=len(texts), desc=desc, unit="text", disable=not show_progress, smoothing=0.1) as bar:
        for idx in batches:
            out[idx] = encode_batch([texts[i] for i in idx])
            bar.update(len(idx))
    return out


def length_groups(lengths: Sequence[int] | np.ndarray, max_groups: int = 8, group_cost: int = 64) -> list[np.ndarray]:
    """Rows grouped by token count so each group is padded only to its own longest row.

    Rows are sorted longest first and cut into at most ``max_groups`` contiguous runs that minimise the
    padded tokens computed, ``sum(rows_g x longest_g)``, plus ``group_cost`` token-equivalents per group
    (one more forward pass each); exact dynamic programme over the cut points.

    Args:
        lengths: real (non-pad) tokens per row, (n,).

    Returns:
        Row indices per group, longest group first; together a permutation of ``range(n)``.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    n = len(lengths)
    order = np.argsort(-lengths, kind="stable")
    if n <= 1 or max_groups <= 1:
        return [order]
    width = lengths[order].astype(np.float64)  # (n,) descending: group rows i..j-1 is padded to width[i]
    pos = np.arange(n + 1)
    # span[i, j] = tokens of one group of rows i..j-1 (inf unless i < j)
    span = np.where(pos[None, 1:] > pos[:n, None], (pos[None, 1:] - pos[:n, None]) * width[:, None], np.inf)
    best = np.full(n + 1, np.inf)  # best[j]: cheapest cover of rows 0..j-1 with the groups so far
    best[0] = 0.0
    cuts: list[np.ndarray] = []  # per round, the start of the last group ending at each j
    results: list[float] = []
    for _ in range(min(max_groups, n)):
        total = best[:n, None] + span + group_cost  # (i, j - 1): last group = rows i..j-1
        cuts.append(total.argmin(0))
        best = np.concatenate([[np.inf], total.min(0)])
        results.append(best[n])
    rounds = int(np.argmin(results)) + 1
    groups, end = [], n
    for r in reversed(range(rounds)):
        start = int(cuts[r][end - 1])
        groups.append(order[start:end])
        end = start
    assert end == 0, "the groups cover every row"
    return groups[::-1]


def truncate_renorm(x: np.ndarray, dim: int) -> np.ndarray:
    """Matryoshka truncation: the first ``dim`` coordinates of each row, L2-normalised again.

    Args:
        x: (n, d) vectors (d >= dim). dim: coordinates kept.

    Returns:
        float32 (n, dim), C-contiguous; a zero row stays zero.
    """
    if not 1 <= dim <= x.shape[-1]:
        raise ValueError(f"cannot truncate {x.shape[-1]}-dim vectors to {dim} dims")
    head = np.array(x[..., :dim], dtype=np.float32)
    norms = np.linalg.norm(head, axis=-1, keepdims=True)
    return np.ascontiguousarray(head / np.maximum(norms, np.finfo(np.float32).tiny))


class TruncatedEncoder:
    """An encoder whose vectors are the first ``dim`` coordinates of ``encoder``'s, re-normalised (Matryoshka).

    Same ``fingerprint()`` as the wrapped encoder: the vector space is the same towers', cut; an INDEX dir
    records the cut in its manifest (``truncate_dim``) and search cuts its queries alike.
    """

    def __init__(self, encoder: Encoder, dim: int) -> None:
        if not 1 <= dim <= int(encoder.dim):
            raise ValueError(f"--dim {dim} is larger than the towers' dim {encoder.dim}" if dim > 0 else
                             f"--dim must be >= 1, got {dim}")
        self.encoder, self.dim = encoder, int(dim)
        fp = getattr(encoder, "fingerprint", None)
        if callable(fp):
            self.fingerprint = fp

    def __getattr__(self, name: str) -> object:  # device, tower, ... of the wrapped encoder
        encoder = self.__dict__.get("encoder")
        if encoder is None:
            raise AttributeError(name)
        return getattr(encoder, name)

    def encode(self, texts: Sequence[str], batch_size: int = 64, show_progress: bool = False) -> np.ndarray:
        return truncate_renorm(self.encoder.encode(texts, batch_size=batch_size, show_progress=show_progress), self.dim)
