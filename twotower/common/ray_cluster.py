"""Ray, the optional cluster engine (``index build --engine ray``, ``serve --engine ray``): import, connect, size.

Ray is an extra (``pip install 'twotower[ray]'``); nothing else imports it, so ``import index`` and every other
verb work without it. ``connect("")`` starts a local Ray on this machine (all its CPUs, no dashboard), so the
same command runs on a laptop; ``connect("auto")`` joins the cluster started by ``ray start --head`` on this
node, ``connect("ray://HOST:10001")`` a remote one through Ray Client.

Resources are sized from what the cluster reports (``ray.cluster_resources()``), never assumed: a job that asks
for more CPUs or GPUs than the cluster has fails at once naming both figures, instead of waiting forever for
actors that can never be placed.
"""
from __future__ import annotations

import logging
import os
from typing import Any

INSTALL_HINT = "install the extra: pip install 'twotower[ray]'"


def import_ray() -> Any:
    """The ``ray`` module, or a ValueError saying how to install it (a user error: one line, exit 2)."""
    try:
        import ray
    except ImportError:
        raise ValueError(f"--engine ray needs Ray, which is not installed; {INSTALL_HINT}") from None
    return ray


def connect(address: str = "", num_cpus: int | None = None) -> bool:
    """Connect this process to Ray; returns True when this call started a local Ray (the caller shuts it down).

    Args:
        address: "" starts a local Ray on this machine; "auto", "HOST:6379" or "ray://HOST:10001" join a running
            cluster. A process already connected (``ray.is_initialized()``) keeps its connection.
        num_cpus: CPUs of a local Ray (default: this machine's, ``os.cpu_count()``).

    Raises:
        ValueError: Ray missing, or the cluster at ``address`` cannot be reached.
    """
    ray = import_ray()
    if ray.is_initialized():
        return False
    quiet = {"logging_level": logging.WARNING, "log_to_driver": True}
    if address:
        try:
            ray.init(address=address, **quiet)
        except (ConnectionError, RuntimeError) as exc:
            raise ValueError(f"--ray-address {address}: cannot connect to a Ray cluster there ({exc}); start one "
                             f"with `ray start --head` or leave --ray-address out to start a local Ray") from None
        return False
    ray.init(num_cpus=num_cpus or os.cpu_count() or 1, include_dashboard=False, **quiet)
    return True


def cluster_resources() -> tuple[float, float]:
    """(CPUs, GPUs) the connected cluster has in all (alive nodes; an autoscaler may add more later)."""
    import ray

    res = ray.cluster_resources()
    return float(res.get("CPU", 0.0)), float(res.get("GPU", 0.0))


def check_fits(what: str, count: int, cpus: float, gpus: float) -> None:
    """Refuse ``count`` actors of ``cpus``/``gpus`` each that the connected cluster cannot hold all at once.

    Raises:
        ValueError: naming the request and what the cluster has.
    """
    have_cpus, have_gpus = cluster_resources()
    need_cpus, need_gpus = count * cpus, count * gpus
    # a small tolerance: fractional shares (2 CPUs / 3 actors) do not add up exactly in floating point
    if need_cpus > have_cpus + 1e-6 or need_gpus > have_gpus + 1e-6:
        raise ValueError(f"{count} {what} x ({cpus:g} CPU, {gpus:g} GPU) need {need_cpus:g} CPUs and {need_gpus:g} "
                         f"GPUs, but the Ray cluster has {have_cpus:g} CPUs and {have_gpus:g} GPUs; ask for fewer "
                         f"or smaller actors, or add nodes (`ray start --address HEAD:6379` on each)")


def caused_by(exc: BaseException, name: str) -> bool:
    """True when ``exc`` or an exception in its cause/context chain is of a class called ``name`` (Ray's
    exceptions are matched by name: their classes are made per cause at run time)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if name in type(current).__name__:
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False
