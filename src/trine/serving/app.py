"""The app: :func:`create_app` over one encoder (and optionally a reranker and an index), and :func:`run_server`.

Errors are JSON naming the field: OpenAI's shape (``{"error": {"message", "type", "param", "code"}}``)
under ``/v1/``, text-embeddings-inference's (``{"error", "error_type"}``, plus ``field``) elsewhere.
Malformed bodies get 422 (the first pydantic error's field and message, the full list in ``detail``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from trine.inference import Encoder, Reranker
from trine.retrieval import HybridRetriever
from trine.serving import native, openai, tei
from trine.serving.batcher import Batcher, Overloaded
from trine.serving.common import ApiError, ServerState, ServeSettings
from trine.serving.metrics import ServerMetrics

access_log = logging.getLogger("trine.serving.access")
logger = logging.getLogger(__name__)
ERROR_TYPES = {400: "Validation", 401: "Unauthorized", 404: "NotFound", 405: "MethodNotAllowed", 413: "Validation",
               422: "Validation", 429: "Overloaded"}
OPEN_PATHS = {"/health"}  # answered without the API key (load balancers' probes)


def error_response(request: Request, status: int, message: str, field: str | None = None,
                   headers: dict[str, str] | None = None, detail: Any = None) -> JSONResponse:
    if request.url.path.startswith("/v1/"):
        kind = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error"}.get(
            status, "invalid_request_error" if status < 500 else "server_error")
        body: dict[str, Any] = {"error": {"message": message, "type": kind, "param": field, "code": status}}
    else:
        body = {"error": message, "error_type": ERROR_TYPES.get(status, "Backend" if status >= 500 else "Validation")}
        if field is not None:
            body["field"] = field
    if detail is not None:
        body["detail"] = detail
    return JSONResponse(body, status_code=status, headers=headers)


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "tuple", "none", "bytes", "literal"}


def _field(loc: tuple[Any, ...]) -> str:
    """pydantic's location (``("body", "input", "list[str]", 2)``) as ``input[2]``: the request part and the
    member tags of a union (``str``, ``list[str]``, ...) left out."""
    parts = list(loc[1:] if loc and loc[0] in ("body", "query", "path", "header") else loc)
    parts = [p for p in parts if isinstance(p, int) or not (p.lower() in _TYPE_TAGS or "[" in p or "-" in p)]
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "body"


def create_app(embedder: Encoder, reranker: Reranker | None = None, index: HybridRetriever | None = None,
               settings: ServeSettings | None = None, documents: Sequence[str] | None = None) -> FastAPI:
    """The FastAPI app serving ``embedder`` (an :class:`~trine.inference.M3Embedder` gives all three
    outputs), ``reranker`` (``/rerank``) and ``index`` (``/search``: a :class:`~trine.retrieval.HybridRetriever`
    over documents encoded by the same model); ``documents``: the index's texts, one per row (see
    :func:`~trine.serving.common.load_documents`), for ``/search`` re-ranked by ``reranker``. One model thread
    runs every model call, in order."""
    settings = settings or ServeSettings()
    if documents is not None:
        if index is None:
            raise ValueError("documents are the texts of the index's rows: they need an index")
        documents = list(documents)
        if len(documents) != len(index.ids) or not all(isinstance(d, str) for d in documents):
            raise ValueError(f"documents: expected {len(index.ids)} texts (one per document of the index), got "
                             f"{len(documents)}")
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="trine-model")
    metrics = ServerMetrics()
    batcher = Batcher(embedder, executor, max_batch_texts=settings.max_batch_texts,
                      max_batch_tokens=settings.max_batch_tokens, max_wait_ms=settings.max_wait_ms,
                      max_queue=settings.max_queue, on_batch=metrics.observe_batch)
    metrics.track_queue(lambda: batcher.depth)
    state = ServerState(embedder, reranker, index, settings, executor, metrics, batcher, documents)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        batcher.start()
        try:
            yield
        finally:  # uvicorn has stopped accepting and finished the open requests
            await batcher.stop()
            executor.shutdown(wait=True)

    app = FastAPI(title="trine", description="dense, lexical and ColBERT embeddings and reranking",
                  lifespan=lifespan, docs_url="/docs", redoc_url=None)
    app.state.trine = state

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, err: ApiError) -> JSONResponse:
        return error_response(request, err.status, err.message, err.field, err.headers)

    @app.exception_handler(Overloaded)
    async def _overloaded(request: Request, err: Overloaded) -> JSONResponse:
        metrics.rejected.inc()
        return error_response(request, 429, f"the server is busy: {err}; retry later",
                              headers={"Retry-After": str(settings.retry_after_s)})

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        errors = err.errors()
        # the most precise of the errors (a union reports one per member: input[1] beats input)
        first = max(errors, key=lambda e: len(_field(tuple(e.get("loc", ()))))) if errors else {
            "loc": ("body",), "msg": "invalid request"}
        field = _field(tuple(first.get("loc", ("body",))))
        return error_response(request, 422, f"{field}: {first.get('msg')}", field,
                              detail=jsonable_encoder(errors, custom_encoder={Exception: str}))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, err: StarletteHTTPException) -> JSONResponse:
        message = f"no route {request.method} {request.url.path}" if err.status_code in (404, 405) else str(err.detail)
        return error_response(request, err.status_code, message, headers=getattr(err, "headers", None))

    @app.middleware("http")
    async def _auth_log_time(request: Request, call_next: Any) -> Response:
        start = time.perf_counter()
        if settings.api_key is not None and request.url.path not in OPEN_PATHS:
            scheme, _, token = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(),
                                                                        settings.api_key.encode()):
                response: Response = error_response(request, 401, "missing or wrong API key (send "
                                                     "Authorization: Bearer <key>)",
                                                     headers={"WWW-Authenticate": "Bearer"})
            else:
                response = await call_next(request)
        else:
            response = await call_next(request)
        seconds = time.perf_counter() - start
        route = request.scope.get("route")
        path = getattr(route, "path", "unmatched")
        metrics.request_seconds.labels(path, str(response.status_code)).observe(seconds)
        if access_log.isEnabledFor(logging.INFO):
            access_log.info(json.dumps({
                "method": request.method, "path": request.url.path, "status": response.status_code,
                "ms": round(seconds * 1000, 2), "client": request.client.host if request.client else None,
            }))
        return response

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=metrics.content_type)

    @app.get("/info")
    async def info() -> dict[str, Any]:
        model = embedder.model
        return {
            "model_id": settings.model_name,
            "model_dtype": str(getattr(embedder, "dtype", None) or "float32").replace("torch.", ""),
            "model_type": {"embedding": {"pooling": getattr(model, "pooling_method", None)}},
            "outputs": list(embedder.outputs),
            "max_input_length": embedder.passage_max_length,
            "query_max_length": embedder.query_max_length,
            "max_batch_requests": settings.max_queue,
            "max_batch_texts": settings.max_batch_texts,
            "max_batch_tokens": settings.max_batch_tokens,
            "max_client_batch_size": settings.max_texts_per_request,
            "auto_truncate": settings.truncate,
            "reranker": reranker is not None,
            "index": None if index is None else {"documents": len(index.ids), "modes": list(index.indexes),
                                                 "texts": documents is not None},
            "version": _version(),
        }

    app.include_router(openai.router)
    app.include_router(tei.router)
    app.include_router(native.router)
    return app


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("trine")
    except PackageNotFoundError:
        return "unknown"


def run_server(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, *, log_level: str = "info",
               graceful_timeout_s: float = 30.0) -> None:
    """Serve ``app`` with uvicorn until SIGINT/SIGTERM; then it stops accepting, finishes the requests
    it accepted (up to ``graceful_timeout_s``) and exits. Access logs: JSON lines on ``trine.serving.access``."""
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level=log_level.lower(), access_log=False,
                timeout_graceful_shutdown=graceful_timeout_s)
