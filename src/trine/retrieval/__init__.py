"""Retrieval: dense (FAISS), sparse (inverted lexical index), multi-vector (maxsim) and hybrid search."""

from trine.retrieval.base import SearchResult, top_k
from trine.retrieval.dense import DenseIndex
from trine.retrieval.export import to_csr_arrays, to_indices_values, to_sparse_vectors, to_token_strings
from trine.retrieval.hybrid import HybridRetriever, QueryReps, reciprocal_rank_fusion, union_rows, weighted_fusion
from trine.retrieval.multivector import MultiVectorIndex
from trine.retrieval.sparse import SparseIndex

__all__ = [
    "DenseIndex",
    "HybridRetriever",
    "MultiVectorIndex",
    "QueryReps",
    "SearchResult",
    "SparseIndex",
    "reciprocal_rank_fusion",
    "to_csr_arrays",
    "to_indices_values",
    "to_sparse_vectors",
    "to_token_strings",
    "top_k",
    "union_rows",
    "weighted_fusion",
]
