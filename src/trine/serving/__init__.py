"""``trine serve``: an HTTP server (FastAPI on uvicorn) over one encoder, optionally a reranker and an index.

One module per API family, each a router over the app's shared state (:mod:`trine.serving.common`):
:mod:`~trine.serving.openai` (``/v1/embeddings``), :mod:`~trine.serving.tei` (text-embeddings-inference's
``/embed``, ``/embed_sparse``, ``/embed_all``, ``/rerank``, ``/tokenize``), :mod:`~trine.serving.native`
(``/encode``, ``/score``, ``/search``); ``/health``, ``/info`` and ``/metrics`` in :mod:`~trine.serving.app`.
Requests are merged by the dynamic batcher (:mod:`~trine.serving.batcher`) into calls of the one encoder.
"""

from trine._lazy import lazy_exports

# Public name -> the module that defines it, imported on first use (see trine._lazy).
_EXPORTS = {
    "ServeSettings": "trine.serving.common",
    "create_app": "trine.serving.app",
    "load_documents": "trine.serving.common",
    "run_server": "trine.serving.app",
}

__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
