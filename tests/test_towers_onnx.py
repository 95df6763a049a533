"""ONNX Runtime copies of a tower: the same float32 embeddings as torch, through every path that encodes."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")

from tests.conftest import QUERIES, build_tiny_index  # noqa: E402
from twotower.towers.model import Tower  # noqa: E402
from twotower.towers.onnx import onnx_copy  # noqa: E402

TEXTS = ["a", "sort a list of numbers in place and return it", "open a json file " * 12, "x y", "graph tree path"]


@pytest.mark.parametrize("pooling,proj_dim", [("mean", None), ("cls", None), ("max", 16)])
def test_onnx_copy_encodes_like_torch(tiny_bert_dir, tmp_path, pooling, proj_dim) -> None:
    torch.manual_seed(0)
    tower = Tower.from_base(tiny_bert_dir, pooling=pooling, max_length=32, proj_dim=proj_dim).eval()
    fast = onnx_copy(tower, tmp_path / "enc.onnx", threads=1)
    assert (tmp_path / "enc.onnx").is_file() and not (tmp_path / "enc.onnx.tmp").exists()
    assert type(fast.encoder).__name__ == "OnnxEncoder" and fast.dim == tower.dim
    assert fast.fingerprint() == tower.fingerprint()  # same vector space: indexes and queries may mix them
    ref = tower.encode(TEXTS, batch_size=2)
    out = fast.encode(TEXTS, batch_size=2)  # several batches of different widths: dynamic axes
    assert out.dtype == np.float32 and out.shape == ref.shape
    np.testing.assert_allclose(out, ref, atol=2e-5)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    # the copy is independent: the torch tower keeps its weights and results
    np.testing.assert_array_equal(tower.encode(TEXTS, batch_size=2), ref)


def test_onnx_copy_refuses_left_padding_and_embeddings_input(tiny_llama_dir, tiny_bert_dir, tmp_path) -> None:
    llm = Tower.from_base(tiny_llama_dir, pooling="last", max_length=16)
    llm.tokenizer.padding_side = "left"
    with pytest.raises(ValueError, match="right-padding"):
        onnx_copy(llm, tmp_path / "llm.onnx")
    fast = onnx_copy(Tower.from_base(tiny_bert_dir, max_length=16), tmp_path / "b.onnx")
    ids = torch.ones((1, 4), dtype=torch.long)
    with pytest.raises(ValueError, match="input_ids and attention_mask"):
        fast.encoder(input_ids=None, attention_mask=ids, inputs_embeds=torch.zeros(1, 4, 8))


def test_missing_onnxruntime_is_a_clear_error(tiny_bert_dir, tmp_path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as if not installed
    tower = Tower.from_base(tiny_bert_dir, max_length=16)
    with pytest.raises(ImportError, match=r"pip install 'twotower\[onnx\]'"):
        onnx_copy(tower, tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()


def test_retriever_with_onnx_precision_matches_fp32(_tiny_models, tmp_path_factory) -> None:
    from twotower.retrieval.retriever import Retriever

    _, index_dir = build_tiny_index(tmp_path_factory.mktemp("onnx"), _tiny_models["bert"])
    exact = Retriever.load(index_dir, device="cpu")
    fast = Retriever.load(index_dir, device="auto", precision="onnx")
    assert type(fast.tower.encoder).__name__ == "OnnxEncoder" and fast.info()["precision"] == "onnx"
    np.testing.assert_allclose(fast.encode(QUERIES), exact.encode(QUERIES), atol=2e-5)
    # tiny random towers give near-tied scores, so ranks may swap within 1e-5: compare scores per rank
    for got, want in zip(fast.search(QUERIES, k=5), exact.search(QUERIES, k=5)):
        np.testing.assert_allclose([h.score for h in got], [h.score for h in want], atol=5e-5)


def test_onnx_precision_on_a_gpu_device_is_refused(_tiny_models, tmp_path_factory) -> None:
    from twotower.retrieval.retriever import Retriever

    _, index_dir = build_tiny_index(tmp_path_factory.mktemp("onnx-gpu"), _tiny_models["bert"])
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="torch sees no CUDA GPU|CUDA"):
            Retriever.load(Path(index_dir), device="cuda", precision="onnx")
    else:
        with pytest.raises(ValueError, match="precision 'onnx' runs the query tower on the CPU"):
            Retriever.load(Path(index_dir), device="cuda", precision="onnx")
