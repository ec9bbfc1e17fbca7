"""``trine serve``: an HTTP server (FastAPI on uvicorn) over one encoder, optionally a reranker and an index.

One module per API family, each a router over the app's shared state (:mod:`trine.serving.common`):
:mod:`~trine.serving.openai` (``/v1/embeddings``), :mod:`~trine.serving.tei` (text-embeddings-inference's
``/embed``, ``/embed_sparse``, ``/embed_all``, ``/rerank``, ``/tokenize``), :mod:`~trine.serving.native`
(``/encode``, ``/score``, ``/search``); ``/health``, ``/info`` and ``/metrics`` in :mod:`~trine.serving.app`.
Requests are merged by the dynamic batcher (:mod:`~trine.serving.batcher`) into calls of the one encoder.
"""

from trine.serving.app import create_app, run_server
from trine.serving.common import ServeSettings, load_documents

__all__ = ["ServeSettings", "create_app", "load_documents", "run_server"]
