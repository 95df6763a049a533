"""Hard-negative mining for the next training round (``twotower mine``).

Follows sentence-transformers' ``mine_hard_negatives`` and NV-Retriever (Moreira et al. 2024, "TopK-PercPos"):
index the pairs' positives (plus an optional extra corpus) with the result tower, search every query
with the query tower, and take negatives from ranks ``[range_min, range_max)`` that are not a positive of
that query and do not score within a margin of its positive (the false-negative guard: a candidate
scoring about as high as the positive is likely an unlabelled positive).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from common.atomic import write_bytes_atomic
from common.cliargs import check_required
from common.encoder import Encoder
from common.jsonl import dumps_strict
from common.outputs import check_out_file
from index.config import MineConfig
from index.corpus import iter_docs
from index.factory import auto_factory, parse_memory
from index.faiss_utils import build_faiss, search, search_defaults
from towers.data import load_pairs
from towers.inference import tower_encoder
from towers.model import TwoTower, read_towers_meta


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
                     config: MineConfig) -> tuple[list[list[int]], MineStats]:
    """Pick negatives per query from ranked candidates.

    Args:
        D, I: (nq, K) search scores and candidate rows, best first (-1 = none).
        positives: per query, the candidate rows that are its positives (never negatives).
        positive_score: (nq,) the query's lowest positive score (the hardest positive, as sbert does).

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


def mine_negatives(query_encoder: Encoder, result_encoder: Encoder, queries: Sequence[str], positives: Sequence[str],
                   config: MineConfig, corpus_texts: Sequence[str] = ()) -> tuple[list[list[str]], MineStats]:
    """Negatives (texts) for each (query, positive) pair; rows sharing a query share its negatives."""
    config.validate()
    corpus = list(dict.fromkeys([*positives, *corpus_texts]))  # unique candidate texts
    row_of = {t: i for i, t in enumerate(corpus)}
    uq = list(dict.fromkeys(queries))
    q_index = {t: i for i, t in enumerate(uq)}
    pos_rows: list[set[int]] = [set() for _ in uq]
    for q, p in zip(queries, positives):
        pos_rows[q_index[q]].add(row_of[p])
    xc = result_encoder.encode(corpus, batch_size=config.batch_size, show_progress=config.progress)  # (n, d)
    xq = query_encoder.encode(uq, batch_size=config.batch_size, show_progress=config.progress)  # (nq, d)
    pos_score = np.array([min(float(xq[i] @ xc[r]) for r in rows) for i, rows in enumerate(pos_rows)])
    factory = config.factory
    if factory == "auto":
        factory = auto_factory(len(corpus), xc.shape[1], parse_memory("")).factory
    index = build_faiss(xc, factory)
    k = min(len(corpus), config.range_max + max(len(r) for r in pos_rows))
    D, I = search(index, xq, k, **search_defaults(index))
    chosen, stats = select_negatives(D, I, pos_rows, pos_score, config)
    return [[corpus[r] for r in chosen[q_index[q]]] for q in queries], stats


def mine(config: MineConfig) -> tuple[Path, MineStats]:
    """Load towers and pairs, mine, write ``config.out`` (JSONL or Parquet) atomically."""
    check_required(config)
    config.validate()
    out = check_out_file(config.out, inputs={"--pairs": config.pairs, "--corpus": config.corpus},
                         overwrite=config.overwrite)
    if out.suffix not in (".jsonl", ".parquet"):
        raise ValueError(f"output '{out}' must end in .jsonl or .parquet")
    read_towers_meta(config.towers)  # every input checked before the towers load
    pairs = load_pairs(config.pairs, query_column=config.query_column, positive_column=config.positive_column,
                       negatives_column=config.negatives_column)
    extra = [d.encode_text for d in iter_docs(config.corpus)] if config.corpus else []
    model = TwoTower.load(config.towers)
    negatives, stats = mine_negatives(tower_encoder(model, "query", config.device),
                                      tower_encoder(model, "result", config.device),
                                      pairs["query"], pairs["positive"], config, extra)
    rows = [{"query": q, "positive": p, "negatives": n} for q, p, n in zip(pairs["query"], pairs["positive"], negatives)
            if config.keep_short or len(n) == config.num_negatives]
    if not rows:
        raise ValueError(f"no pair got {config.num_negatives} negatives ({stats.summary()}); widen --range-max, "
                         f"lower the margins or pass --keep-short")
    _write_rows(out, rows)
    return out, stats


def _write_rows(out: Path, rows: list[dict[str, Any]]) -> None:
    if out.suffix == ".jsonl":
        write_bytes_atomic(out, "".join(dumps_strict(r, ensure_ascii=False) + "\n" for r in rows).encode())
        return
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(rows), sink)
    write_bytes_atomic(out, sink.getvalue().to_pybytes())
