"""The demo's step caching: trained towers are reused, changed settings retrain, an unfinished run resumes."""
from __future__ import annotations

import dataclasses
import json

import pytest

from twotower.eval.demo import PROFILES, _dev_subset, _train_towers


@pytest.fixture
def train_cfg(tiny_bert_dir, tmp_path):
    from twotower.towers.train import TrainConfig

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"query": f"query {i}", "positive": f"document number {i}"}) + "\n"
                             for i in range(16)))
    return TrainConfig(pairs=str(pairs), out=str(tmp_path / "towers"), base=str(tiny_bert_dir), max_steps=2,
                       batch_size=4, query_max_length=8, result_max_length=16, eval_every=0, checkpoint_every=1,
                       device="cpu")


def test_train_step_is_cached_retrained_or_resumed(train_cfg, tmp_path, capsys) -> None:
    out = tmp_path / "towers"
    assert _train_towers(train_cfg, out) == "trained"
    fingerprint = json.loads((out / "twotower.json").read_text())["fingerprint"]
    assert _train_towers(train_cfg, out) == "cached"
    changed = dataclasses.replace(train_cfg, lr=1e-3)
    assert _train_towers(changed, out) == "trained"
    assert "settings changed" in capsys.readouterr().err
    assert json.loads((out / "twotower.json").read_text())["train_config"]["lr"] == 1e-3
    (out / "twotower.json").unlink()  # a run killed before publishing: checkpoints remain
    assert _train_towers(changed, out) == "resumed"
    assert (out / "twotower.json").exists()
    assert json.loads((out / "twotower.json").read_text())["fingerprint"] != fingerprint


def test_dev_subset_and_profiles(tmp_path) -> None:
    dev = tmp_path / "dev.jsonl"
    dev.write_text("".join(f'{{"query": "q{i}", "positive": "p{i}"}}\n' for i in range(10)))
    sub = _dev_subset(dev, 3, tmp_path / "dev-3.jsonl")
    assert sub.read_text().count("\n") == 3
    assert _dev_subset(dev, None, tmp_path / "unused.jsonl") == dev
    small = PROFILES["cpu-small"]
    assert small.max_queries and small.max_corpus and small.doc_max_length <= PROFILES["full"].doc_max_length


def test_llm_towers_config_uses_the_same_pairs_with_the_llm_settings(tmp_path, monkeypatch) -> None:
    from twotower.eval.config import LLM_QUERY_PROMPTS, DemoConfig
    from twotower.eval.demo import _llm_train_config

    prof = PROFILES["cpu-small"]
    for precision, amp in (("fp32", "none"), ("bf16", "bf16")):
        cfg = _llm_train_config(DemoConfig(suite="codesearch-py", llm_precision=precision), prof, tmp_path / "suite",
                                tmp_path / "out", "cpu")
        assert (cfg.base, cfg.amp, cfg.max_steps, cfg.lr) == ("smollm2", amp, prof.llm_max_steps, prof.llm_lr)
        assert cfg.pairs == str(tmp_path / "suite" / "train.jsonl") and cfg.result_max_length == prof.doc_max_length
        assert cfg.query_prompt == LLM_QUERY_PROMPTS["codesearch-py"] and cfg.query_prompt.endswith("\nQuery: ")
    steps = _llm_train_config(DemoConfig(suite="nq", llm_max_steps=7), prof, tmp_path, tmp_path, "cpu")
    assert steps.max_steps == 7 and "question" in steps.query_prompt
