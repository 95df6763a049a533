"""The speed paths of towers/model.py: length-grouped forward, bf16 cast copy, int8 copy, encode batching and amp.

Each fast path must give the embeddings of the plain float32 path (exactly up to rounding for the grouped
forward and the batching; within a stated cosine for the reduced-precision copies), in input row order, and
must leave the tower it was made from as it was.
"""
from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from twotower.common.encoder import length_groups
from twotower.towers.inference import cast_copy, int8_copy
from twotower.towers.model import Tower

FAST = settings(max_examples=80, deadline=None, database=None, derandomize=True)

_WORDS = "sort list file open read write parse json http server client socket thread lock queue matrix".split()


def _texts(word_counts: list[int], seed: int = 0) -> list[str]:
    """Distinct texts of the given word counts (word count ~ token count for these words)."""
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(_WORDS, size=n)) + f" {i}" for i, n in enumerate(word_counts)]


# Very different lengths, deliberately not sorted: several length groups form, and a scrambled row order shows.
MIXED = _texts([1, 60, 3, 150, 2, 25, 1, 90, 7, 4, 200, 2])


def _tower(base: Path, seed: int = 0, **kw) -> Tower:
    torch.manual_seed(seed)  # the projection (when proj_dim is set) is initialised at random
    return Tower.from_base(base, **kw).eval()


def _unrelated_bert_tower(like: Tower) -> Tower:
    """A tower with the same architecture and tokenizer but other random weights: what garbage scores."""
    from transformers import BertModel

    torch.manual_seed(1234)
    encoder = BertModel(type(like.encoder.config).from_dict(like.encoder.config.to_dict()))
    return Tower(encoder, like.tokenizer, like.pooling, like.max_length,
                 like.proj.out_features if like.proj is not None else None).eval()


def _row_cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return (a * b).sum(1)


def _snapshot(tower: Tower) -> dict[str, torch.Tensor]:
    return {name: t.detach().clone() for name, t in tower.state_dict().items()}


def _assert_unchanged(tower: Tower, before: dict[str, torch.Tensor]) -> None:
    after = tower.state_dict()
    assert after.keys() == before.keys()
    for name, t in before.items():
        assert after[name].dtype == t.dtype == torch.float32, name
        assert torch.equal(after[name], t), name
    assert all(type(m) is nn.Linear for m in tower.modules() if isinstance(m, nn.Linear)), "original was quantized"


def _count_encoder_calls(tower: Tower) -> tuple[list[tuple[int, int]], torch.utils.hooks.RemovableHandle]:
    """Record (rows, columns) of every encoder forward pass."""
    shapes: list[tuple[int, int]] = []

    def hook(module, args, kwargs, out):
        shapes.append(tuple(out.last_hidden_state.shape[:2]))

    return shapes, tower.encoder.register_forward_hook(hook, with_kwargs=True)


# ---- length_groups ---------------------------------------------------------------------------------------
def _padded_cost(lengths: np.ndarray, groups: list[np.ndarray], group_cost: int) -> int:
    return sum(len(g) * int(lengths[g].max()) + group_cost for g in groups)


def _brute_force_cost(lengths: np.ndarray, max_groups: int, group_cost: int) -> int:
    """Cheapest cut of the longest-first order into at most ``max_groups`` contiguous runs (all cut sets tried)."""
    widths = np.sort(lengths)[::-1]
    n = len(widths)
    best = None
    for k in range(min(max_groups, n)):  # k cuts = k + 1 groups
        for cuts in itertools.combinations(range(1, n), k):
            bounds = (0, *cuts, n)
            cost = sum((e - s) * int(widths[s]) + group_cost for s, e in zip(bounds, bounds[1:]))
            best = cost if best is None else min(best, cost)
    return best


@FAST
@given(lengths=st.lists(st.integers(0, 512), max_size=40), max_groups=st.integers(1, 10),
       group_cost=st.integers(0, 300))
def test_length_groups_partition_rows_longest_group_first(lengths, max_groups, group_cost):
    lengths = np.asarray(lengths, dtype=np.int64)
    groups = length_groups(lengths, max_groups, group_cost)
    assert 1 <= len(groups) <= max(max_groups, 1)
    flat = np.concatenate(groups)
    assert sorted(flat.tolist()) == list(range(len(lengths)))  # every row exactly once
    if len(lengths):
        assert all(len(g) for g in groups), "no empty group (an empty group is a wasted forward pass)"
    for longer, shorter in zip(groups, groups[1:]):  # contiguous runs of the longest-first order
        assert lengths[longer].min() >= lengths[shorter].max()


@FAST
@given(lengths=st.lists(st.integers(1, 300), min_size=1, max_size=9), max_groups=st.integers(1, 9),
       group_cost=st.integers(0, 200))
def test_length_groups_minimise_padded_tokens_plus_group_cost(lengths, max_groups, group_cost):
    lengths = np.asarray(lengths, dtype=np.int64)
    groups = length_groups(lengths, max_groups, group_cost)
    assert _padded_cost(lengths, groups, group_cost) == _brute_force_cost(lengths, max_groups, group_cost)


def test_length_groups_optimal_on_larger_seeded_batches():
    """The exact DP against brute force where brute force is still cheap (n=12, all 2^11 cut sets)."""
    rng = np.random.default_rng(0)
    for _ in range(20):
        lengths = rng.integers(1, 512, size=12)
        max_groups, group_cost = int(rng.integers(2, 8)), int(rng.integers(0, 400))
        groups = length_groups(lengths, max_groups, group_cost)
        assert len(groups) <= max_groups
        assert _padded_cost(lengths, groups, group_cost) == _brute_force_cost(lengths, max_groups, group_cost)


@FAST
@given(n=st.integers(1, 64), length=st.integers(1, 512), max_groups=st.integers(1, 10),
       group_cost=st.integers(0, 300))
def test_length_groups_single_length_batch_is_one_group(n, length, max_groups, group_cost):
    groups = length_groups([length] * n, max_groups, group_cost)
    assert len(groups) == 1
    assert sorted(groups[0].tolist()) == list(range(n))


def test_length_groups_trade_padding_against_passes():
    # 2 long rows among 30 short ones: one group pads 32 rows to 500 (16000 tokens), two groups compute 1300.
    lengths = np.array([10] * 13 + [500] + [10] * 7 + [500] + [10] * 10)
    groups = length_groups(lengths, max_groups=8, group_cost=64)
    assert [sorted(g.tolist()) for g in groups] == [[13, 21], sorted(set(range(32)) - {13, 21})]
    # when a pass costs more than the padding it saves, one group
    assert len(length_groups(lengths, max_groups=8, group_cost=20_000)) == 1
    assert len(length_groups(lengths, max_groups=1, group_cost=0)) == 1
    # a torch tensor of lengths (what forward_grouped passes, via .numpy()) works the same
    assert [g.tolist() for g in length_groups(torch.as_tensor(lengths).numpy())] == [g.tolist() for g in groups]


def test_length_groups_tiny_inputs():
    assert [g.tolist() for g in length_groups([])] == [[]]
    assert [g.tolist() for g in length_groups([7])] == [[0]]


# ---- Tower.forward_grouped -----------------------------------------------------------------------------
@pytest.mark.parametrize("pooling,proj", [("mean", None), ("cls", 16), ("max", None), ("last", 8)])
def test_forward_grouped_equals_forward_in_row_order(tiny_bert_dir, pooling, proj):
    tower = _tower(tiny_bert_dir, pooling=pooling, proj_dim=proj)
    batch = tower.tokenize(MIXED)
    lengths = batch["attention_mask"].sum(1)
    assert lengths.max() > 10 * lengths.min()  # very different lengths
    with torch.no_grad():
        full = tower(**batch)
        shapes, handle = _count_encoder_calls(tower)
        grouped = tower.forward_grouped(**batch)
        handle.remove()
    assert grouped.shape == full.shape == (len(MIXED), tower.dim)
    torch.testing.assert_close(grouped, full, atol=1e-5, rtol=0)
    # the rows really were split and trimmed: several passes, far fewer (padded) tokens than B x T
    assert len(shapes) > 1
    assert sum(r for r, _ in shapes) == len(MIXED)
    assert sum(r * c for r, c in shapes) < 0.6 * batch["input_ids"].numel()
    # each pass is padded to its own longest row only
    expected_widths = sorted(int(lengths[g].max()) for g in length_groups(lengths.numpy()))
    assert sorted(c for _, c in shapes) == expected_widths


def test_forward_grouped_gradients_equal_forward(tiny_bert_dir):
    """Training uses forward_grouped: the loss gradients (including the once-looked-up embeddings) must match."""
    tower = _tower(tiny_bert_dir, proj_dim=16)  # eval(): no dropout, so both paths are deterministic
    batch = tower.tokenize(MIXED)
    target = torch.randn(len(MIXED), tower.dim, generator=torch.Generator().manual_seed(0))

    def grads(fn) -> dict[str, torch.Tensor]:
        tower.zero_grad(set_to_none=True)
        (fn(**batch) * target).sum().backward()
        return {n: p.grad.clone() for n, p in tower.named_parameters() if p.grad is not None}

    plain, grouped = grads(tower), grads(tower.forward_grouped)
    assert plain.keys() == grouped.keys()
    assert "encoder.embeddings.word_embeddings.weight" in grouped
    for name in plain:
        torch.testing.assert_close(grouped[name], plain[name], atol=1e-5, rtol=1e-4, msg=name)


def test_forward_grouped_decoder_right_padding(tiny_llama_dir):
    tower = _tower(tiny_llama_dir, pooling="last")
    assert tower.tokenizer.padding_side == "right"
    batch = tower.tokenize(MIXED)
    with torch.no_grad():
        full = tower(**batch)
        shapes, handle = _count_encoder_calls(tower)
        grouped = tower.forward_grouped(**batch)
        handle.remove()
    assert len(shapes) > 1
    torch.testing.assert_close(grouped, full, atol=1e-5, rtol=0)


def test_forward_grouped_left_padding_runs_as_one_batch(tiny_llama_dir):
    tower = _tower(tiny_llama_dir, pooling="last")
    tower.tokenizer.padding_side = "left"
    batch = tower.tokenize(MIXED)
    mask = batch["attention_mask"]
    assert (mask[:, -1] == 1).all() and (mask[:, 0] == 0).any()  # really left-padded
    with torch.no_grad():
        full = tower(**batch)
        shapes, handle = _count_encoder_calls(tower)
        grouped = tower.forward_grouped(**batch)
        handle.remove()
    assert shapes == [tuple(batch["input_ids"].shape)]  # one pass over the whole batch
    torch.testing.assert_close(grouped, full, atol=1e-6, rtol=0)


# ---- Tower.cast_copy -----------------------------------------------------------------------------------
@pytest.mark.parametrize("proj", [None, 16])
def test_cast_copy_bf16_is_a_close_float32_output_copy(tiny_bert_dir, proj):
    tower = _tower(tiny_bert_dir, proj_dim=proj)
    before = _snapshot(tower)
    ref = tower.encode(MIXED, batch_size=4)

    half = cast_copy(tower, torch.bfloat16)

    assert half is not tower and not half.training
    _assert_unchanged(tower, before)  # the original keeps its float32 weights
    np.testing.assert_array_equal(tower.encode(MIXED, batch_size=4), ref)
    src_ptrs = {p.data_ptr() for p in tower.parameters()}
    assert not src_ptrs & {p.data_ptr() for p in half.parameters()}, "the copy shares storage with the original"
    assert {p.dtype for p in half.encoder.parameters()} == {torch.bfloat16}
    if proj:
        assert half.proj.weight.dtype == half.proj.bias.dtype == torch.float32
    assert half.device == tower.device and half.dim == tower.dim

    out = half.encode(MIXED, batch_size=4)
    assert out.dtype == np.float32 and out.shape == ref.shape
    # pooling and the L2 norm run in float32: unit to float32 rounding, not bf16's ~4e-3
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    assert _row_cos(out, ref).min() >= 0.99
    # each bf16 embedding is nearest to its own float32 embedding (a shuffled or constant output would not be)
    assert (np.argmax(out @ ref.T, axis=1) == np.arange(len(MIXED))).all()


# ---- Tower.quantized_int8 ------------------------------------------------------------------------------
@pytest.mark.parametrize("proj", [None, 16])
def test_quantized_int8_copy_close_to_float32_original_untouched(tiny_bert_dir, proj):
    from torch.ao.nn.quantized import dynamic as nnqd

    tower = _tower(tiny_bert_dir, proj_dim=proj)
    before = _snapshot(tower)
    fp = tower.fingerprint()
    ref = tower.encode(MIXED, batch_size=4)
    n_linear = sum(isinstance(m, nn.Linear) for m in tower.modules())

    q = int8_copy(tower)

    assert isinstance(q, Tower) and q is not tower and not q.training
    assert q.device.type == "cpu"
    assert sum(isinstance(m, nnqd.Linear) for m in q.modules()) == n_linear  # every Linear, projection too
    if proj:
        assert isinstance(q.proj, nnqd.Linear)
    _assert_unchanged(tower, before)
    assert tower.fingerprint() == fp
    np.testing.assert_array_equal(tower.encode(MIXED, batch_size=4), ref)

    out = q.encode(MIXED, batch_size=4)
    assert out.dtype == np.float32 and out.shape == ref.shape
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    cos = _row_cos(out, ref)
    assert cos.min() >= 0.99
    assert (np.argmax(out @ ref.T, axis=1) == np.arange(len(MIXED))).all()
    # the threshold means something: a tower with other random weights is far from the original
    garbage = _row_cos(_unrelated_bert_tower(tower).encode(MIXED, batch_size=4), ref)
    assert garbage.mean() < 0.6 and garbage.mean() < cos.min() - 0.3


# ---- Tower.encode --------------------------------------------------------------------------------------
@pytest.mark.parametrize("pooling,proj", [("mean", None), ("last", 16)])
def test_encode_keeps_input_order_across_length_batches(tiny_bert_dir, pooling, proj):
    tower = _tower(tiny_bert_dir, pooling=pooling, proj_dim=proj)
    tower.train()  # encode must switch to eval (no dropout) and restore the mode after
    shapes, handle = _count_encoder_calls(tower)
    batched = tower.encode(MIXED, batch_size=3)
    handle.remove()
    assert tower.training
    # 12 texts in batches of 3 by token count, longest first, each padded to its own longest row only
    n_tokens = sorted((len(x) for x in tower.tokenizer(MIXED)["input_ids"]), reverse=True)
    assert shapes == [(3, n_tokens[i]) for i in range(0, len(MIXED), 3)]
    alone = np.stack([tower.encode([t])[0] for t in MIXED])
    assert batched.dtype == np.float32 and batched.shape == (len(MIXED), tower.dim)
    np.testing.assert_allclose(batched, alone, atol=1e-5, rtol=0)
    # the rows differ enough that a scrambled order would fail the comparison above
    assert np.abs(alone - np.roll(alone, 1, axis=0)).max() > 1e-2


@pytest.mark.parametrize("proj", [None, 16])
def test_encode_bf16_autocast_close_to_float32(tiny_bert_dir, proj):
    tower = _tower(tiny_bert_dir, proj_dim=proj)
    ref = tower.encode(MIXED, batch_size=4)
    before = _snapshot(tower)
    out = tower.encode(MIXED, batch_size=4, amp_dtype=torch.bfloat16)
    _assert_unchanged(tower, before)
    assert out.dtype == np.float32 and out.shape == ref.shape
    assert _row_cos(out, ref).min() >= 0.99
    assert (np.argmax(out @ ref.T, axis=1) == np.arange(len(MIXED))).all()
    # back in float32 after the autocast call: the same vectors as before
    np.testing.assert_array_equal(tower.encode(MIXED, batch_size=4), ref)


# Regression: the projection once ran under autocast and the norm was taken in bf16 (off unit by ~1e-3).
def test_encode_bf16_autocast_with_projection_is_unit_norm(tiny_bert_dir):
    tower = _tower(tiny_bert_dir, proj_dim=16)
    out = tower.encode(MIXED, batch_size=4, amp_dtype=torch.bfloat16)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-4)
