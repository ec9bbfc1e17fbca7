"""Retrieval: dense (FAISS), sparse (inverted lexical index), multi-vector (maxsim), hybrid search, and BM25
over texts (bm25s) as the classical baseline."""

from trine.retrieval.base import SearchResult, top_k
from trine.retrieval.bm25 import BM25Index
from trine.retrieval.dense import DenseIndex
from trine.retrieval.export import to_csr_arrays, to_indices_values, to_sparse_vectors, to_token_strings
from trine.retrieval.hybrid import HybridRetriever, QueryReps, reciprocal_rank_fusion, union_rows, weighted_fusion
from trine.retrieval.multivector import MultiVectorIndex
from trine.retrieval.protocol import Index, Representation, check_index, load_index, register_index
from trine.retrieval.sparse import SparseIndex
from trine.retrieval.vectordb import CollectionIndex, ModelSignature, VectorCollection, open_collection

__all__ = [
    "BM25Index",
    "CollectionIndex",
    "DenseIndex",
    "HybridRetriever",
    "Index",
    "ModelSignature",
    "MultiVectorIndex",
    "QueryReps",
    "Representation",
    "SearchResult",
    "SparseIndex",
    "check_index",
    "load_index",
    "reciprocal_rank_fusion",
    "register_index",
    "to_csr_arrays",
    "to_indices_values",
    "to_sparse_vectors",
    "to_token_strings",
    "top_k",
    "VectorCollection",
    "open_collection",
    "union_rows",
    "weighted_fusion",
]
