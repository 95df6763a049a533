"""ONNX Runtime inference for a tower's encoder (optional extra ``.[onnx]``): the exact-precision CPU speed-up.

``onnx_copy(tower)`` exports the tower's transformer encoder once (TorchScript exporter, opset 17, dynamic
batch and sequence axes) and returns a ``Tower`` whose encoder runs in an ONNX Runtime session, with the
same tokenizer, pooling, projection and L2 norm in torch, so ``encode`` and everything built on it
(``index build``'s encoder protocol, ``Retriever``) work unchanged. On the 2-core AVX-512 CPU of
BENCHMARKS.md it encodes MiniLM ~1.5x faster than torch fp32 at the same float32 results (max |cos - 1|
2.4e-7 vs sentence-transformers); ``towers.cast_copy(inference, tower, torch.bfloat16)`` is faster still where
the CPU has bf16 instructions, at |cos - 1| ~1e-4. Inference only: the copy has no gradients.
"""
from __future__ import annotations

import copy
import tempfile
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from torch import nn

from twotower.towers.model import Tower

OPSET = 17


def _require_ort() -> Any:
    try:
        import onnxruntime
    except ImportError:
        raise ImportError("ONNX Runtime is not installed: pip install 'twotower[onnx]' "
                          "(onnxruntime and onnx)") from None
    return onnxruntime


class _HiddenStates(nn.Module):
    """The encoder as ``(input_ids, attention_mask) -> last_hidden_state``: what gets exported."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


class OnnxEncoder(nn.Module):
    """Stands in for a HF encoder inside ``Tower``: same call, same ``.config``, run by ONNX Runtime on CPU."""

    def __init__(self, model_path: str | Path, config: Any, threads: int | None = None) -> None:
        super().__init__()
        ort = _require_ort()
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
        self.config = config
        self.model_path = str(model_path)

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                inputs_embeds: torch.Tensor | None = None) -> SimpleNamespace:
        if input_ids is None or attention_mask is None or inputs_embeds is not None:
            raise ValueError("the ONNX encoder takes input_ids and attention_mask (no inputs_embeds)")
        feeds = {"input_ids": input_ids.cpu().numpy().astype(np.int64, copy=False),
                 "attention_mask": attention_mask.cpu().numpy().astype(np.int64, copy=False)}
        hidden = self.session.run(["last_hidden_state"], feeds)[0]  # (B, T, H) float32
        return SimpleNamespace(last_hidden_state=torch.from_numpy(hidden))

    def get_input_embeddings(self) -> None:  # forward_grouped would look the embeddings up itself
        raise NotImplementedError("the ONNX encoder runs whole batches only")


def export_encoder(tower: Any, path: str | Path) -> Path:
    """Write the tower's encoder as an ONNX model at ``path`` (float32, dynamic batch and length axes)."""
    _require_ort()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module = _HiddenStates(copy.deepcopy(tower.encoder).float().cpu().eval())
    ids = torch.ones((2, 8), dtype=torch.long)
    axes = {0: "batch", 1: "tokens"}
    tmp = path.with_name(path.name + ".tmp")
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        # The tracer warns about Python branches on shapes and about advanced indexing; the dynamic axes
        # and the equality tests (tests/test_towers_onnx.py) are what tell whether the graph is right.
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (ids, torch.ones_like(ids)), str(tmp), input_names=["input_ids", "attention_mask"],
                          output_names=["last_hidden_state"], opset_version=OPSET, dynamo=False,
                          dynamic_axes={"input_ids": axes, "attention_mask": axes, "last_hidden_state": axes})
    tmp.replace(path)  # a crash mid-export leaves no half-written model under the final name
    return path


def onnx_copy(tower: Any, path: str | Path | None = None, threads: int | None = None) -> Any:
    """An inference copy of ``tower`` (``towers.model.Tower``) whose encoder runs in ONNX Runtime (CPU).

    Args:
        path: where to write the ONNX model (default: a new temporary dir, kept for the copy's life).
        threads: ONNX Runtime intra-op threads (default: torch's thread count).
    """
    if getattr(tower.tokenizer, "padding_side", "right") == "left":
        raise ValueError("onnx_copy supports right-padding encoders (BERT-style towers); this tower pads left")
    if path is None:
        path = Path(tempfile.mkdtemp(prefix="twotower-onnx-")) / "encoder.onnx"
    model_path = export_encoder(tower, path)
    clone = Tower(OnnxEncoder(model_path, tower.encoder.config, threads), tower.tokenizer, tower.pooling,
                  tower.max_length, normalize=tower.normalize, prompt=tower.prompt)
    if tower.proj is not None:
        clone.proj = copy.deepcopy(tower.proj).float().cpu()
        clone.dim = tower.dim
    clone.source_fingerprint = tower.fingerprint()  # same vectors: an index built with it fits the source
    return clone.eval()
