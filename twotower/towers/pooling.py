"""Pooling token states into one vector per text: mean, cls, last (EOS) or max."""
from __future__ import annotations

import torch

POOLINGS = ("mean", "cls", "last", "max")


def check_pooling(pooling: str) -> str:
    if pooling not in POOLINGS:
        raise ValueError(f"unknown pooling '{pooling}': choose {', '.join(POOLINGS)}")
    return pooling


def pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """Pool token states (B, T, H) with attention mask (B, T) into (B, H).

    ``last`` takes the last non-pad token and works with left or right padding.
    """
    if pooling == "mean":
        m = mask.bool().unsqueeze(-1)  # where(), not a product: a decoder's left-pad states may be non-finite
        return torch.where(m, hidden, 0).sum(1) / m.sum(1).to(hidden.dtype).clamp(min=1e-9)
    if pooling == "cls":
        return hidden[:, 0]
    if pooling == "last":
        # Position of the last 1 in each row: T-1 minus the first 1 of the reversed mask.
        last = mask.shape[1] - 1 - mask.flip(1).int().argmax(1)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    if pooling == "max":
        return hidden.masked_fill(~mask.bool().unsqueeze(-1), -1e9).max(1).values
    raise ValueError(f"unknown pooling '{pooling}': choose {', '.join(POOLINGS)}")
