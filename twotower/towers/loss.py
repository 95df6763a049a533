"""InfoNCE with in-batch negatives, and a fixed or learnable temperature.

The loss of sentence-transformers' ``MultipleNegativesRankingLoss`` (Henderson et al. 2017, "Efficient
Natural Language Response Suggestion for Smart Reply"), i.e. InfoNCE (van den Oord et al. 2018,
"Representation Learning with Contrastive Predictive Coding", arXiv:1807.03748): each query must pick its
own positive out of every positive in the batch plus every hard negative.

:func:`matryoshka_loss` adds Matryoshka Representation Learning (Kusupati et al. 2022, arXiv:2205.13147;
sentence-transformers' ``MatryoshkaLoss``): the same InfoNCE at several prefix dims, so a truncated embedding
still retrieves.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

from twotower.towers.distributed import gather_batch


def info_nce(
    q: torch.Tensor,
    p: torch.Tensor,
    negs: torch.Tensor | None = None,
    temperature: float | torch.Tensor = 0.05,
    symmetric: bool = False,
    labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """Cross-entropy of each query over [all positives; all hard negatives].

    Args:
        q: query embeddings (B, d).
        p: positive embeddings (P, d); row ``labels[i]`` is query i's positive (P = B on one process; under
            data parallelism P is the all-gathered positives and ``labels`` points at this rank's rows).
        negs: hard-negative embeddings (M, d) appended as extra columns, shared by all queries, or None.
        temperature: scalar (float or 0-d tensor, e.g. :class:`Temperature`'s output); scores are cos / t.
        symmetric: also score each positive against all queries (result -> query) and average both terms;
            needs ``q`` and ``p`` aligned row for row.
        labels: (B,) column of each query's positive; defaults to ``arange(B)``.

    Returns:
        0-d loss tensor.
    """
    labels = torch.arange(len(q), device=q.device) if labels is None else labels
    candidates = p if negs is None or len(negs) == 0 else torch.cat([p, negs])  # (P + M, d)
    scores = q @ candidates.T / temperature  # (B, P + M)
    loss = F.cross_entropy(scores, labels)
    if symmetric:
        assert len(q) == len(p), f"symmetric InfoNCE needs aligned q and p, got {len(q)} and {len(p)} rows"
        loss = (loss + F.cross_entropy(scores[:, : len(p)].T, labels)) / 2  # (P, B): positive -> its query
    return loss


def contrastive_loss(
    q: torch.Tensor,
    p: torch.Tensor,
    negs: torch.Tensor,
    temperature: float | torch.Tensor = 0.05,
    symmetric: bool = False,
) -> torch.Tensor:
    """InfoNCE of this process's queries over the positives and hard negatives of *every* process.

    On one process this is :func:`info_nce`. Under ``torch.distributed`` the rows of all ranks are
    all-gathered with gradients (:func:`towers.distributed.gather_batch`), each query's label points at its
    own positive inside the gathered block (offset by the rows of lower ranks), and the symmetric term
    scores each local positive against every rank's queries. The mean of this loss over ranks is the loss
    of the concatenated batch, and DDP's gradient average then equals its gradient (see
    ``towers.distributed``).

    Args:
        q: this rank's queries (B, d); p: its positives (B, d); negs: its hard negatives (M, d), M may be 0.
        temperature, symmetric: as in :func:`info_nce`.

    Returns:
        0-d loss of this rank's rows.
    """
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return info_nce(q, p, negs, temperature, symmetric)
    Q, P, N, q_offset, p_offset = gather_batch(q, p, negs)  # (W*B, d), (W*B, d), (sum M, d)
    loss = info_nce(q, P, N, temperature, labels=p_offset + torch.arange(len(q), device=q.device))
    if symmetric:  # each local positive picks its query among all ranks' queries
        back = info_nce(p, Q, None, temperature, labels=q_offset + torch.arange(len(p), device=p.device))
        loss = (loss + back) / 2
    return loss


def truncate_renorm(x: torch.Tensor, dim: int) -> torch.Tensor:
    """The first ``dim`` coordinates of each row, L2-normalised again: (n, d) -> (n, dim)."""
    return F.normalize(x[..., :dim], dim=-1)


def matryoshka_loss(
    q: torch.Tensor,
    p: torch.Tensor,
    negs: torch.Tensor,
    dims: tuple[int, ...],
    weights: tuple[float, ...],
    temperature: float | torch.Tensor = 0.05,
    symmetric: bool = False,
) -> torch.Tensor:
    """Matryoshka loss: ``sum_i weights[i] * contrastive_loss`` on the first ``dims[i]`` coordinates, each
    prefix re-normalised (cosine at every dim, as the truncated index and query will be).

    Args:
        q, p, negs, temperature, symmetric: as in :func:`contrastive_loss` (unit rows).
        dims: prefix dims, e.g. (384, 256, 128, 64); each <= d. weights: one per dim.

    Returns:
        0-d loss tensor.
    """
    assert len(dims) == len(weights), f"{len(dims)} dims but {len(weights)} weights"
    losses = [w * contrastive_loss(truncate_renorm(q, d), truncate_renorm(p, d), truncate_renorm(negs, d),
                                   temperature, symmetric) for d, w in zip(dims, weights)]
    return torch.stack(losses).sum()


class Temperature(nn.Module):
    """Softmax temperature, learnable as ``log t`` (CLIP) and clamped so it cannot collapse or explode.

    Fixed (``learnable=False``) it is a buffer, so it is saved with the state but never trained.
    """

    def __init__(self, init: float = 0.05, learnable: bool = False, min_t: float = 0.01, max_t: float = 1.0) -> None:
        super().__init__()
        if not min_t <= init <= max_t:
            raise ValueError(f"temperature {init} is outside [{min_t}, {max_t}]")
        log_t = torch.tensor(math.log(init))
        if learnable:
            self.log_t = nn.Parameter(log_t)
        else:
            self.register_buffer("log_t", log_t)
        self.min_t, self.max_t = min_t, max_t

    def forward(self) -> torch.Tensor:
        return self.log_t.exp().clamp(self.min_t, self.max_t)
