"""Tower = transformers AutoModel + pooling + optional projection + L2 norm; TwoTower = query + result tower.

Style follows Tevatron's ``EncoderModel`` / DPR's ``BiEncoder``: one thin ``nn.Module`` per tower, shared
vs separate weights is a flag. Each tower is saved as a plain Hugging Face dir (safetensors) that also
carries sentence-transformers module files, so ``AutoModel.from_pretrained`` and
``SentenceTransformer(dir)`` both load it.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoModel, AutoTokenizer

from twotower.common.atomic import atomic_dir
from twotower.common.encoder import length_groups
from twotower.common.schemas import TowersMeta, read_json_file
from twotower.towers.bases import resolve_base
from twotower.towers.feed import BatchFeed
from twotower.towers.llm import append_eos, appends_eos, default_pooling, left_padded, position_ids
from twotower.towers.lora import plain_encoder
from twotower.towers.pooling import check_pooling, pool
from twotower.towers.st_format import (
    ST_SIDE_NAMES,
    read_st_files,
    weights_fingerprint,
    write_json,
    write_router_files,
    write_st_files,
)
from twotower.towers.static import KIND as STATIC_KIND
from twotower.towers.static import StaticTower

TOWERS_FORMAT_VERSION = 1


class Tower(nn.Module):
    """One encoder tower. ``forward(input_ids, attention_mask) -> (B, dim)``.

    ``prompt`` (an instruction such as ``"Instruct: Given a docstring, retrieve the Python function\nQuery: "``)
    is prepended to every text the tower tokenises, in training and at inference, the way
    sentence-transformers applies a prompt: it counts into ``max_length`` and truncation cuts the text's end.
    """

    def __init__(
        self,
        encoder: nn.Module,
        tokenizer: Any,
        pooling: str = "mean",
        max_length: int = 256,
        proj_dim: int | None = None,
        normalize: bool = True,
        prompt: str = "",
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.tokenizer = tokenizer
        self.pooling = check_pooling(pooling)
        self.max_length = max_length
        self.normalize = normalize
        self.prompt = prompt
        hidden = encoder.config.hidden_size
        self.proj = nn.Linear(hidden, proj_dim) if proj_dim else None
        self.dim = proj_dim or hidden
        self.source_fingerprint: str | None = None  # set on inference copies that keep the same vectors
        if tokenizer.pad_token is None:  # decoder LLMs ship without one; last-token pooling ignores pads
            tokenizer.pad_token = tokenizer.eos_token

    @classmethod
    def from_base(
        cls, base: str | Path, pooling: str = "mean", max_length: int = 256, proj_dim: int | None = None,
        normalize: bool = True, prompt: str = "", eos: bool = False,
    ) -> Tower:
        """A fresh tower on a base model dir (see ``towers.bases.resolve_base``).

        Args:
            eos: make the tokenizer end every input with its EOS token (``towers.llm.append_eos``; a no-op for
                tokenizers without one).
        """
        check_pooling(pooling)
        encoder = AutoModel.from_pretrained(base, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(base)
        if eos:
            append_eos(tokenizer)
        return cls(encoder, tokenizer, pooling, max_length, proj_dim, normalize, prompt)

    @property
    def device(self) -> torch.device:
        param = next(self.parameters(), None)  # an ONNX copy without projection has no torch parameters
        return param.device if param is not None else torch.device("cpu")

    def with_prompt(self, texts: Sequence[str], prompt: str | None = None) -> list[str]:
        """``texts`` with the tower's prompt (or ``prompt``, e.g. a shared tower's result prompt) in front."""
        prompt = self.prompt if prompt is None else prompt
        return [prompt + t for t in texts] if prompt else list(texts)

    def tokenize(self, texts: Sequence[str], max_length: int | None = None,
                 prompt: str | None = None) -> dict[str, torch.Tensor]:
        """Padded model inputs (input_ids, attention_mask: (B, T)) of the prompted texts; ``max_length`` and
        ``prompt`` default to the tower's; padding is on the tokenizer's side."""
        batch = self.tokenizer(self.with_prompt(texts, prompt), padding=True, truncation=True,
                               max_length=max_length or self.max_length, return_tensors="pt")
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}

    def forward(self, input_ids: torch.Tensor | None, attention_mask: torch.Tensor,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Token ids (B, T) - or their input embeddings (B, T, H) - and mask (B, T) -> (B, dim)."""
        extra = {}
        if left_padded(attention_mask):  # positions from each text's first real token (see towers.llm)
            extra["position_ids"] = position_ids(attention_mask)
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask,
                              inputs_embeds=inputs_embeds, **extra).last_hidden_state  # (B, T, H)
        # Pooling, projection and the L2 norm run in float32 whatever the encoder's precision (autocast or a
        # half-precision cast_copy): a bf16 norm is unit only to ~4e-3, and inner-product scores need unit.
        with torch.autocast(hidden.device.type, enabled=False):
            emb = pool(hidden.float(), attention_mask, self.pooling)  # (B, H)
            if self.proj is not None:
                emb = self.proj(emb)  # (B, dim)
            if self.normalize:
                emb = nn.functional.normalize(emb, dim=-1)
        return emb

    def forward_grouped(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_groups: int = 8,
                        group_cost: int = 64) -> torch.Tensor:
        """:meth:`forward` of a padded batch (B, T) run as length groups (see :func:`length_groups`): each
        group drops the columns that are padding in all of its rows, so far fewer pad tokens are computed.

        Same embeddings as :meth:`forward` up to float rounding (a row's outputs do not depend on trailing
        padding or on the other rows); in train mode dropout draws its masks per group. A left-padding
        tokenizer (decoder LLMs) has nothing to trim, so that batch runs as one.

        Returns:
            (B, dim) in the input row order.
        """
        if getattr(self.tokenizer, "padding_side", "right") == "left":
            return self(input_ids, attention_mask)
        groups = length_groups(attention_mask.sum(1).cpu().numpy(), max_groups, group_cost)
        if len(groups) == 1:
            return self(input_ids, attention_mask)
        # The token embeddings are looked up once for the whole batch: the backward of an embedding lookup
        # writes a dense (vocab, H) gradient, which per group would cost a vocabulary-sized buffer each.
        embeds = self.encoder.get_input_embeddings()(input_ids)  # (B, T, H)
        parts = []
        for rows in groups:
            idx = torch.as_tensor(rows, device=input_ids.device)
            mask = attention_mask.index_select(0, idx)  # (b, T)
            used = mask.bool().any(0).nonzero()
            width = int(used.max()) + 1 if len(used) else 1  # trailing all-pad columns cut
            parts.append(self(None, mask[:, :width], inputs_embeds=embeds.index_select(0, idx)[:, :width]))
        order = torch.as_tensor(np.concatenate(groups), device=input_ids.device)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(len(order), device=order.device)
        return torch.cat(parts)[inverse]

    def encode(
        self, texts: Sequence[str], batch_size: int = 64, show_progress: bool = False,
        amp_dtype: torch.dtype | None = None, max_length: int | None = None, prompt: str | None = None,
    ) -> np.ndarray:
        """Encoder protocol: texts -> float32 (n, dim), input order kept.

        A background thread tokenises the texts chunk by chunk, batches them by *token* count (longest first, so
        each batch is padded only to its own longest sequence) and collates (pinned on CUDA) while the model runs
        the previous batch (:class:`~twotower.towers.feed.BatchFeed`).

        Args:
            amp_dtype: autocast dtype (``torch.bfloat16``/``torch.float16``) or None for full precision.
            max_length: token cap per text, prompt included (default: the tower's ``max_length``).
            prompt: prepended to every text (default: the tower's ``prompt``).
        """
        was_training = self.training
        self.eval()
        device = self.device
        length = max_length or self.max_length

        def tokenize(part: list[str]) -> list[list[int]]:
            return self.tokenizer(self.with_prompt(part, prompt), truncation=True, max_length=length)["input_ids"]

        out = np.empty((len(texts), self.dim), dtype=np.float32)
        feed = BatchFeed(tokenize, texts, batch_size, self.tokenizer.pad_token_id, pin=device.type == "cuda")
        try:
            with torch.inference_mode(), tqdm(total=len(texts), desc="encode", unit="text", smoothing=0.1,
                                              disable=not show_progress) as bar:
                for rows, input_ids, mask in feed:
                    input_ids = input_ids.to(device, non_blocking=True)
                    mask = mask.to(device, non_blocking=True)
                    with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                        out[rows] = self(input_ids, mask).float().cpu().numpy()
                    bar.update(len(rows))
            return out
        finally:
            feed.close()
            self.train(was_training)

    # ---- persistence: plain HF dir + sentence-transformers module files -----------------------------
    def save(self, path: str | Path, max_length: int | None = None, side: str = "query",
             prompts: dict[str, str] | None = None) -> None:
        """Write this tower as an HF model dir loadable by AutoModel and SentenceTransformer.

        A shared tower is saved once per side, so the side's settings can override the tower's own:

        Args:
            max_length: the token cap recorded (default: the tower's).
            side: ``query`` or ``result``: whose prompt is this tower's default in sentence-transformers.
            prompts: the pair's prompts by side (default: this tower's own prompt for ``side``); all are
                exported as sentence-transformers prompts (``query``, ``document``).
        """
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        prompts = prompts if prompts is not None else {side: self.prompt}
        plain_encoder(self.encoder).save_pretrained(path, safe_serialization=True)
        self.tokenizer.save_pretrained(path)
        write_st_files(path, self.encoder.config.hidden_size, self.pooling, max_length or self.max_length,
                       self.normalize, self.proj, {ST_SIDE_NAMES[k]: v for k, v in prompts.items()},
                       ST_SIDE_NAMES[side])

    @classmethod
    def load(cls, path: str | Path) -> Tower:
        """Load a tower saved by :meth:`save` (pooling, projection, max length read from its files)."""
        path = Path(path)
        st = read_st_files(path)
        encoder = AutoModel.from_pretrained(path, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(path)
        proj_dim = st.proj["weight"].shape[0] if st.proj is not None else None
        tower = cls(encoder, tokenizer, st.pooling, st.max_length, proj_dim, normalize=st.normalize, prompt=st.prompt)
        if st.proj is not None:
            tower.proj.load_state_dict(st.proj)
        return tower

    def fingerprint(self) -> str:
        """sha256 over this tower's weights (sorted names, raw bytes): identifies the vector space. An
        ``onnx_copy`` (same float32 vectors, weights inside ONNX Runtime) reports its source's."""
        return self.source_fingerprint or weights_fingerprint(self)


class TwoTower(nn.Module):
    """A query tower and a result tower; ``shared=True`` makes them one module (tied weights).

    Each side has its own prompt: the tower's, except that a shared tower's result side takes
    ``result_prompt`` (one module, two prompts).

    Each side has two token budgets: the training one (``query_tower.max_length``, ``result_max_length``) and
    the inference one (``inference_max_length(side)``: what ``towers.inference`` encodes with, and what each
    tower's sentence-transformers ``max_seq_length`` says); unset, inference uses the training lengths.
    """

    def __init__(self, query_tower: Tower | StaticTower, result_tower: Tower | None = None, base: str = "",
                 train_config: dict[str, Any] | None = None, result_prompt: str | None = None,
                 inference_max_lengths: dict[str, int] | None = None, freeze_result: bool = False) -> None:
        super().__init__()
        self.query_tower = query_tower
        self.result_tower = result_tower if result_tower is not None else query_tower
        if self.query_tower.dim != self.result_tower.dim:
            raise ValueError(f"query tower has {self.query_tower.dim} dims but the result tower has "
                             f"{self.result_tower.dim}: their scores would be undefined")
        self.base = base
        self.train_config = train_config or {}
        self._result_prompt = result_prompt
        self.inference_max_lengths: dict[str, int] = dict(inference_max_lengths or {})  # side -> tokens
        self.freeze_result = freeze_result
        if freeze_result:
            self.result_tower.requires_grad_(False)

    def train(self, mode: bool = True) -> TwoTower:
        """As ``nn.Module.train``, except that a frozen result tower stays in eval mode (no dropout noise)."""
        super().train(mode)
        if self.freeze_result:
            self.result_tower.eval()
        return self

    def tower_kinds(self) -> dict[str, str]:
        """Which kind each tower is (``transformer`` or ``static``), by side; recorded in twotower.json."""
        return {side: getattr(tower, "kind", "transformer")
                for side, tower in (("query", self.query_tower), ("result", self.result_tower))}

    @property
    def shared(self) -> bool:
        return self.query_tower is self.result_tower

    @classmethod
    def from_base(cls, base: str, shared: bool = False, pooling: str | None = None, query_max_length: int = 64,
                  result_max_length: int = 256, proj_dim: int | None = None, normalize: bool = True,
                  query_prompt: str = "", result_prompt: str = "", eos: bool | None = None) -> TwoTower:
        """Two towers on one base (``minilm``, ``smollm2``, ``gemma3`` or a local HF dir).

        Args:
            pooling: None picks ``last`` for decoder LLM bases and ``mean`` otherwise.
            query_prompt, result_prompt: prepended to every query / result text (instructions, e5-style).
            eos: end every input with the tokenizer's EOS token; None = on with ``last`` pooling (the pooled
                token is then the EOS, which has read the whole text).
        """
        path = resolve_base(base)
        if pooling is None:
            pooling = default_pooling(path)
        eos = pooling == "last" if eos is None else eos
        query = Tower.from_base(path, pooling, query_max_length, proj_dim, normalize, query_prompt, eos)
        result = None
        if not shared:
            result = Tower.from_base(path, pooling, result_max_length, proj_dim, normalize, result_prompt, eos)
            if proj_dim:  # both towers start from the same projection, like they start from the same encoder
                result.proj.load_state_dict(query.proj.state_dict())
        return cls(query, result, base=str(base), result_prompt=result_prompt)

    def encode_queries(self, texts: Sequence[str], batch_size: int = 64, **kw: Any) -> np.ndarray:
        return self.query_tower.encode(texts, batch_size, **kw)

    def encode_results(self, texts: Sequence[str], batch_size: int = 64, **kw: Any) -> np.ndarray:
        # A shared tower is the query tower: results get their own (longer) max length and prompt.
        kw.setdefault("max_length", self.result_max_length)
        kw.setdefault("prompt", self.result_prompt)
        return self.result_tower.encode(texts, batch_size, **kw)

    @property
    def result_max_length(self) -> int:
        return self.train_config.get("result_max_length", self.result_tower.max_length)

    @property
    def query_max_length(self) -> int:
        """The query tokens of training (a loaded tower's own ``max_length`` is its inference length)."""
        return self.train_config.get("query_max_length", self.query_tower.max_length)

    def inference_max_length(self, side: str) -> int:
        """Tokens per text at inference on ``side`` (``query`` / ``result``); default the training length."""
        if side not in ("query", "result"):
            raise ValueError(f"unknown tower side '{side}': choose query, result")
        default = self.query_max_length if side == "query" else self.result_max_length
        return int(self.inference_max_lengths.get(side) or default)

    @property
    def query_prompt(self) -> str:
        return self.query_tower.prompt

    @property
    def result_prompt(self) -> str:
        return self._result_prompt if self._result_prompt is not None else self.result_tower.prompt

    @property
    def prompts(self) -> dict[str, str]:
        """Prompt per side: ``{"query": ..., "result": ...}``."""
        return {"query": self.query_prompt, "result": self.result_prompt}

    def fingerprint(self) -> str:
        return self.result_tower.fingerprint()

    def metadata(self) -> dict[str, Any]:
        return {
            "format_version": TOWERS_FORMAT_VERSION,
            "base": self.base,
            "shared": self.shared,
            "pooling": self.query_tower.pooling,
            "normalize": self.query_tower.normalize,
            "query_max_length": self.query_max_length,
            "result_max_length": self.result_max_length,
            "inference_query_max_length": self.inference_max_length("query"),
            "inference_result_max_length": self.inference_max_length("result"),
            "dim": self.result_tower.dim,
            "metric": "ip" if self.result_tower.normalize else "ip_unnormalized",
            "query_prompt": self.query_prompt,
            "result_prompt": self.result_prompt,
            "append_eos": appends_eos(self.result_tower.tokenizer),
            "tower_kinds": self.tower_kinds(),
            "train_config": self.train_config,
            # the verdict of training (towers.train): did the towers beat the untrained base on dev?
            **{k: self.train_config[k] for k in ("improved", "verdict", "dev_metrics") if k in self.train_config},
            "fingerprint": self.fingerprint(),
            # each tower's weights are recorded: a query tower swapped in from another run is refused at load
            "query_fingerprint": self.query_tower.fingerprint(),
        }

    def save(self, path: str | Path) -> None:
        """Write the TOWERS dir (query_tower/, result_tower/, twotower.json, and the sentence-transformers
        Router files that make the dir one ``SentenceTransformer``) atomically: temp dir + rename."""
        with atomic_dir(path) as tmp:
            # sentence-transformers' max_seq_length is the inference length: SentenceTransformer(dir) encodes as
            # index build / search do
            self.query_tower.save(tmp / "query_tower", max_length=self.inference_max_length("query"), side="query",
                                  prompts=self.prompts)
            self.result_tower.save(tmp / "result_tower", max_length=self.inference_max_length("result"),
                                   side="result", prompts=self.prompts)
            write_router_files(tmp, {ST_SIDE_NAMES["query"]: tmp / "query_tower",
                                     ST_SIDE_NAMES["result"]: tmp / "result_tower"},
                               {ST_SIDE_NAMES[k]: v for k, v in self.prompts.items()}, self.result_tower.normalize)
            write_json(tmp / "twotower.json", self.metadata())

    @classmethod
    def load(cls, path: str | Path, allow_mixed_towers: bool = False) -> TwoTower:
        """A TOWERS dir saved by :meth:`save`; ``twotower.json`` is checked against its schema and each tower's
        weights against the fingerprint recorded for it (``allow_mixed_towers``: accept a query tower from
        another run)."""
        path = Path(path)
        meta = read_towers_meta(path)
        query = load_tower(path / "query_tower", tower_kind(meta, "query"))
        result = None if meta.get("shared") else Tower.load(path / "result_tower")
        train_config = dict(meta.get("train_config") or {})
        train_config.setdefault("result_max_length", meta.get("result_max_length", query.max_length))
        train_config.setdefault("query_max_length", meta.get("query_max_length", query.max_length))
        inference = {side: meta[f"inference_{side}_max_length"] for side in ("query", "result")
                     if meta.get(f"inference_{side}_max_length")}  # absent before issue 15: the training lengths
        try:
            model = cls(query, result, base=meta.get("base", ""), train_config=train_config,
                        result_prompt=meta.get("result_prompt") if meta.get("shared") else None,
                        inference_max_lengths=inference)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None
        expected = meta.get("fingerprint")
        if expected and model.fingerprint() != expected:
            raise ValueError(f"{path}: result tower weights do not match the fingerprint in twotower.json "
                             f"({model.fingerprint()} != {expected}); the towers dir is corrupt or was edited")
        check_query_tower(path, meta, query, allow_mixed_towers)  # after the dims: a width mismatch says so
        return model


def tower_kind(meta: dict[str, Any], side: str) -> str:
    """``transformer`` or ``static``: the kind of ``side``'s tower by a twotower.json (``meta``); towers saved
    before issue 25 record none and are two transformers."""
    return (meta.get("tower_kinds") or {}).get(side, "transformer")


def load_tower(path: str | Path, kind: str = "transformer") -> Tower | StaticTower:
    """One tower dir of either kind (:func:`tower_kind`)."""
    return StaticTower.load(path) if kind == STATIC_KIND else Tower.load(path)


def read_towers_meta(path: str | Path) -> dict[str, Any]:
    """The ``twotower.json`` of a TOWERS dir (fingerprint, dims, ...), without loading weights; checked against
    its schema (``common.schemas.TowersMeta``) and format version."""
    meta_path = Path(path) / "twotower.json"
    if not meta_path.exists():
        raise FileNotFoundError(f"towers dir '{path}' has no twotower.json (expected the output of `twotower train`)")
    meta = read_json_file(meta_path, TowersMeta)
    if meta["format_version"] > TOWERS_FORMAT_VERSION:
        raise ValueError(f"{meta_path}: format_version {meta['format_version']} is newer than this twotower "
                         f"supports ({TOWERS_FORMAT_VERSION}); upgrade twotower")
    return meta


def check_query_tower(path: str | Path, meta: dict[str, Any], tower: Tower | StaticTower,
                      allow_mixed_towers: bool = False) -> None:
    """Refuse a query tower whose weights are not the ones ``twotower.json`` recorded for this run (a tower of
    another run with the same dims, copied in); ``allow_mixed_towers`` accepts it. TOWERS dirs saved before the
    query fingerprint was recorded are not checked."""
    expected = meta.get("query_fingerprint")
    if expected is None or allow_mixed_towers:
        return
    have = tower.fingerprint()
    if have != expected:
        raise ValueError(f"{Path(path) / 'query_tower'}: query tower fingerprint {have} is not the {expected} "
                         f"twotower.json records for this run (a tower from another run?); use the towers trained "
                         f"together, or pass --allow-mixed-towers if you mean it")
