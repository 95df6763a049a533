"""Data-parallel training with ``torch.distributed``: set-up from torchrun's environment, rank-0-only side
effects, and an all-gather that keeps gradients (in-batch negatives from every rank).

Launch with ``torchrun --nproc_per_node N -m towers.cli ...`` (or ``twotower train --nproc N``); torchrun sets
RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT, and :func:`init_distributed` reads them. Without
them everything here is a no-op for a single process.

Exactness (why no loss rescaling is needed): rank r computes ``L_r``, the mean InfoNCE of its own B queries
against the positives and hard negatives of *all* ranks. The global loss of the concatenated batch is
``L = mean_r L_r``. The gather's backward all-reduces (sums) the gradient w.r.t. the gathered rows, so the rows
rank s encoded receive ``sum_r dL_r/d rows_s``; DDP then averages the parameter gradients over ranks, which
gives ``(1/W) sum_s sum_r dL_r/dθ|_s = dL/dθ``: exactly the single-process gradient over the whole batch.
"""
from __future__ import annotations

import builtins
import inspect
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from twotower.common.cliargs import USER_ERRORS

BACKENDS = ("auto", "gloo", "nccl")
T = TypeVar("T")
# Errors re-raised on every rank with their own type (the CLI prints these as one clean line).
_USER_ERRORS = USER_ERRORS


@dataclass(frozen=True)
class DistEnv:
    """Where this process stands in the job (a single process is rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # init_distributed created the process group, so shutdown() destroys it

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    """True inside a process that torchrun (or another env:// launcher) started."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def check_launch(nproc: int) -> None:
    """``--nproc N`` is for the launcher; inside torchrun it must match the processes started on this node."""
    if nproc == 1:
        return
    if not launched_by_torchrun():
        raise ValueError(f"--nproc {nproc}: the processes are started by `twotower train --nproc N` (or "
                         "`torchrun --nproc_per_node N -m towers.cli ...`); train() runs inside each of them")
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "0"))
    if local != nproc:
        raise ValueError(f"--nproc {nproc}, but torchrun started {local} processes on this machine; leave --nproc "
                         "at 1 when launching torchrun yourself")


def resolve_backend(backend: str, device: torch.device) -> str:
    """``auto`` -> nccl for CUDA devices, gloo otherwise; a backend that cannot work is refused."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend '{backend}': choose {', '.join(BACKENDS)}")
    if backend == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise ValueError(f"backend nccl needs CUDA tensors but the device is '{device}'; use --backend gloo or "
                         "--device cuda")
    return backend


def init_distributed(backend: str, device: torch.device, timeout_minutes: float = 30.0) -> DistEnv:
    """Join the process group torchrun describes in the environment (a no-op for one process).

    A group that the caller already initialised (e.g. tests with ``torch.multiprocessing.spawn``) is used
    as is and left for the caller to destroy.
    """
    if dist.is_available() and dist.is_initialized():
        rank = dist.get_rank()
        return DistEnv(rank, dist.get_world_size(), int(os.environ.get("LOCAL_RANK", rank)), owns_group=False)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistEnv()
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise ValueError(f"WORLD_SIZE={world} is set but {', '.join(missing)} is not; launch with torchrun "
                         "(or `twotower train --nproc N`)")
    name = resolve_backend(backend, device)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL binds each process to its GPU
    dist.init_process_group(name, init_method="env://", timeout=timedelta(minutes=timeout_minutes))
    return DistEnv(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), owns_group=True)


def shutdown(env: DistEnv) -> None:
    if env.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    """Wait for every rank (no-op for one process), e.g. while rank 0 evaluates or saves."""
    if _active():
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def broadcast_object(obj: T) -> T:
    """Rank 0's ``obj`` on every rank (small picklable control values only, never user data)."""
    if not _active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_object(obj: T) -> list[T]:
    """Every rank's ``obj``, in rank order (``[obj]`` for one process)."""
    if not _active():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def run_collectively(fn: Callable[[], T], main_only: bool = False) -> T:
    """Run ``fn`` on every rank (or only on rank 0, broadcasting its result) and agree on failure.

    An error on any rank is raised on *every* rank, so none is left waiting at the next collective: the
    failing rank re-raises its own exception; the others raise the same kind (user errors keep their type)
    naming the rank and its message.
    """
    if not _active():
        return fn()
    rank = dist.get_rank()
    result: Any = None
    error: BaseException | None = None
    if rank == 0 or not main_only:
        try:
            result = fn()
        except Exception as exc:  # noqa: BLE001 - re-raised below, on every rank
            error = exc
    reports = all_gather_object(None if error is None else (type(error).__name__, str(error)))
    if error is not None:
        raise error
    for other, report in enumerate(reports):
        if report is not None:
            kind = getattr(builtins, report[0], None)
            kind = kind if isinstance(kind, type) and issubclass(kind, _USER_ERRORS) else RuntimeError
            raise kind(f"rank {other}: {report[1]}")
    return broadcast_object(result) if main_only else result


def global_mean(value: torch.Tensor) -> float:
    """Mean of a 0-d tensor over ranks (gloo has no AVG op, hence SUM / W)."""
    value = value.detach().float().clone()
    if _active():
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return float(value)


def average_gradients(params: Iterable[nn.Parameter]) -> None:
    """Average ``.grad`` over ranks for parameters that DDP does not own (the learnable temperature)."""
    if not _active():
        return
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= dist.get_world_size()


class _GatherRows(torch.autograd.Function):
    """All-gather of rows (n_rank, d) -> (sum n, d), rank order; row counts may differ across ranks."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, sizes: list[int], rank: int) -> torch.Tensor:
        ctx.sizes, ctx.rank = sizes, rank
        padded = x.new_zeros((max(sizes), *x.shape[1:]))  # all_gather needs equal shapes
        padded[: len(x)] = x
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded)
        return torch.cat([part[:n] for part, n in zip(parts, sizes)])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        # Every rank's loss may depend on this rank's rows: sum their gradients (see the module docstring).
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start: start + ctx.sizes[ctx.rank]], None, None


def gather_batch(q: torch.Tensor, p: torch.Tensor, negs: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, int]:
    """All ranks' queries, positives and hard negatives, with gradients flowing back to their rank.

    One collective for the three (packed as rows ``[q; p; negs]``), so the backward all-reduce runs on every
    rank even where ``negs`` is empty.

    Args:
        q: this rank's queries (B, d); p: its positives (B, d), aligned with q; negs: its hard negatives (M, d).

    Returns:
        (Q (sum B, d), P (sum B, d), N (sum M, d), q_offset, p_offset): rows in rank order, so the
        concatenation equals a single process's batch; this rank's rows start at the offsets.
    """
    rank, world = dist.get_rank(), dist.get_world_size()
    counts = torch.tensor([len(q), len(p), len(negs)], device=q.device)
    all_counts = [torch.empty_like(counts) for _ in range(world)]
    dist.all_gather(all_counts, counts)
    nq, npos, nneg = torch.stack(all_counts).T.tolist()  # each: per-rank row counts
    sizes = [a + b + c for a, b, c in zip(nq, npos, nneg)]
    packed = _GatherRows.apply(torch.cat([q, p, negs]), sizes, rank)  # (sum sizes, d)
    Q, P, N = [], [], []
    for block, a, b in zip(packed.split(sizes), nq, npos):  # each rank's [q; p; negs] block
        Q.append(block[:a])
        P.append(block[a: a + b])
        N.append(block[a + b:])
    return torch.cat(Q), torch.cat(P), torch.cat(N), sum(nq[:rank]), sum(npos[:rank])


def wrap_ddp(module: nn.Module, device: torch.device, find_unused_parameters: bool) -> nn.Module:
    """``DistributedDataParallel(module)`` when running distributed, else ``module`` itself.

    Buffers are not re-sent every forward: the towers' buffers (position ids) are constants.
    """
    if not _active():
        return module
    # torch >= 2.13 renamed the option (and warns on the old name); older releases only know the old one
    options = inspect.signature(DistributedDataParallel).parameters
    no_resync = "forward_sync_buffers" if "forward_sync_buffers" in options else "broadcast_buffers"
    return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None,
                                   find_unused_parameters=find_unused_parameters, **{no_resync: False})


def unused_parameters(module: nn.Module, *inputs: Any) -> list[str]:
    """Names of trainable parameters that get no gradient from ``module(*inputs)`` (e.g. BERT's pooler,
    computed but never used by the towers). DDP needs ``find_unused_parameters=True`` only when this is
    non-empty. The RNG is forked so the probe does not shift the dropout stream."""
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        outputs = [o for o in module(*inputs) if isinstance(o, torch.Tensor)]
        total = sum(o.float().sum() for o in outputs)
        grads = torch.autograd.grad(total, [p for _, p in named], allow_unused=True)
    return [n for (n, _), g in zip(named, grads) if g is None]
