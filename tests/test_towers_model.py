from __future__ import annotations

import numpy as np
import pytest
import torch

from twotower.towers.model import Tower, TwoTower
from twotower.towers.pooling import pool

TEXTS = ["how do I sort a list", "def f(x):\n    return sorted(x)", "a", "a much longer piece of text " * 5]


def test_separate_towers_have_separate_weights(tiny_bert_dir):
    model = TwoTower.from_base(str(tiny_bert_dir))
    assert not model.shared
    q = dict(model.query_tower.named_parameters())
    r = dict(model.result_tower.named_parameters())
    assert q.keys() == r.keys()
    for name in q:
        assert q[name].data_ptr() != r[name].data_ptr(), name
    # a change to one tower leaves the other as it was
    with torch.no_grad():
        next(model.query_tower.parameters()).add_(1.0)
    assert not np.allclose(model.encode_queries(TEXTS), model.encode_results(TEXTS))


def test_shared_flag_ties_weights(tiny_bert_dir, tmp_path):
    model = TwoTower.from_base(str(tiny_bert_dir), shared=True)
    assert model.shared and model.query_tower is model.result_tower
    with torch.no_grad():
        next(model.query_tower.parameters()).add_(1.0)
    np.testing.assert_allclose(model.encode_queries(TEXTS[:2]), model.encode_results(TEXTS[:2]), atol=1e-6)
    model.save(tmp_path / "t")
    again = TwoTower.load(tmp_path / "t")
    assert again.shared and again.query_tower is again.result_tower


@pytest.mark.parametrize("pooling,proj", [("mean", None), ("cls", 16), ("max", None)])
def test_save_reload_allclose_transformers_and_sentence_transformers(tiny_bert_dir, tmp_path, pooling, proj):
    model = TwoTower.from_base(str(tiny_bert_dir), pooling=pooling, proj_dim=proj)
    with torch.no_grad():  # make the towers differ so a swapped save would show
        for p in model.result_tower.parameters():
            p.add_(0.01 * torch.randn_like(p))
    before_q, before_r = model.encode_queries(TEXTS), model.encode_results(TEXTS)
    model.save(tmp_path / "towers")
    again = TwoTower.load(tmp_path / "towers")
    np.testing.assert_allclose(again.encode_queries(TEXTS), before_q, atol=1e-5)
    np.testing.assert_allclose(again.encode_results(TEXTS), before_r, atol=1e-5)
    assert again.fingerprint() == model.fingerprint()

    from transformers import AutoModel, AutoTokenizer

    hf = AutoModel.from_pretrained(tmp_path / "towers" / "result_tower").eval()
    tok = AutoTokenizer.from_pretrained(tmp_path / "towers" / "result_tower")
    batch = tok(TEXTS, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.no_grad():
        emb = pool(hf(**batch).last_hidden_state, batch["attention_mask"], pooling)
        if proj:
            emb = model.result_tower.proj(emb)
        emb = torch.nn.functional.normalize(emb, dim=-1).numpy()
    np.testing.assert_allclose(emb, before_r, atol=1e-5)

    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(tmp_path / "towers" / "result_tower"), device="cpu")
    np.testing.assert_allclose(st.encode(TEXTS, convert_to_numpy=True), before_r, atol=1e-5)


def test_last_token_pooling_left_and_right_padding():
    hidden = torch.arange(2 * 4 * 1, dtype=torch.float32).reshape(2, 4, 1)
    right = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    left = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    assert pool(hidden, right, "last").flatten().tolist() == [1.0, 7.0]
    assert pool(hidden, left, "last").flatten().tolist() == [3.0, 7.0]


def test_decoder_base_defaults_to_last_token(tiny_llama_dir, tmp_path):
    model = TwoTower.from_base(str(tiny_llama_dir))
    assert model.query_tower.pooling == "last"
    out = model.encode_results(TEXTS)
    assert out.shape == (4, 32) and out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    model.save(tmp_path / "t")
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(tmp_path / "t" / "result_tower"), device="cpu")
    np.testing.assert_allclose(st.encode(TEXTS), out, atol=1e-5)


def test_encode_keeps_input_order(tiny_bert_dir):
    tower = Tower.from_base(tiny_bert_dir)
    batched = tower.encode(TEXTS, batch_size=2)
    single = np.concatenate([tower.encode([t]) for t in TEXTS])
    np.testing.assert_allclose(batched, single, atol=1e-5)


@pytest.mark.parametrize("bad,match", [("avg", "unknown pooling 'avg': choose mean, cls, last, max")])
def test_unknown_pooling(tiny_bert_dir, bad, match):
    with pytest.raises(ValueError, match=match):
        TwoTower.from_base(str(tiny_bert_dir), pooling=bad)


def test_unknown_base_name():
    with pytest.raises(ValueError, match="unknown base model 'bert-huge': choose minilm, smollm2, gemma3"):
        TwoTower.from_base("bert-huge")


def test_towers_dir_missing_files(tiny_bert_dir, tmp_path):
    TwoTower.from_base(str(tiny_bert_dir)).save(tmp_path / "t")
    (tmp_path / "t" / "result_tower" / "modules.json").unlink()
    with pytest.raises(FileNotFoundError, match="missing modules.json"):
        TwoTower.load(tmp_path / "t")
