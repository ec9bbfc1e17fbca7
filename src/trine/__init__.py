"""trine: multi-function (dense + lexical + multi-vector) text embeddings."""

from trine.inference import Embedder, M3Embedder, Reranker
from trine.modeling import CrossEncoder, DecoderEmbedder, LLMReranker, TriHeadModel
from trine.retrieval import (
    BM25Index,
    DenseIndex,
    HybridRetriever,
    MultiVectorIndex,
    QueryReps,
    SearchResult,
    SparseIndex,
)

__version__ = "0.1.0"
__all__ = [
    "BM25Index",
    "CrossEncoder",
    "DecoderEmbedder",
    "DenseIndex",
    "Embedder",
    "HybridRetriever",
    "LLMReranker",
    "M3Embedder",
    "MultiVectorIndex",
    "QueryReps",
    "Reranker",
    "SearchResult",
    "SparseIndex",
    "TriHeadModel",
    "__version__",
]

# ---- FlagEmbedding's class names (BGEM3FlagModel, FlagModel, FlagReranker, ...): thin faces in trine.flag,
# ---- imported on first use (PEP 562), so they add nothing to `import trine`
from trine.flag import FLAG_NAMES as _FLAG_NAMES  # noqa: E402 (a separate block, kept apart from the above)

__all__ += list(_FLAG_NAMES)


def __getattr__(name: str):  # noqa: ANN202
    if name in _FLAG_NAMES:
        import trine.flag

        return getattr(trine.flag, name)
    raise AttributeError(f"module 'trine' has no attribute {name!r}")
