"""Micro-batching: concurrent requests are merged into one encode + one faiss search.

Encoding 32 queries in one forward pass costs far less than 32 passes of one, so under load the server
queues requests for at most ``max_wait_ms`` (or until ``max_batch`` queries are waiting), runs them together
in one worker thread and scatters the results back to each request's future. The event loop only queues
and awaits; it never runs a model or a search. Requests that arrive while a batch is running wait in the
queue and form the next batch at once, so throughput grows with load.
"""
from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from twotower.index.query import QueryOptions
from twotower.retrieval.retriever import Hit, Retriever, check_queries


class Overloaded(RuntimeError):
    """The request queue is full: the caller should answer 503 and the client retry later."""


@dataclass
class _Job:
    queries: list[str]
    opts: QueryOptions  # resolved (Retriever.options): k and nprobe included
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    enqueued: float  # time.monotonic() when queued: the wait for others counts from here


_STOP = object()


class MicroBatcher:
    """Merge concurrent ``search`` calls into batches run by one worker thread.

    Args:
        retriever: does the encode and search.
        max_batch: most queries merged into one batch (a larger single request runs alone).
        max_wait_ms: longest a request waits for others to join its batch.
        max_queue: most requests waiting; beyond it ``search`` raises ``Overloaded``.
        finish: optional function applied to each request's hits in the worker thread (e.g. JSON
            encoding), so that work stays off the event loop too.
    """

    def __init__(self, retriever: Retriever, max_batch: int = 64, max_wait_ms: float = 2.0, max_queue: int = 1024,
                 finish: Callable[[list[list[Hit]]], Any] | None = None) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {max_wait_ms}")
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        self.retriever = retriever
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.finish = finish
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max_queue)
        self._thread: threading.Thread | None = None
        self._carry: _Job | None = None  # a job that did not fit the last batch opens the next one
        self.batches = 0
        self.queries = 0
        self.largest = 0  # most queries seen in one batch

    def start(self) -> MicroBatcher:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="twotower-batcher", daemon=True)
            self._thread.start()
        return self

    def close(self, timeout: float = 10.0) -> None:
        """Finish queued work, then stop the worker thread."""
        if self._thread is not None:
            self._queue.put(_STOP, timeout=timeout)
            self._thread.join(timeout)
            self._thread = None

    def stats(self) -> dict[str, float]:
        return {"batches": self.batches, "queries": self.queries, "largest_batch": self.largest,
                "mean_batch": round(self.queries / self.batches, 2) if self.batches else 0.0}

    async def search(self, queries: list[str], k: int | None = None, options: QueryOptions | None = None,
                     **fields: Any) -> Any:
        """Hits (or ``finish(hits)``) for ``queries``, computed in a merged batch.

        Args:
            k, options, fields: as ``Retriever.search`` (``index.query.QueryOptions``; None = the index default).

        Raises:
            Overloaded: the queue is full.
            ValueError: from the retriever (bad k, empty query, bad mode or filter).
        """
        if self._thread is None:
            raise RuntimeError("MicroBatcher.search called before start()")
        # Checked here, not in the worker: one bad request must not fail the batch it would join.
        queries = check_queries(queries)
        opts = self.retriever.options(options, k=k, **fields)
        loop = asyncio.get_running_loop()
        job = _Job(queries, opts, loop, loop.create_future(), time.monotonic())
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise Overloaded(f"server busy: {self._queue.maxsize} requests already queued; retry later") from None
        return await job.future

    # ---- worker thread ----------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            batch = self._collect()
            if batch is None:
                return
            self._process(batch)

    def _collect(self) -> list[_Job] | None:
        """Block for a first job, then gather more until max_batch queries or max_wait has passed."""
        first, self._carry = self._carry, None
        if first is None:
            first = self._queue.get()
        if first is _STOP:
            return None
        batch, n = [first], len(first.queries)
        # Counted from the first job's arrival: a job that already waited through a running batch goes
        # out with whatever has queued meanwhile, without a further wait.
        deadline = first.enqueued + self.max_wait
        while n < self.max_batch:
            remaining = deadline - time.monotonic()
            try:
                job = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if job is _STOP or n + len(job.queries) > self.max_batch:
                self._carry = job  # opens the next round (or stops the worker after this batch)
                break
            batch.append(job)
            n += len(job.queries)
        return batch

    def _process(self, batch: list[_Job]) -> None:
        # One retriever for the whole batch: ``serve`` may swap in a new index version meanwhile (see
        # retrieval.reload); this batch finishes on the one it started with, which stays alive until then.
        retriever = self.retriever
        try:
            outcomes: list[tuple[Any, BaseException | None]] = [(r, None) for r in self._answer(retriever, batch)]
        except Exception as exc:  # the worker keeps serving; the error goes to the requests that cause it
            # Isolation: the requests grouped by chance must not share one request's failure, so each is
            # answered again on its own, and only those that fail alone get the error.
            outcomes = [(None, exc)] if len(batch) == 1 else [self._alone(retriever, job) for job in batch]
        n = sum(len(job.queries) for job, (_, exc) in zip(batch, outcomes) if exc is None)
        if n:
            self.batches += 1
            self.queries += n
            self.largest = max(self.largest, n)
        for job, (result, exc) in zip(batch, outcomes):
            job.loop.call_soon_threadsafe(_resolve, job.future, result, exc)

    def _alone(self, retriever: Retriever, job: _Job) -> tuple[Any, BaseException | None]:
        try:
            return self._answer(retriever, [job])[0], None
        except Exception as exc:  # this request's own failure, delivered to it alone
            return None, exc

    def _answer(self, retriever: Retriever, batch: list[_Job]) -> list[Any]:
        """The results of ``batch`` (one per job, ``finish``-ed): one encode, one search per distinct options."""
        texts = [q for job in batch for q in job.queries]
        dense = [job.opts.mode != "bm25" for job in batch for _ in job.queries]
        xq = None
        if any(dense):  # (nq, dim): one forward pass for every query that needs a vector
            xq = np.zeros((len(texts), retriever.dim), np.float32)
            xq[dense] = retriever.encode([t for t, d in zip(texts, dense) if d])
        # One search per distinct options (k and nprobe included): the batch usually shares one.
        groups: dict[tuple[Any, ...], list[int]] = {}
        for j, job in enumerate(batch):
            groups.setdefault(job.opts.key(), []).append(j)
        starts = [0]
        for job in batch:
            starts.append(starts[-1] + len(job.queries))
        results: list[Any] = [None] * len(batch)
        for members in groups.values():
            rows = [r for j in members for r in range(starts[j], starts[j + 1])]
            hits = retriever.search_encoded([texts[r] for r in rows], None if xq is None else xq[rows],
                                            batch[members[0]].opts)
            pos = 0
            for j in members:
                n = len(batch[j].queries)
                results[j] = hits[pos:pos + n]
                pos += n
        return [self.finish(r) for r in results] if self.finish is not None else results


def _resolve(future: asyncio.Future, result: Any, exc: BaseException | None) -> None:
    if future.done():  # the client went away and the request was cancelled
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)
