"""``twotower search`` (ranked hits in the terminal or as JSON lines) and ``twotower serve`` (HTTP).

Heavy imports (torch, faiss, fastapi) stay inside the run functions so ``twotower --help`` is fast.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any, BinaryIO

from twotower.common.cliargs import add_dataclass_args, dataclass_from_args
from twotower.common.jsonl import dumps_strict, iter_binary_lines, read_text_lines
from twotower.common.text import is_blank
from twotower.index.query import check_config_options, check_k, options_of
from twotower.retrieval.config import DEFAULT_MAX_K, RayServeConfig, SearchConfig, ServeConfig

TEXT_WIDTH = 100  # characters of a hit's first text line shown in the readable listing


def add_search_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "search", help="search an index with query texts",
        description="Encode queries with the query tower and print the top-k hits of the INDEX: rank, score, "
                    "id and the first line of text (or JSON lines with --json). Queries come from the "
                    "command line, or one per line from --queries-file FILE|-.")
    p.add_argument("--index", required=True, help="INDEX dir (output of `twotower index build`)")
    p.add_argument("queries", nargs="*", metavar="QUERY", help="query texts")
    add_dataclass_args(p, SearchConfig, skip=("index",))
    p.set_defaults(func=run_search)
    return p


def add_serve_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "serve", help="serve an index over HTTP (FastAPI + uvicorn)",
        description="Load the INDEX and its query tower once and answer POST /search {\"queries\": [...], "
                    "\"k\": 10}, GET /health and GET /info; API docs at /docs (served offline), the OpenAPI "
                    "schema at /openapi.json. Concurrent requests are micro-batched into one encode + search. "
                    "A new version of the INDEX dir (index add/remove/build) is loaded and swapped in between "
                    "batches, within --reload-interval seconds. With --shards SHARD_DIR... --engine ray the shards "
                    "of a sharded build are served on Ray Serve instead, one deployment per shard behind a router "
                    "that encodes each query once and merges the shards' top-k (same API).")
    p.add_argument("--index", default="", help="INDEX dir (output of `twotower index build`); required unless "
                                               "--shards with --engine ray")
    add_dataclass_args(p, ServeConfig, skip=("index",))
    add_dataclass_args(p, RayServeConfig)
    p.set_defaults(func=run_serve)
    return p


def read_queries(path: str, stdin: BinaryIO | None = None) -> list[str]:
    """Non-blank lines of ``path`` (``-`` = stdin), without line ends (LF or CRLF) or a BOM. A line of only
    invisible characters (zero-width spaces, NUL, ...) is refused naming it, like an empty query. Stdin is read
    as bytes by the one bounded line reader (``common.jsonl.iter_binary_lines``), like a file."""
    if path == "-":
        lines = [(n, line.rstrip("\r\n")) for n, line in iter_binary_lines(stdin or sys.stdin.buffer, "stdin")
                 if line.strip()]
    else:
        lines = read_text_lines(path, "--queries-file")
    for n, line in lines:
        if is_blank(line):
            raise ValueError(f"{'stdin' if path == '-' else path}: line {n}: the query has no visible character")
    return [line for _, line in lines]


def first_line(text: str, width: int = TEXT_WIDTH) -> str:
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    return line if len(line) <= width else line[: width - 1] + "…"


def format_hits(query: str, hits: Sequence[Any]) -> str:
    """Readable aligned listing: a ``query:`` header, then ``rank  score  id  first line of text``."""
    lines = [f"query: {query}"]
    if not hits:
        return "\n".join(lines + ["  (no hits)"])
    id_width = max(len(h.id) for h in hits)
    rank_width = len(str(hits[-1].rank))
    for h in hits:
        lines.append(f"  {h.rank:>{rank_width}}  {h.score:7.4f}  {h.id:<{id_width}}  {first_line(h.text)}")
    return "\n".join(lines)


def passive_openmp() -> None:
    """Make idle OpenMP threads sleep instead of spin (unless the user set ``OMP_WAIT_POLICY``).

    torch and faiss each bring an OpenMP runtime; by default their idle threads busy-wait, and on a
    few shared cores the two spin against each other and against the HTTP event loop: MiniLM encoding
    one query measured 107 ms spinning vs 15 ms passive on 2 cores. Read when the runtimes load, so this
    must run before torch or faiss is imported.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def run_search(args: argparse.Namespace) -> int:
    passive_openmp()
    config = dataclass_from_args(SearchConfig, args)
    queries = list(args.queries)
    if config.queries_file is not None:
        queries += read_queries(config.queries_file)
    if not queries:
        raise ValueError("no queries: give them as arguments or with --queries-file FILE|-")
    check_k(config.k, DEFAULT_MAX_K)  # fail before the (slow) load, naming the cap
    check_config_options(config, "search")  # every query option, each error naming its --flag
    from twotower.index.load import check_query_sides
    from twotower.retrieval.retriever import Retriever

    opts = options_of(config, "search")
    check_query_sides(config.index, opts.mode, opts.filter)
    retriever = Retriever.load(config.index, config.towers, config.device, batch_size=config.batch_size,
                               precision=config.precision, query_max_length=config.query_max_length,
                               allow_mixed_towers=config.allow_mixed_towers)
    results = retriever.search(queries, options=opts)
    out = sys.stdout
    for i, (query, hits) in enumerate(zip(queries, results)):
        if config.json:
            out.write(dumps_strict({"query": query, "hits": [h.to_dict() for h in hits]}, ensure_ascii=False) + "\n")
        else:
            out.write(("\n" if i else "") + format_hits(query, hits) + "\n")
    out.flush()
    return 0


def run_serve(args: argparse.Namespace) -> int:
    passive_openmp()
    config = dataclass_from_args(ServeConfig, args)
    ray_cfg = dataclass_from_args(RayServeConfig, args)
    if ray_cfg.engine == "ray":
        from twotower.retrieval.ray_serve import serve_shards

        serve_shards(config, ray_cfg)
        return 0
    if not config.index:
        raise ValueError("--index is required (or --shards SHARD_DIR... with --engine ray)")
    import torch

    from twotower.retrieval.retriever import Retriever
    from twotower.retrieval.server import serve

    if config.threads:
        torch.set_num_threads(config.threads)

    # Loaded here, before uvicorn starts, so a bad index or a fingerprint mismatch is one clean error line.
    retriever = Retriever.load(config.index, config.towers, config.device, max_k=config.max_k,
                               precision=config.precision, query_max_length=config.query_max_length,
                               allow_mixed_towers=config.allow_mixed_towers)
    print(f"twotower serve: {retriever.ntotal} docs, dim {retriever.dim}, on http://{config.host}:{config.port} "
          f"(docs at /docs)", file=sys.stderr)
    serve(config, retriever)
    return 0
