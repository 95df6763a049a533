"""A static query tower: one token-embedding table, mean pooling, L2 norm. No transformer runs per query.

Only the result tower has to be a transformer: it runs offline, once per document. The query tower runs per
call, and a static table makes it almost free (model2vec; sentence-transformers ``StaticEmbedding``). It is
initialised by distilling a transformer query tower (model2vec's recipe: every vocabulary token through the
encoder, mean pooled, SIF-weighted, *no PCA*, so the table stays in the space the result tower was trained
against) and then trained contrastively against the result tower, frozen or jointly (``towers.train``).

On disk the tower is a sentence-transformers ``StaticEmbedding`` module dir (``model.safetensors`` with
``embedding.weight``, ``tokenizer.json``) plus ``1_Normalize``: ``SentenceTransformer(dir)`` loads it, and so
does the TOWERS dir's Router (``encode_query`` runs this table, ``encode_document`` the transformer).
Tokenisation is sentence-transformers': no special tokens, cut at ``max_length`` tokens (the cut is written
into ``tokenizer.json``, so both libraries cut alike).
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer
from torch import nn
from tqdm.auto import tqdm

from twotower.towers.st_format import (
    ST_CONFIG,
    ST_MODULE_TYPES,
    ST_SIDE_NAMES,
    read_default_prompt,
    st_config,
    weights_fingerprint,
    write_json,
)

KIND = "static"
TOWER_KINDS = ("transformer", KIND)
WEIGHTS_KEY = "embedding.weight"  # sentence-transformers StaticEmbedding's state dict


def is_static_dir(path: str | Path) -> bool:
    """Whether ``path`` holds a static tower (its first sentence-transformers module is a StaticEmbedding)."""
    modules = Path(path) / "modules.json"
    return modules.exists() and json.loads(modules.read_text())[0]["type"].endswith("StaticEmbedding")


class StaticTower(nn.Module):
    """Token table + mean pooling + L2 norm, with the :class:`~twotower.towers.model.Tower` interface
    (``tokenize``, ``forward``, ``forward_grouped``, ``encode``, ``save``, ``load``, ``fingerprint``).

    Args:
        weights: (vocab, dim) token vectors, row i for token id i of ``tokenizer``.
        tokenizer: a ``tokenizers.Tokenizer`` (model2vec's and sentence-transformers' form).
        max_length: tokens kept per text (prompt included).
        prompt: prepended to every text.
    """

    kind = KIND
    pooling = "mean"
    proj = None  # no projection: the table is in the result tower's space already

    def __init__(self, weights: torch.Tensor, tokenizer: Tokenizer, max_length: int = 256, normalize: bool = True,
                 prompt: str = "") -> None:
        super().__init__()
        self.embedding = nn.EmbeddingBag.from_pretrained(weights.float().contiguous(), freeze=False, mode="mean")
        self.tokenizer = tokenizer
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()  # cut by max_length here, per call
        self.max_length = max_length
        self.normalize = normalize
        self.prompt = prompt
        self.dim = int(weights.shape[1])
        self.source_fingerprint: str | None = None

    @property
    def device(self) -> torch.device:
        return self.embedding.weight.device

    def with_prompt(self, texts: Sequence[str], prompt: str | None = None) -> list[str]:
        prompt = self.prompt if prompt is None else prompt
        return [prompt + t for t in texts] if prompt else list(texts)

    def token_ids(self, texts: Sequence[str], max_length: int | None = None, prompt: str | None = None
                  ) -> list[list[int]]:
        """Token ids per prompted text, no special tokens, at most ``max_length`` (default the tower's) each."""
        length = max_length or self.max_length
        return [e.ids[:length] for e in self.tokenizer.encode_batch(self.with_prompt(texts, prompt),
                                                                    add_special_tokens=False)]

    def tokenize(self, texts: Sequence[str], max_length: int | None = None,
                 prompt: str | None = None) -> dict[str, torch.Tensor]:
        """Padded input_ids and attention_mask (B, T), as :meth:`Tower.tokenize` (T >= 1)."""
        ids = self.token_ids(texts, max_length, prompt)
        width = max([len(i) for i in ids] + [1])
        input_ids = torch.zeros((len(ids), width), dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for row, seq in enumerate(ids):
            input_ids[row, :len(seq)] = torch.as_tensor(seq, dtype=torch.long)
            mask[row, :len(seq)] = 1
        return {"input_ids": input_ids, "attention_mask": mask}

    def bag(self, flat_ids: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """Flat token ids (N,) and each text's start offset (B,) -> (B, dim), mean pooled and normalised.
        A text with no token gets the zero vector."""
        emb = self.embedding(flat_ids, offsets)  # (B, dim)
        return nn.functional.normalize(emb, dim=-1) if self.normalize else emb

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **_: Any) -> torch.Tensor:
        """Padded ids (B, T) and mask (B, T) -> (B, dim) in float32."""
        lengths = attention_mask.sum(1)
        offsets = torch.cumsum(lengths, 0) - lengths  # (B,) start of each text in the flat ids
        with torch.autocast(input_ids.device.type, enabled=False):
            return self.bag(input_ids[attention_mask.bool()], offsets)

    forward_grouped = forward  # nothing to trim: a static table costs per token, not per padded position

    def encode(self, texts: Sequence[str], batch_size: int = 64, show_progress: bool = False,
               amp_dtype: torch.dtype | None = None, max_length: int | None = None,
               prompt: str | None = None) -> np.ndarray:
        """Encoder protocol: texts -> float32 (n, dim), input order kept (``amp_dtype`` is ignored: a table
        lookup has no matmul to speed up)."""
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        device = self.device
        with torch.inference_mode():
            for start in tqdm(range(0, len(texts), batch_size), desc="encode", unit="batch",
                              disable=not show_progress):
                ids = self.token_ids(texts[start:start + batch_size], max_length, prompt)
                lengths = torch.as_tensor([len(i) for i in ids], dtype=torch.long)
                flat = torch.as_tensor([t for seq in ids for t in seq], dtype=torch.long)
                offsets = torch.cumsum(lengths, 0) - lengths
                out[start:start + len(ids)] = self.bag(flat.to(device), offsets.to(device)).float().cpu().numpy()
        return out

    def fingerprint(self) -> str:
        return self.source_fingerprint or weights_fingerprint(self)

    # ---- persistence: a sentence-transformers StaticEmbedding dir -------------------------------------
    def save(self, path: str | Path, max_length: int | None = None, side: str = "query",
             prompts: dict[str, str] | None = None) -> None:
        """Write the tower as a sentence-transformers module dir (see the module docstring); arguments as
        :meth:`Tower.save`."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        prompts = prompts if prompts is not None else {side: self.prompt}
        save_file({WEIGHTS_KEY: self.embedding.weight.detach().cpu().contiguous()}, path / "model.safetensors")
        tokenizer = Tokenizer.from_str(self.tokenizer.to_str())
        tokenizer.enable_truncation(max_length or self.max_length)  # sentence-transformers cuts where we cut
        tokenizer.save(str(path / "tokenizer.json"))
        modules = [{"idx": 0, "name": "0", "path": "", "type": ST_MODULE_TYPES["static"]}]
        if self.normalize:
            (path / "1_Normalize").mkdir(exist_ok=True)
            modules.append({"idx": 1, "name": "1", "path": "1_Normalize", "type": ST_MODULE_TYPES["normalize"]})
        write_json(path / "modules.json", modules)
        write_json(path / ST_CONFIG, st_config({ST_SIDE_NAMES[k]: v for k, v in prompts.items()},
                                               ST_SIDE_NAMES[side], self.normalize))

    @classmethod
    def load(cls, path: str | Path) -> StaticTower:
        """Load a tower written by :meth:`save` (or any sentence-transformers StaticEmbedding dir)."""
        path = Path(path)
        for name in ("modules.json", "model.safetensors", "tokenizer.json"):
            if not (path / name).exists():
                raise FileNotFoundError(f"static tower dir '{path}' is missing {name} (expected a twotower "
                                        "static tower: a sentence-transformers StaticEmbedding dir)")
        weights = load_file(path / "model.safetensors")
        if WEIGHTS_KEY not in weights:
            raise ValueError(f"{path / 'model.safetensors'}: no '{WEIGHTS_KEY}' tensor (found {', '.join(weights)})")
        tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
        truncation = tokenizer.truncation
        max_length = int(truncation["max_length"]) if truncation else 256
        paths = {m["path"] for m in json.loads((path / "modules.json").read_text())}
        return cls(weights[WEIGHTS_KEY], tokenizer, max_length, normalize="1_Normalize" in paths,
                   prompt=read_default_prompt(path))


def distill(source: str | Path, dim: int, max_length: int = 64, prompt: str = "",
            device: str = "cpu") -> StaticTower:
    """A static tower distilled from the transformer model dir ``source`` with model2vec (offline).

    No PCA: the table stays in ``source``'s output space, the space the result tower scores in, so the
    distilled tower already retrieves before any training. SIF weighting is model2vec's default.

    Raises:
        ValueError: the table's width (``source``'s hidden size) is not ``dim``, the result tower's (one line).
    """
    from transformers import AutoConfig

    hidden = AutoConfig.from_pretrained(source).hidden_size
    if hidden != dim:
        raise ValueError(f"static query tower: distilled from {source} it has {hidden} dims, but the result tower "
                         f"has {dim}; a static tower has no projection, so both must be equal (drop --proj-dim)")
    from model2vec.distill import distill as m2v_distill  # heavy (transformers model load): only when asked

    static = m2v_distill(str(source), pca_dims=None, quantize_to="float32", device=device)
    weights = torch.as_tensor(np.asarray(static.embedding, dtype=np.float32))
    return StaticTower(weights, static.tokenizer, max_length, normalize=True, prompt=prompt)
