"""Hard-negative mining, the part every caller shares: ``twotower mine`` (``index.mine``, faiss over a corpus) and
``twotower train --hard-negatives`` (exact search over the pairs' positives, before training and per round).

Follows sentence-transformers' ``mine_hard_negatives`` and NV-Retriever (Moreira et al. 2024, "TopK-PercPos"):
encode the positives (plus an optional extra corpus) with the result tower, search every query with the query
tower, and take negatives from ranks ``[range_min, range_max)`` that are not a positive of that query and do
not score within a margin of its positive (the false-negative guard: a candidate scoring about as high as the
positive is likely an unlabelled positive).
"""
from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from twotower.common.atomic import write_bytes_atomic
from twotower.common.encoder import Encoder
from twotower.common.jsonl import dumps_strict
from twotower.towers.config import MINE_RANGE_MAX, MINE_RELATIVE_MARGIN

if TYPE_CHECKING:
    from twotower.towers.model import TwoTower

# (xb (n, d), xq (nq, d), k) -> (D, I): each query's k best rows of xb by inner product, best first
Search = Callable[[np.ndarray, np.ndarray, int], tuple[np.ndarray, np.ndarray]]


@dataclass
class MiningRules:
    """The false-negative guards and how many to take (``twotower mine``'s defaults; its ``MineConfig`` has the
    same fields and can be passed wherever this is)."""

    num_negatives: int = 1
    range_min: int = 0
    range_max: int = MINE_RANGE_MAX
    relative_margin: float | None = MINE_RELATIVE_MARGIN
    absolute_margin: float | None = None
    max_score: float | None = None
    sampling: str = "top"
    seed: int = 0
    batch_size: int = 64
    progress: bool = True


@dataclass
class MineStats:
    queries: int = 0
    candidates: int = 0
    skipped_margin: int = 0
    skipped_max_score: int = 0
    short: int = 0
    mean_positive: float = 0.0
    mean_negative: float = 0.0

    def summary(self) -> str:
        return (f"{self.queries} queries, mean positive score {self.mean_positive:.4f}, mean negative score "
                f"{self.mean_negative:.4f}; skipped {self.skipped_margin} candidates by margin and "
                f"{self.skipped_max_score} by max_score; {self.short} queries got fewer than asked")


def select_negatives(D: np.ndarray, I: np.ndarray, positives: Sequence[set[int]], positive_score: np.ndarray,
                     config: Any) -> tuple[list[list[int]], MineStats]:
    """Pick negatives per query from ranked candidates.

    Args:
        D, I: (nq, K) search scores and candidate rows, best first (-1 = none).
        positives: per query, the candidate rows that are its positives (never negatives).
        positive_score: (nq,) the query's lowest positive score (the hardest positive, as sbert does).
        config: the rules (``MiningRules`` or ``index.config.MineConfig``: range, margins, max score,
            sampling, number, seed).

    Returns:
        Per query the chosen rows (rank order for ``top``), and counts.
    """
    rng = np.random.default_rng(config.seed)
    stats = MineStats(queries=len(I))
    chosen: list[list[int]] = []
    neg_scores: list[float] = []
    for q in range(len(I)):
        keep: list[int] = []
        for r in range(config.range_min, min(config.range_max, I.shape[1])):
            row, score = int(I[q, r]), float(D[q, r])
            if row < 0 or row in positives[q]:
                continue
            stats.candidates += 1
            if config.max_score is not None and score > config.max_score:
                stats.skipped_max_score += 1
            elif (config.absolute_margin is not None and score + config.absolute_margin > positive_score[q]) or \
                    (config.relative_margin is not None and score > positive_score[q] * (1 - config.relative_margin)):
                stats.skipped_margin += 1
            else:
                keep.append(r)
        if config.sampling == "random" and len(keep) > config.num_negatives:
            keep = sorted(rng.choice(keep, config.num_negatives, replace=False).tolist())
        keep = keep[: config.num_negatives]
        stats.short += len(keep) < config.num_negatives
        neg_scores += [float(D[q, r]) for r in keep]
        chosen.append([int(I[q, r]) for r in keep])
    stats.mean_positive = float(np.mean(positive_score)) if len(positive_score) else 0.0
    stats.mean_negative = float(np.mean(neg_scores)) if neg_scores else 0.0
    return chosen, stats


def exact_search(xb: np.ndarray, xq: np.ndarray, k: int, chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-k of ``xq`` (nq, d) over ``xb`` (n, d), in chunks of queries: (D, I) (nq, k)."""
    D, I = [], []
    for i in range(0, len(xq), chunk):
        scores = xq[i:i + chunk] @ xb.T  # (c, n)
        part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(scores, part, axis=1), axis=1, kind="stable")
        top = np.take_along_axis(part, order, axis=1)
        I.append(top)
        D.append(np.take_along_axis(scores, top, axis=1))
    return np.concatenate(D), np.concatenate(I)


def mine_negatives(query_encoder: Encoder, result_encoder: Encoder, queries: Sequence[str], positives: Sequence[str],
                   rules: Any, corpus_texts: Sequence[str] = (), search: Search = exact_search
                   ) -> tuple[list[list[str]], MineStats]:
    """Negatives (texts) for each (query, positive) pair; rows sharing a query share its negatives.

    Args:
        rules: ``MiningRules`` or ``index.config.MineConfig`` (also gives ``batch_size`` and ``progress``).
        search: how candidates are ranked: exact by default; ``index.mine`` passes a faiss index's search.
    """
    corpus = list(dict.fromkeys([*positives, *corpus_texts]))  # unique candidate texts
    row_of = {t: i for i, t in enumerate(corpus)}
    uq = list(dict.fromkeys(queries))
    q_index = {t: i for i, t in enumerate(uq)}
    pos_rows: list[set[int]] = [set() for _ in uq]
    for q, p in zip(queries, positives):
        pos_rows[q_index[q]].add(row_of[p])
    xc = result_encoder.encode(corpus, batch_size=rules.batch_size, show_progress=rules.progress)  # (n, d)
    xq = query_encoder.encode(uq, batch_size=rules.batch_size, show_progress=rules.progress)  # (nq, d)
    pos_score = np.array([min(float(xq[i] @ xc[r]) for r in rows) for i, rows in enumerate(pos_rows)])
    k = min(len(corpus), rules.range_max + max(len(r) for r in pos_rows))
    D, I = search(xc, xq, k)
    chosen, stats = select_negatives(D, I, pos_rows, pos_score, rules)
    return [[corpus[r] for r in chosen[q_index[q]]] for q in queries], stats


# ---- mining inside a training run (twotower train --hard-negatives N [--hard-negatives-rounds R]) ----------
def mined_path(ckpt_root: Path, round_: int) -> Path:
    """Where a run keeps round ``round_``'s negatives (a resumed run reads them instead of re-mining)."""
    return ckpt_root / f"mined-round-{round_}.json"


def mine_for_training(model: TwoTower, queries: Sequence[str], positives: Sequence[str], num_negatives: int,
                      seed: int, device: str, precision: str, batch_size: int = 64, progress: bool = True
                      ) -> tuple[list[list[str]], MineStats]:
    """``num_negatives`` negatives per training pair from the pairs' own positives, searched exactly with the
    model as it is now (the base before training, the previous round's towers after), at the training lengths
    (what the loss will see). ``model`` is left in train mode."""
    from twotower.towers.inference import TowerEncoder

    rules = MiningRules(num_negatives=num_negatives, seed=seed, batch_size=batch_size, progress=progress)
    q_enc = TowerEncoder(model.query_tower, device, precision, model.query_tower.max_length, prompt=model.query_prompt)
    r_enc = TowerEncoder(model.result_tower, device, precision, model.result_max_length, prompt=model.result_prompt)
    try:
        return mine_negatives(q_enc, r_enc, queries, positives, rules)
    finally:
        model.train()


def save_mined(path: Path, round_: int, step: int, fingerprint: str, num_negatives: int, negatives: list[list[str]],
               stats: MineStats) -> None:
    write_bytes_atomic(path, dumps_strict({"round": round_, "step": step, "data_fingerprint": fingerprint,
                                           "num_negatives": num_negatives, "stats": asdict(stats),
                                           "negatives": negatives},
                                          ensure_ascii=False).encode())


def load_mined(path: Path, fingerprint: str, num_negatives: int) -> tuple[list[list[str]], dict[str, Any]] | None:
    """A round's saved negatives when they were mined for these pairs and this N, else None."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if data.get("data_fingerprint") != fingerprint or data.get("num_negatives") != num_negatives:
        return None
    return data["negatives"], data["stats"]


def mined_stats(ckpt_root: Path, round_: int) -> dict[str, Any] | None:
    """Round, step and stats of a saved round (what twotower.json records), or None when there is none."""
    try:
        data = json.loads(mined_path(ckpt_root, round_).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return {"round": data["round"], "step": data["step"], "num_negatives": data["num_negatives"], **data["stats"]}
