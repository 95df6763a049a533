"""Exact inner-product search with torch (matmul + topk, chunked): the GPU path when faiss has no GPU build.

The lent GPU machines have CUDA torch but no faiss-gpu; a Flat index is then searched here, on the GPU,
with the same ``search(xq, k) -> (D, I)`` contract as faiss (ids -1 / scores -inf where fewer than k exist).
"""
from __future__ import annotations

import numpy as np
import torch


class TorchFlatSearcher:
    """Holds ``xb`` (n, d) on a torch device; excluded rows (tombstones) are masked out of every search."""

    def __init__(self, xb: np.ndarray, device: str = "cuda", float16: bool = False,
                 excluded: np.ndarray | None = None, max_scores: int = 1 << 27) -> None:
        """
        Args:
            xb: base vectors (n, d) float32.
            float16: store xb in half precision (half the GPU memory; scores accumulate in fp16 matmul).
            excluded: int64 rows never returned.
            max_scores: elements of one (q_chunk, db_chunk) score block (bounds the temporary memory:
                2**27 floats = 512 MiB).
        """
        self.device = torch.device(device)
        self.dtype = torch.float16 if float16 else torch.float32
        self.xb = torch.from_numpy(np.ascontiguousarray(xb, np.float32)).to(self.device, self.dtype)  # (n, d)
        self.n, self.d = self.xb.shape
        self.mask = None
        if excluded is not None and len(excluded):
            self.mask = torch.zeros(self.n, dtype=torch.bool, device=self.device)
            self.mask[torch.from_numpy(np.asarray(excluded, np.int64)).to(self.device)] = True
        self.max_scores = max_scores

    def search(self, xq: np.ndarray, k: int, allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` by inner product: D float32 (nq, k) descending, I int64 (nq, k).

        Args:
            allowed: bool (n,): only these rows may be returned (a metadata filter), besides the exclusions.
        """
        mask = self.mask
        if allowed is not None:
            blocked = torch.from_numpy(~np.asarray(allowed, bool)).to(self.device)
            mask = blocked if mask is None else (mask | blocked)
        nq = xq.shape[0]
        kk = min(k, self.n)
        q_chunk = max(1, min(nq, 4096))
        db_chunk = max(kk, min(self.n, self.max_scores // q_chunk))
        D = np.full((nq, k), -np.inf, np.float32)
        I = np.full((nq, k), -1, np.int64)
        with torch.inference_mode():
            if nq * self.n <= self.max_scores and mask is None:  # one block: one matmul, one topk
                q = torch.from_numpy(xq).to(self.device, self.dtype)  # (nq, d)
                scores = q @ self.xb.T  # (nq, n)
                d, i = scores.float().topk(kk, dim=1)  # .float() returns float32 scores as they are
                if kk == k:
                    return d.cpu().numpy(), i.cpu().numpy()
                D[:, :kk], I[:, :kk] = d.cpu().numpy(), i.cpu().numpy()
                return D, I
            for qs in range(0, nq, q_chunk):
                q = torch.from_numpy(xq[qs : qs + q_chunk]).to(self.device, self.dtype)  # (b, d)
                best_d = best_i = None
                for ds in range(0, self.n, db_chunk):
                    scores = (q @ self.xb[ds : ds + db_chunk].T).float()  # (b, chunk); no copy when float32
                    if mask is not None:
                        scores.masked_fill_(mask[ds : ds + db_chunk], float("-inf"))
                    d, i = scores.topk(min(kk, scores.shape[1]), dim=1)
                    i += ds
                    if best_d is not None:  # merge with the running top-k of earlier db chunks
                        d, pos = torch.cat([best_d, d], 1).topk(kk, dim=1)
                        i = torch.cat([best_i, i], 1).gather(1, pos)
                    best_d, best_i = d, i
                assert best_d is not None and best_i is not None, "empty database"
                bd, bi = best_d.cpu().numpy(), best_i.cpu().numpy()
                bi[~np.isfinite(bd)] = -1  # masked rows surface only when fewer than k live rows exist
                D[qs : qs + len(bd), :kk], I[qs : qs + len(bd), :kk] = bd, bi
        return D, I
