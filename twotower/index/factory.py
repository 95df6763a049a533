"""Choosing a FAISS ``index_factory`` string from corpus size and a memory budget (``--factory auto``).

The rules follow the faiss wiki "Guidelines to choose an index": exact search while it is cheap, an
inverted file (IVF) with ``nlist ~ 4 * sqrt(n)`` beyond that, and compressed codes (SQ8, then PQ) only when
the float vectors would not fit the memory budget; compact codes come with re-scoring (``index.rescore``): the
float vectors stay on disk (``vectors.npy``, memory-mapped) and re-score ``k * N`` candidates exactly. The
estimates count the codes, the 8-byte ids an IVF stores per vector and the coarse centroids; they are what the
index needs in RAM to search (the memory-mapped vectors are disk, read a few rows per query).
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass

# Below this many vectors exact search is fast enough (tens of ms per query batch on a CPU) and has no
# recall loss, so ``auto`` picks Flat.
EXACT_MAX = 100_000
# PQ sub-quantizer counts tried from the largest (best recall) to the smallest (most compact); M must divide d.
PQ_M_CHOICES = (64, 48, 32, 24, 16, 12, 8, 4)
# faiss k-means wants >= 39 training points per centroid; nlist is capped so every list can be trained.
MIN_POINTS_PER_CENTROID = 39
# Default HNSW search breadth: ~0.95+ recall@10 on typical embeddings with HNSW32 (faiss default is 16).
DEFAULT_EF_SEARCH = 64

_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 2**10, "kib": 2**10, "m": 2**20, "mb": 2**20, "mib": 2**20,
          "g": 2**30, "gb": 2**30, "gib": 2**30, "t": 2**40, "tb": 2**40, "tib": 2**40}


@dataclass(frozen=True)
class FactoryChoice:
    """What ``auto`` picked and why (recorded in the manifest)."""

    factory: str
    estimated_bytes: int
    reason: str
    rescore: int = 0  # candidates x k re-scored with the float vectors on disk (0: none, the floats fit)


def default_rescore(factory: str) -> int:
    """The re-scoring factor that suits a factory's codes (scripts/bench_index.py, BENCHMARKS.md): 0 for float
    vectors (Flat, IVF,Flat, HNSW32), 4 for scalar codes (SQ8/SQ6/SQ4/SQfp16), 10 for PQ, 20 for sign bits
    (recall@10 >= 0.99 of exact on 500k synthetic vectors; sign bits 0.96 at 10, 0.99 at 20-40 on real ones)."""
    last = factory.split(",")[-1].strip()
    if factory.startswith("B"):
        return 20
    if re.search(r"PQ\d", last):
        return 10
    if last.startswith("SQ"):
        return 4
    return 0


def parse_memory(text: str) -> int:
    """``"8GB"``, ``"512M"``, ``"1.5g"``, ``"1000000"`` -> bytes (binary units). Empty -> half the host RAM."""
    if not text:
        return host_memory_bytes() // 2
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"bad memory size '{text}': use a number with an optional unit, e.g. 512MB, 8GB, 1.5TB")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def host_memory_bytes() -> int:
    """Physical RAM of this machine (POSIX ``sysconf``)."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def choose_nlist(n: int) -> int:
    """``4 * sqrt(n)`` rounded to a power of two, capped so each list gets enough training points."""
    nlist = 2 ** round(math.log2(max(1.0, 4 * math.sqrt(n))))
    cap = max(1, n // MIN_POINTS_PER_CENTROID)
    while nlist > cap:
        nlist //= 2
    return max(1, nlist)


def default_nprobe(nlist: int) -> int:
    """Lists visited per query: 1/64 of them, at least 8, at most 256 (32 for IVF2048, 64 for IVF4096).

    On clustered synthetic vectors this is past the recall@10 = 0.99 knee (scripts/bench_index.py); real
    embeddings are less clustered, so the default keeps a margin. Tune per query with ``nprobe``.
    """
    return int(min(nlist, max(8, min(256, nlist // 64))))


def auto_factory(n: int, d: int, budget_bytes: int) -> FactoryChoice:
    """Pick a factory string for ``n`` vectors of dimension ``d`` that fits ``budget_bytes`` of RAM.

    Raises:
        ValueError: even the most compact IVF-PQ would not fit; the message gives the bytes needed.
    """
    if n <= 0 or d <= 0:
        raise ValueError(f"cannot choose an index for n={n} vectors of dim {d}")
    flat = 4 * n * d
    if n < EXACT_MAX and flat <= budget_bytes:
        return FactoryChoice("Flat", flat, f"n={n} < {EXACT_MAX}: exact search")
    nlist = choose_nlist(n)
    centroids = 4 * nlist * d
    # (factory, bytes per vector) from most to least accurate; +8 for the id an inverted list stores.
    tiers = [(f"IVF{nlist},Flat", 4 * d + 8), (f"IVF{nlist},SQ8", d + 8)]
    tiers += [(f"IVF{nlist},PQ{m}", m + 8) for m in PQ_M_CHOICES if d % m == 0 and m < d]
    for factory, per_vector in tiers:
        need = n * per_vector + centroids
        if need <= budget_bytes:
            rescore = default_rescore(factory)
            kind = "float vectors fit" if not rescore else \
                f"float vectors exceed the budget: compact codes + re-scoring {rescore}x k from vectors.npy on disk"
            return FactoryChoice(factory, need, f"n={n}: IVF with nlist={nlist}; {kind} "
                                 f"({format_bytes(need)} of {format_bytes(budget_bytes)})", rescore)
    smallest_factory, per_vector = tiers[-1]
    need = n * per_vector + centroids
    raise ValueError(
        f"memory budget {format_bytes(budget_bytes)} is too small for {n} vectors of dim {d}: even "
        f"'{smallest_factory}' needs ~{format_bytes(need)}; raise --memory-budget, pass an explicit --factory, "
        f"or shard the corpus")
