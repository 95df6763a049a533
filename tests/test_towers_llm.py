"""Decoder-LLM towers (tiny random Llama / GPT-2 with a byte-level BPE tokenizer): EOS + last-token pooling under
either padding side, instruction prompts from twotower.json to every encoder, and the TOWERS dir as one
sentence-transformers model (a Router) whose vectors are twotower's."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from twotower.towers.inference import query_encoder, result_encoder
from twotower.towers.llm import append_eos, appends_eos
from twotower.towers.model import Tower, TwoTower

TEXTS = ["how do I sort a list", "def f(x):\n    return sorted(x)", "a", "all about the document number " * 4]
QP, RP = "Instruct: Given a docstring, retrieve the Python function\nQuery: ", "Passage: "


def _perturb(model: TwoTower) -> None:
    """Make the towers differ (random init is the same for both), so a swapped side would show."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.result_tower.parameters():
            p.add_(0.05 * torch.randn_like(p))


def test_append_eos_survives_truncation_and_save(tiny_lm_dir, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_lm_dir)
    assert not appends_eos(tok) and tok.pad_token is None
    assert append_eos(tok) and appends_eos(tok)
    ids = tok(TEXTS[-1], truncation=True, max_length=5)["input_ids"]
    assert len(ids) == 5 and ids[-1] == tok.eos_token_id  # the budget counts the EOS: it is never cut off
    tok.save_pretrained(tmp_path / "tok")
    assert appends_eos(AutoTokenizer.from_pretrained(tmp_path / "tok"))


def test_eos_last_token_vectors_equal_under_left_and_right_padding(tiny_lm_dir):
    model = TwoTower.from_base(str(tiny_lm_dir), query_max_length=32)
    tower = model.query_tower
    assert tower.pooling == "last" and appends_eos(tower.tokenizer)
    tower.eval()
    out = {}
    with torch.no_grad():
        for side in ("left", "right"):
            tower.tokenizer.padding_side = side
            batch = tower.tokenize(TEXTS)
            rows = batch["attention_mask"].sum(1)
            assert rows.min() < batch["attention_mask"].shape[1], "the batch must be padded"
            eos_col = 0 if side == "right" else -1
            last = batch["input_ids"][torch.arange(len(TEXTS)), rows - 1] if side == "right" \
                else batch["input_ids"][:, eos_col]
            assert (last == tower.tokenizer.eos_token_id).all()  # the pooled token is each text's EOS
            out[side] = tower(**batch).numpy()
    np.testing.assert_allclose(out["left"], out["right"], atol=1e-5)
    alone = np.concatenate([tower.encode([t]) for t in TEXTS])  # no padding at all
    np.testing.assert_allclose(out["right"], alone, atol=1e-5)
    np.testing.assert_allclose(model.encode_queries(TEXTS), alone, atol=1e-5)


@pytest.mark.parametrize("shared", [False, True])
def test_prompts_round_trip_through_twotower_json_and_sentence_transformers(tiny_lm_dir, tmp_path, shared):
    model = TwoTower.from_base(str(tiny_lm_dir), shared=shared, query_max_length=48, result_max_length=48,
                               query_prompt=QP, result_prompt=RP)
    if not shared:
        _perturb(model)
    q, r = model.encode_queries(TEXTS), model.encode_results(TEXTS)
    # The prompt is in the vectors: what the tower gives equals the plain tower on prompted text.
    plain = Tower(model.query_tower.encoder, model.query_tower.tokenizer, "last", 48)
    np.testing.assert_allclose(q, plain.encode([QP + t for t in TEXTS]), atol=1e-5)
    assert not np.allclose(q, plain.encode(TEXTS), atol=1e-3)

    model.save(tmp_path / "towers")
    meta = json.loads((tmp_path / "towers" / "twotower.json").read_text())
    assert (meta["query_prompt"], meta["result_prompt"], meta["append_eos"]) == (QP, RP, True)
    again = TwoTower.load(tmp_path / "towers")
    assert again.prompts == {"query": QP, "result": RP}
    # float32 here: "auto" is bf16 for a decoder tower on a CPU with native bf16 (common.device.autocast_dtype)
    np.testing.assert_allclose(query_encoder(again, "cpu", "fp32").encode(TEXTS), q, atol=1e-5)
    np.testing.assert_allclose(result_encoder(again, "cpu", "fp32").encode(TEXTS), r, atol=1e-5)
    auto = query_encoder(again, "cpu").encode(TEXTS)  # whatever auto picks here, it is the same vectors to ~1e-2
    assert np.min(np.sum(auto * q, axis=1)) > 0.99
    assert Tower.load(tmp_path / "towers" / "query_tower").prompt == QP  # what search/serve load

    from sentence_transformers import SentenceTransformer

    st_q = SentenceTransformer(str(tmp_path / "towers" / "query_tower"), device="cpu")
    assert st_q.prompts == {"query": QP, "document": RP}
    np.testing.assert_allclose(st_q.encode(TEXTS), q, atol=1e-5)  # its default prompt is the query prompt
    st_r = SentenceTransformer(str(tmp_path / "towers" / "result_tower"), device="cpu")
    np.testing.assert_allclose(st_r.encode(TEXTS, prompt_name="document"), r, atol=1e-5)
    np.testing.assert_allclose(st_r.encode(TEXTS), r, atol=1e-5)


@pytest.mark.parametrize("base", ["bert", "llama-lm"])
def test_towers_dir_is_one_sentence_transformer_with_a_router(_tiny_models, tmp_path, base):
    from sentence_transformers import SentenceTransformer

    prompts = {"query_prompt": QP, "result_prompt": RP} if base != "bert" else {}
    model = TwoTower.from_base(str(_tiny_models[base]), query_max_length=40, result_max_length=64, proj_dim=16,
                               **prompts)
    _perturb(model)
    model.save(tmp_path / "towers")
    st = SentenceTransformer(str(tmp_path / "towers"), device="cpu")
    np.testing.assert_allclose(st.encode_query(TEXTS), model.encode_queries(TEXTS), atol=1e-5)
    np.testing.assert_allclose(st.encode_document(TEXTS), model.encode_results(TEXTS), atol=1e-5)
    assert st.get_embedding_dimension() == 16
