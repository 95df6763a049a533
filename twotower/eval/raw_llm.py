"""A decoder LLM used as is, as a text encoder: the raw-LLM baseline the trained towers are measured against.

Poolings (all from one forward pass, so the bench gets the three rows for the price of one):

- ``last``:   the final layer's hidden state at the last non-pad token (what a causal LM "has read so far");
- ``mean``:   the masked mean of the final layer's hidden states;
- ``logits``: the LM head applied to the last token: a vocab-sized next-token score vector (the
  representation of the article this project starts from).

Every vector is L2-normalised (cosine = inner product). Texts are wrapped in the PromptEOL prompt
(Jiang et al. 2023, "Scaling Sentence Embeddings with Large Language Models"), which asks the model to
compress the text into its next word. ``max_length`` counts the text's tokens (the prompt and special
tokens come on top), so the prompt always survives and every pooling sees the same text as other systems.
Embeddings are cached on disk (``common.cache.cache_dir()/emb/``), keyed by model weights + pooling + prompt +
max length + dtype, and per text by its sha256, so a rerun only encodes texts it has not seen.
"""
from __future__ import annotations

import hashlib
import io
import json
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

from twotower.common.atomic import write_bytes_atomic
from twotower.common.cache import cache_dir
from twotower.common.device import autocast_dtype, resolve_device
from twotower.common.hashing import file_sha256
from twotower.common.jsonl import dumps_strict
from twotower.towers.bases import resolve_base

LLM_POOLINGS = ("last", "mean", "logits")
PROMPTS = {"promptEOL": 'This sentence : "{text}" means in one word:"'}
# New embeddings are flushed to the cache every this many texts, so an interrupted run keeps its work.
_FLUSH_EVERY = 1024


def check_llm_poolings(poolings: Sequence[str]) -> tuple[str, ...]:
    """Validate pooling names (``unknown pooling 'avg': choose last, mean, logits``)."""
    for p in poolings:
        if p not in LLM_POOLINGS:
            raise ValueError(f"unknown raw-llm pooling '{p}': choose {', '.join(LLM_POOLINGS)}")
    if not poolings:
        raise ValueError(f"no raw-llm pooling given: choose from {', '.join(LLM_POOLINGS)}")
    return tuple(dict.fromkeys(poolings))


def resolve_prompt(prompt: str | None) -> str | None:
    """``promptEOL`` -> its template; a string containing ``{text}`` is a custom template; None = raw text."""
    if prompt is None or prompt in ("", "none", "None"):
        return None
    if prompt in PROMPTS:
        return PROMPTS[prompt]
    if "{text}" in prompt:
        return prompt
    raise ValueError(f"unknown prompt '{prompt}': choose {', '.join(PROMPTS)}, none, or a template with {{text}}")


def model_fingerprint(model_dir: str | Path) -> str:
    """sha256 over the model dir's config.json and weight files (content, not names or dates)."""
    model_dir = Path(model_dir)
    weights = sorted(model_dir.glob("*.safetensors")) + sorted(model_dir.glob("*.bin"))
    if not weights:
        raise FileNotFoundError(f"model dir '{model_dir}' has no *.safetensors or *.bin weights")
    h = hashlib.sha256()
    for path in [model_dir / "config.json", *weights]:
        h.update(path.name.encode())
        h.update(bytes.fromhex(file_sha256(path)))
    return h.hexdigest()[:16]


class EmbeddingCache:
    """Embeddings of one (model, pooling, prompt, max length, dtype) on disk: ``.npz`` chunks (no pickle).

    Each chunk holds ``keys`` (n, 32) uint8 text sha256 digests and ``emb`` (n, d) float32.
    """

    def __init__(self, root: Path, key: dict[str, Any]) -> None:
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
        self.dir = Path(root) / digest
        self.key = key
        self._rows: dict[bytes, np.ndarray] | None = None

    @staticmethod
    def text_key(text: str) -> bytes:
        return hashlib.sha256(text.encode("utf-8")).digest()

    def _load(self) -> dict[bytes, np.ndarray]:
        if self._rows is None:
            self._rows = {}
            for chunk in sorted(self.dir.glob("chunk-*.npz")):
                with np.load(chunk, allow_pickle=False) as z:
                    for k, v in zip(z["keys"], z["emb"]):
                        self._rows[k.tobytes()] = v
        return self._rows

    def get(self, keys: Sequence[bytes]) -> list[np.ndarray | None]:
        rows = self._load()
        return [rows.get(k) for k in keys]

    def put(self, keys: Sequence[bytes], emb: np.ndarray) -> None:
        """Add rows (written atomically as a new chunk)."""
        if not len(keys):
            return
        assert emb.shape[0] == len(keys), f"{emb.shape[0]} embeddings for {len(keys)} keys"
        if not (self.dir / "key.json").exists():
            write_bytes_atomic(self.dir / "key.json", dumps_strict(self.key, indent=2, sort_keys=True).encode())
        buf = io.BytesIO()
        np.savez(buf, keys=np.frombuffer(b"".join(keys), dtype=np.uint8).reshape(len(keys), 32),
                 emb=emb.astype(np.float32))
        write_bytes_atomic(self.dir / f"chunk-{uuid.uuid4().hex}.npz", buf.getvalue())
        rows = self._load()
        for k, v in zip(keys, emb):
            rows[k] = v


class RawLLMEncoder:
    """A causal LM as an encoder (Encoder protocol: ``dim``, ``encode``), plus all poolings in one pass.

    Args:
        model_dir_or_name: ``smollm2`` (default), ``gemma3`` or a local causal-LM dir.
        pooling: ``last`` | ``mean`` | ``logits``: what :meth:`encode` returns.
        prompt: ``promptEOL``, None (raw text) or a template containing ``{text}``.
        max_length: tokens kept of each text; the prompt and special tokens are added on top.
        batch_size: texts per forward pass.
        cache: keep embeddings on disk under ``common.cache.cache_dir()/emb/``.
        device: ``auto`` (cuda when available), ``cpu``, ``cuda`` or ``cuda:N``.
        precision: ``auto``: bf16 on a GPU (fp16 without bf16) and on a CPU with native bf16, else fp32;
            ``fp32``; ``bf16`` (see ``common.device.autocast_dtype``).
    """

    def __init__(self, model_dir_or_name: str = "smollm2", pooling: str = "last", prompt: str | None = "promptEOL",
                 max_length: int = 256, batch_size: int = 16, cache: bool = True, device: str = "auto",
                 precision: str = "auto") -> None:
        (self.pooling,) = check_llm_poolings([pooling])
        self.name = str(model_dir_or_name)
        self.model_dir = resolve_base(self.name)
        self.prompt_name = prompt
        self.template = resolve_prompt(prompt)
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1 token, got {max_length}")
        self.max_length = max_length
        self.batch_size = batch_size
        self.use_cache = cache
        self.device = resolve_device(device)
        # Weights in half precision where the hardware computes it natively (a GPU; a CPU with AVX512-BF16/AMX).
        self.dtype = autocast_dtype(precision, self.device, decoder=True) or torch.float32
        self._model: Any = None
        self._tokenizer: Any = None
        self._fingerprint: str | None = None
        self._caches: dict[tuple[str, int], EmbeddingCache] = {}
        self.last_stats: dict[str, int] = {}  # texts taken from the cache vs run through the model last call
        config = json.loads((self.model_dir / "config.json").read_text())
        text_config = config.get("text_config", config)
        self.hidden_size = int(text_config["hidden_size"])
        self.vocab_size = int(text_config["vocab_size"])

    # ---- Encoder protocol --------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        return self.dim_of(self.pooling)

    def dim_of(self, pooling: str) -> int:
        return self.vocab_size if pooling == "logits" else self.hidden_size

    def encode(self, texts: Sequence[str], batch_size: int | None = None, show_progress: bool = False) -> np.ndarray:
        """float32 (n, dim) L2-normalised embeddings with this encoder's pooling."""
        return self.encode_all_poolings(texts, (self.pooling,), batch_size, show_progress)[self.pooling]

    # ---- the one-pass multi-pooling encoder --------------------------------------------------------
    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = model_fingerprint(self.model_dir)
        return self._fingerprint

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    def config(self) -> dict[str, Any]:
        """Everything needed to rerun this system (goes into results.json)."""
        return {"model": self.name, "model_dir": str(self.model_dir), "model_fingerprint": self.fingerprint,
                "pooling": self.pooling, "prompt": self.prompt_name, "prompt_template": self.template,
                "max_length": self.max_length, "dtype": self.dtype_name, "normalize": True}

    def _cache(self, pooling: str, max_length: int) -> EmbeddingCache:
        if (pooling, max_length) not in self._caches:
            key = {"model_fingerprint": self.fingerprint, "pooling": pooling, "prompt": self.template,
                   "max_length": max_length, "dtype": self.dtype_name, "version": 1}
            self._caches[pooling, max_length] = EmbeddingCache(cache_dir() / "emb", key)
        return self._caches[pooling, max_length]

    def encode_all_poolings(self, texts: Sequence[str], poolings: Sequence[str] = LLM_POOLINGS,
                            batch_size: int | None = None, show_progress: bool = False,
                            max_length: int | None = None) -> dict[str, np.ndarray]:
        """One forward pass per batch serves every pooling.

        Args:
            max_length: text tokens kept for this call (default: the encoder's ``max_length``), e.g. a
                shorter budget for queries than for docs.

        Returns:
            pooling -> float32 (n, dim_of(pooling)) L2-normalised, rows in input order.
        """
        poolings = check_llm_poolings(poolings)
        max_length = max_length or self.max_length
        texts = list(texts)
        out = {p: np.empty((len(texts), self.dim_of(p)), dtype=np.float32) for p in poolings}
        todo = list(range(len(texts)))
        keys = [EmbeddingCache.text_key(t) for t in texts] if self.use_cache else []
        if self.use_cache:
            hits = {p: self._cache(p, max_length).get(keys) for p in poolings}
            todo = [i for i in todo if any(hits[p][i] is None for p in poolings)]
            for p in poolings:
                for i, row in enumerate(hits[p]):
                    if row is not None:
                        out[p][i] = row
        self.last_stats = {"cached": len(texts) - len(todo), "encoded": len(todo)}
        if not todo:
            return out
        self._load_model()
        ids = self._prompt_ids([texts[i] for i in todo], max_length)
        order = np.argsort([-len(x) for x in ids], kind="stable")  # length-sorted batches: minimal padding
        bs = batch_size or self.batch_size
        pending: list[int] = []
        with tqdm(total=len(todo), desc=f"raw-llm {self.name}", unit="text", disable=not show_progress) as bar:
            for start in range(0, len(order), bs):
                batch = order[start:start + bs]
                pooled = self._forward([ids[j] for j in batch], poolings)
                for p in poolings:
                    out[p][[todo[j] for j in batch]] = pooled[p]
                pending.extend(todo[j] for j in batch)
                bar.update(len(batch))
                if self.use_cache and (len(pending) >= _FLUSH_EVERY or start + bs >= len(order)):
                    for p in poolings:
                        self._cache(p, max_length).put([keys[i] for i in pending], out[p][pending])
                    pending = []
        return out

    # ---- model plumbing ----------------------------------------------------------------------------
    def _load_model(self) -> None:
        if self._model is not None:
            return
        self._model = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=self.dtype).to(self.device).eval()
        self._tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        if self._tokenizer.pad_token is None:  # decoder LLMs often ship without one; pads are masked anyway
            self._tokenizer.pad_token = self._tokenizer.eos_token
        out_features = self._model.get_output_embeddings().out_features
        assert out_features == self.vocab_size, f"lm head has {out_features} outputs, config says {self.vocab_size}"

    def _prompt_ids(self, texts: Sequence[str], max_length: int | None = None) -> list[list[int]]:
        """Token ids of special-prefix + prompt-head + text (first max_length tokens) + prompt-tail."""
        tok = self._tokenizer
        # Special tokens the tokenizer adds around a text (e.g. BOS for Llama/Gemma, none for SmolLM2).
        with_special = tok("x")["input_ids"]
        plain = tok("x", add_special_tokens=False)["input_ids"]
        cut = _find_sub(with_special, plain)
        special_head, special_tail = with_special[:cut], with_special[cut + len(plain):]
        head, tail = (self.template.split("{text}", 1) if self.template else ("", ""))
        head_ids = tok(head, add_special_tokens=False)["input_ids"] if head else []
        tail_ids = tok(tail, add_special_tokens=False)["input_ids"] if tail else []
        body = tok(list(texts), add_special_tokens=False, truncation=True,
                   max_length=max_length or self.max_length)["input_ids"]
        return [special_head + head_ids + b + tail_ids + special_tail for b in body]

    def _forward(self, ids: list[list[int]], poolings: Sequence[str]) -> dict[str, np.ndarray]:
        batch = self._tokenizer.pad({"input_ids": ids}, padding=True, return_tensors="pt")  # honours padding_side
        input_ids = batch["input_ids"].to(self.device)  # (B, T)
        mask = batch["attention_mask"].to(self.device)  # (B, T), 1 = real token
        # Positions count real tokens only, so a left-padded text sees the positions it would see alone
        # (matters for absolute position embeddings, e.g. GPT-2).
        position_ids = (mask.long().cumsum(1) - 1).clamp(min=0)
        with torch.inference_mode():
            hidden = self._model.base_model(input_ids=input_ids, attention_mask=mask,
                                            position_ids=position_ids).last_hidden_state  # (B, T, H)
            last = mask.shape[1] - 1 - mask.flip(1).int().argmax(1)  # (B,) index of the last real token
            h_last = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]  # (B, H)
            out: dict[str, torch.Tensor] = {}
            if "last" in poolings:
                out["last"] = h_last
            if "mean" in poolings:
                m = mask.bool().unsqueeze(-1)  # where(), not multiply: pad states may be non-finite
                out["mean"] = torch.where(m, hidden, 0).sum(1) / m.sum(1).clamp(min=1)
            if "logits" in poolings:
                logits = self._model.get_output_embeddings()(h_last)  # (B, V): next-token scores
                cap = getattr(self._model.config, "final_logit_softcapping", None)
                if cap:  # Gemma-style soft-capping, as the model's own forward applies it
                    logits = torch.tanh(logits / cap) * cap
                out["logits"] = logits
            return {p: torch.nn.functional.normalize(v.float(), dim=-1).cpu().numpy() for p, v in out.items()}


def _find_sub(seq: list[int], sub: list[int]) -> int:
    for i in range(len(seq) - len(sub) + 1):
        if seq[i:i + len(sub)] == sub:
            return i
    raise AssertionError(f"tokenizer adds tokens inside the text: {seq} does not contain {sub}")
