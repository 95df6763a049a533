"""MicroBatcher: merged batches give each request its own answer; limits, failures and shutdown."""
from __future__ import annotations

import asyncio

import pytest

from tests.conftest import QUERIES, build_tiny_index


@pytest.fixture(scope="module")
def retriever(_tiny_models, tmp_path_factory):
    from twotower.retrieval.retriever import Retriever

    _, index_dir = build_tiny_index(tmp_path_factory.mktemp("batcher"), _tiny_models["bert"])
    return Retriever.load(index_dir, device="cpu")


def _ids(hits) -> list[list[str]]:
    return [[h.id for h in row] for row in hits]


def test_batches_respect_max_batch_and_scatter_back(retriever) -> None:
    from twotower.retrieval.batcher import MicroBatcher

    singles = [f"{QUERIES[i % len(QUERIES)]} {i}" for i in range(10)]
    big = [f"{q} big" for q in QUERIES] + ["one more"]  # 6 queries > max_batch: runs alone

    async def scenario() -> tuple[list, list, dict, dict]:
        batcher = MicroBatcher(retriever, max_batch=4, max_wait_ms=30).start()
        try:
            got = await asyncio.gather(*(batcher.search([q], 3 + i % 2) for i, q in enumerate(singles)))
            after_singles = batcher.stats()
            got_big = await batcher.search(big, 5)
            return got, got_big, after_singles, batcher.stats()
        finally:
            batcher.close()

    got, got_big, after_singles, final = asyncio.run(scenario())
    assert [_ids(g) for g in got] == [_ids(retriever.search(q, k=3 + i % 2)) for i, q in enumerate(singles)]
    assert _ids(got_big) == _ids(retriever.search(big, k=5))
    assert after_singles["queries"] == 10 and after_singles["largest_batch"] <= 4
    assert after_singles["batches"] >= 3  # 10 queries in batches of at most 4
    assert final["largest_batch"] == 6


def test_invalid_input_is_rejected_before_queueing(retriever) -> None:
    from twotower.retrieval.batcher import MicroBatcher

    async def scenario() -> None:
        batcher = MicroBatcher(retriever).start()
        try:
            with pytest.raises(ValueError, match="query 0 is empty"):
                await batcher.search([""], 3)
            with pytest.raises(ValueError, match="got 0"):
                await batcher.search(["ok"], 0)
            assert batcher.stats()["batches"] == 0
        finally:
            batcher.close()

    asyncio.run(scenario())


def test_failed_batch_reaches_every_request_and_worker_survives(retriever, monkeypatch) -> None:
    from twotower.retrieval.batcher import MicroBatcher

    def boom(queries):
        raise RuntimeError("encoder exploded")

    async def scenario() -> list:
        batcher = MicroBatcher(retriever, max_wait_ms=20).start()
        try:
            monkeypatch.setattr(retriever, "encode", boom)  # fault injection: the next batch fails
            failed = await asyncio.gather(*(batcher.search([q], 3) for q in QUERIES), return_exceptions=True)
            assert all(isinstance(e, RuntimeError) and "exploded" in str(e) for e in failed)
            monkeypatch.undo()
            return await batcher.search(QUERIES[:2], 3)
        finally:
            batcher.close()

    assert _ids(asyncio.run(scenario())) == _ids(retriever.search(QUERIES[:2], k=3))


def test_one_request_failing_never_fails_the_others_grouped_with_it(retriever, monkeypatch) -> None:
    """Isolation (issue 24): a request whose encode fails (fault injected for its text only) gets the error;
    the requests the batcher grouped with it in the same batch still get their own answers."""
    from twotower.retrieval.batcher import MicroBatcher

    real_encode = retriever.encode

    def poisoned(queries):
        if any("poison" in q for q in queries):
            raise RuntimeError("encoder exploded on this request's text")
        return real_encode(queries)

    async def scenario() -> tuple[list, dict]:
        batcher = MicroBatcher(retriever, max_batch=64, max_wait_ms=200).start()
        try:
            monkeypatch.setattr(retriever, "encode", poisoned)
            texts = [*QUERIES[:2], "poison pill", *QUERIES[2:]]
            got = await asyncio.gather(*(batcher.search([q], 3) for q in texts), return_exceptions=True)
            return got, batcher.stats()
        finally:
            batcher.close()

    got, stats = asyncio.run(scenario())
    monkeypatch.undo()
    assert stats["batches"] == 1 and stats["largest_batch"] == len(QUERIES), stats  # grouped into one batch
    assert isinstance(got[2], RuntimeError) and "this request's text" in str(got[2])
    good = got[:2] + got[3:]
    assert [_ids(g)[0] for g in good] == _ids(retriever.search(QUERIES, k=3))


def test_close_finishes_queued_work(retriever) -> None:
    from twotower.retrieval.batcher import MicroBatcher

    async def scenario() -> list:
        batcher = MicroBatcher(retriever, max_batch=2, max_wait_ms=0).start()
        tasks = [asyncio.ensure_future(batcher.search([q], 2)) for q in QUERIES]
        await asyncio.sleep(0)  # every request is queued
        await asyncio.to_thread(batcher.close)
        return await asyncio.wait_for(asyncio.gather(*tasks), 30)

    assert [_ids(r)[0] for r in asyncio.run(scenario())] == _ids(retriever.search(QUERIES, k=2))
