"""The app: :func:`create_app` over one encoder (and optionally a reranker and an index), and :func:`run_server`.

Errors are JSON naming the field: OpenAI's shape (``{"error": {"message", "type", "param", "code"}}``)
under ``/v1/``, text-embeddings-inference's (``{"error", "error_type"}``, plus ``field``) elsewhere.
Malformed bodies get 422 (the first pydantic error's field and message, the full list in ``detail``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
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

import trine.serving.native as native
import trine.serving.openai as openai
import trine.serving.tei as tei
from trine.inference import Encoder, Reranker
from trine.retrieval import HybridRetriever
from trine.serving.batcher import Batcher, Overloaded, Ticket, current_ticket
from trine.serving.common import ApiError, ServerState, ServeSettings
from trine.serving.metrics import ServerMetrics

access_log = logging.getLogger("trine.serving.access")
logger = logging.getLogger(__name__)
ERROR_TYPES = {400: "Validation", 401: "Unauthorized", 404: "NotFound", 405: "MethodNotAllowed", 413: "Validation",
               422: "Validation", 429: "Overloaded"}
OPEN_PATHS = {"/health"}  # answered without the API key (load balancers' probes)


def _clean(value: Any) -> Any:
    """``value`` made JSON-safe: a lone surrogate (sent as ``"\\ud800"``) escaped, a non-finite number as its name,
    so an error about a bad value can always be answered."""
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {_clean(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def error_response(request: Request | str, status: int, message: str, field: str | None = None,
                   headers: dict[str, str] | None = None, detail: Any = None) -> JSONResponse:
    """The error body of ``request``'s API (or of a path): OpenAI's under ``/v1/``, text-embeddings-inference's
    elsewhere."""
    path = request if isinstance(request, str) else request.url.path
    if path.startswith("/v1/"):
        kind = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error"}.get(
            status, "invalid_request_error" if status < 500 else "server_error")
        body: dict[str, Any] = {"error": {"message": message, "type": kind, "param": field, "code": status}}
    else:
        body = {"error": message, "error_type": ERROR_TYPES.get(status, "Backend" if status >= 500 else "Validation")}
        if field is not None:
            body["field"] = field
    if detail is not None:
        body["detail"] = detail
    return JSONResponse(_clean(body), status_code=status, headers=headers)


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


class _Guard:
    """What every request passes before any route reads it, in this order: the ``Host`` allow-list (400), the API
    key (401), then for a POST the admission (429 at once when ``max_queue`` requests wait: nothing of the body is
    read) and the body limit (413 from ``Content-Length``, or as soon as a streamed body passes ``max_body_bytes``);
    the body is read here, within the limit, and handed on. Times every request for ``/metrics`` and the access log.
    A pure ASGI middleware: no task per request, and the admission ticket is a context variable the batcher sees."""

    def __init__(self, app: Any, state: ServerState):
        self.app = app
        self.state = state

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = [500]

        async def send_status(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            refusal, body, ticket = await self._check(scope, receive)
            if refusal is not None:
                await refusal(scope, receive, send_status)
                return
            if body is None:
                await self.app(scope, receive, send_status)
                return
            token = current_ticket.set(ticket)
            try:
                await self.app(scope, _replay(body, receive), send_status)
            finally:
                current_ticket.reset(token)
                ticket.release()
        finally:
            self._observe(scope, status[0], time.perf_counter() - start)

    async def _check(self, scope: dict, receive: Any) -> tuple[Response | None, bytes | None, Ticket | None]:
        settings = self.state.settings
        path = scope["path"]
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if not settings.host_allowed(headers.get("host")):
            return error_response(path, 400, f"Host {headers.get('host', '')!r} is not allowed on this server (trine "
                                             "serve --allowed-hosts)"), None, None
        if settings.api_key is not None and path not in OPEN_PATHS:
            scheme, _, token = headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(),
                                                                        settings.api_key.encode()):
                return error_response(path, 401, "missing or wrong API key (send Authorization: Bearer <key>)",
                                      headers={"WWW-Authenticate": "Bearer"}), None, None
        if scope["method"] != "POST":
            return None, None, None
        try:
            ticket = self.state.admit_request()
        except Overloaded as err:
            self.state.metrics.rejected.inc()
            return error_response(path, 429, f"the server is busy: {err}; retry later",
                                  headers={"Retry-After": str(settings.retry_after_s)}), None, None
        limit = settings.max_body_bytes
        too_large = f"body: more than this server's limit of {limit} bytes per request (--max-body-bytes)"
        declared = headers.get("content-length", "")
        if declared.strip().isdigit() and int(declared) > limit:
            ticket.release()
            return error_response(path, 413, too_large, "body"), None, None
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                ticket.release()
                return Response(status_code=400), None, None  # nobody reads it
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                ticket.release()
                return error_response(path, 413, too_large, "body", headers={"Connection": "close"}), None, None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return None, b"".join(chunks), ticket

    def _observe(self, scope: dict, status: int, seconds: float) -> None:
        route = scope.get("route")
        self.state.metrics.request_seconds.labels(getattr(route, "path", "unmatched"), str(status)).observe(seconds)
        if access_log.isEnabledFor(logging.INFO):
            client = scope.get("client")
            access_log.info(json.dumps({"method": scope["method"], "path": scope["path"], "status": status,
                                        "ms": round(seconds * 1000, 2), "client": client[0] if client else None}))


def _replay(body: bytes, receive: Any) -> Any:
    """An ASGI ``receive`` that gives ``body`` as one message, then waits on the client's (for its disconnect)."""
    sent = False

    async def replay() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


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
    state = ServerState(embedder, reranker, index, settings, executor, metrics, batcher, documents)
    metrics.track_queue(lambda: state.waiting.count)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        batcher.start()
        try:
            yield
        finally:  # uvicorn has stopped accepting and finished the open requests
            await batcher.stop()
            executor.shutdown(wait=True)
            state.tokenizer_thread.shutdown(wait=True)

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
        # the offending values are not echoed: they may be megabytes, or not serialisable (NaN, lone surrogates)
        detail = [{k: v for k, v in e.items() if k in ("loc", "msg", "type")} for e in errors]
        return error_response(request, 422, f"{field}: {first.get('msg')}", field,
                              detail=jsonable_encoder(detail, custom_encoder={Exception: str}))

    @app.exception_handler(Exception)
    async def _failed(request: Request, err: Exception) -> JSONResponse:  # logged with its traceback by Starlette
        return error_response(request, 500, f"internal error ({type(err).__name__}); see the server's log")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, err: StarletteHTTPException) -> JSONResponse:
        message = f"no route {request.method} {request.url.path}" if err.status_code in (404, 405) else str(err.detail)
        return error_response(request, err.status_code, message, headers=getattr(err, "headers", None))

    app.add_middleware(_Guard, state=state)

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
            "max_body_bytes": settings.max_body_bytes,
            "max_text_chars": settings.max_text_chars,
            "max_colbert_tokens": settings.max_colbert_tokens,
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
