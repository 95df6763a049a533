"""HTTP service: FastAPI app with POST /search, GET /health, GET /info (API docs at /docs, served offline by
``retrieval.apidocs``; the schema at /openapi.json).

The index and query tower are loaded once (before ``uvicorn`` starts, or in the app's lifespan);
concurrent requests are merged by ``retrieval.batcher.MicroBatcher`` into one encode + search in a worker
thread, so the event loop never blocks. Every input limit answers 422 with ``detail`` (FastAPI's list of
``{loc, msg, type}``) and ``error`` (one readable line naming the field); an oversized body 413, a body of
unknown length 411, a full queue 503. A new version of the INDEX dir is swapped in between batches
(``retrieval.reload``). Every body is strict JSON (no NaN/Infinity: ``common.jsonl.dumps_strict``).
"""
from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import asdict
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, StrictStr

from twotower.common.jsonl import dumps_strict
from twotower.common.text import is_blank
from twotower.index.filters import FilterError
from twotower.retrieval.apidocs import render_docs
from twotower.retrieval.batcher import MicroBatcher, Overloaded
from twotower.retrieval.config import MAX_NPROBE, MAX_RESCORE, ServeConfig
from twotower.retrieval.reload import IndexWatcher
from twotower.retrieval.retriever import Hit, Retriever, is_encodable


class SearchRequest(BaseModel):
    """Body of ``POST /search``. Strict types: ``"k": "10"`` or ``"queries": [1]`` are errors, not coerced."""

    model_config = ConfigDict(extra="forbid")
    queries: list[StrictStr] = Field(description="query texts (one result list per query)",
                                     examples=[["how do I sort a list", "open a file"]])
    k: StrictInt = Field(10, description="hits per query (1..max_k)")
    nprobe: StrictInt | None = Field(None, description="IVF lists to visit (default: the index's)")
    mode: Literal["dense", "bm25", "hybrid"] | None = Field(
        None, description="dense (towers), bm25, or hybrid (both, fused); default: the index manifest's")
    fusion: Literal["rrf", "weighted"] | None = Field(
        None, description="hybrid fusion: rrf (reciprocal rank, k=60) or weighted; default: the manifest's")
    alpha: StrictFloat | StrictInt | None = Field(
        None, description="weighted fusion: the dense side's weight, 0..1; default: the manifest's")
    norm: Literal["minmax", "zscore"] | None = Field(None, description="weighted fusion: score normalisation")
    depth: StrictInt | None = Field(None, description="hybrid: candidates per side = k * depth (1..100)")
    filter: dict[str, Any] | None = Field(
        None, description='metadata filter, e.g. {"package": "numpy"}, {"lang": {"$in": ["py", "java"]}}, '
                          '{"year": {"$gte": 2020}}; operators $eq $ne $in $nin $gt $gte $lt $lte',
        examples=[{"package": "numpy"}])
    rescore: StrictInt | None = Field(None, description="re-score k x rescore candidates with the exact vectors "
                                                        "the index keeps (0: off; default: the index's)")


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


def check_limits(req: SearchRequest, config: ServeConfig) -> list[dict[str, Any]]:
    """Errors (FastAPI-style ``{loc, msg, type}``) for a request that breaks a limit; [] when valid."""
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
    if req.nprobe is not None and req.nprobe < 1:
        return err(("nprobe",), f"nprobe must be >= 1, got {req.nprobe}")
    if req.nprobe is not None and req.nprobe > MAX_NPROBE:
        return err(("nprobe",), f"nprobe must be <= {MAX_NPROBE}, got {req.nprobe}")
    if req.rescore is not None and not 0 <= req.rescore <= MAX_RESCORE:
        return err(("rescore",), f"rescore must be between 0 and {MAX_RESCORE}, got {req.rescore}")
    return []


class BodyLimit:
    """ASGI middleware: refuse a POST body before it is read when it is too large (413) or of unknown
    length (411), so a huge request cannot make the server parse and hold it."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            length = next((v for k, v in scope["headers"] if k == b"content-length"), None)
            response = None
            if length is None:
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
    """One request's results as JSON bytes (runs in the batcher's worker thread)."""
    return dumps_strict([[h.to_dict() for h in row] for row in hits], ensure_ascii=False).encode()


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

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        # Keep loc/msg/type only: ``input`` would echo a (possibly huge) body back, ``ctx`` holds objects.
        detail = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
                  for e in exc.errors()]
        return _error_response(422, detail)

    @app.post("/search", response_model=SearchResponse,
              responses={422: {"description": "a limit or type error; `error` names the field"},
                         503: {"description": "queue full; retry later"}})
    async def search(req: SearchRequest) -> Response:
        """Top-k hits for each query (requests arriving together share one encode + search)."""
        t0 = time.perf_counter()
        errors = check_limits(req, config)
        if errors:
            return _error_response(422, errors)
        try:
            body = await app.state.batcher.search(req.queries, req.k, req.nprobe, mode=req.mode, fusion=req.fusion,
                                                  alpha=req.alpha, norm=req.norm, depth=req.depth, filter=req.filter,
                                                  rescore=req.rescore)
        except Overloaded as exc:
            return _error_response(503, [{"loc": [], "msg": str(exc), "type": "overloaded"}])
        except FilterError as exc:  # unknown field / bad operator: names the field and the valid operators
            return _error_response(422, [{"loc": ["body", "filter"], "msg": str(exc), "type": "value_error"}])
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


def serve(config: ServeConfig, retriever: Retriever | None = None) -> None:
    """Run the app under uvicorn until interrupted."""
    import uvicorn  # the ASGI server: only needed to listen, not to build the app (tests use TestClient)

    uvicorn.run(create_app(config, retriever), host=config.host, port=config.port, log_level=config.log_level,
                access_log=config.access_log)
