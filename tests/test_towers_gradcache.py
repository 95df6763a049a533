"""GradCache (one process, CPU, tiny random BERT): cached gradients equal the uncached ones, dropout included."""
from __future__ import annotations

import json
import shutil
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pytest
import torch

from twotower.towers import gradcache
from twotower.towers.gradcache import chunk_pairs, split_features
from twotower.towers.loss import Temperature, contrastive_loss
from twotower.towers.model import TwoTower
from twotower.towers.train import Batch, TowerForward, TrainConfig, collate, features, forward_backward, train

WORDS = "apple banana cherry grape lemon mango orange peach pear plum kiwi melon".split()
POSITIVES = [f"all about the {w} " + " ".join([w] * (i % 4)) for i, w in enumerate(WORDS)]  # uneven lengths
NEGATIVES = [[f"nothing on {w}"] for w in WORDS[1:] + WORDS[:1]]
CPU = torch.device("cpu")


def _setup(base: Path, shared: bool = False) -> tuple[TwoTower, Temperature, Batch]:
    torch.manual_seed(0)
    model = TwoTower.from_base(str(base), shared=shared, query_max_length=16, result_max_length=16, proj_dim=8)
    batch = collate(np.arange(8), WORDS, POSITIVES, NEGATIVES, epoch=0, per_query=1)
    return model, Temperature(0.05, learnable=True), batch


def _grads(model: TwoTower, temp: Temperature) -> dict[str, torch.Tensor]:
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    out["temperature"] = temp.log_t.grad.clone()
    model.zero_grad(set_to_none=True)
    temp.zero_grad(set_to_none=True)
    return out


def _assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 1e-5) -> None:
    assert a.keys() == b.keys(), sorted(a.keys() ^ b.keys())
    for name in a:
        assert torch.allclose(a[name], b[name], atol=atol, rtol=1e-4), (name, (a[name] - b[name]).abs().max())


def _chunked_reference(model: TwoTower, temp: Temperature, batch: Batch, chunk: int) -> torch.Tensor:
    """The uncached loss over the same chunks, every chunk's graph kept: dropout consumes the RNG in the same
    order as GradCache's first pass, so with correct replay the gradients must match."""
    forward = TowerForward(model)
    qs, rs = [], []
    for qc, rc in chunk_pairs(*features(model, batch, CPU), chunk):
        q, r = forward(qc, rc)
        qs += [q] if q is not None else []
        rs += [r] if r is not None else []
    q, r, n = torch.cat(qs), torch.cat(rs), len(batch.positives)
    loss = contrastive_loss(q, r[:n], r[n:], temp(), symmetric=True)
    loss.backward()
    return loss.detach()


@pytest.mark.parametrize("shared", [False, True])
def test_cached_gradients_equal_uncached_with_dropout(tiny_bert_dir, shared):
    model, temp, batch = _setup(tiny_bert_dir, shared)
    model.train()  # dropout 0.1 in the tiny BERT: active
    torch.manual_seed(1)
    ref_loss = _chunked_reference(model, temp, batch, chunk=3)
    want = _grads(model, temp)
    torch.manual_seed(1)
    loss = forward_backward(TowerForward(model), model, batch, CPU, temp, symmetric=True, cache_chunk_size=3)
    assert loss.item() == pytest.approx(ref_loss.item(), abs=1e-6)
    _assert_close(_grads(model, temp), want)
    assert len(batch.positives) + len(batch.negatives) > 8  # results outnumber queries: q-less chunks ran too


def test_without_rng_replay_dropout_would_break_the_equality(tiny_bert_dir, monkeypatch):
    """The control: the same comparison fails when chunks are re-encoded with fresh dropout masks."""
    model, temp, batch = _setup(tiny_bert_dir)
    model.train()
    torch.manual_seed(1)
    _chunked_reference(model, temp, batch, chunk=3)
    want = _grads(model, temp)
    monkeypatch.setattr(gradcache.RngState, "replay", lambda self: nullcontext())
    torch.manual_seed(1)
    forward_backward(TowerForward(model), model, batch, CPU, temp, symmetric=True, cache_chunk_size=3)
    got = _grads(model, temp)
    assert max((got[n] - want[n]).abs().max().item() for n in want) > 1e-3


def test_cached_equals_one_uncached_pass_without_dropout(tiny_bert_dir):
    """No dropout: per-chunk padding trimmed or not, GradCache gives the one-pass gradients (any chunk size)."""
    model, temp, batch = _setup(tiny_bert_dir)
    model.eval()
    forward = TowerForward(model)
    loss = forward_backward(forward, model, batch, CPU, temp, symmetric=True)
    want = _grads(model, temp)
    for chunk in (1, 5, 64):
        cached = forward_backward(forward, model, batch, CPU, temp, symmetric=True, cache_chunk_size=chunk)
        assert cached.item() == pytest.approx(loss.item(), abs=1e-6)
        _assert_close(_grads(model, temp), want)


def test_split_features_cuts_trailing_padding_only():
    ids = torch.tensor([[5, 6, 7, 0, 0], [5, 6, 0, 0, 0], [5, 0, 0, 0, 0]])
    feats = {"input_ids": ids, "attention_mask": (ids > 0).long()}
    chunks = split_features(feats, 2)
    assert [c["input_ids"].shape for c in chunks] == [(2, 3), (1, 1)]
    assert torch.equal(chunks[0]["input_ids"], ids[:2, :3])
    left = {"input_ids": ids.flip(1), "attention_mask": (ids > 0).long().flip(1)}  # left padding: nothing to cut
    assert [c["input_ids"].shape for c in split_features(left, 2)] == [(2, 5), (1, 5)]
    pairs = chunk_pairs(feats, {k: torch.cat([v, v]) for k, v in feats.items()}, 2)
    assert [(q is None, r is None) for q, r in pairs] == [(False, False), (False, False), (True, False)]
    with pytest.raises(ValueError, match="chunk size must be >= 1"):
        split_features(feats, 0)


def test_train_with_cache_chunk_size_matches_plain_training(tiny_bert_dir, tmp_path):
    nodrop = tmp_path / "nodrop"
    shutil.copytree(tiny_bert_dir, nodrop)
    config = json.loads((nodrop / "config.json").read_text())
    (nodrop / "config.json").write_text(json.dumps({**config, "hidden_dropout_prob": 0.0,
                                                    "attention_probs_dropout_prob": 0.0}))
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"query": q, "positive": p, "negatives": n}) + "\n"
                             for q, p, n in zip(WORDS, POSITIVES, NEGATIVES)))
    kw = dict(pairs=str(pairs), base=str(nodrop), batch_size=6, max_steps=3, lr=1e-3, checkpoint_every=0,
              eval_every=0, device="cpu", query_max_length=16, result_max_length=16, log_every=1)
    plain = train(TrainConfig(out=str(tmp_path / "plain"), **kw))
    cached = train(TrainConfig(out=str(tmp_path / "cached"), cache_chunk_size=2, **kw))
    # Adam divides by sqrt(v): a coordinate whose gradient is float noise can move by a fraction of lr (1e-3)
    # either way, so weights compare at 1e-4; the per-step gradients above are the tight (1e-5) check.
    for (name, a), b in zip(plain.state_dict().items(), cached.state_dict().values(), strict=True):
        assert torch.allclose(a, b, atol=1e-4), (name, (a - b).abs().max())
    losses = [[json.loads(x)["loss"] for x in (tmp_path / d / "train_log.jsonl").read_text().splitlines()]
              for d in ("plain", "cached")]
    assert np.allclose(*losses, atol=1e-5)
    assert json.loads((tmp_path / "cached" / "twotower.json").read_text())["train_config"]["cache_chunk_size"] == 2
