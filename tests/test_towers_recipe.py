"""A decoder base gets the demo's recipe by default (lr, precision, pooling/EOS, instruction); the user's values win;
one precision rule serves train and index; the recipe in force is printed and recorded in twotower.json."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import WORDS
from twotower.common import device as device_mod
from twotower.common.device import autocast_dtype
from twotower.towers.config import TrainConfig
from twotower.towers.recipe import DECODER, ENCODER, GENERIC_QUERY_PROMPT, resolve_recipe


@pytest.fixture
def pairs_file(tmp_path) -> Path:
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({"query": w, "positive": f"all about the {w} number {i}"}) + "\n"
                            for i, w in enumerate(WORDS)))
    return path


def _cfg(pairs: Path, base: Path, out: Path, **kw) -> TrainConfig:
    return TrainConfig(pairs=str(pairs), out=str(out), base=str(base), device="cpu", **kw)


@pytest.mark.parametrize("native", [True, False])
def test_one_precision_rule(monkeypatch, native: bool) -> None:
    monkeypatch.setattr(device_mod, "cpu_has_bf16", lambda: native)
    assert autocast_dtype("auto", "cpu", decoder=True) == (torch.bfloat16 if native else None)
    assert autocast_dtype("auto", "cpu", decoder=False) is None  # small encoders keep float32 on a CPU
    assert autocast_dtype("none", "cpu", decoder=True) is None and autocast_dtype("bf16", "cpu") == torch.bfloat16


@pytest.mark.parametrize("native", [True, False])
def test_decoder_base_gets_the_demo_recipe(pairs_file, tiny_llama_lm_dir, tmp_path, monkeypatch, native) -> None:
    monkeypatch.setattr(device_mod, "cpu_has_bf16", lambda: native)
    config, rec = resolve_recipe(_cfg(pairs_file, tiny_llama_lm_dir, tmp_path / "t"), tiny_llama_lm_dir, "cpu")
    assert (config.lr, config.query_prompt) == (DECODER.lr, GENERIC_QUERY_PROMPT) == (1e-4, GENERIC_QUERY_PROMPT)
    assert rec["recipe"] == "decoder-llm" and rec["lr"]["from"] == "recipe" and rec["query_prompt"]["from"] == "recipe"
    assert rec["precision"]["value"] == ("bf16" if native else "fp32")
    assert (rec["pooling"]["value"], rec["append_eos"]["value"]) == ("last", True)


def test_encoder_base_keeps_the_encoder_recipe(pairs_file, tiny_bert_dir, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(device_mod, "cpu_has_bf16", lambda: True)
    config, rec = resolve_recipe(_cfg(pairs_file, tiny_bert_dir, tmp_path / "t"), tiny_bert_dir, "cpu")
    assert (config.lr, config.query_prompt, rec["recipe"]) == (ENCODER.lr, "", "encoder") == (2e-5, "", "encoder")
    assert (rec["precision"]["value"], rec["pooling"]["value"], rec["append_eos"]["value"]) == ("fp32", "mean", False)


def test_user_values_override_the_recipe(pairs_file, tiny_llama_lm_dir, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(device_mod, "cpu_has_bf16", lambda: True)
    cfg = _cfg(pairs_file, tiny_llama_lm_dir, tmp_path / "t", lr=3e-4, query_prompt="", amp="none", pooling="mean")
    config, rec = resolve_recipe(cfg, tiny_llama_lm_dir, "cpu")
    assert (config.lr, config.query_prompt) == (3e-4, "")
    assert {k: rec[k]["from"] for k in ("lr", "query_prompt", "precision", "pooling")} == dict.fromkeys(
        ("lr", "query_prompt", "precision", "pooling"), "user")
    assert (rec["precision"]["value"], rec["append_eos"]["value"]) == ("fp32", False)


def test_unset_recipe_fields_do_not_block_resume(pairs_file, tiny_llama_lm_dir, tmp_path) -> None:
    saved = {**_cfg(pairs_file, tiny_llama_lm_dir, tmp_path / "t", lr=1e-4, query_prompt="x").to_dict()}
    assert _cfg(pairs_file, tiny_llama_lm_dir, tmp_path / "t").resume_mismatches(saved) == []
    assert _cfg(pairs_file, tiny_llama_lm_dir, tmp_path / "t", lr=2e-4).resume_mismatches(saved) == [
        "lr: checkpoint has 0.0001, this run has 0.0002"]
    with pytest.raises(ValueError, match="--lr must be > 0, got 0"):
        _cfg(pairs_file, tiny_llama_lm_dir, tmp_path / "t", lr=0.0)


def test_train_prints_and_records_the_recipe_and_index_follows_the_rule(
        pairs_file, tiny_llama_lm_dir, tmp_path, monkeypatch, capsys) -> None:
    from twotower.towers.inference import result_encoder
    from twotower.towers.model import TwoTower
    from twotower.towers.train import train

    monkeypatch.setattr(device_mod, "cpu_has_bf16", lambda: True)
    out = tmp_path / "towers"
    train(_cfg(pairs_file, tiny_llama_lm_dir, out, batch_size=8, max_steps=2, log_every=1, checkpoint_every=0,
               eval_every=0, dev="none", query_max_length=32, result_max_length=24))
    err = capsys.readouterr().err
    assert "twotower train: recipe decoder-llm for base" in err and "lr 0.0001 (recipe), precision bf16 (auto" in err
    meta = json.loads((out / "twotower.json").read_text())
    rec = meta["train_config"]["recipe"]
    assert rec["recipe"] == "decoder-llm" and rec["precision"]["value"] == "bf16"
    assert meta["train_config"]["lr"] == 1e-4 and meta["query_prompt"] == GENERIC_QUERY_PROMPT
    assert (meta["pooling"], meta["append_eos"]) == ("last", True)
    assert result_encoder(TwoTower.load(out), "cpu").amp_dtype == torch.bfloat16  # index: the same rule
