"""Distillation from a cross-encoder into the towers: ``twotower train --teacher RERANKER`` (margin-MSE).

Hofstätter et al. 2020, "Improving Efficient Neural Ranking Models with Cross-Architecture Knowledge
Distillation": the student is trained to reproduce the teacher's *margin* between a query's positive and each of
its hard negatives, not its raw scores (a cross-encoder's logits and a bi-encoder's cosines live on different
scales; margins can be matched). Here the student margin is (q.p - q.n) / t with the InfoNCE temperature t (the
scale the contrastive loss already uses), the teacher margin the reranker's logit difference, and the term is added
to the contrastive loss with ``--teacher-weight``. The teacher scores every (query, text) pair once per set of
negatives (the data's, or each mining round's) before those steps run.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from twotower.towers.reranker import Reranker

Scores = dict[tuple[str, str], float]  # (query, text) -> the teacher's logit


def teacher_scores(reranker: Reranker, queries: Sequence[str], positives: Sequence[str],
                   negatives: Sequence[Sequence[str]], batch_size: int = 64) -> Scores:
    """The teacher's logit of every distinct (query, positive) and (query, negative) pair of the rows."""
    pairs = list(dict.fromkeys((q, t) for q, p, negs in zip(queries, positives, negatives) for t in (p, *negs)))
    scores = reranker.score([q for q, _ in pairs], [t for _, t in pairs], batch_size)
    return {pair: float(s) for pair, s in zip(pairs, scores)}


def batch_margins(queries: Sequence[str], positives: Sequence[str], negatives: Sequence[str],
                  owners: Sequence[int], scores: Scores) -> list[float]:
    """Teacher margin s(q, p) - s(q, n) of each negative of a batch (``owners[j]``: the row negative j belongs to)."""
    return [scores[(queries[o], positives[o])] - scores[(queries[o], n)] for o, n in zip(owners, negatives)]


def margin_mse(q: torch.Tensor, p: torch.Tensor, negs: torch.Tensor, owners: Sequence[int],
               teacher_margins: Sequence[float], temperature: torch.Tensor | float) -> torch.Tensor:
    """MSE between student and teacher margins.

    Args:
        q, p: (B, d) queries and their positives; negs: (M, d) hard negatives, negative j of row ``owners[j]``.
        teacher_margins: (M,) the teacher's s(q, p) - s(q, n).
        temperature: the InfoNCE temperature (student margins are cosine differences / t).
    """
    idx = torch.as_tensor(list(owners), device=q.device, dtype=torch.long)
    student = ((q[idx] * p[idx]).sum(-1) - (q[idx] * negs).sum(-1)) / temperature  # (M,)
    return F.mse_loss(student, torch.as_tensor(list(teacher_margins), device=q.device, dtype=student.dtype))
