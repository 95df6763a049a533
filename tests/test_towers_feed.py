"""The fed encoder (twotower.towers.feed): the same embeddings as the plain batching loop, order kept, errors
surfaced as they were raised, and no thread left behind."""
from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from twotower.common.encoder import encode_batched
from twotower.towers.feed import BatchFeed, collate
from twotower.towers.model import Tower


def _texts(n: int) -> list[str]:
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    rng = np.random.default_rng(0)
    return [" ".join(rng.choice(words, size=int(rng.integers(1, 30)))) for _ in range(n)]


def _reference(tower: Tower, texts: list[str], batch_size: int) -> np.ndarray:
    """The encoder before the feed: one tokenizer call, global length sort, row-by-row padding."""
    tower.eval()  # no dropout (encode() switches to eval mode itself)
    ids = tower.tokenizer(tower.with_prompt(texts), truncation=True, max_length=tower.max_length)["input_ids"]
    pad = tower.tokenizer.pad_token_id

    def run(batch: list[list[int]]) -> np.ndarray:
        width = max(len(x) for x in batch)
        input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, seq in enumerate(batch):
            input_ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
        return tower(input_ids, mask).float().numpy()

    with torch.inference_mode():
        return encode_batched(ids, run, tower.dim, batch_size, lengths=[len(x) for x in ids])


def test_collate_matches_row_by_row_padding() -> None:
    ids, mask = collate([[5, 6, 7], [8], [9, 10]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0], [9, 10, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0]]
    assert ids.dtype == mask.dtype == torch.int64


def test_fed_encode_is_bit_identical_in_one_chunk(tiny_bert_dir) -> None:
    tower = Tower.from_base(str(tiny_bert_dir), pooling="mean", max_length=24)
    texts = _texts(150)
    np.testing.assert_array_equal(tower.encode(texts, batch_size=16), _reference(tower, texts, 16))


def test_chunks_keep_order_and_agree(tiny_bert_dir) -> None:
    tower = Tower.from_base(str(tiny_bert_dir), pooling="mean", max_length=24)
    texts = _texts(90)
    ref = _reference(tower, texts, 8)
    seen: list[np.ndarray] = []
    out = np.empty_like(ref)
    tokenize = lambda part: tower.tokenizer(part, truncation=True, max_length=24)["input_ids"]  # noqa: E731
    feed = BatchFeed(tokenize, texts, 8, tower.tokenizer.pad_token_id, chunk=7, prefetch=2)
    with torch.inference_mode():
        for rows, input_ids, mask in feed:
            seen.append(rows)
            out[rows] = tower(input_ids, mask).numpy()
    assert sorted(np.concatenate(seen).tolist()) == list(range(90))  # every row once
    np.testing.assert_allclose(out, ref, atol=1e-5)  # other batch mates and widths: float rounding only
    assert feed.stats.rows == 90 and feed.stats.padded_tokens >= feed.stats.real_tokens > 0


def test_an_error_in_the_thread_is_raised_as_it_was() -> None:
    def tokenize(part: list[str]) -> list[list[int]]:
        if "bad" in part:
            raise ValueError("row text 'bad' cannot be tokenised")
        return [[1, 2]] * len(part)

    before = threading.active_count()
    with pytest.raises(ValueError, match="row text 'bad' cannot be tokenised"):
        list(BatchFeed(tokenize, ["ok"] * 5 + ["bad"], 2, 0, chunk=3))
    assert threading.active_count() == before


def test_leaving_early_stops_the_thread() -> None:
    before = threading.active_count()
    feed = BatchFeed(lambda part: [[1, 2, 3]] * len(part), ["x"] * 1000, 4, 0, chunk=50, prefetch=1)
    for _ in feed:
        break  # the generator's finally closes the feed
    assert threading.active_count() == before
    with pytest.raises(ValueError, match="must be >= 1"):
        BatchFeed(lambda p: [], [], 0, 0)
