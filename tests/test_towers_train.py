"""Contrastive training on a tiny random BERT (CPU): loss, temperature, hard negatives, exact resume, CLI."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn import functional as F

import twotower.towers.train as train_mod
from tests.conftest import PAIR_WORDS as WORDS
from twotower import cli as twotower_cli
from twotower.towers import checkpoint as ckpt
from twotower.towers.loss import Temperature, info_nce
from twotower.towers.model import TwoTower
from twotower.towers.train import TrainConfig, collate, train


@pytest.fixture
def pairs_file(tmp_path) -> Path:
    """24 synthetic pairs: query 'w' -> 'all about the w w'; hard negative = the next word's document."""
    path = tmp_path / "pairs.jsonl"
    with path.open("w") as fh:
        for i, w in enumerate(WORDS):
            nxt = WORDS[(i + 1) % len(WORDS)]
            fh.write(json.dumps({"query": w, "positive": f"all about the {w} {w}",
                                 "negatives": [f"all about the {nxt} {nxt}", f"nothing on {nxt}"]}) + "\n")
    return path


def _config(pairs: Path, out: Path, base: Path, **kw) -> TrainConfig:
    defaults = dict(batch_size=8, max_steps=9, lr=1e-3, warmup_ratio=0.2, log_every=1, checkpoint_every=3,
                    keep_checkpoints=0, eval_every=0, device="cpu", query_max_length=16, result_max_length=16)
    return TrainConfig(pairs=str(pairs), out=str(out), base=str(base), **{**defaults, **kw})


def _losses(out: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (out / "train_log.jsonl").read_text().splitlines()) if "loss" in r]


# ---- loss ------------------------------------------------------------------------------------------
def test_info_nce_matches_cross_entropy_with_negatives_and_symmetric():
    torch.manual_seed(0)
    q, p, n = (F.normalize(torch.randn(s, 8), dim=-1) for s in (4, 4, 3))
    plain = info_nce(q, p, temperature=0.1)
    assert torch.allclose(plain, F.cross_entropy(q @ p.T / 0.1, torch.arange(4)))
    with_negs = info_nce(q, p, n, temperature=0.1)  # negatives are extra columns: (4, 4 + 3) scores
    assert torch.allclose(with_negs, F.cross_entropy(q @ torch.cat([p, n]).T / 0.1, torch.arange(4)))
    assert with_negs > plain  # more candidates can only make picking the positive harder
    sym = info_nce(q, p, n, temperature=0.1, symmetric=True)
    assert torch.allclose(sym, (with_negs + F.cross_entropy(p @ q.T / 0.1, torch.arange(4))) / 2)


def test_temperature_is_learnable_and_clamped():
    t = Temperature(0.05, learnable=True)
    q, p = F.normalize(torch.randn(4, 8), dim=-1), F.normalize(torch.randn(4, 8), dim=-1)
    info_nce(q, p, temperature=t()).backward()
    assert t.log_t.grad is not None and t.log_t.grad != 0
    fixed = Temperature(0.05)
    assert not list(fixed.parameters()) and "log_t" in fixed.state_dict()
    with torch.no_grad():
        t.log_t.fill_(-20.0)
    assert t().item() == pytest.approx(0.01)
    with pytest.raises(ValueError, match="outside"):
        Temperature(5.0)


def test_collate_cycles_hard_negatives_and_drops_in_batch_positives():
    queries, positives = ["a", "b", "c"], ["A", "B", "C"]
    negatives = [["B", "x1", "x2"], ["y1"], []]
    rows = np.array([0, 1, 2])
    batch = collate(rows, queries, positives, negatives, epoch=0, per_query=2)
    assert batch.positives == ["A", "B", "C"] and batch.negatives == ["x1", "y1"]  # "B" is row 1's positive
    assert collate(rows, queries, positives, negatives, epoch=1, per_query=2).negatives == ["x2", "y1"]
    assert collate(rows, queries, positives, None, epoch=0, per_query=2).negatives == []


# ---- training ------------------------------------------------------------------------------------------
def test_loss_decreases_and_learnable_temperature_moves(pairs_file, tiny_bert_dir, tmp_path):
    config = _config(pairs_file, tmp_path / "out", tiny_bert_dir, max_steps=30, checkpoint_every=0,
                     learn_temperature=True, temperature_lr=1e-2, symmetric=True)
    model = train(config)
    losses = _losses(tmp_path / "out")
    assert len(losses) == 30
    assert np.mean(losses[-6:]) < 0.6 * np.mean(losses[:6]), losses
    meta = json.loads((tmp_path / "out" / "twotower.json").read_text())
    assert meta["train_config"]["final_temperature"] != pytest.approx(0.05, abs=1e-4)
    assert meta["train_config"]["symmetric"] is True and meta["train_config"]["steps"] == 30
    assert model.fingerprint() == TwoTower.load(tmp_path / "out").fingerprint()


def test_interrupted_then_resumed_equals_uninterrupted(pairs_file, tiny_bert_dir, tmp_path, monkeypatch):
    # exercise every piece of state; log windows of 2 steps straddle the checkpoints every 3
    kw = dict(learn_temperature=True, negatives_per_query=2, symmetric=True, log_every=2)
    straight = train(_config(pairs_file, tmp_path / "a", tiny_bert_dir, **kw))

    real_step, calls = train_mod.optimizer_step, []

    def dies_during_step_8(*args, **kwargs):  # a crash in the middle of step 8: after forward, before update
        calls.append(1)
        if len(calls) == 8:
            raise KeyboardInterrupt
        real_step(*args, **kwargs)

    monkeypatch.setattr(train_mod, "optimizer_step", dies_during_step_8)
    with pytest.raises(KeyboardInterrupt):
        train(_config(pairs_file, tmp_path / "b", tiny_bert_dir, **kw))
    monkeypatch.setattr(train_mod, "optimizer_step", real_step)
    root = tmp_path / "b" / "checkpoints"
    assert [s for s, _ in ckpt.list_checkpoints(root)] == [3, 6]
    assert not (tmp_path / "b" / "twotower.json").exists()

    (root / "step-6" / ckpt.MARKER).unlink()  # a half-written checkpoint must be skipped: resume from 3
    with pytest.raises(FileExistsError, match="--resume"):
        train(_config(pairs_file, tmp_path / "b", tiny_bert_dir, **kw))
    with pytest.raises(ValueError, match=r"lr: checkpoint has 0\.001, this run has 0\.002"), pytest.warns(UserWarning):
        train(_config(pairs_file, tmp_path / "b", tiny_bert_dir, resume=True, **{**kw, "lr": 2e-3}))
    with pytest.warns(UserWarning, match=r"skipping incomplete checkpoint .*step-6: no COMPLETE\.json"):
        resumed = train(_config(pairs_file, tmp_path / "b", tiny_bert_dir, resume=True, **kw))

    a, b = straight.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert _losses(tmp_path / "a") == _losses(tmp_path / "b")  # same batches, same dropout, same optimizer
    meta_a, meta_b = (json.loads((tmp_path / d / "twotower.json").read_text()) for d in "ab")
    assert meta_a["fingerprint"] == meta_b["fingerprint"]
    assert meta_a["train_config"]["final_temperature"] == meta_b["train_config"]["final_temperature"]


def test_checksum_mismatch_or_missing_file_is_not_complete(tmp_path):
    root = tmp_path / "checkpoints"
    weights = {"w": torch.arange(4.0)}
    for step in (1, 2, 3):
        ckpt.save_checkpoint(root, step, weights, {"x": torch.ones(2)}, {"config": {}})
    assert ckpt.latest_complete(root) == root / "step-3"
    (root / "step-3" / "state.json").write_text("{}")  # same name, other bytes
    (root / "step-2" / "trainer.pt").unlink()
    with pytest.warns(UserWarning) as record:
        assert ckpt.latest_complete(root) == root / "step-1"
    assert "step-3: state.json does not match its checksum" in str(record[0].message)
    assert "step-2: trainer.pt is missing" in str(record[1].message)
    loaded, trainer, state = ckpt.load_checkpoint(root / "step-1")
    assert torch.equal(loaded["w"], weights["w"]) and state["step"] == 1
    ckpt.prune(root, keep=1)
    assert [s for s, _ in ckpt.list_checkpoints(root)] == [3]


def test_cli_trains_shared_towers_with_dev_recall_and_reports_bad_input(pairs_file, tiny_bert_dir, tmp_path, capsys):
    out = tmp_path / "towers"
    rc = twotower_cli.main(["train", "--pairs", str(pairs_file), "--out", str(out), "--base", str(tiny_bert_dir),
                            "--shared", "--batch-size", "4", "--max-steps", "3", "--dev", str(pairs_file),
                            "--device", "cpu", "--checkpoint-every", "2", "--result-max-length", "24",
                            "--allow-no-gain"])
    assert rc == 0
    assert "dev recall@10" in capsys.readouterr().out
    model = TwoTower.load(out)
    assert model.shared and model.result_max_length == 24
    assert model.encode_queries(["apple"]).shape == (1, 32)
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "dev_recall@10" in r] == [0, 3]
    assert [s for s, _ in ckpt.list_checkpoints(out / "checkpoints")] == [2, 3]

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"query": "a", "positive": "b"}\n{"query": "a"\n')
    rc = twotower_cli.main(["train", "--pairs", str(bad), "--out", str(tmp_path / "x"), "--base", str(tiny_bert_dir)])
    assert rc == 2
    assert "bad.jsonl: line 2: malformed JSON" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()  # nothing is written before the data is validated


def test_gradient_checkpointing_is_a_pure_memory_trade_and_bf16_autocast_runs(pairs_file, tiny_bert_dir, tmp_path):
    kw = dict(max_steps=3, checkpoint_every=0, proj_dim=16)
    plain = train(_config(pairs_file, tmp_path / "a", tiny_bert_dir, **kw))
    recomputed = train(_config(pairs_file, tmp_path / "b", tiny_bert_dir, gradient_checkpointing=True, **kw))
    for (name, a), b in zip(plain.state_dict().items(), recomputed.state_dict().values(), strict=True):
        assert torch.allclose(a, b, atol=1e-6), name
    bf16 = train(_config(pairs_file, tmp_path / "c", tiny_bert_dir, amp="bf16", **kw))  # CPU autocast
    assert all(np.isfinite(_losses(tmp_path / "c"))) and bf16.result_tower.dim == 16


@pytest.mark.gpu
@pytest.mark.parametrize("amp", ["auto", "fp16"])
def test_trains_on_gpu_with_amp(pairs_file, tiny_bert_dir, tmp_path, amp):
    model = train(_config(pairs_file, tmp_path / "out", tiny_bert_dir, device="cuda", amp=amp, max_steps=4))
    assert all(np.isfinite(_losses(tmp_path / "out")))
    assert TwoTower.load(tmp_path / "out").fingerprint() == model.fingerprint()


@pytest.mark.parametrize("bad,message", [
    (dict(batch_size=1), "--batch-size must be >= 2"),
    (dict(amp="fp8"), "unknown amp 'fp8': choose auto, bf16, fp16, none"),
    (dict(warmup_ratio=1.0), r"--warmup-ratio must be in \[0, 1\)"),
    (dict(resume=True, overwrite=True), "contradict"),
    (dict(pairs=""), "--pairs is required"),
])
def test_config_errors_name_the_option(bad, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**{"pairs": "p.jsonl", "out": "o", **bad})
