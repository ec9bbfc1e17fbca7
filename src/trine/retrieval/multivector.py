"""Multi-vector (ColBERT) retrieval: exact maxsim re-ranking of candidates, and full search for small corpora.

Every document's token vectors are stored in one (total tokens x dim) array with row offsets.
Scores come from ``trine.scoring.colbert_scores_padded`` (the one maxsim implementation).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from trine.retrieval.base import (
    SearchResult,
    atomic_folder,
    check_ids,
    check_unique,
    pad_results,
    read_ids,
    read_meta,
    top_k,
    write_ids,
    write_meta,
)
from trine.retrieval.protocol import register_index, rerank
from trine.scoring import colbert_scores_padded, pad_vectors

STORE_DTYPES = {"float32": np.float32, "float16": np.float16}


def _stack(colbert_vecs: Sequence[np.ndarray], dim: int | None, dtype: Any) -> tuple[np.ndarray, np.ndarray]:
    """Documents' (tokens x dim) arrays as one contiguous (total tokens x dim) array, and their lengths."""
    arrays = [np.asarray(v) for v in colbert_vecs]
    if dim is None:
        dim = arrays[0].shape[-1] if arrays[0].ndim == 2 else -1
    for i, a in enumerate(arrays):
        if a.ndim != 2 or a.shape[1] != dim:
            raise ValueError(f"colbert_vecs[{i}] has shape {a.shape}; expected (tokens x {dim})")
    lengths = np.array([a.shape[0] for a in arrays], dtype=np.int64)
    vectors = np.concatenate(arrays, axis=0).astype(dtype, copy=False)
    if not np.isfinite(vectors).all():
        raise ValueError("colbert_vecs contain NaN or infinite values")
    return np.ascontiguousarray(vectors), lengths


class MultiVectorIndex:
    """Token vectors per document (``colbert_vecs`` as ``M3Embedder`` returns), scored by exact maxsim.

    ``dtype="float16"`` halves the memory; scores are computed in float32 either way.
    Implements :class:`trine.retrieval.Index` over ``colbert_vecs``.
    """

    representation = "colbert"

    def __init__(self, vectors: np.ndarray, offsets: np.ndarray, ids: list[str]):
        self.vectors = vectors
        self.offsets = offsets
        self.ids = ids
        self.dim = int(vectors.shape[1])

    def __len__(self) -> int:
        return len(self.ids)

    @classmethod
    def build(cls, colbert_vecs: Sequence[np.ndarray], ids: Sequence[str] | None = None,
              dtype: str = "float32") -> MultiVectorIndex:
        if dtype not in STORE_DTYPES:
            raise ValueError(f"dtype must be one of {tuple(STORE_DTYPES)}, not {dtype!r}")
        if len(colbert_vecs) == 0:
            raise ValueError("colbert_vecs is empty: nothing to index")
        doc_ids = check_ids(ids, len(colbert_vecs))
        check_unique(doc_ids)
        vectors, lengths = _stack(colbert_vecs, None, STORE_DTYPES[dtype])
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        return cls(vectors, offsets, doc_ids)

    def add(self, colbert_vecs: Sequence[np.ndarray], ids: Sequence[str] | None = None) -> None:
        """Append documents as new rows (ids default to the row numbers), stored in the index's dtype;
        on bad input nothing changes. A memory-mapped index is read into memory."""
        new_ids = check_ids(ids, len(colbert_vecs), start=len(self.ids))
        check_unique(self.ids + new_ids)
        if not new_ids:
            return
        vectors, lengths = _stack(colbert_vecs, self.dim, self.vectors.dtype)
        offsets = np.concatenate([self.offsets, self.offsets[-1] + np.cumsum(lengths)]).astype(np.int64)
        self.vectors = np.ascontiguousarray(np.concatenate([self.vectors, vectors], axis=0))
        self.offsets = offsets
        self.ids.extend(new_ids)

    def doc_vectors(self, row: int) -> np.ndarray:
        v = self.vectors[self.offsets[row] : self.offsets[row + 1]]
        return v if v.flags.writeable else np.array(v)  # memory-mapped: torch wants writable arrays

    def _check_queries(self, queries: Sequence[np.ndarray]) -> None:
        for i, q in enumerate(queries):
            if np.ndim(q) != 2 or np.shape(q)[1] != self.dim:
                raise ValueError(f"query {i}: multi-vectors of shape {np.shape(q)}; expected (tokens x {self.dim})")

    def _gather(self, docs: np.ndarray, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows ``docs``' token vectors padded to ``width`` (count x width x dim, float32) and their mask,
        gathered in one indexing (no loop over documents)."""
        lengths = self.offsets[docs + 1] - self.offsets[docs]
        steps = np.arange(width, dtype=np.int64)
        mask = steps[None, :] < lengths[:, None]
        positions = np.where(mask, self.offsets[docs][:, None] + steps[None, :], 0)
        vecs = self.vectors[positions.ravel()].astype(np.float32, copy=False).reshape(len(docs), width, self.dim)
        return torch.from_numpy(vecs), torch.from_numpy(mask)

    def score(self, queries: Sequence[np.ndarray], rows: np.ndarray) -> np.ndarray:
        """Exact maxsim of query i with rows[i] (queries x m); -inf where rows is -1.

        One batched maxsim (:func:`trine.scoring.colbert_scores_padded`) per query over all its candidates,
        gathered padded in one indexing (no loop per document). Per query, not over pairs of several queries:
        a pair's score then depends only on the query's candidates, so equal documents tie exactly."""
        rows = np.asarray(rows, dtype=np.int64)
        if rows.ndim != 2 or rows.shape[0] != len(queries):
            raise ValueError(f"rows must be (queries x m) with {len(queries)} queries, got {rows.shape}")
        self._check_queries(queries)
        if rows.size and rows.max() >= len(self.ids):
            raise ValueError(f"rows must be below the index's {len(self.ids)} documents, got {int(rows.max())}")
        out = np.full(rows.shape, -np.inf, dtype=np.float32)
        for i, q in enumerate(queries):
            valid = rows[i] >= 0
            if not valid.any():
                continue
            docs = rows[i, valid]
            width = max(int((self.offsets[docs + 1] - self.offsets[docs]).max()), 1)
            qv, qm = pad_vectors([q])
            pv, pm = self._gather(docs, width)
            out[i, valid] = colbert_scores_padded(qv, qm, pv, pm)[0].numpy()
        return out

    def rerank(self, queries: Sequence[np.ndarray], candidates: SearchResult | np.ndarray, k: int) -> SearchResult:
        """Re-order each query's candidate rows (duplicates and -1 ignored) by exact maxsim; keep the best ``k``."""
        return rerank(self, queries, candidates, k)

    def search(self, queries: Sequence[np.ndarray], k: int, doc_batch: int = 2048) -> SearchResult:
        """Exact maxsim against every document (small corpora: cost is queries x all tokens)."""
        self._check_queries(queries)
        qv, qm = pad_vectors(list(queries))
        scores = np.empty((len(queries), len(self.ids)), dtype=np.float32)
        for start in range(0, len(self.ids), doc_batch):
            rows = np.arange(start, min(start + doc_batch, len(self.ids)))
            lengths = self.offsets[rows + 1] - self.offsets[rows]
            pv, pm = self._gather(rows, max(int(lengths.max()), 1))
            scores[:, rows] = colbert_scores_padded(qv, qm, pv, pm).numpy()
        return pad_results([top_k(s, k) for s in scores], k)

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> None:
        """Write ``index.json``, ``ids.json``, ``vectors.npy`` and ``offsets.npy``; all or nothing."""
        with atomic_folder(path, overwrite=overwrite) as tmp:
            np.save(os.path.join(tmp, "vectors.npy"), self.vectors)
            np.save(os.path.join(tmp, "offsets.npy"), self.offsets)
            write_ids(tmp, self.ids)
            write_meta(tmp, "multivector", count=len(self.ids), dim=self.dim, tokens=int(self.offsets[-1]),
                       dtype=str(self.vectors.dtype))

    @classmethod
    def load(cls, path: str | os.PathLike, mmap: bool = False) -> MultiVectorIndex:
        """``mmap=True`` maps the vectors from disk instead of reading them into memory."""
        meta = read_meta(path, "multivector")
        folder = os.fspath(path)
        vectors = np.load(os.path.join(folder, "vectors.npy"), mmap_mode="r" if mmap else None)
        offsets = np.load(os.path.join(folder, "offsets.npy"))
        if vectors.shape != (meta["tokens"], meta["dim"]) or offsets.size != meta["count"] + 1:
            raise ValueError(f"{folder}: vectors.npy / offsets.npy do not match index.json")
        return cls(vectors, offsets, read_ids(folder, meta["count"]))


register_index("multivector", MultiVectorIndex)
