"""HTTP service: FastAPI app with POST /search, GET /health, GET /info (API docs at /docs, served offline by
``retrieval.apidocs``; the schema at /openapi.json).

The index and query tower are loaded once (before ``uvicorn`` starts, or in the app's lifespan);
concurrent requests are merged by ``retrieval.batcher.MicroBatcher`` into one encode + search in a worker
thread, so the event loop never blocks. Every input limit answers 422 with ``detail`` (FastAPI's list of
``{loc, msg, type}``) and ``error`` (one readable line naming the field); an oversized body 413, a body of
unknown length 411, a Content-Type other than JSON 415, headers or a body slower than ``--read-timeout`` 408
(``retrieval.timeouts``), a full queue 503. A new version of the INDEX dir is swapped in between batches
(``retrieval.reload``). Every body is strict JSON (no NaN/Infinity: ``common.jsonl.dumps_strict``).
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import sys
import time
import types
import typing
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import asdict
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, StrictStr, create_model

from twotower.common.jsonl import dumps_strict
from twotower.common.text import is_blank
from twotower.index.filters import FilterError
from twotower.index.query import QueryOptionError, QueryOptions, surface_fields
from twotower.retrieval.apidocs import render_docs
from twotower.retrieval.batcher import MicroBatcher, Overloaded
from twotower.retrieval.config import ServeConfig
from twotower.retrieval.reload import IndexWatcher
from twotower.retrieval.retriever import Hit, Retriever, ShardsFailed, is_encodable
from twotower.retrieval.timeouts import BodyTimeout, ReadTimeout, TimedH11Protocol, timeout_body


def _request_type(f: dataclasses.Field, hint: Any) -> Any:
    """The strict pydantic type of a QueryOptions field: ``"k": "10"`` is an error, not coerced."""
    base = typing.get_args(hint)[0] if typing.get_origin(hint) in (typing.Union, types.UnionType) else hint
    if "choices" in f.metadata:
        tp: Any = Literal[tuple(f.metadata["choices"])]
    else:
        tp = {int: StrictInt, float: StrictFloat | StrictInt, str: StrictStr}.get(base, base)
    return tp | None if f.default is None else tp


def _request_fields() -> dict[str, Any]:
    """One body field per ``http`` field of ``index.query.QueryOptions`` (its default, help and choices)."""
    hints = typing.get_type_hints(QueryOptions)
    out = {}
    for f in surface_fields("http"):
        help_text = f.metadata["help"] + (f"; default: {f.metadata['none']}" if "none" in f.metadata else "")
        out[f.name] = (_request_type(f, hints[f.name]), Field(f.default, description=help_text))
    return out


SearchRequest = create_model(
    "SearchRequest", __config__=ConfigDict(extra="forbid"),
    __doc__="Body of ``POST /search``: the queries and the query options (``index.query.QueryOptions``). Strict "
            "types: ``\"k\": \"10\"`` or ``\"queries\": [1]`` are errors, not coerced.",
    queries=(list[StrictStr], Field(description="query texts (one result list per query)",
                                    examples=[["how do I sort a list", "open a file"]])),
    **_request_fields())


class HitModel(BaseModel):
    id: str
    score: float
    text: str
    title: str
    metadata: dict[str, Any]
    rank: int


class SearchResponse(BaseModel):
    results: list[list[HitModel]] = Field(description="one ranked hit list per query, best first")
    took_ms: float = Field(description="server time for this request, queueing included")
    failed_shards: list[str] | None = Field(None, description="sharded serving: the shards that failed, one line "
                                                              "each; the results are those of the other shards")


def check_limits(req: Any, config: ServeConfig) -> list[dict[str, Any]]:
    """Errors (FastAPI-style ``{loc, msg, type}``) for a request (a ``SearchRequest``) that breaks a limit or
    whose query options fail their checks (``index.query``); [] when valid."""
    def err(loc: tuple[Any, ...], msg: str) -> list[dict[str, Any]]:
        return [{"loc": ["body", *loc], "msg": msg, "type": "value_error"}]

    if not req.queries:
        return err(("queries",), "queries is empty: give at least one query")
    if len(req.queries) > config.max_queries:
        return err(("queries",), f"too many queries: {len(req.queries)} > max_queries {config.max_queries}")
    for i, q in enumerate(req.queries):
        if is_blank(q):
            return err(("queries", i), f"query {i} is empty (no visible character)")
        if not is_encodable(q):
            return err(("queries", i), f"query {i} is not valid text: it holds a lone UTF-16 surrogate")
        if len(q) > config.max_query_chars:
            return err(("queries", i), f"query {i} is too long: {len(q)} chars > max_query_chars "
                                       f"{config.max_query_chars}")
    if not 1 <= req.k <= config.max_k:
        return err(("k",), f"k must be between 1 and {config.max_k} (the cap), got {req.k}")
    try:
        query_options(req)
    except QueryOptionError as exc:
        return err((exc.name,), str(exc))
    return []


def query_options(req: Any) -> QueryOptions:
    """The request's :class:`~twotower.index.query.QueryOptions` (None fields: the index's defaults)."""
    return QueryOptions(**{f.name: getattr(req, f.name) for f in surface_fields("http")})


class BodyLimit:
    """ASGI middleware: refuse a POST body before it is read when it is too large (413) or of unknown
    length (411), so a huge request cannot make the server parse and hold it."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            length = next((v for k, v in scope["headers"] if k == b"content-length"), None)
            ctype = next((v for k, v in scope["headers"] if k == b"content-type"), None)
            media = ctype.split(b";")[0].strip().lower() if ctype is not None else b"application/json"
            response = None
            if media != b"application/json" and not media.endswith(b"+json"):
                shown = ctype.decode("latin-1") if ctype is not None else ""
                response = _error_response(415, [{"loc": ["header", "content-type"], "type": "unsupported_media_type",
                                                  "msg": f"Content-Type '{shown}' is not supported: send the body as "
                                                         f"application/json"}])
            elif length is None:
                response = _error_response(411, [{"loc": ["header", "content-length"], "type": "length_required",
                                                  "msg": "send a Content-Length header (chunked bodies are refused)"}])
            elif not length.isdigit() or int(length) > self.max_bytes:
                response = _error_response(413, [{"loc": ["body"], "type": "too_large",
                                                  "msg": f"request body of {length.decode(errors='replace')} bytes "
                                                         f"is over max_body_bytes {self.max_bytes}"}])
            if response is not None:
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _error_response(status: int, detail: list[dict[str, Any]]) -> JSONResponse:
    line = "; ".join(f"{'.'.join(str(p) for p in d['loc'])}: {d['msg']}" for d in detail)
    return JSONResponse({"detail": detail, "error": line}, status_code=status)


def _hits_json(hits: list[list[Hit]]) -> bytes:
    """One request's results as JSON bytes (runs in the batcher's worker thread); when shards failed
    (``PartialRow``), followed by ``,"failed_shards":[...]`` (the route puts both inside the response object)."""
    body = dumps_strict([[h.to_dict() for h in row] for row in hits], ensure_ascii=False).encode()
    failed = sorted({line for row in hits for line in getattr(row, "failed", ())})
    return body + b',"failed_shards":' + dumps_strict(failed).encode() if failed else body


def create_app(config: ServeConfig, retriever: Retriever | None = None) -> FastAPI:
    """The FastAPI app. ``retriever=None`` loads ``config.index`` in the lifespan (once, at start)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        r = retriever or Retriever.load(config.index, config.towers, config.device, max_k=config.max_k,
                                         precision=config.precision, query_max_length=config.query_max_length,
                                         allow_mixed_towers=config.allow_mixed_towers)
        r.max_k = config.max_k
        batcher = MicroBatcher(r, config.max_batch, config.max_wait_ms, config.max_queue, finish=_hits_json)
        app.state.retriever, app.state.batcher = r, batcher.start()
        app.state.watcher = IndexWatcher(config, batcher, on_swap=lambda new: setattr(app.state, "retriever", new))
        task = asyncio.create_task(app.state.watcher.run()) if config.reload_interval > 0 else None
        try:
            yield
        finally:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            batcher.close()

    # FastAPI's own /docs and /redoc load their scripts from a CDN: off; /docs is served by the app itself.
    app = FastAPI(title="twotower", summary="Two-tower dense retrieval: query tower + FAISS index.",
                  lifespan=lifespan, docs_url=None, redoc_url=None)

    app.add_middleware(BodyLimit, max_bytes=config.body_limit())
    app.add_middleware(ReadTimeout, timeout=config.read_timeout)  # outermost: times every body chunk

    @app.exception_handler(BodyTimeout)
    async def body_timeout(request: Request, exc: BodyTimeout) -> JSONResponse:
        return JSONResponse(timeout_body(exc.timeout, "body"), status_code=408, headers={"connection": "close"})

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        # Keep loc/msg/type only: ``input`` would echo a (possibly huge) body back, ``ctx`` holds objects.
        detail = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
                  for e in exc.errors()]
        return _error_response(422, detail)

    @app.post("/search", response_model=SearchResponse,
              responses={422: {"description": "a limit or type error; `error` names the field"},
                         503: {"description": "queue full; retry later"}})
    async def search(req: SearchRequest) -> Response:  # type: ignore[valid-type]
        """Top-k hits for each query (requests arriving together share one encode + search)."""
        t0 = time.perf_counter()
        errors = check_limits(req, config)
        if errors:
            return _error_response(422, errors)
        try:
            body = await app.state.batcher.search(req.queries, options=query_options(req))
        except Overloaded as exc:
            return _error_response(503, [{"loc": [], "msg": str(exc), "type": "overloaded"}])
        except FilterError as exc:  # unknown field / bad operator: names the field and the valid operators
            return _error_response(422, [{"loc": ["body", "filter"], "msg": str(exc), "type": "value_error"}])
        except ShardsFailed as exc:  # every shard failed (one failing is named in a 200's failed_shards)
            return _error_response(503, [{"loc": [], "msg": str(exc), "type": "shards_failed"}])
        except ValueError as exc:  # anything the retriever still rejects is the client's input
            return _error_response(422, [{"loc": ["body"], "msg": str(exc), "type": "value_error"}])
        took_ms = (time.perf_counter() - t0) * 1000.0
        return Response(b'{"results":' + body + b',"took_ms":' + f"{took_ms:.3f}".encode() + b"}",
                        media_type="application/json")

    @app.get("/health")
    async def health() -> dict[str, Any]:
        """Liveness: the index is loaded and the batcher runs; which index version is served."""
        r = app.state.retriever
        return {"status": "ok", "ntotal": r.ntotal, "generation": r.index.manifest.get("generation", 1),
                "reloads": app.state.watcher.reloads, **app.state.batcher.stats()}

    @app.get("/info")
    async def info() -> Response:
        """Index manifest, towers meta (twotower.json) and the serve limits."""
        limits = {k: v for k, v in asdict(config).items() if k not in ("host", "port")}
        body = dumps_strict({**app.state.retriever.info(), "serve": limits}, ensure_ascii=False)
        return Response(body.encode(), media_type="application/json")

    @app.get("/docs", include_in_schema=False)
    async def docs(request: Request) -> HTMLResponse:
        return HTMLResponse(render_docs(app.openapi(), str(request.base_url).rstrip("/")))

    return app


def uvicorn_config(config: ServeConfig, app: Any) -> Any:
    """The ``uvicorn.Config`` of ``serve``: the header/body read timeout, keep-alive and connection cap."""
    import uvicorn  # the ASGI server: only needed to listen, not to build the app (tests use TestClient)

    return uvicorn.Config(app, host=config.host, port=config.port, log_level=config.log_level,
                          access_log=config.access_log, http=TimedH11Protocol.with_timeout(config.read_timeout),
                          timeout_keep_alive=config.keep_alive, limit_concurrency=config.max_connections)


def serve(config: ServeConfig, retriever: Retriever | None = None) -> None:
    """Run the app under uvicorn until interrupted."""
    import uvicorn
    from uvicorn.main import STARTUP_FAILURE

    server = uvicorn.Server(uvicorn_config(config, create_app(config, retriever)))
    with contextlib.suppress(KeyboardInterrupt):  # uvicorn.run's own ending: Ctrl-C is a normal stop
        server.run()
    if not server.started:  # e.g. the port is taken: uvicorn has logged why
        sys.exit(STARTUP_FAILURE)
