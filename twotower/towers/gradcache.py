"""GradCache: a contrastive batch far larger than fits in memory, with the gradients of the uncached loss.

Gao, Zhang, Han and Callan 2021, "Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup"
(arXiv:2101.06983). InfoNCE couples every row of the batch, so ordinary gradient accumulation over
micro-batches would change the loss (fewer negatives). Instead:

1. encode the batch chunk by chunk with no autograd graph (peak memory: one chunk's activations);
2. compute the full-batch loss on those embeddings and its gradient w.r.t. every embedding (cheap: (B, d));
3. re-encode each chunk with a graph and backpropagate the cached embedding gradients into the encoders
   (chain rule: dL/dθ = sum_i dL/de_i · de_i/dθ).

Each chunk's RNG state is saved in step 1 and replayed in step 3, so dropout draws the same masks and the
re-encoded embeddings are exactly the ones the loss saw. The cost is one extra forward pass per step.
Under DDP the loss in step 2 gathers across ranks as usual (its backward all-reduces the embedding
gradients), and step 3 lets DDP all-reduce parameter gradients once, on the last chunk (``no_sync`` before).
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Optional

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

Features = dict[str, torch.Tensor]
Chunk = tuple[Optional[Features], Optional[Features]]


def split_features(features: Features, chunk_size: int) -> list[Features]:
    """Row chunks of tokenised inputs (input_ids, attention_mask: (B, T)) -> [(<=C, T_c)].

    Trailing columns that are padding in every row of a chunk are cut (memory), which changes nothing:
    right padding sits after every real token; with left padding the last column is never all padding.
    """
    if chunk_size < 1:
        raise ValueError(f"cache chunk size must be >= 1, got {chunk_size}")
    out = []
    for start in range(0, len(features["attention_mask"]), chunk_size):
        chunk = {k: v[start: start + chunk_size] for k, v in features.items()}
        used = chunk["attention_mask"].bool().any(0).nonzero()
        width = int(used.max()) + 1 if len(used) else 1
        out.append({k: v[:, :width] for k, v in chunk.items()})
    return out


def chunk_pairs(q_features: Features, r_features: Features, chunk_size: int) -> list[Chunk]:
    """Chunk i = (query rows [iC, (i+1)C), result rows [iC, (i+1)C)); the shorter side runs out first (None)."""
    qs, rs = split_features(q_features, chunk_size), split_features(r_features, chunk_size)
    return [(qs[i] if i < len(qs) else None, rs[i] if i < len(rs) else None) for i in range(max(len(qs), len(rs)))]


class RngState:
    """The CPU (and this CUDA device's) RNG state at construction; :meth:`replay` runs code from it again
    and leaves the RNG as it found it."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    @contextmanager
    def replay(self) -> Iterator[None]:
        with torch.random.fork_rng(devices=[self.device] if self.cuda is not None else []):
            torch.set_rng_state(self.cpu)
            if self.cuda is not None:
                torch.cuda.set_rng_state(self.cuda, self.device)
            yield


def cached_backward(
    forward: nn.Module,
    q_features: Features,
    r_features: Features,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    chunk_size: int,
    scale: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """GradCache step: accumulate into ``.grad`` the gradients of ``loss_fn`` over the whole batch.

    Args:
        forward: ``(q_features | None, r_features | None) -> (q (b, d) | None, r (b, d) | None)``, possibly
            wrapped in ``DistributedDataParallel``.
        q_features: tokenised queries (B, T_q); r_features: tokenised results (positives then hard negatives,
            R = B + M rows).
        loss_fn: ``(q (B, d), r (R, d)) -> 0-d loss``.
        chunk_size: rows per tower per forward pass.
        scale: applied to the loss before backward (``GradScaler.scale`` for fp16), or None.

    Returns:
        The loss, detached.
    """
    ddp = isinstance(forward, DistributedDataParallel)
    plain = forward.module if ddp else forward
    chunks = chunk_pairs(q_features, r_features, chunk_size)
    device = q_features["input_ids"].device
    states, q_parts, r_parts = [], [], []
    with torch.no_grad():  # 1. embeddings of every chunk, no graph kept
        for qc, rc in chunks:
            states.append(RngState(device))
            q, r = plain(qc, rc)
            q_parts += [q] if q is not None else []
            r_parts += [r] if r is not None else []
    q_all = torch.cat(q_parts).requires_grad_()  # (B, d) leaves
    r_all = torch.cat(r_parts).requires_grad_()  # (R, d)
    loss = loss_fn(q_all, r_all)  # 2. full-batch loss; its gradient lands on the leaves (and the temperature)
    (scale(loss) if scale is not None else loss).backward()
    assert q_all.grad is not None and r_all.grad is not None, "the loss must depend on every embedding"
    q_grads, r_grads = q_all.grad.split(chunk_size), r_all.grad.split(chunk_size)
    # 3. Re-encode with a graph and push the cached gradients through. Last chunk first, so the final one -
    # where DDP all-reduces - is chunk 0, which always holds rows of both towers (every parameter is used).
    for i in reversed(range(len(chunks))):
        sync = nullcontext() if i == 0 or not ddp else forward.no_sync()
        with sync, states[i].replay():
            q, r = forward(*chunks[i])
            cached = [(e, grads[i]) for e, grads in ((q, q_grads), (r, r_grads)) if e is not None]
            surrogate = sum((e * g).sum() for e, g in cached)  # d/dθ = sum_rows cached grad · de/dθ
            surrogate.backward()
    return loss.detach()
