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


def length_sorted_batches(texts: Sequence[object], batch_size: int, lengths: Sequence[int] | None = None) -> list[np.ndarray]:
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
