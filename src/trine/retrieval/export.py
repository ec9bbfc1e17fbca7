"""Lexical weights in the forms vector databases take: (indices, values) arrays, or token strings."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from transformers import PreTrainedTokenizerBase


def to_indices_values(lexical_weights: Mapping[str, float]) -> tuple[np.ndarray, np.ndarray]:
    """``{token id string: weight}`` -> (int64 token ids, ascending; float32 weights), as Qdrant/Milvus take."""
    try:
        ids = np.fromiter((int(t) for t in lexical_weights), dtype=np.int64, count=len(lexical_weights))
    except ValueError as err:
        raise ValueError(f"lexical weight keys must be token id strings: {err}") from err
    values = np.fromiter((float(w) for w in lexical_weights.values()), dtype=np.float32, count=len(lexical_weights))
    order = np.argsort(ids, kind="stable")
    return ids[order], values[order]


def to_sparse_vectors(lexical_weights: Sequence[Mapping[str, float]]) -> list[tuple[np.ndarray, np.ndarray]]:
    return [to_indices_values(w) for w in lexical_weights]


def to_csr_arrays(lexical_weights: Sequence[Mapping[str, float]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(indptr, indices, data) of a documents x vocabulary CSR matrix (``scipy.sparse.csr_matrix`` takes them)."""
    parts = to_sparse_vectors(lexical_weights)
    indptr = np.zeros(len(parts) + 1, dtype=np.int64)
    np.cumsum([p[0].size for p in parts], out=indptr[1:])
    indices = np.concatenate([p[0] for p in parts]) if parts else np.zeros(0, np.int64)
    data = np.concatenate([p[1] for p in parts]) if parts else np.zeros(0, np.float32)
    return indptr, indices, data


def to_token_strings(lexical_weights: Mapping[str, float], tokenizer: PreTrainedTokenizerBase) -> dict[str, float]:
    """``{token id string: weight}`` -> ``{token string: weight}`` (the tokenizer's own pieces, e.g. '▁file')."""
    ids, values = to_indices_values(lexical_weights)
    tokens = tokenizer.convert_ids_to_tokens(ids.tolist())
    if len(set(tokens)) != len(tokens):
        raise ValueError("two token ids map to one token string; keep token ids for this tokenizer")
    return dict(zip(tokens, values.tolist()))
