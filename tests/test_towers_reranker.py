"""Cross-encoder reranker: losses, dir checks before load, train-reranker end to end (mining, dev verdict,
sentence-transformers CrossEncoder format), bad input one line."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import PAIR_WORDS as WORDS
from twotower import cli as twotower_cli
from twotower.towers.reranker import Reranker, bce_loss, check_reranker_dir, listwise_loss


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _pairs(words) -> list[dict]:
    """Query "w" -> "all about the w w": a task whose answer is in the text (a cross-encoder can learn it)."""
    return [{"query": w, "positive": f"all about the {w} {w}"} for w in words]


@pytest.fixture
def setup(tiny_bert_dir, tmp_path):
    from twotower.towers.model import TwoTower

    towers = tmp_path / "towers"
    TwoTower.from_base(str(tiny_bert_dir), query_max_length=16, result_max_length=16).save(towers)
    train = _write(tmp_path / "train.jsonl", _pairs(WORDS) * 2)
    dev = _write(tmp_path / "dev.jsonl", _pairs(WORDS))
    return {"towers": towers, "train": train, "dev": dev, "base": tiny_bert_dir, "root": tmp_path}


def run(argv, capsys):
    capsys.readouterr()  # only this command's output
    code = twotower_cli.main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_bce_loss_is_weighted_pointwise_bce_and_listwise_prefers_the_positive():
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.0, 1.0, -2.0]])
    # by hand: the positive weighted by the number of negatives (2), mean over all 6 entries
    sig = torch.sigmoid(logits)
    expected = -(2 * torch.log(sig[:, 0]).sum() + torch.log(1 - sig[:, 1:]).sum()) / 6
    assert torch.allclose(bce_loss(logits), expected)
    good, bad = torch.tensor([[3.0, 0.0, 0.0]]), torch.tensor([[0.0, 3.0, 0.0]])
    assert listwise_loss(good) < listwise_loss(bad) and bce_loss(good) < bce_loss(bad)


def test_train_reranker_learns_keeps_the_best_saves_st_format_and_the_verdict(setup, capsys):
    out = setup["root"] / "reranker"
    argv = ["train-reranker", "--pairs", str(setup["train"]), "--towers", str(setup["towers"]), "--out", str(out),
            "--base", str(setup["base"]), "--dev", str(setup["dev"]), "--hard-negatives", "3",
            "--relative-margin", "0", "--max-steps", "60", "--eval-every", "20", "--batch-size", "8", "--lr", "5e-3",
            "--max-length", "32", "--device", "cpu", "--no-progress", "--allow-no-gain"]
    code, stdout, err = run(argv, capsys)
    assert code == 0, err
    meta = json.loads((out / "reranker.json").read_text())
    last = stdout.strip().splitlines()[-1]
    assert last.startswith("dev nDCG@10 towers ") and "-> towers+rerank" in last and "top-20 reranked" in last
    assert meta["max_length"] == 32 and meta["mined"]["queries"] == len(WORDS) and meta["pairs_trained"] == 48
    assert meta["final_loss"] < meta["first_loss"], "the loss fell"
    history = meta["dev_metrics"]["history"]
    assert [h["step"] for h in history] == [0, 20, 40, 60]
    # --select best: the saved weights are the best evaluation's, measured again here from the dir
    from twotower.towers.model import TwoTower
    from twotower.towers.reranker_train import DevRerank

    best = max(h["ndcg@10"] for h in history[1:])
    ours = Reranker.load(out, device="cpu")
    dev = DevRerank(TwoTower.load(setup["towers"]), WORDS, [r["positive"] for r in _pairs(WORDS)], 20, "cpu", 64)
    assert dev.towers()["ndcg@10"] == pytest.approx(history[0]["ndcg@10"])
    assert dev.measure(ours)["ndcg@10"] == pytest.approx(best) == meta["dev_metrics"]["reranked"]["ndcg@10"]
    assert meta["improved"] == (best > history[0]["ndcg@10"])
    # sentence-transformers loads the dir and scores exactly as we do (raw logits, our max length)
    from sentence_transformers import CrossEncoder

    pairs = [(w, f"all about the {v} {v}") for w in WORDS[:4] for v in WORDS[:4]]
    st = CrossEncoder(str(out), device="cpu")
    assert st.max_length == 32
    np.testing.assert_allclose(st.predict(pairs), ours.score([q for q, _ in pairs], [t for _, t in pairs]),
                               rtol=1e-4, atol=1e-5)
    # a second run refuses the existing dir without --overwrite, before any load
    code, _, err = run(argv, capsys)
    assert code == 2 and "--overwrite" in err and len(err.strip().splitlines()) == 1
    # without --allow-no-gain the exit status says whether reranking beat the towers' order
    code, stdout, _ = run([a for a in argv if a != "--allow-no-gain"] + ["--overwrite"], capsys)
    assert code == (0 if json.loads((out / "reranker.json").read_text())["improved"] else 3)


def test_rerank_orders_candidates_by_score(setup):
    model = Reranker.from_base(setup["base"], 32, device="cpu", seed=0)
    texts = ["a b", "c d", "e f", "g h"]
    (order, scores), = model.rerank(["q"], [texts])
    raw = model.score(["q"] * 4, texts)
    assert sorted(order.tolist()) == [0, 1, 2, 3] and np.allclose(scores, raw[order])
    assert np.all(np.diff(scores) <= 0)


def test_dirs_that_do_not_fit_are_refused_before_load(setup, tmp_path):
    base = setup["base"]
    assert check_reranker_dir(base, 32, trained=False) == 32
    with pytest.raises(ValueError, match="512 positions"):
        check_reranker_dir(base, 4096, trained=False)
    with pytest.raises(ValueError, match="not a one-label cross-encoder"):
        check_reranker_dir(base)  # a bare encoder is no reranker
    small = tmp_path / "small"  # a tokenizer larger than the model's embedding table
    small.mkdir()
    for f in base.iterdir():
        (small / f.name).write_bytes(f.read_bytes())
    config = json.loads((small / "config.json").read_text())
    (small / "config.json").write_text(json.dumps({**config, "vocab_size": 1000}))
    with pytest.raises(ValueError, match="tokenizer has .* tokens but the model's embedding has 1000"):
        check_reranker_dir(small, 32, trained=False)
    (small / "model.safetensors").unlink()
    (small / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ValueError, match="no model.safetensors"):
        check_reranker_dir(small, 32, trained=False)


@pytest.mark.parametrize("extra,match", [
    (["--max-length", "4096"], "max length 4096 does not fit base model"),
    (["--hard-negatives", "0"], "--hard-negatives must be > 0"),
    (["--hard-negatives", "60"], "raise --range-max"),
    (["--relative-margin", "1.5"], "--relative-margin must be in [0, 1)"),
    (["--base", "nosuchbase"], "unknown base model 'nosuchbase'"),
])
def test_bad_options_are_one_line_before_any_load(setup, capsys, extra, match):
    argv = ["train-reranker", "--pairs", str(setup["train"]), "--towers", str(setup["towers"]), "--out",
            str(setup["root"] / "r"), "--base", str(setup["base"]), "--device", "cpu", *extra]
    code, _, err = run(argv, capsys)
    assert code == 2 and match in err and len(err.strip().splitlines()) == 1, err
    assert not (setup["root"] / "r").exists()


def test_bad_towers_and_pairs_are_one_line(setup, capsys, tmp_path):
    common = ["--base", str(setup["base"]), "--device", "cpu", "--no-progress", "--out", str(tmp_path / "r")]
    code, _, err = run(["train-reranker", "--pairs", str(setup["train"]), "--towers", str(tmp_path), *common],
                       capsys)
    assert code == 2 and "twotower.json" in err and len(err.strip().splitlines()) == 1, err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"query": "a", "positive": "b"}\n{"query": "a"}\n')
    code, _, err = run(["train-reranker", "--pairs", str(bad), "--towers", str(setup["towers"]), *common], capsys)
    assert code == 2 and "bad.jsonl" in err and "positive" in err and len(err.strip().splitlines()) == 1, err


# ---- distillation: train --teacher RERANKER (margin-MSE) ----------------------------------------------------
def test_margin_mse_matches_the_formula_and_batch_margins_follow_owners():
    from twotower.towers.distill import batch_margins, margin_mse

    torch.manual_seed(0)
    q, p, negs = torch.randn(2, 4), torch.randn(2, 4), torch.randn(3, 4)
    owners, teacher = [0, 1, 1], [1.0, 0.5, -2.0]
    student = torch.stack([(q[o] @ p[o] - q[o] @ n) / 0.05 for o, n in zip(owners, negs)])
    assert torch.allclose(margin_mse(q, p, negs, owners, teacher, 0.05),
                          ((student - torch.tensor(teacher)) ** 2).mean())
    scores = {("a", "pa"): 3.0, ("a", "n1"): 1.0, ("b", "pb"): 2.0, ("b", "n1"): 2.5}
    assert batch_margins(["a", "b"], ["pa", "pb"], ["n1", "n1"], [0, 1], scores) == [2.0, -0.5]


def test_collate_keeps_each_negatives_owner():
    from twotower.towers.train import collate

    negatives = [["n0", "p1"], ["n1a", "n1b"]]  # row 0's "p1" is row 1's positive: dropped
    scores = {(q, t): float(len(t)) for q in ("q0", "q1") for t in ("p0", "p1", "n0", "p1", "n1a", "n1b")}
    batch = collate(np.array([0, 1]), ["q0", "q1"], ["p0", "p1"], negatives, 0, 2, teacher=scores)
    assert batch.negatives == ["n0", "n1a", "n1b"] and batch.owners == [0, 1, 1]
    assert batch.margins == [0.0, -1.0, -1.0]


def test_train_with_a_teacher_distils_and_records_it(setup, capsys, tmp_path):
    teacher = tmp_path / "teacher"
    Reranker.from_base(setup["base"], 32, device="cpu", seed=3).save(teacher, {"base": "tiny"})
    common = ["train", "--pairs", str(setup["train"]), "--base", str(setup["base"]), "--max-steps", "3",
              "--batch-size", "4", "--dev", "none", "--device", "cpu", "--hard-negatives", "1", "--seed", "1"]
    code, _, err = run([*common, "--out", str(tmp_path / "plain")], capsys)
    assert code == 0, err
    code, out, err = run([*common, "--out", str(tmp_path / "distil"), "--teacher", str(teacher)], capsys)
    assert code == 0, err
    assert "--teacher: scoring 48 pairs" in out + err
    from twotower.towers.model import TwoTower

    plain, distil = TwoTower.load(tmp_path / "plain"), TwoTower.load(tmp_path / "distil")
    assert distil.train_config["teacher"] == str(teacher)
    assert plain.fingerprint() != distil.fingerprint(), "the margin-MSE term changed the gradients"
    # a teacher that is no reranker, or no negatives to distil over: one line, before any model loads
    code, _, err = run([*common, "--out", str(tmp_path / "x"), "--teacher", str(setup["base"])], capsys)
    assert code == 2 and "not a one-label cross-encoder" in err and len(err.strip().splitlines()) == 1, err
    at = common.index("--hard-negatives")
    no_negs = common[:at] + common[at + 2:]
    code, _, err = run([*no_negs, "--out", str(tmp_path / "y"), "--teacher", str(teacher)], capsys)
    assert code == 2 and "--teacher distils over hard negatives" in err and len(err.strip().splitlines()) == 1, err
