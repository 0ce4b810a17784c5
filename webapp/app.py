"""The web app: page search over a vision_rag index and grounded statistical answers, on one small server.

    create_app(index_dir=None, store=None, embedder=None, llm=None, index=None)  -> a FastAPI app
    serve(..., host="127.0.0.1", port=8000)                                      -> runs it with uvicorn

``index_dir`` may hold a plain or a sharded collection (searched in this process); ``index`` is an index
already opened, e.g. :class:`vision_rag.ray_shards.RayShardedIndex` (``gemma-ground serve --ray``): a search
then says which shards did not answer (``missing_shards``), never silently partial.

Pages (plain HTML + vanilla JS from ``static/``, no build step): ``/`` search (query box, results with page
thumbnails and scores, a toggle overlaying the similarity map on each page) and ``/stats`` (question box,
answer with footnotes / table citations, how the question was resolved, a clear abstention, the tables
used drawn as charts by the vendored Chart.js in ``static/vendor/``, and the sources' attribution lines).
Both call the JSON API, documented by OpenAPI at ``/api/openapi.json`` (no Swagger page: it would load its
script from a CDN).

This is the one module that composes vision_rag and grounding, each through its public API; vision_rag
is imported only when an index is configured, so the statistics page works without it.

Safe by construction: page images are served by page id only (file paths come from the index, never
from a request, and never go out in answers: documents are named by file name and an opaque id); the
pages insert every piece of text with ``textContent``; every response, errors included, carries a strict
Content-Security-Policy and the other security headers; request bodies (16 KiB, 10 s, JSON parsed without
recursion; see :mod:`grounding.asgi`), query lengths, result counts and image sizes are bounded; every
error is JSON ``{"error": {"status", "type", "message"}}`` with its status code, down to a request that is
not HTTP (:func:`http_protocol`).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import threading
import time
from collections import OrderedDict
from importlib.resources import files
from pathlib import Path
from typing import Literal
from urllib.parse import quote

from fastapi import FastAPI, Query, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException

from grounding.answer import Answer, ask
from grounding.asgi import LimitedRequests, RequestLimits, hardened_protocol, run_server
from grounding.types import GroundingError, StatSource
from models.guard import GuardError

__all__ = ["create_app", "serve", "http_protocol", "public_document_id", "WebAppError", "SearchRequest", "SearchResponse", "SearchHit", "AskRequest",
           "StatusResponse", "ErrorResponse", "MAX_BODY_BYTES", "MAX_K", "MAX_QUERY_CHARS", "MAX_QUESTION_CHARS",
           "MAX_IMAGE_SIDE"]

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 16 * 1024
LIMITS = RequestLimits(max_body_bytes=MAX_BODY_BYTES, body_timeout=10.0, head_timeout=10.0)
MAX_K = 50
MAX_QUERY_CHARS = 500
MAX_QUESTION_CHARS = 1000
MAX_IMAGE_SIDE = 2000
THUMBNAIL_SIDE = 320
STATIC = files("webapp") / "static"


class WebAppError(GroundingError):
    """The web app cannot start with these settings (no such index, no model recorded for it ...)."""


# -- API data -------------------------------------------------------------------------------------------
class SearchRequest(BaseModel):
    query: str = Field(min_length=1, max_length=MAX_QUERY_CHARS, description="what to look for, in words")
    k: int = Field(default=10, ge=1, le=MAX_K, description="how many pages to return")
    document_id: str | None = Field(default=None, max_length=500,
                                    description="only pages of this document (a hit's opaque document_id)")


class SearchHit(BaseModel):
    rank: int
    page_id: int
    score: float = Field(description="MaxSim: sum over query tokens of the best page-token similarity")
    normalized_score: float = Field(description="score / query tokens, in [-1, 1]")
    document_id: str = Field(description="opaque id of the source document (never its path); pass it as the "
                                         "search's document_id to search that document only")
    document_name: str = Field(description="file name of the source (never the full path)")
    page_number: int = Field(description="1-based page number within the document")
    text: str = Field(description="start of the page's text layer (PDFs), empty for scans")
    image_url: str
    thumbnail_url: str
    simmap_url: str = Field(description="transparent PNG heat map of the query over the page's patches")


class SearchResponse(BaseModel):
    query: str
    model_id: str
    pages_in_index: int
    hits: list[SearchHit]
    elapsed_ms: float
    shards: int = Field(default=1, description="shards the index is split into")
    missing_shards: list[int] = Field(default_factory=list,
                                      description="shards that did not answer: the hits come from the others")


class AskRequest(BaseModel):
    question: str = Field(min_length=1, max_length=MAX_QUESTION_CHARS)
    mode: Literal["rag", "rig"] = "rag"


class StatusResponse(BaseModel):
    search_enabled: bool
    pages_in_index: int | None = None
    model_id: str | None = None
    statistics_source: str
    llm: str | None = None
    guard: str | None = None  # the safety guard screening questions and answers, if any
    shards: int | None = None
    missing_shards: list[int] = Field(default_factory=list, description="shards not answering now")


class ErrorBody(BaseModel):
    status: int
    type: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorBody


def _error_document(status: int, kind: str, message: str) -> dict:
    return ErrorResponse(error=ErrorBody(status=status, type=kind, message=message)).model_dump()


def _error(status: int, kind: str, message: str) -> JSONResponse:
    # The security headers are set here too: a 500 is answered outside every middleware of the app.
    return JSONResponse(status_code=status, content=_error_document(status, kind, message), headers=_SECURITY_HEADERS)


def public_document_id(document_id: str) -> str:
    """The id the web API shows for an index's document id (a file path): a hash, so no path goes out."""
    return hashlib.sha256(document_id.encode("utf-8")).hexdigest()[:20]


class ApiError(HTTPException):
    def __init__(self, status: int, kind: str, message: str):
        super().__init__(status_code=status, detail=message)
        self.kind = kind


# -- the statistics and search back ends ---------------------------------------------------------------------
def _stat_source(store) -> StatSource:
    from grounding.sources import open_source

    if store is None:
        return open_source("local")
    if isinstance(store, StatSource):
        return store
    return open_source("local", store=store)  # a grounding Store or the path of a store file


class _Search:
    """The index, its embedder and small caches of rendered images; one embedding at a time."""

    def __init__(self, index_dir, embedder, index=None):
        from vision_rag.sharded import open_collection

        # A plain or sharded index; refuses a directory that holds no index, with the reason.
        self.index = index if index is not None else open_collection(index_dir)
        if embedder is None:
            from vision_rag.colpali import ColPaliEmbedder, read_embedder_record

            record = read_embedder_record(index_dir) if index_dir is not None else None
            if record is None:
                raise WebAppError(f"{index_dir} has no embedder.json naming the model that built it; pass the "
                                  "ColPali checkpoint (serve --colpali SOURCE / create_app(embedder=...))")
            embedder = ColPaliEmbedder.load(record.source, adapter=record.adapter, settings=record.settings)
        if getattr(embedder, "model_id", self.index.model_id) != self.index.model_id:
            raise WebAppError(f"the index in {index_dir} was built with model {self.index.model_id!r}, not "
                              f"{embedder.model_id!r}; serve it with the model that built it")
        self.embedder = embedder
        self.lock = threading.Lock()
        self._images: OrderedDict[tuple, bytes] = OrderedDict()
        self._images_lock = threading.Lock()
        self._documents: tuple[int, dict[str, str]] = (-1, {})

    def document_id(self, public_id: str) -> str | None:
        """The index's document id behind a public one (None: no such document)."""
        generation = self.index.generation
        if self._documents[0] != generation:
            self._documents = (generation, {public_document_id(p.document_id): p.document_id
                                            for p in self.index.pages()})
        return self._documents[1].get(public_id)

    def page(self, page_id: int):
        from vision_rag.index import PageNotFoundError

        try:
            return self.index.get(page_id)
        except PageNotFoundError:
            raise ApiError(404, "page_not_found", f"no page with id {page_id} in the index") from None

    def shard_state(self) -> tuple[int | None, list[int]]:
        """(shards, shards not answering now) of a sharded index; (None, []) for a plain one."""
        status = getattr(self.index, "status", None)
        if status is None:
            return getattr(self.index, "n_shards", None), []
        shards = status(timeout_s=5.0)
        return len(shards), [s.shard for s in shards if not s.available]

    def png(self, key: tuple, render) -> bytes:
        """Rendered PNGs by (kind, page id, generation, size...): the last 256 are kept."""
        key = (*key, self.index.generation)
        with self._images_lock:
            if key in self._images:
                self._images.move_to_end(key)
                return self._images[key]
        data = render()
        with self._images_lock:
            self._images[key] = data
            while len(self._images) > 256:
                self._images.popitem(last=False)
        return data


def _png_bytes(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def similarity_grid(query_vectors, patch_vectors, grid: tuple[int, int]):
    """Per image patch, the summed similarity of all query tokens (vision_rag's per-token similarity maps,
    added up), scaled to [0, 1]: one ``grid`` array for the whole query.

    The ColPali page image is resized to a square without keeping its aspect ratio, so the grid covers
    the whole page image, stretched likewise."""
    import numpy as np

    from vision_rag import similarity_maps

    sims = similarity_maps(query_vectors, patch_vectors, grid).sum(0)
    low, high = float(sims.min()), float(sims.max())
    return (sims - low) / (high - low) if high > low else np.zeros_like(sims)


def _heat_png(grid_values, side: int = 256) -> bytes:
    """A transparent red heat map (alpha follows the value), upscaled smoothly to ``side`` pixels."""
    import numpy as np
    from PIL import Image

    rgba = np.zeros((*grid_values.shape, 4), dtype=np.uint8)
    rgba[..., 0] = 255
    rgba[..., 1] = (80 * (1 - grid_values)).astype(np.uint8)
    rgba[..., 3] = (200 * grid_values).astype(np.uint8)
    return _png_bytes(Image.fromarray(rgba, "RGBA").resize((side, side), Image.BILINEAR))


# -- the app ---------------------------------------------------------------------------------------------------
_SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}


class _SecurityHeaders:
    """ASGI middleware, outermost: the security headers on every response the app and its middleware send."""

    def __init__(self, app):
        self.app = app
        self.headers = [(k.lower().encode(), v.encode()) for k, v in _SECURITY_HEADERS.items()]

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                present = {name.lower() for name, _ in message.get("headers", [])}
                extra = [(k, v) for k, v in self.headers if k not in present]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, receive, send_with_headers)


def http_protocol(limits: RequestLimits = LIMITS):
    """The uvicorn protocol class of the web app: requests that are not HTTP, or whose head is too slow,
    get a JSON error with the security headers (see :func:`grounding.asgi.hardened_protocol`)."""
    return hardened_protocol(_error_document, limits, headers=_SECURITY_HEADERS)


def create_app(index_dir: str | Path | None = None, store=None, embedder=None, llm=None, *, index=None,
               max_new_tokens: int = 512, limits: RequestLimits = LIMITS, guard=None) -> FastAPI:
    """The web app.

    ``index_dir``: a vision_rag index for the search page (None: search is off, statistics work);
    ``embedder``: its ColPali embedder (default: the model recorded in the index's ``embedder.json``);
    ``store``: the statistics — a StatSource, a grounding Store or the path of a store file (default: the
    embedded Gapminder store); ``llm``: a grounding LLM or LangChain chat model that writes answers
    (None: the retrieved statistics are stated plainly, with their sources); ``limits``: request body
    size and time limits (serve with ``http_protocol(limits)`` for the head timeout); ``index``: the index of
    ``index_dir`` already opened (e.g. a :class:`vision_rag.ray_shards.RayShardedIndex`); ``guard``: a safety
    guard (:func:`models.load_guard`) screening each question and answer (a refusal shows the scores).
    """
    search = _Search(index_dir, embedder, index) if index_dir is not None or index is not None else None
    source = _stat_source(store)
    model = None
    if llm is not None:
        from grounding.langchain import as_grounding_llm

        model = as_grounding_llm(llm)
    llm_lock = threading.Lock()  # native models keep one KV cache: one generation at a time

    app = FastAPI(title="gemma-grounding", version="0.1.0", openapi_url="/api/openapi.json", docs_url=None,
                  redoc_url=None, description="Search scanned pages (ColPali) and ask statistical questions "
                  "answered with cited numbers (RAG / RIG). All errors are JSON: {\"error\": {status, type, message}}.")

    # Added last = outermost: the headers go on the body limit's own 413/408 answers too.
    app.add_middleware(LimitedRequests, limits=limits, render_error=_error_document, invalid_json_status=422,
                       headers=_SECURITY_HEADERS)
    app.add_middleware(_SecurityHeaders)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        kind = getattr(exc, "kind", None) or {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return _error(exc.status_code, kind, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        problems = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body') or 'body'}: {e.get('msg')}"
                             for e in exc.errors())
        return _error(422, "invalid_request", problems or "invalid request")

    if search is not None:
        from vision_rag.sharded import ShardUnavailableError

        @app.exception_handler(ShardUnavailableError)
        async def shard_unavailable(request: Request, exc: ShardUnavailableError):
            log.warning("%s: %s", request.url.path, exc)
            return _error(503, "shard_unavailable", f"shards {exc.shards} of the index are not answering; "
                          "try again shortly (they are being restarted)")

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, exc: Exception):
        log.exception("error serving %s", request.url.path)
        return _error(500, "internal_error", f"the server failed to answer ({type(exc).__name__}); see its log")

    # -- pages --------------------------------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    def search_page():
        return FileResponse(str(STATIC / "search.html"), media_type="text/html")

    @app.get("/stats", include_in_schema=False)
    def stats_page():
        return FileResponse(str(STATIC / "stats.html"), media_type="text/html")

    app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")

    # -- API --------------------------------------------------------------------------------------------------
    def need_search() -> _Search:
        if search is None:
            raise ApiError(503, "search_disabled", "no page index is configured: start the server with --index DIR")
        return search

    @app.get("/api/status", response_model=StatusResponse, tags=["status"])
    def status() -> StatusResponse:
        """What this server can do: search (and over how many pages, in how many shards), the statistics
        source, the LLM."""
        shards, missing = search.shard_state() if search else (None, [])
        return StatusResponse(search_enabled=search is not None,
                              pages_in_index=len(search.index) if search else None,
                              model_id=search.index.model_id if search else None,
                              statistics_source=source.name, llm=None if model is None else repr(model),
                              guard=None if guard is None else repr(guard),
                              shards=shards, missing_shards=missing)

    @app.post("/api/search", response_model=SearchResponse, tags=["search"],
              responses={422: {"model": ErrorResponse}, 503: {"model": ErrorResponse}})
    def search_pages(request: SearchRequest) -> SearchResponse:
        """The ``k`` pages that best match the query (ColPali MaxSim), best first."""
        from vision_rag.index import SearchFilter
        from vision_rag.langchain import PageSourceError, page_text

        s = need_search()
        if not request.query.strip():
            raise ApiError(422, "invalid_request", "query: the query is blank")
        started = time.perf_counter()
        with s.lock:
            (query_vectors,) = s.embedder.embed_queries([request.query], progress=False)
        search_filter = None
        if request.document_id:
            document_id = s.document_id(request.document_id)
            if document_id is None:
                raise ApiError(404, "document_not_found", "no document with this document_id in the index")
            search_filter = SearchFilter(document_id=document_id)
        hits = s.index.search(query_vectors, k=request.k, filter=search_filter)
        out = []
        quoted = quote(request.query, safe="")
        for rank, hit in enumerate(hits, 1):
            try:
                text = page_text(hit.page)[:500]
            except PageSourceError:
                text = ""
            base = f"/api/pages/{hit.page_id}"
            out.append(SearchHit(
                rank=rank, page_id=hit.page_id, score=hit.score, normalized_score=hit.normalized_score,
                document_id=public_document_id(hit.page.document_id),
                document_name=Path(hit.page.source_path).name or "(unnamed)",
                page_number=hit.page.page_number + 1, text=text, image_url=f"{base}/image",
                thumbnail_url=f"{base}/image?size={THUMBNAIL_SIDE}", simmap_url=f"{base}/simmap?query={quoted}"))
        return SearchResponse(query=request.query, model_id=s.index.model_id, pages_in_index=len(s.index), hits=out,
                              elapsed_ms=round(1000 * (time.perf_counter() - started), 1),
                              shards=getattr(hits, "shards", 1), missing_shards=getattr(hits, "missing_shards", []))

    png = {"content": {"image/png": {}}, "description": "a PNG image"}

    @app.get("/api/pages/{page_id}/image", response_class=Response, tags=["search"],
             responses={200: png, 404: {"model": ErrorResponse}, 410: {"model": ErrorResponse}})
    def page_image_png(page_id: int = PathParam(ge=0, le=2**62),
                       size: int = Query(1000, ge=32, le=MAX_IMAGE_SIDE, description="longest side in pixels")):
        """The page image (rendered from its PDF or read from its image file), by page id."""
        from vision_rag.langchain import PageSourceError, page_image

        s = need_search()
        page = s.page(page_id)

        def render() -> bytes:
            try:
                return _png_bytes(page_image(page, dpi=150, max_side=size))
            except PageSourceError as e:
                raise _source_gone(page_id, e) from None

        return Response(s.png(("image", page_id, size), render), media_type="image/png",
                        headers={"Cache-Control": "private, max-age=300"})

    @app.get("/api/pages/{page_id}/simmap", response_class=Response, tags=["search"],
             responses={200: png, 404: {"model": ErrorResponse}})
    def page_simmap_png(page_id: int = PathParam(ge=0, le=2**62),
                        query: str = Query(min_length=1, max_length=MAX_QUERY_CHARS)):
        """Where the query matched on the page: a transparent heat map over the page's image patches
        (summed similarity of the query tokens per patch, scaled to [0, 1]), to lay over the page image."""
        from vision_rag.langchain import PageSourceError, page_image

        s = need_search()
        page = s.page(page_id)
        if not query.strip():
            raise ApiError(422, "invalid_request", "query: the query is blank")
        grid = tuple(s.embedder.patch_grid)
        n_patches = grid[0] * grid[1]

        def render() -> bytes:
            with s.lock:
                (query_vectors,) = s.embedder.embed_queries([query], progress=False)
                stored = s.index.vectors(page_id)
                if s.index.settings.pool_factor == 1 and stored.shape[0] >= n_patches:
                    patches = stored[:n_patches]  # the first tokens of a page are its patches, row-major
                else:  # pooled tokens lost their positions: embed the page again
                    try:
                        image = page_image(page, dpi=150)
                    except PageSourceError as e:
                        raise _source_gone(page_id, e) from None
                    patches = s.embedder.embed_pages([image], progress=False)[0][:n_patches]
            return _heat_png(similarity_grid(query_vectors, patches, grid))

        return Response(s.png(("simmap", page_id, query), render), media_type="image/png")

    @app.post("/api/ask", response_model=Answer, tags=["statistics"],
              responses={422: {"model": ErrorResponse}, 502: {"model": ErrorResponse}})
    def ask_statistics(request: AskRequest) -> Answer:
        """A grounded answer: RAG (tables, cited as [Table N]) or RIG (each number checked, footnoted)."""
        if not request.question.strip():
            raise ApiError(422, "invalid_request", "question: the question is blank")
        try:
            with llm_lock if model is not None else contextlib.nullcontext():
                return ask(request.question, mode=request.mode, source=source, llm=model,
                           max_new_tokens=max_new_tokens, guard=guard)
        except GroundingError as e:
            raise ApiError(502, "upstream_error", f"{type(e).__name__}: {e}") from None
        except GuardError as e:  # the guard could not score this question (e.g. longer than its context)
            raise ApiError(422, "guard_error", str(e)) from None

    app.state.search = search
    app.state.source = source
    return app


def _source_gone(page_id: int, error: Exception) -> ApiError:
    log.warning("page %d: %s", page_id, error)  # the reason names the file: for the log, not the client
    return ApiError(410, "page_source_gone", f"page {page_id}: its source file is gone, changed or unreadable; "
                    "re-index it")


def serve(index_dir: str | Path | None = None, store=None, embedder=None, llm=None, *, index=None,
          host: str = "127.0.0.1", port: int = 8000, log_level: str = "info", guard=None) -> None:
    """Run the web app with uvicorn (bound to 127.0.0.1 unless ``host`` says otherwise)."""
    if host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serving on %s: the app has no authentication; anyone who can reach it can use it", host)
    app = create_app(index_dir, store=store, embedder=embedder, llm=llm, index=index, guard=guard)
    run_server(app, host, port, protocol=http_protocol(), log_level=log_level)
