"""``twotower train-reranker``: a cross-encoder trained on the user's pairs with negatives mined by their towers.

Recipe (sentence-transformers v4 reranker training, ``training_gooaq_bce.py`` and its blog post): mine hard
negatives with a bi-encoder (here the user's towers, with ``twotower mine``'s rules and false-negative margins:
``towers.negatives``), then train pointwise binary cross-entropy on (query, text, 1/0) with the positive weighted by
the number of negatives. The v4 post's strongest model on its own data was this BCE recipe; its LambdaLoss/ListNet
examples need the same mined lists and did not beat it there, so ``bce`` is the default and ``--loss listwise`` the
alternative. The dev evaluation is the one that matters for a second stage: the towers' own top ``--rerank-depth``
for each dev query, reordered; nDCG@10 before (the towers' order) and after (the reranker's), the best evaluation
kept (``--select best``), and the verdict line as ``train``'s.

Why here: the mining rules and exact search live in ``towers.negatives`` (``index.mine`` only adds faiss and an
extra corpus to them), the dev split in ``towers.data`` and the dev state in ``towers.dev``. Candidates are the pairs'
own positives, as in ``train --hard-negatives``, so nothing from ``index`` is needed and the verb sits in the lowest
layer that reaches all it uses.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from twotower.common.metrics import ndcg_at_k, recall_at_k
from twotower.common.outputs import check_out_dir
from twotower.towers.bases import resolve_base
from twotower.towers.data import DEV_MIN, load_pairs, split_dev
from twotower.towers.dev import METRIC, DevState, top_k
from twotower.towers.inference import tower_encoder
from twotower.towers.model import TwoTower, read_towers_meta
from twotower.towers.negatives import MiningRules, mine_negatives
from twotower.towers.reranker import LOSS_FNS, Reranker, check_reranker_dir
from twotower.towers.reranker_config import RerankerTrainConfig

__all__ = ["RerankerTrainConfig", "check_inputs", "train_reranker"]


def check_inputs(config: RerankerTrainConfig) -> Path:
    """Every cheap check before a model or the pairs load: --out, --towers, --base and its max length."""
    out = check_out_dir(config.out, ("reranker",), verb="train-reranker", overwrite=config.overwrite,
                        inputs={"--pairs": config.pairs, "--dev": config.dev_file, "--towers": config.towers,
                                "--base": config.base})
    read_towers_meta(config.towers)
    check_reranker_dir(resolve_base(config.base), config.max_length, trained=False)
    return out


def _split(config: RerankerTrainConfig, pairs: Any) -> tuple[Any, Any]:
    """(training pairs, dev pairs or None), as ``train``: a --dev file, the grouped automatic split, or none."""
    if config.dev_file is not None:
        return pairs, load_pairs(config.dev_file, config.query_column, config.positive_column)
    if config.dev == "none":
        return pairs, None
    train_rows, dev_rows = split_dev(pairs["query"], pairs["positive"], config.seed)
    if len(dev_rows) < DEV_MIN:
        print(f"twotower train-reranker: no dev split: {len(pairs)} pairs give {len(dev_rows)} dev pairs (fewer "
              f"than {DEV_MIN}); no verdict, give --dev FILE", file=sys.stderr)
        return pairs, None
    return pairs.select(train_rows), pairs.select(dev_rows)


class DevRerank:
    """The towers' dev top-k, fixed once: ``towers()`` scores their order, ``measure(reranker)`` the reordered."""

    def __init__(self, towers: TwoTower, queries: list[str], positives: list[str], depth: int, device: str,
                 batch_size: int) -> None:
        doc_of: dict[str, int] = {}
        rel_of: dict[str, dict[int, float]] = {}
        for q, p in zip(queries, positives):
            rel_of.setdefault(q, {})[doc_of.setdefault(p, len(doc_of))] = 1.0
        self.queries, self.docs = list(rel_of), list(doc_of)
        self.relevant = [rel_of[q] for q in self.queries]
        xq = tower_encoder(towers, "query", device).encode(self.queries, batch_size)  # (nq, d)
        xb = tower_encoder(towers, "result", device).encode(self.docs, batch_size)  # (nb, d)
        self.I = top_k(xq @ xb.T, min(depth, len(self.docs)))  # (nq, depth) the towers' order
        self.batch_size = batch_size

    def metrics(self, I: np.ndarray) -> dict[str, float]:
        return {"recall@10": recall_at_k(I, self.relevant, 10), METRIC: ndcg_at_k(I, self.relevant, 10)}

    def towers(self) -> dict[str, float]:
        return self.metrics(self.I)

    def measure(self, reranker: Reranker) -> dict[str, float]:
        ranked = reranker.rerank(self.queries, [[self.docs[j] for j in row] for row in self.I], self.batch_size)
        return self.metrics(np.stack([row[order] for row, (order, _) in zip(self.I, ranked)]))


def verdict(state: DevState, chosen: dict[str, Any], total: int, depth: int) -> str:
    """``dev nDCG@10 towers B -> towers+rerank A (+A-B, top-N reranked, step S/TOTAL)``."""
    assert state.base is not None, "the verdict needs the towers' own dev order"
    before, after = state.base[METRIC], chosen[METRIC]
    return (f"dev nDCG@10 towers {before:.3f} -> towers+rerank {after:.3f} ({after - before:+.3f}, top-{depth} "
            f"reranked, step {chosen['step']}/{total})")


def train_reranker(config: RerankerTrainConfig) -> tuple[Path, dict[str, Any]]:
    """Mine, train, evaluate, save; returns (the RERANKER dir, its reranker.json)."""
    out = check_inputs(config)
    base = resolve_base(config.base)
    pairs = load_pairs(config.pairs, config.query_column, config.positive_column)
    pairs, dev = _split(config, pairs)
    towers = TwoTower.load(config.towers)
    rules = MiningRules(num_negatives=config.hard_negatives, range_max=config.range_max, seed=config.seed,
                        relative_margin=config.relative_margin, absolute_margin=config.absolute_margin,
                        batch_size=config.eval_batch_size, progress=config.progress)
    queries, positives = list(pairs["query"]), list(pairs["positive"])
    negatives, stats = mine_negatives(tower_encoder(towers, "query", config.device),
                                      tower_encoder(towers, "result", config.device), queries, positives, rules)
    rows = [(q, p, n) for q, p, n in zip(queries, positives, negatives) if len(n) == config.hard_negatives]
    print(f"twotower train-reranker: mined: {stats.summary()}; {len(rows)} of {len(queries)} pairs kept",
          file=sys.stderr)
    if not rows:
        raise ValueError(f"no pair got {config.hard_negatives} negatives ({stats.summary()}); lower "
                         f"--hard-negatives, widen --range-max or lower the margins")
    dev_eval = (DevRerank(towers, list(dev["query"]), list(dev["positive"]), config.rerank_depth, config.device,
                          config.eval_batch_size) if dev is not None else None)
    del towers

    reranker = Reranker.from_base(base, config.max_length, config.device, config.seed)
    model, loss_fn = reranker.model.train(), LOSS_FNS[config.loss]
    per_epoch = -(-len(rows) // config.batch_size)
    total = config.max_steps or per_epoch * config.epochs
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=config.lr)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(config.warmup_ratio * total), total)
    state, best_weights = DevState(), None
    if dev_eval is not None:
        state.record(0, dev_eval.towers())  # the "before": the towers' own order

    def evaluate(step: int) -> None:
        nonlocal best_weights
        assert dev_eval is not None, "evaluate only with a dev set"
        metrics = dev_eval.measure(reranker)
        tqdm.write(f"step {step}: dev nDCG@10 after reranking = {metrics[METRIC]:.4f}")
        if state.record(step, metrics) and config.select == "best":
            best_weights = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}

    rng = np.random.default_rng(config.seed)
    order: list[int] = []
    losses: list[float] = []
    for step in tqdm(range(1, total + 1), desc="train-reranker", unit="step", disable=not config.progress):
        if len(order) < config.batch_size:
            order += rng.permutation(len(rows)).tolist()
        batch, order = [rows[i] for i in order[:config.batch_size]], order[config.batch_size:]
        group = 1 + config.hard_negatives
        qs = [q for q, _, _ in batch for _ in range(group)]
        texts = [t for _, p, n in batch for t in (p, *n)]
        loss = loss_fn(reranker.logits(qs, texts).view(len(batch), group))  # (b, 1 + n), column 0 the positive
        loss.backward()
        if config.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if dev_eval is not None and ((config.eval_every and step % config.eval_every == 0) or step == total):
            evaluate(step)

    summary: dict[str, Any] = {}
    if dev_eval is not None:
        chosen = state.last
        if config.select == "best" and state.best is not None and best_weights is not None and \
                state.best["step"] != total:
            model.load_state_dict(best_weights)
            chosen = state.best
        assert chosen is not None and state.base is not None, "dev was measured before and after training"
        improved = chosen[METRIC] > state.base[METRIC]
        summary = {"improved": improved, "verdict": verdict(state, chosen, total, config.rerank_depth),
                   "dev_metrics": {"towers": state.base, "reranked": chosen, "pairs": len(dev),
                                   "queries": len(dev_eval.queries), "history": state.history}}
    meta = {"base": str(config.base), "towers": read_towers_meta(config.towers).get("fingerprint"),
            "train_config": config.to_dict(), "steps": total, "pairs_trained": len(rows),
            "mined": stats.__dict__, "first_loss": float(np.mean(losses[:10])),
            "final_loss": float(np.mean(losses[-10:])), **summary}
    model.eval()
    reranker.save(out, meta)
    return out, reranker.meta
