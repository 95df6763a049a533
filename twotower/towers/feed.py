"""A fed encoder: tokenisation and collation off the critical path, length-bucketed, pinned for the GPU.

The measured H100 figure (BENCHMARKS.md) had encoding tokenizer-bound at ~2% of bf16 peak: the GPU waited while
one Python thread tokenised every text, then padded every batch row by row. :class:`BatchFeed` moves that work to
a background thread that runs one chunk ahead of the model:

- tokenise a chunk of texts in one fast-tokenizer call (Rust, releases the GIL: it overlaps the model's forward);
- cut the chunk into batches of similar token length (:func:`~twotower.common.encoder.length_sorted_batches`),
  so each batch is padded only to its own longest row;
- collate each batch with numpy in one scatter (no per-row Python loop);
- pin the batch's host memory when the model is on CUDA, so ``.to(device, non_blocking=True)`` is an async copy.

On the CPU it is the same code path (no pinning); with one chunk (``len(texts) <= chunk``) the batches are exactly
the ones of a global length sort, so the embeddings are bit-identical to encoding without the feed.

Padding-free ("unpadded") attention needs ``flash_attn``'s varlen kernels (``attn_implementation=
"flash_attention_2"``), which neither this machine nor the lent GPU image has; the feed reports its padding
overhead (``stats``) so what length bucketing leaves on the table is measured, not guessed.
"""
from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from twotower.common.encoder import length_sorted_batches

_DONE = object()


@dataclass
class FeedStats:
    """What the feed produced: rows, real tokens and padded tokens (real + padding) over all batches."""

    rows: int = 0
    batches: int = 0
    real_tokens: int = 0
    padded_tokens: int = 0

    @property
    def padding_overhead(self) -> float:
        """Padded / real tokens - 1 (0.0 = no padding computed)."""
        return self.padded_tokens / self.real_tokens - 1.0 if self.real_tokens else 0.0


def collate(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``input_ids`` and ``attention_mask`` (B, T), T = the longest row, in one numpy scatter."""
    lengths = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
    width = int(lengths.max()) if len(seqs) else 0
    mask = np.arange(width)[None, :] < lengths[:, None]  # (B, T): True on real tokens
    ids = np.full((len(seqs), width), pad_id, dtype=np.int64)
    ids[mask] = np.fromiter((t for s in seqs for t in s), dtype=np.int64, count=int(lengths.sum()))
    return torch.from_numpy(ids), torch.from_numpy(mask.astype(np.int64))


class BatchFeed:
    """Iterate ``(rows, input_ids, attention_mask)`` batches of ``texts``, prepared by a background thread.

    Args:
        tokenize: texts -> list of token-id lists (truncated; the prompt already applied by the caller's closure).
        texts: the texts to encode.
        batch_size: rows per batch.
        pad_id: the tokenizer's pad token id.
        chunk: texts tokenised per call; the thread runs at most ``prefetch`` batches ahead of the consumer.
        pin: pin each batch's host memory (only useful, and only done, when CUDA is available).
        prefetch: batches queued ahead.

    ``rows`` are indices into ``texts`` (int64 array); the caller scatters outputs back with them. Use it as a
    context manager (or exhaust it): leaving early stops the thread, and an error in the thread is raised in the
    consumer, with its own message and type.
    """

    def __init__(self, tokenize: Callable[[list[str]], list[list[int]]], texts: Sequence[str], batch_size: int,
                 pad_id: int, chunk: int = 4096, pin: bool = False, prefetch: int = 4) -> None:
        if batch_size < 1 or chunk < 1 or prefetch < 1:
            raise ValueError(f"batch_size, chunk and prefetch must be >= 1, got {batch_size}, {chunk}, {prefetch}")
        self.tokenize, self.texts, self.batch_size, self.pad_id = tokenize, texts, batch_size, pad_id
        self.chunk = chunk
        self.pin = pin and torch.cuda.is_available()
        self.stats = FeedStats()
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=prefetch)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, name="twotower-feed", daemon=True)
        self._started = False

    # -- producer (background thread) ----------------------------------------------------------------------
    def _put(self, item: Any) -> bool:
        """Queue ``item`` unless the consumer has gone; True when queued."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self) -> None:
        try:
            for start in range(0, len(self.texts), self.chunk):
                part = list(self.texts[start : start + self.chunk])
                ids = self.tokenize(part)
                for idx in length_sorted_batches(ids, self.batch_size, [len(x) for x in ids]):
                    input_ids, mask = collate([ids[i] for i in idx], self.pad_id)
                    if self.pin:
                        input_ids, mask = input_ids.pin_memory(), mask.pin_memory()
                    self.stats.rows += len(idx)
                    self.stats.batches += 1
                    self.stats.real_tokens += int(mask.sum())
                    self.stats.padded_tokens += mask.numel()
                    if not self._put((idx + start, input_ids, mask)):
                        return
            self._put(_DONE)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which raises it as it was
            self._put(exc)

    # -- consumer --------------------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[tuple[np.ndarray, torch.Tensor, torch.Tensor]]:
        if self._started:
            raise RuntimeError("a BatchFeed is iterated once")
        self._started = True
        self._thread.start()
        try:
            while True:
                item = self._queue.get()
                if item is _DONE:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self.close()

    def close(self) -> None:
        """Stop the thread (a consumer that leaves early) and wait for it."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def __enter__(self) -> BatchFeed:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
