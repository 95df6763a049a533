"""Training that proves its gain (issue 15), on a tiny random BERT (CPU): the automatic dev split, the best
checkpoint (kept across a resume), patience, the no-gain verdict and its exit status, auto lengths, inference
lengths apart from training ones, and hard negatives mined before training and per round."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

import twotower.towers.train as train_mod
from tests.conftest import PAIR_WORDS as WORDS
from twotower import cli as twotower_cli
from twotower.towers.data import DEV_MIN, split_dev
from twotower.towers.dev import read_best
from twotower.towers.inference import query_encoder, result_encoder, tower_encoder
from twotower.towers.lengths import auto_max_length
from twotower.towers.model import TwoTower
from twotower.towers.train import TrainConfig, train


@pytest.fixture
def pairs_file(tmp_path) -> Path:
    path = tmp_path / "pairs.jsonl"
    with path.open("w") as fh:
        for w in WORDS:
            fh.write(json.dumps({"query": w, "positive": f"all about the {w} {w}"}) + "\n")
    return path


def _config(pairs: Path, out: Path, base: Path, **kw) -> TrainConfig:
    defaults = dict(batch_size=8, max_steps=6, lr=1e-3, warmup_ratio=0.2, log_every=1, checkpoint_every=1,
                    keep_checkpoints=0, eval_every=1, device="cpu", query_max_length=16, result_max_length=16,
                    dev=str(pairs), eval_batch_size=32)
    return TrainConfig(pairs=str(pairs), out=str(out), base=str(base), **{**defaults, **kw})


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def _weights(model: TwoTower) -> dict[str, torch.Tensor]:
    return {f"query_tower.{k}": v for k, v in model.query_tower.state_dict().items()} | \
        {f"result_tower.{k}": v for k, v in model.result_tower.state_dict().items()}


# ---- the automatic dev split ---------------------------------------------------------------------------
def test_auto_split_shares_no_query_or_positive_with_training():
    rng = np.random.default_rng(0)
    # 3,000 rows whose queries and positives repeat (shared queries, shared positives, chains of both)
    queries = [f"q{int(i)}" for i in rng.integers(0, 1800, 3000)]
    positives = [f"p{int(i)}" for i in rng.integers(0, 2200, 3000)]
    train_rows, dev_rows = split_dev(queries, positives, seed=1)
    assert sorted(train_rows + dev_rows) == list(range(3000))
    assert 0.9 * 60 <= len(dev_rows) <= 60  # min(2% of 3,000, 1,000), whole groups only
    assert not {queries[i] for i in train_rows} & {queries[i] for i in dev_rows}
    assert not {positives[i] for i in train_rows} & {positives[i] for i in dev_rows}
    assert split_dev(queries, positives, seed=1) == (train_rows, dev_rows)  # a resume gets the same split
    assert split_dev(queries, positives, seed=2)[1] != dev_rows
    many = [f"x{i}" for i in range(100_000)]
    assert len(split_dev(many, many, seed=0)[1]) == 1000  # capped


def test_train_holds_out_the_auto_split_and_measures_base_then_towers(tiny_bert_dir, tmp_path, capsys):
    pairs = tmp_path / "many.jsonl"
    rows = [{"query": f"{a} {b} {c}", "positive": f"all about {a}, {b} and {c}"}
            for a in WORDS for b in WORDS for c in WORDS[:2]]
    rows = rows + rows[:300]  # repeated pairs: the split must keep each group on one side
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    model = train(_config(pairs, out, tiny_bert_dir, dev="auto", max_steps=2, eval_every=0, checkpoint_every=0))
    assert "dev: held out" in capsys.readouterr().err
    meta = json.loads((out / "twotower.json").read_text())
    dev_pairs = meta["dev_metrics"]["pairs"]
    assert DEV_MIN <= dev_pairs <= round(0.02 * len(rows)) and meta["dev_metrics"]["split"] == "auto"
    assert [r["step"] for r in _log(out) if "dev_ndcg@10" in r] == [0, 2]
    assert meta["dev_metrics"]["base"]["ndcg@10"] == _log(out)[0]["dev_ndcg@10"]
    assert meta["verdict"].startswith("dev nDCG@10 base ") and meta["verdict"].endswith("step 2/2)")
    assert isinstance(meta["improved"], bool) and model.train_config["improved"] == meta["improved"]
    # too few pairs for a split: trained on all of them, no verdict
    train(_config(tmp_path / "many.jsonl", tmp_path / "none", tiny_bert_dir, dev="none", max_steps=1,
                  checkpoint_every=0))
    assert "verdict" not in json.loads((tmp_path / "none" / "twotower.json").read_text())


# ---- the best checkpoint, patience, resume --------------------------------------------------------------
SCRIPT = {0: 0.50, 1: 0.60, 2: 0.90, 3: 0.70, 4: 0.65, 5: 0.95, 6: 0.95}  # dev nDCG@10 by step


@pytest.fixture
def scripted_dev(monkeypatch):
    """The real dev evaluation, with its nDCG@10 replaced by SCRIPT[step]: which checkpoint is best is then
    known in advance (a tiny random model's real scores barely move)."""
    real, calls = train_mod.dev_metrics, []

    def scripted(model, *args, **kwargs):
        metrics = real(model, *args, **kwargs)
        calls.append(1)
        return {**metrics, "ndcg@10": SCRIPT[scripted.step()]}

    monkeypatch.setattr(train_mod, "dev_metrics", scripted)
    return scripted


def test_saved_towers_are_the_best_checkpoint_and_patience_stops(pairs_file, tiny_bert_dir, tmp_path, monkeypatch,
                                                                 scripted_dev):
    steps = iter([0, 1, 2, 3, 4, 5, 6])
    scripted_dev.step = lambda: next(steps)
    out = tmp_path / "out"
    model = train(_config(pairs_file, out, tiny_bert_dir, patience=2))
    meta = json.loads((out / "twotower.json").read_text())
    assert meta["dev_metrics"]["towers"]["step"] == 2
    assert meta["train_config"]["stopped"].startswith("stopped early: 2 evaluations")
    assert meta["train_config"]["steps"] == 4  # steps 3 and 4 brought no gain
    assert meta["verdict"] == "dev nDCG@10 base 0.500 -> towers 0.900 (+0.400, step 2/6)" and meta["improved"]
    step2 = load_file(out / "checkpoints" / "step-2" / "model.safetensors")
    step4 = load_file(out / "checkpoints" / "step-4" / "model.safetensors")
    saved = _weights(TwoTower.load(out))
    for name, value in saved.items():
        assert torch.equal(value, step2[name]), name
    assert any(not torch.equal(v, step4[k]) for k, v in saved.items())  # not simply the last weights
    assert _weights(model).keys() == saved.keys()
    assert read_best(out / "checkpoints")["step"] == 2


def test_resume_keeps_the_best_so_far(pairs_file, tiny_bert_dir, tmp_path, monkeypatch, scripted_dev):
    steps = {"n": -1}

    def next_step():
        steps["n"] += 1
        return steps["n"]

    scripted_dev.step = next_step
    real_step, calls = train_mod.optimizer_step, []

    def dies_at_step_5(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        real_step(*args, **kwargs)

    monkeypatch.setattr(train_mod, "optimizer_step", dies_at_step_5)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        train(_config(pairs_file, out, tiny_bert_dir, checkpoint_every=3))
    monkeypatch.setattr(train_mod, "optimizer_step", real_step)
    assert read_best(out / "checkpoints")["step"] == 2
    steps["n"] = 3  # the resumed run (from the checkpoint of step 3) evaluates steps 4, 5, 6
    train(_config(pairs_file, out, tiny_bert_dir, checkpoint_every=3, resume=True))
    meta = json.loads((out / "twotower.json").read_text())
    assert meta["dev_metrics"]["base"]["ndcg@10"] == 0.5  # the base measured before the crash
    assert meta["dev_metrics"]["towers"]["step"] == 5  # 0.95 at step 5 beats 0.90 at step 2 (step 6 ties)
    assert [h["step"] for h in meta["dev_metrics"]["history"]] == list(range(7))


# ---- the verdict -----------------------------------------------------------------------------------------
def test_no_gain_exits_3_with_towers_saved_and_flagged(pairs_file, tiny_bert_dir, tmp_path, capsys):
    argv = ["train", "--pairs", str(pairs_file), "--dev", str(pairs_file), "--base", str(tiny_bert_dir),
            "--batch-size", "8", "--max-steps", "2", "--lr", "1e-12", "--device", "cpu", "--eval-every", "1",
            "--query-max-length", "16", "--result-max-length", "16", "--checkpoint-every", "0"]
    out = tmp_path / "out"
    assert twotower_cli.main([*argv, "--out", str(out)]) == 3  # lr 1e-12: the towers stay the base
    captured = capsys.readouterr()
    last = captured.out.strip().splitlines()[-1]
    assert last.startswith("dev nDCG@10 base ") and "(+0.000, step 1/2)" in last and "no gain" in last
    assert "too few pairs: 24 training pairs" in captured.err and "--lr 1e-12" in captured.err
    meta = json.loads((out / "twotower.json").read_text())
    assert meta["improved"] is False
    assert meta["train_config"]["improved"] is False and meta["train_config"]["no_gain_reasons"]
    TwoTower.load(out)  # saved and whole
    assert twotower_cli.main([*argv, "--out", str(tmp_path / "ok"), "--allow-no-gain"]) == 0


# ---- lengths ---------------------------------------------------------------------------------------------
def test_auto_length_is_the_95th_percentile_capped(tiny_bert_dir):
    tok = AutoTokenizer.from_pretrained(tiny_bert_dir)
    texts = [" ".join(["apple"] * n) for n in range(1, 101)]  # n words -> n + 2 tokens ([CLS] ... [SEP])
    assert [len(ids) for ids in tok(texts[:3])["input_ids"]] == [3, 4, 5]
    length, info = auto_max_length(tok, texts, cap=512)
    assert length == 98 and info["p95"] == 98 and info["longest"] == 102  # ceil(percentile(3..102, 95) = 97.05)
    assert auto_max_length(tok, texts, cap=50)[0] == 50
    assert auto_max_length(tok, texts, cap=512, prompt="query : ")[0] == 100  # the prompt counts (2 tokens)
    sampled, info = auto_max_length(tok, texts * 20, cap=512, sample=100, seed=3)
    assert info["sample"] == 100 and 60 <= sampled <= 102


def test_train_auto_lengths_are_recorded_and_printed(tiny_bert_dir, tmp_path, capsys):
    pairs = tmp_path / "p.jsonl"
    pairs.write_text("".join(json.dumps({"query": w, "positive": " ".join([w] * (i % 7 + 1))}) + "\n"
                             for i, w in enumerate(WORDS)))
    train(_config(pairs, tmp_path / "out", tiny_bert_dir, query_max_length="auto", result_max_length="auto",
                  max_steps=1, dev="none", checkpoint_every=0))
    meta = json.loads((tmp_path / "out" / "twotower.json").read_text())
    tok = AutoTokenizer.from_pretrained(tiny_bert_dir)
    counts = [len(ids) for ids in tok([json.loads(r)["positive"] for r in pairs.read_text().splitlines()])["input_ids"]]
    expected = int(np.ceil(np.percentile(counts, 95)))
    assert expected > 8 and meta["result_max_length"] == expected
    assert meta["query_max_length"] == 8  # one-word queries: a few tokens, raised to the minimum of 8
    assert meta["train_config"]["lengths_measured"]["result"]["p95"] == expected
    assert f"--result-max-length auto: {expected} tokens" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--query-max-length must be a number of tokens or auto"):
        TrainConfig(pairs="p", out="o", query_max_length="long")


def test_trained_at_16_tokens_encodes_at_64(pairs_file, tiny_bert_dir, tmp_path):
    out = tmp_path / "out"
    train(_config(pairs_file, out, tiny_bert_dir, max_steps=1, dev="none", checkpoint_every=0,
                  inference_query_max_length=64, inference_result_max_length=64))
    model = TwoTower.load(out)
    meta = json.loads((out / "twotower.json").read_text())
    assert (meta["query_max_length"], meta["result_max_length"]) == (16, 16)
    assert (meta["inference_query_max_length"], meta["inference_result_max_length"]) == (64, 64)
    assert json.loads((out / "result_tower" / "sentence_bert_config.json").read_text())["max_seq_length"] == 64
    long_text = " ".join(WORDS * 2)  # 48 words: cut at 16 tokens in training, whole at 64
    enc = result_encoder(model, "cpu")
    assert enc.max_length == 64 and query_encoder(model, "cpu").max_length == 64
    tower = model.result_tower
    at64, at16 = (tower.encode([long_text], max_length=n) for n in (64, 16))
    assert np.allclose(enc.encode([long_text]), at64, atol=1e-6) and not np.allclose(at64, at16, atol=1e-3)
    assert tower_encoder(model, "result", "cpu", max_length=16).encode([long_text]) == pytest.approx(at16, abs=1e-6)
    # unset: the base's max (the tiny BERT: 512 positions)
    train(_config(pairs_file, tmp_path / "dflt", tiny_bert_dir, max_steps=1, dev="none", checkpoint_every=0))
    assert TwoTower.load(tmp_path / "dflt").inference_max_length("result") == 512


# ---- hard negatives ----------------------------------------------------------------------------------------
def test_hard_negatives_are_mined_per_round_and_recorded(pairs_file, tiny_bert_dir, tmp_path):
    out = tmp_path / "out"
    train(_config(pairs_file, out, tiny_bert_dir, max_steps=2, eval_every=0, hard_negatives=2,
                  hard_negatives_rounds=2, checkpoint_every=2))
    meta = json.loads((out / "twotower.json").read_text())
    mined = meta["train_config"]["hard_negatives_mined"]
    assert [(m["round"], m["step"], m["num_negatives"], m["queries"]) for m in mined] == [(1, 0, 2, 24), (2, 2, 2, 24)]
    assert meta["train_config"]["steps"] == 4  # two rounds of --max-steps 2
    saved = json.loads((out / "checkpoints" / "mined-round-1.json").read_text())
    for row, negs in zip(map(json.loads, pairs_file.read_text().splitlines()), saved["negatives"]):
        assert len(negs) <= 2 and row["positive"] not in negs  # a pair's own positive is never its negative
    with pytest.raises(ValueError, match="--hard-negatives-rounds needs --hard-negatives"):
        TrainConfig(pairs="p", out="o", hard_negatives_rounds=2)


def test_index_search_and_bench_use_the_inference_length_or_the_override(pairs_file, tiny_bert_dir, tmp_path):
    from twotower.eval.config import BenchConfig
    from twotower.eval.systems import TowersSystem, parse_systems
    from twotower.retrieval.retriever import Retriever

    towers = tmp_path / "towers"
    train(_config(pairs_file, towers, tiny_bert_dir, max_steps=1, dev="none", checkpoint_every=0,
                  inference_query_max_length=48, inference_result_max_length=64))
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"_id": w, "text": f"all about the {w} " * 10}) + "\n" for w in WORDS))
    for name, extra in (("idx", []), ("idx20", ["--result-max-length", "20"])):
        assert twotower_cli.main(["index", "build", "--towers", str(towers), "--corpus", str(corpus), "--out",
                                  str(tmp_path / name), "--device", "cpu", "--no-progress", *extra]) == 0
    built = json.loads((tmp_path / "idx" / "manifest.json").read_text())["build_config"]
    assert built["result_max_length"] is None  # the recorded 64 applied: the vectors differ from the 20-token build
    a, b = (Retriever.load(tmp_path / n, device="cpu") for n in ("idx", "idx20"))
    assert a.encoder.tower.max_length == 48
    assert Retriever.load(tmp_path / "idx", device="cpu", query_max_length=8).encoder.tower.max_length == 8
    xa, xb = (r.index.cpu_index.reconstruct_n(0, 3) for r in (a, b))
    assert not np.allclose(xa, xb, atol=1e-4)
    (spec,) = parse_systems(f"towers:t={towers}")
    system = TowersSystem(spec, "cpu")
    assert system.config()["t"]["result_max_length"] == 64 and system._encoder("query").max_length == 48
    over = TowersSystem(spec, "cpu", max_lengths=(None, 20))
    assert over._encoder("result").max_length == 20 and over.config()["t"]["train_result_max_length"] == 16
    with pytest.raises(ValueError, match="--towers-result-max-length must be >= 1"):
        BenchConfig(suite="s", towers_result_max_length=0)
