"""Hard-negative mining for the next training round (``twotower mine``).

The selection rules (ranks, false-negative margins) live in ``towers.negatives``, shared with
``twotower train --hard-negatives``; this module adds the verb: a TOWERS dir, an extra corpus, candidates in a
faiss index, and the output file.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from twotower.common.atomic import write_bytes_atomic
from twotower.common.cliargs import check_required
from twotower.common.encoder import Encoder
from twotower.common.jsonl import dumps_strict
from twotower.common.outputs import check_out_file
from twotower.index.config import MineConfig
from twotower.index.corpus import iter_docs
from twotower.index.factory import auto_factory, parse_memory
from twotower.index.faiss_utils import build_faiss, search, search_defaults
from twotower.towers.data import load_pairs
from twotower.towers.inference import tower_encoder
from twotower.towers.model import TwoTower, read_towers_meta
from twotower.towers.negatives import MineStats, select_negatives
from twotower.towers.negatives import mine_negatives as towers_mine

__all__ = ["MineConfig", "MineStats", "mine", "mine_negatives", "select_negatives"]


def mine_negatives(query_encoder: Encoder, result_encoder: Encoder, queries: Sequence[str], positives: Sequence[str],
                   config: MineConfig, corpus_texts: Sequence[str] = ()) -> tuple[list[list[str]], MineStats]:
    """Negatives (texts) for each (query, positive) pair (``towers.negatives.mine_negatives``) with the candidates
    in a faiss index (``config.factory``; ``auto``: Flat below 100k candidates, IVF beyond)."""
    config.validate()

    def faiss_search(xb: np.ndarray, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        factory = config.factory
        if factory == "auto":
            factory = auto_factory(len(xb), xb.shape[1], parse_memory("")).factory
        index = build_faiss(xb, factory)
        return search(index, xq, k, **search_defaults(index))

    return towers_mine(query_encoder, result_encoder, queries, positives, config, corpus_texts, faiss_search)


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
