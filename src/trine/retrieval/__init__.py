"""Retrieval: dense (FAISS), sparse (inverted lexical index), multi-vector (maxsim), hybrid search, and BM25
over texts (bm25s) as the classical baseline."""

from trine._lazy import lazy_exports

# Public name -> the module that defines it, imported on first use (see trine._lazy).
_EXPORTS = {
    "BM25Index": "trine.retrieval.bm25",
    "ColbertPlaidIndex": "trine.retrieval.plaid",
    "CollectionIndex": "trine.retrieval.vectordb",
    "DenseIndex": "trine.retrieval.dense",
    "HybridRetriever": "trine.retrieval.hybrid",
    "Index": "trine.retrieval.protocol",
    "ModelSignature": "trine.retrieval.vectordb",
    "MultiVectorIndex": "trine.retrieval.multivector",
    "QueryReps": "trine.retrieval.hybrid",
    "Representation": "trine.retrieval.protocol",
    "SearchResult": "trine.retrieval.base",
    "SparseIndex": "trine.retrieval.sparse",
    "check_index": "trine.retrieval.protocol",
    "load_index": "trine.retrieval.protocol",
    "reciprocal_rank_fusion": "trine.retrieval.hybrid",
    "register_index": "trine.retrieval.protocol",
    "to_csr_arrays": "trine.retrieval.export",
    "to_indices_values": "trine.retrieval.export",
    "to_sparse_vectors": "trine.retrieval.export",
    "to_token_strings": "trine.retrieval.export",
    "top_k": "trine.retrieval.base",
    "VectorCollection": "trine.retrieval.vectordb",
    "open_collection": "trine.retrieval.vectordb",
    "union_rows": "trine.retrieval.hybrid",
    "weighted_fusion": "trine.retrieval.hybrid",
}

__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
