"""A cross-encoder reranker: one encoder reads the query and a text together and gives one relevance logit.

The second stage after the towers (Nogueira & Cho 2019; sentence-transformers ``CrossEncoder``). A RERANKER dir is
sentence-transformers' CrossEncoder format (``config.json`` of a ``*ForSequenceClassification`` with one label,
``model.safetensors``, tokenizer files with ``model_max_length``, ``modules.json``,
``config_sentence_transformers.json``), so ``sentence_transformers.CrossEncoder(dir)`` loads it and scores the
same, plus our ``reranker.json`` (max length, the towers it was trained with, the training config and verdict).

A dir is checked before any weights load (:func:`check_reranker_dir`): a tokenizer whose vocabulary is larger
than the model's embedding table, or a max length beyond the model's positions, would fail or read garbage later.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from twotower.common.atomic import atomic_dir
from twotower.common.device import autocast_dtype, resolve_device
from twotower.common.hashing import file_sha256
from twotower.common.outputs import RERANKER_KIND as KIND

META = "reranker.json"
_ST_FILES = {  # what sentence-transformers >= 5 writes for a CrossEncoder (a Transformer module at the root)
    "modules.json": [{"idx": 0, "name": "0", "path": "",
                      "type": "sentence_transformers.base.modules.transformer.Transformer"}],
    "sentence_bert_config.json": {"transformer_task": "sequence-classification",
                                  "modality_config": {"text": {"method": "forward", "method_output_name": "logits"}},
                                  "module_output_name": "scores"},
    # raw logits, no sigmoid: our losses train logits and ranking needs no squashing
    "config_sentence_transformers.json": {"model_type": "CrossEncoder", "prompts": {}, "default_prompt_name": None,
                                          "activation_fn": "torch.nn.modules.linear.Identity"},
}


def _json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{what} '{path.parent}' has no {path.name} (expected a Hugging Face model dir)") from None
    except ValueError as exc:
        raise ValueError(f"{what} '{path.parent}': {path.name} is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{what} '{path.parent}': {path.name} is not a JSON object")
    return data


def _tokenizer_vocab(path: Path, what: str) -> int:
    """Tokens the dir's tokenizer can emit, read from its files (no model load)."""
    if (path / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        try:
            return Tokenizer.from_file(str(path / "tokenizer.json")).get_vocab_size(with_added_tokens=True)
        except Exception as exc:  # tokenizers raises its own Exception type on a malformed file
            raise ValueError(f"{what} '{path}': tokenizer.json cannot be read ({exc})") from None
    if (path / "vocab.txt").is_file():
        return sum(1 for _ in open(path / "vocab.txt", encoding="utf-8"))
    raise ValueError(f"{what} '{path}' has no tokenizer (tokenizer.json or vocab.txt)")


def check_reranker_dir(path: str | Path, max_length: int | None = None, trained: bool = True) -> int:
    """Check a reranker (``trained``) or a base encoder dir before loading it; the max length to use.

    Args:
        max_length: tokens of query + text asked for; None: the dir's own (``reranker.json``, else the tokenizer's
            ``model_max_length``), capped at the model's positions.
        trained: the dir must be a one-label sequence classifier (a RERANKER dir), not a bare encoder.

    Raises:
        ValueError: one line naming the dir and what does not fit.
    """
    p, what = Path(path), "reranker" if trained else "base model"
    if not p.is_dir():
        raise ValueError(f"{what} '{p}' is not a directory")
    config = _json(p / "config.json", what)
    if trained:
        archs = config.get("architectures") or []
        labels = len(config.get("id2label") or {0: 0})
        if not any(str(a).endswith("ForSequenceClassification") for a in archs) or labels != 1:
            raise ValueError(f"reranker '{p}' is not a one-label cross-encoder (architectures {archs}, {labels} "
                             f"labels); train one with `twotower train-reranker`")
    if not any((p / n).is_file() for n in ("model.safetensors", "model.safetensors.index.json")):
        raise ValueError(f"{what} '{p}' has no model.safetensors (only safetensors weights are loaded)")
    positions = int(config.get("max_position_embeddings") or config.get("n_positions") or 512)
    vocab = int(config.get("vocab_size") or 0)
    tokens = _tokenizer_vocab(p, what)
    if vocab and tokens > vocab:
        raise ValueError(f"{what} '{p}': its tokenizer has {tokens} tokens but the model's embedding has {vocab}; "
                         f"the tokenizer does not belong to this model")
    if max_length is None:
        meta = _json(p / META, what) if (p / META).is_file() else {}
        tok_config = _json(p / "tokenizer_config.json", what) if (p / "tokenizer_config.json").is_file() else {}
        max_length = int(meta.get("max_length") or min(int(tok_config.get("model_max_length") or positions),
                                                        positions))
    if max_length < 1 or max_length > positions:
        raise ValueError(f"max length {max_length} does not fit {what} '{p}': its model has {positions} positions "
                         f"(choose 1..{positions})")
    return max_length


def bce_loss(logits: torch.Tensor) -> torch.Tensor:
    """Pointwise BCE over (b, 1 + n) logits, column 0 the positive; the positive weighted n (sentence-transformers
    ``BinaryCrossEntropyLoss(pos_weight=n)``), so each query's positive counts as much as its n negatives."""
    labels = torch.zeros_like(logits)
    labels[:, 0] = 1.0
    weight = torch.tensor(float(max(logits.shape[1] - 1, 1)), device=logits.device)
    return F.binary_cross_entropy_with_logits(logits.float(), labels, pos_weight=weight)


def listwise_loss(logits: torch.Tensor) -> torch.Tensor:
    """Softmax cross-entropy over each row's (1 + n) logits with the positive (column 0) the target (ListNet with
    one relevant text)."""
    return F.cross_entropy(logits.float(), torch.zeros(len(logits), dtype=torch.long, device=logits.device))


LOSS_FNS = {"bce": bce_loss, "listwise": listwise_loss}


class Reranker:
    """A cross-encoder on a device: ``logits`` for training, ``score`` and ``rerank`` at inference.

    Args:
        model: a one-label ``AutoModelForSequenceClassification``.
        tokenizer: its tokenizer.
        max_length: tokens of query + text (longest-first truncation).
        device: auto, cpu, cuda or cuda:N.
        precision: autocast at inference (``common.device.autocast_dtype``: bf16/fp16 on a GPU, fp32 on the CPU).
        meta: ``reranker.json`` of a loaded dir.
    """

    def __init__(self, model: Any, tokenizer: Any, max_length: int, device: str = "auto", precision: str = "auto",
                 meta: dict[str, Any] | None = None) -> None:
        self.device = resolve_device(device)
        self.model = model.to(self.device)
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.amp_dtype = autocast_dtype(precision, self.device)
        self.meta = meta or {}

    @classmethod
    def from_base(cls, base: str | Path, max_length: int, device: str = "auto", seed: int = 0) -> Reranker:
        """A new reranker: ``base``'s encoder plus a fresh one-label head (seeded)."""
        check_reranker_dir(base, max_length, trained=False)
        torch.manual_seed(seed)
        model = AutoModelForSequenceClassification.from_pretrained(str(base), num_labels=1)
        return cls(model, AutoTokenizer.from_pretrained(str(base)), max_length, device)

    @classmethod
    def load(cls, path: str | Path, device: str = "auto", precision: str = "auto",
             max_length: int | None = None) -> Reranker:
        """Load a RERANKER dir (checked first: :func:`check_reranker_dir`)."""
        length = check_reranker_dir(path, max_length)
        meta = json.loads((Path(path) / META).read_text()) if (Path(path) / META).is_file() else {}
        model = AutoModelForSequenceClassification.from_pretrained(str(path)).eval()
        return cls(model, AutoTokenizer.from_pretrained(str(path)), length, device, precision, meta)

    def logits(self, queries: Sequence[str], texts: Sequence[str]) -> torch.Tensor:
        """One logit per (query, text) pair: (n,), with the graph (training)."""
        batch = self.tokenizer(list(queries), list(texts), truncation=True, max_length=self.max_length,
                               padding=True, return_tensors="pt").to(self.device)
        return self.model(**batch).logits[:, 0]

    @torch.inference_mode()
    def score(self, queries: Sequence[str], texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """float32 (n,) logits of the pairs, in eval mode, ``batch_size`` pairs per forward pass."""
        was_training = self.model.training
        self.model.eval()
        out = []
        try:
            for i in range(0, len(texts), batch_size):
                with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                    out.append(self.logits(queries[i:i + batch_size], texts[i:i + batch_size]).float().cpu())
        finally:
            self.model.train(was_training)
        return torch.cat(out).numpy() if out else np.zeros(0, np.float32)

    def rerank(self, queries: Sequence[str], candidates: Sequence[Sequence[str]],
               batch_size: int = 64) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per query, (order, scores): its candidates' positions best first and their logits in that order.

        All pairs of all queries are scored together, ``batch_size`` per pass (a micro-batch of requests is one
        call)."""
        flat_q = [q for q, c in zip(queries, candidates) for _ in c]
        flat_t = [t for c in candidates for t in c]
        scores = self.score(flat_q, flat_t, batch_size)
        out, at = [], 0
        for c in candidates:
            s = scores[at:at + len(c)]
            order = np.argsort(-s, kind="stable")
            out.append((order, s[order]))
            at += len(c)
        return out

    def fingerprint(self) -> str:
        return str(self.meta.get("fingerprint", ""))

    def save(self, path: str | Path, meta: dict[str, Any]) -> None:
        """Write a RERANKER dir atomically (a crash keeps the previous one whole)."""
        with atomic_dir(path) as tmp:
            self.model.save_pretrained(tmp, safe_serialization=True)
            self.tokenizer.model_max_length = self.max_length
            self.tokenizer.save_pretrained(tmp)
            for name, content in _ST_FILES.items():
                (tmp / name).write_text(json.dumps(content, indent=2) + "\n")
            full = {"kind": KIND, "max_length": self.max_length, **meta,
                    "fingerprint": file_sha256(tmp / "model.safetensors")[:16]}
            (tmp / META).write_text(json.dumps(full, indent=2, sort_keys=True) + "\n")
        self.meta = full
