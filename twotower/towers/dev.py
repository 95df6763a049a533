"""Dev evaluation of a training run: recall@10 and nDCG@10, the best checkpoint, patience, and the verdict.

A run measures the untrained base at step 0 and the towers every ``--eval-every`` steps (and at the end), on
dev pairs given with ``--dev FILE`` or held out of ``--pairs`` (``towers.data.split_dev``), at the *inference*
lengths, since those are what the towers will be used at. ``--select best`` keeps the evaluation with the
highest nDCG@10 (its weights in ``checkpoints/best/``, so a resumed run keeps it); the verdict compares it
with the base: ``dev nDCG@10 base 0.612 -> towers 0.701 (+0.089, step 300/625)``.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from twotower.common.atomic import atomic_dir, write_bytes_atomic
from twotower.common.hashing import file_sha256
from twotower.common.metrics import ndcg_at_k, recall_at_k

if TYPE_CHECKING:
    from twotower.towers.model import TwoTower

BEST_DIR = "best"  # under checkpoints/: model.safetensors + best.json
METRIC = "ndcg@10"  # what --select best and the verdict compare


def dev_metrics(model: TwoTower, queries: Sequence[str], positives: Sequence[str], k: int = 10,
                batch_size: int = 64, amp_dtype: torch.dtype | None = None,
                lengths: tuple[int, int] | None = None) -> dict[str, float]:
    """Recall@k and nDCG@k of exact search over the dev positives.

    A text shared by several rows is one doc, relevant to each of them; a query text repeated with different
    positives has all of them relevant. Encoded with the training's autocast dtype (an LLM's float32
    evaluation would cost more than its bf16 training).

    Args:
        lengths: (query, result) tokens per text; default the model's training lengths.
    """
    doc_of: dict[str, int] = {}
    relevant_of: dict[str, dict[int, float]] = {}
    for q, p in zip(queries, positives):
        relevant_of.setdefault(q, {})[doc_of.setdefault(p, len(doc_of))] = 1.0
    uq = list(relevant_of)
    q_len, r_len = lengths or (model.query_tower.max_length, model.result_max_length)
    xq = model.encode_queries(uq, batch_size, amp_dtype=amp_dtype, max_length=q_len)  # (nq, d)
    xb = model.encode_results(list(doc_of), batch_size, amp_dtype=amp_dtype, max_length=r_len)  # (nb, d)
    k_eff = min(k, len(xb))
    I = np.concatenate([top_k(xq[i:i + 1024] @ xb.T, k_eff) for i in range(0, len(xq), 1024)])  # (nq, k)
    rel = [relevant_of[q] for q in uq]
    return {f"recall@{k}": recall_at_k(I, rel, k_eff), f"ndcg@{k}": ndcg_at_k(I, rel, k_eff)}


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Column indices of the k best scores per row, best first: (n, m) -> (n, k)."""
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(scores, part, axis=1), axis=1, kind="stable")
    return np.take_along_axis(part, order, axis=1)


@dataclass
class DevState:
    """What a run knows of its dev scores: kept in every checkpoint's state.json, so ``--resume`` keeps it.

    ``stale``: evaluations after the best one without a new best (``--patience`` stops at that many).
    """

    base: dict[str, float] | None = None
    best: dict[str, Any] | None = None  # {"step": N, "recall@10": ..., "ndcg@10": ...}
    last: dict[str, Any] | None = None
    stale: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> DevState:
        return cls(**d) if d else cls()

    def record(self, step: int, metrics: dict[str, float]) -> bool:
        """Note an evaluation; True when it is a new best (the base at step 0 is the reference, not a candidate)."""
        entry = {"step": step, **metrics}
        self.last = entry
        if not self.history or self.history[-1]["step"] != step:
            self.history.append(entry)
        if step == 0:
            self.base = dict(metrics)
            return False
        if self.best is None or metrics[METRIC] > self.best[METRIC]:
            self.best, self.stale = entry, 0
            return True
        if step > self.best["step"]:  # a resumed run replays evaluations up to a best it already has
            self.stale += 1
        return False


def save_best(root: Path, step: int, weights: dict[str, torch.Tensor], metrics: dict[str, Any]) -> None:
    """``root/best/``: the best evaluation's weights and scores, written atomically (replacing the previous)."""
    with atomic_dir(root / BEST_DIR) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, tmp / "model.safetensors")
        meta = {"step": step, **metrics, "sha256": file_sha256(tmp / "model.safetensors")}
        write_bytes_atomic(tmp / "best.json", (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode())


def read_best(root: Path) -> dict[str, Any] | None:
    """``best.json`` of ``root/best/`` when its weights are whole, else None."""
    path = root / BEST_DIR
    try:
        meta = json.loads((path / "best.json").read_text())
        if file_sha256(path / "model.safetensors") != meta.get("sha256"):
            return None
    except (OSError, ValueError):
        return None
    return meta


def load_best(root: Path) -> dict[str, torch.Tensor]:
    return load_file(root / BEST_DIR / "model.safetensors")


def verdict(state: DevState, chosen: dict[str, Any], total: int) -> str:
    """``dev nDCG@10 base 0.612 -> towers 0.701 (+0.089, step 300/625)``."""
    assert state.base is not None, "the verdict needs the base's step-0 evaluation"
    base, towers = state.base[METRIC], chosen[METRIC]
    return (f"dev nDCG@10 base {base:.3f} -> towers {towers:.3f} ({towers - base:+.3f}, "
            f"step {chosen['step']}/{total})")


def no_gain_reasons(n_train: int, n_dev: int, lr: float, state: DevState) -> list[str]:
    """Why towers may not beat their base, with this run's figures, for the user to act on."""
    reasons = [f"too few pairs: {n_train} training pairs (contrastive fine-tuning usually needs thousands)",
               f"too high a learning rate: --lr {lr:g} (try half, or --warmup-ratio 0.2)",
               f"dev too small to tell: {n_dev} dev pairs (give a bigger --dev file)"]
    evals = [h for h in state.history if h["step"] > 0]
    if len(evals) > 1 and state.base is not None and evals[0][METRIC] > evals[-1][METRIC]:
        reasons.append(f"the dev score fell during training (step {evals[0]['step']}: {evals[0][METRIC]:.3f}, "
                       f"step {evals[-1]['step']}: {evals[-1][METRIC]:.3f}): fewer steps or a lower --lr")
    reasons.append("the base may already fit these pairs: check with `twotower bench` before training longer")
    return reasons
