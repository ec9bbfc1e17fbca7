"""trine: multi-function (dense + lexical + multi-vector) text embeddings.

The public names are exported lazily (:mod:`trine._lazy`): ``import trine`` loads none of torch,
transformers or FAISS; ``trine.M3Embedder`` imports its module on first use."""

from trine._lazy import lazy_exports

__version__ = "0.1.0"

# Public name -> the module that defines it. Add a name here (and to __all__) to export it.
_EXPORTS = {
    "BM25Index": "trine.retrieval.bm25",
    "ColbertPlaidIndex": "trine.retrieval.plaid",
    "CrossEncoder": "trine.modeling.cross_encoder",
    "DecoderEmbedder": "trine.modeling.decoder",
    "DenseIndex": "trine.retrieval.dense",
    "Embedder": "trine.inference.embedder",
    "HybridRetriever": "trine.retrieval.hybrid",
    "LLMReranker": "trine.modeling.llm_reranker",
    "M3Embedder": "trine.inference.embedder",
    "MultiVectorIndex": "trine.retrieval.multivector",
    "QueryReps": "trine.retrieval.hybrid",
    "Reranker": "trine.inference.reranker",
    "SearchResult": "trine.retrieval.base",
    "SparseIndex": "trine.retrieval.sparse",
    "TriHeadModel": "trine.modeling.trihead",
}

# FlagEmbedding's class names (BGEM3FlagModel, FlagModel, FlagReranker, ...): thin faces (trine.flag)
_EXPORTS.update({name: "trine.flag" for name in (
    "BGEM3FlagModel", "FlagAutoModel", "FlagAutoReranker", "FlagICLModel", "FlagLLMModel", "FlagLLMReranker",
    "FlagModel", "FlagReranker", "LayerWiseFlagLLMReranker")})

__all__ = [*_EXPORTS, "__version__"]
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
