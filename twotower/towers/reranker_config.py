"""``RerankerTrainConfig``: every knob of ``twotower train-reranker``, one field each (the CLI is generated from it).

Kept free of torch imports so ``twotower train-reranker --help`` stays fast.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from twotower.common.cliargs import check_required, field
from twotower.common.device import check_device
from twotower.towers.config import DEV_AUTO, DEV_NONE, MAX_TOKENS, MINE_RANGE_MAX, MINE_RELATIVE_MARGIN, SELECT_CHOICES

# bce: pointwise, each (query, text) pair labelled 1 or 0, positives weighted by the number of negatives (the
# sentence-transformers v4 reranker recipe); listwise: softmax cross-entropy over [positive, negatives] of a query
# (ListNet with one relevant text).
LOSSES = ("bce", "listwise")


@dataclass
class RerankerTrainConfig:
    """Configuration of one cross-encoder training run (see ``twotower train-reranker --help``)."""

    pairs: str = field("", "training pairs: .jsonl/.csv/.parquet file or a datasets hub name (as `train`)",
                       required=True)
    towers: str = field("", "TOWERS dir: mines the hard negatives and gives the dev top-k the reranker reorders",
                        required=True)
    out: str = field("", "output RERANKER dir (sentence-transformers CrossEncoder format + reranker.json)",
                     required=True)
    base: str = field("minilm", "encoder the cross-encoder starts from: minilm or a local Hugging Face model dir "
                                "(a scoring head of one label is added when it has none)")
    dev: str = field(DEV_AUTO, "dev pairs: auto (hold out min(2%%, 1000) pairs of --pairs, as `train`), none, or "
                               "a pairs file; the towers' dev top --rerank-depth is reranked and nDCG@10 compared")
    query_column: str = field("query", "column holding the query text")
    positive_column: str = field("positive", "column holding the positive text")
    max_length: int = field(256, "max tokens of query + text together (the cross-encoder reads both at once); "
                                 "kept as the reranker's max length")
    loss: str = field("bce", "bce (pointwise, positives weighted by --hard-negatives: the sentence-transformers "
                             "v4 reranker recipe) or listwise (softmax over the positive and its negatives)",
                      choices=LOSSES)
    # Hard negatives: `twotower mine`'s rules (towers.negatives), searched exactly over the pairs' positives
    hard_negatives: int = field(5, "negatives per pair mined with --towers (the v4 reranker recipe uses 5); pairs "
                                   "that get fewer are dropped")
    range_max: int = field(MINE_RANGE_MAX, "mine candidates up to this rank (exclusive), as `twotower mine`")
    relative_margin: float | None = field(MINE_RELATIVE_MARGIN, "drop candidates scoring above (1 - margin) x the "
                                                                "positive's score: likely unlabelled positives")
    absolute_margin: float | None = field(None, "drop candidates scoring above the positive's score - margin")
    rerank_depth: int = field(20, "dev: rerank the towers' top this many per query (20: the search default)")
    # Optimisation
    max_steps: int = field(0, "optimizer steps; 0 = --epochs passes over the pairs")
    epochs: int = field(1, "passes over the pairs when --max-steps is 0")
    batch_size: int = field(16, "pairs per step (each scored with its --hard-negatives negatives)")
    lr: float = field(2e-5, "peak AdamW learning rate (the sentence-transformers default)")
    warmup_ratio: float = field(0.1, "fraction of steps with linear LR warm-up (then linear decay to 0)")
    weight_decay: float = field(0.01, "AdamW weight decay")
    max_grad_norm: float = field(1.0, "clip the gradient norm to this (0 = no clipping)")
    seed: int = field(42, "seed of the data order, the mining sample and the head's initialisation")
    eval_every: int = field(100, "dev nDCG@10 every N steps (and at the end); 0 = only at the end")
    select: str = field("best", "weights saved: best (highest dev nDCG@10) or last", choices=SELECT_CHOICES)
    allow_no_gain: bool = field(False, "exit 0 even when reranking does not beat the towers' order on dev "
                                       "(default: saved, flagged \"improved\": false, exit 3)")
    eval_batch_size: int = field(64, "pairs per forward pass when scoring (dev, mining)")
    device: str = field("auto", "auto (cuda when available), cpu, cuda or cuda:N")
    progress: bool = field(True, "show progress bars")
    overwrite: bool = field(False, "replace an existing RERANKER dir at --out")

    def __post_init__(self) -> None:
        check_required(self)
        check_device(self.device)
        for name in ("batch_size", "lr", "hard_negatives", "rerank_depth", "eval_batch_size", "max_length",
                     "range_max"):
            if not getattr(self, name) > 0:
                raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {getattr(self, name)}")
        for name in ("max_steps", "epochs", "weight_decay", "max_grad_norm", "eval_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if self.max_steps == 0 and self.epochs == 0:
            raise ValueError("give --max-steps or --epochs (both are 0)")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"--warmup-ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.max_length > MAX_TOKENS:
            raise ValueError(f"--max-length must be <= {MAX_TOKENS} tokens, got {self.max_length}")
        if self.hard_negatives > self.range_max:
            raise ValueError(f"cannot mine {self.hard_negatives} negatives from ranks [0, {self.range_max}): raise "
                             f"--range-max or lower --hard-negatives")
        for name in ("relative_margin", "absolute_margin"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be in [0, 1), got {value}")
        if self.loss not in LOSSES:
            raise ValueError(f"unknown loss '{self.loss}': choose {', '.join(LOSSES)}")
        if self.select not in SELECT_CHOICES:
            raise ValueError(f"unknown select '{self.select}': choose {', '.join(SELECT_CHOICES)}")
        if not self.dev:
            raise ValueError(f"--dev is empty: give {DEV_AUTO}, {DEV_NONE} or a pairs file")

    @property
    def dev_file(self) -> str | None:
        """The ``--dev`` pairs file, or None for ``auto`` / ``none``."""
        return None if self.dev in (DEV_AUTO, DEV_NONE) else self.dev

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
