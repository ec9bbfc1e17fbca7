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
