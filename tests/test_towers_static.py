"""A static query tower (``train --query-tower static``): training frozen and joint, save/load through twotower
and sentence-transformers, index build + search with it, refusals in one line.

The base is a tiny random BERT with a WordPiece vocabulary of a few hundred tokens trained in code, so the
model2vec distillation (one forward pass per vocabulary token) takes a moment, not the MiniLM vocab's 30k.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import PAIR_WORDS as WORDS
from twotower import cli as twotower_cli
from twotower.towers.model import TwoTower
from twotower.towers.static import StaticTower
from twotower.towers.train import TrainConfig, train

KW = dict(batch_size=8, max_steps=4, lr=1e-3, static_lr=5e-2, device="cpu", query_max_length=16,
          result_max_length=16, dev="none", checkpoint_every=0)


def _wordpiece_bert(path: Path) -> Path:
    """A 2-layer, 32-wide random BERT whose tokenizer is a WordPiece vocabulary trained on the pair words."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok.train_from_iterator([" ".join(WORDS), "all about the nothing on"],
                            trainers.WordPieceTrainer(vocab_size=300, special_tokens=specials))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
                                                       special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64)).save_pretrained(path)
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                            sep_token="[SEP]", mask_token="[MASK]").save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    """The base, its pairs, towers trained jointly (static query + transformer result) and a static query
    tower trained against the joint run's result tower, frozen."""
    root = tmp_path_factory.mktemp("static")
    pairs = root / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"query": w, "positive": f"all about the {w} {w}"}) + "\n" for w in WORDS))
    base = _wordpiece_bert(root / "base")
    train(TrainConfig(pairs=str(pairs), out=str(root / "joint"), base=str(base), query_tower="static", **KW))
    train(TrainConfig(pairs=str(pairs), out=str(root / "frozen"), base=str(base), query_tower="static",
                      result_tower_from=str(root / "joint"), **KW))
    return {"root": root, "pairs": pairs, "base": base, "joint": root / "joint", "frozen": root / "frozen"}


def _result_weights(model: TwoTower) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.result_tower.state_dict().items()}


def test_joint_training_moves_both_towers_and_records_kinds(built):
    from twotower.towers.model import Tower
    from twotower.towers.static import distill

    model = TwoTower.load(built["joint"])
    assert isinstance(model.query_tower, StaticTower) and model.query_tower.dim == model.result_tower.dim == 32
    assert json.loads((built["joint"] / "twotower.json").read_text())["tower_kinds"] == \
        {"query": "static", "result": "transformer"}
    start = distill(built["base"], 32)  # the untrained pair: distilled table, base result tower
    base = Tower.from_base(built["base"], max_length=16)
    assert not torch.allclose(start.embedding.weight, model.query_tower.embedding.weight)
    trained = _result_weights(model)
    assert any(not torch.allclose(v, trained[k]) for k, v in base.state_dict().items())


def test_frozen_training_keeps_the_result_tower_and_its_fingerprint(built):
    joint, frozen = TwoTower.load(built["joint"]), TwoTower.load(built["frozen"])
    assert frozen.fingerprint() == joint.fingerprint()  # an index built with the joint towers stays valid
    for k, v in _result_weights(joint).items():
        assert torch.equal(v, frozen.result_tower.state_dict()[k])
    assert not torch.allclose(joint.query_tower.embedding.weight, frozen.query_tower.embedding.weight)
    meta = json.loads((built["frozen"] / "twotower.json").read_text())
    assert meta["tower_kinds"]["query"] == "static" and meta["train_config"]["result_tower_from"] == str(built["joint"])


def test_save_load_roundtrip_through_twotower_and_sentence_transformers(built, tmp_path):
    from sentence_transformers import SentenceTransformer

    model = TwoTower.load(built["frozen"])
    texts = ["apple", "kiwi and mango", "", "a word the vocabulary never saw: zzzq"]
    q = model.encode_queries(texts)
    assert q.shape == (4, 32) and q.dtype == np.float32
    assert np.allclose(np.linalg.norm(q[[0, 1, 3]], axis=1), 1, atol=1e-5) and not q[2].any()  # no token: zero
    # batch-1 and batch-64 paths agree, and the padded training forward gives the same vectors
    assert np.allclose(np.concatenate([model.encode_queries([t], batch_size=1) for t in texts]), q, atol=1e-6)
    with torch.no_grad():
        padded = model.query_tower(**model.query_tower.tokenize(texts)).numpy()
    assert np.allclose(padded, q, atol=1e-6)
    model.save(tmp_path / "again")
    again = TwoTower.load(tmp_path / "again")
    assert np.allclose(again.encode_queries(texts), q) and again.fingerprint() == model.fingerprint()
    st = SentenceTransformer(str(built["frozen"]), device="cpu")  # the Router: static route + transformer route
    assert np.allclose(st.encode_query(texts), q, atol=1e-6)
    docs = ["all about the kiwi kiwi", "all about the fig fig"]
    assert np.allclose(st.encode_document(docs), model.encode_results(docs), atol=1e-5)
    alone = SentenceTransformer(str(built["frozen"] / "query_tower"), device="cpu")  # the tower dir alone
    assert np.allclose(alone.encode(texts), q, atol=1e-6)
    long = " ".join(WORDS * 4)  # cut at the same token in both libraries
    assert np.allclose(st.encode_query([long]), model.encode_queries([long]), atol=1e-6)


def test_index_build_and_search_with_a_static_query_tower(built, tmp_path, capsys):
    corpus = tmp_path / "corpus.jsonl"
    docs = [{"_id": f"d-{w}", "title": "", "text": f"all about the {w} {w}"} for w in WORDS]
    corpus.write_text("".join(json.dumps(d) + "\n" for d in docs))
    index = tmp_path / "index"
    assert twotower_cli.main(["index", "build", "--towers", str(built["frozen"]), "--corpus", str(corpus),
                              "--out", str(index), "--device", "cpu"]) == 0
    capsys.readouterr()
    queries = list(WORDS[:5])
    assert twotower_cli.main(["search", "--index", str(index), *queries, "-k", "3", "--json", "--device", "cpu"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    model = TwoTower.load(built["frozen"])
    scores = model.encode_queries(queries) @ model.encode_results([d["text"] for d in docs]).T  # exact reference
    for rec, row in zip(records, scores):
        assert [h["id"] for h in rec["hits"]] == [docs[i]["_id"] for i in np.argsort(-row, kind="stable")[:3]]
        assert rec["hits"][0]["score"] == pytest.approx(float(row.max()), abs=1e-4)


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_dim_mismatch_is_refused_in_one_line(built, tmp_path, capsys):
    # towers with a projection: their result tower (16 dims) is not the width of their query encoder (32)
    projected = tmp_path / "projected"
    TwoTower.from_base(str(built["base"]), proj_dim=16).save(projected)
    capsys.readouterr()
    rc = twotower_cli.main(["train", "--pairs", str(built["pairs"]), "--out", str(tmp_path / "x"), "--query-tower",
                            "static", "--result-tower-from", str(projected), "--device", "cpu", "--dev", "none",
                            "--batch-size", "8"])
    assert rc == 2 and "has 16 dims but its query tower's encoder 32" in _one_line(capsys)
    assert not (tmp_path / "x").exists()
    # a TOWERS dir whose static query tower is not the result tower's width
    broken = tmp_path / "broken"
    model = TwoTower.load(built["frozen"])
    model.save(broken)
    StaticTower(torch.randn(model.query_tower.embedding.num_embeddings, 8), model.query_tower.tokenizer
                ).save(broken / "query_tower")
    with pytest.raises(ValueError, match="query tower has 8 dims but the result tower has 32"):
        TwoTower.load(broken)


@pytest.mark.parametrize("extra, message", [
    (["--shared"], "cannot be combined with --shared"),
    (["--proj-dim", "16"], "cannot be combined with --proj-dim"),
    (["--lora-r", "4"], "cannot be combined with --lora-r"),
    (["--static-lr", "0"], "--static-lr must be > 0"),
])
def test_static_option_conflicts_are_one_line(built, tmp_path, capsys, extra, message):
    rc = twotower_cli.main(["train", "--pairs", str(built["pairs"]), "--out", str(tmp_path / "x"), "--query-tower",
                            "static", *extra])
    assert rc == 2 and message in _one_line(capsys)


def test_result_tower_from_needs_a_static_query_tower(built, tmp_path, capsys):
    rc = twotower_cli.main(["train", "--pairs", str(built["pairs"]), "--out", str(tmp_path / "x"),
                            "--result-tower-from", str(built["joint"])])
    assert rc == 2 and "--result-tower-from needs --query-tower static" in _one_line(capsys)


def test_mine_and_bench_take_a_static_query_tower(built, tmp_path, capsys):
    from twotower.eval.systems import TowersSystem, parse_systems

    out = tmp_path / "mined.jsonl"
    assert twotower_cli.main(["mine", "--towers", str(built["frozen"]), "--pairs", str(built["pairs"]), "--out",
                              str(out), "--num-negatives", "2", "--device", "cpu"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == len(WORDS) and all(r["positive"] not in r["negatives"] for r in rows)
    system = TowersSystem(parse_systems(f"towers:towers-static-query={built['frozen']}")[0], "cpu")
    assert system.config()["towers-static-query"]["tower_kinds"] == {"query": "static", "result": "transformer"}
    model = TwoTower.load(built["frozen"])
    assert np.allclose(system.encode_queries(["kiwi"], 8, False)["towers-static-query"], model.encode_queries(["kiwi"]))
