"""Dense retrieval over FAISS: exact inner product by default, HNSW or IVF as approximate options."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Literal

import faiss
import numpy as np

from trine.retrieval.base import (
    SearchResult,
    atomic_folder,
    check_ids,
    check_unique,
    read_ids,
    read_meta,
    write_ids,
    write_meta,
)
from trine.retrieval.protocol import register_index

DenseKind = Literal["flat", "hnsw", "ivf"]
DENSE_KINDS = ("flat", "hnsw", "ivf")


def _as_matrix(vectors: np.ndarray, dim: int | None, what: str) -> np.ndarray:
    x = np.ascontiguousarray(np.asarray(vectors, dtype=np.float32))
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim != 2 or (dim is not None and x.shape[1] != dim):
        raise ValueError(f"{what}: expected a (count x {dim or 'dim'}) array, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{what}: contains NaN or infinite values")
    return x


class DenseIndex:
    """Inner-product search over dense vectors (normalised vectors make it cosine).

    ``kind="flat"`` (default) is exact (``IndexFlatIP``). ``"hnsw"`` (``hnsw_m`` links per node,
    ``ef_construction``, ``ef_search``) and ``"ivf"`` (``nlist`` lists, ``nprobe`` searched; trained
    on the first vectors added) are approximate. Every kind can give back stored vectors, so exact
    scores of any (query, document) pair are available for fusion (:meth:`score`).
    Implements :class:`trine.retrieval.Index` over ``dense_vecs``.
    """

    representation = "dense"

    def __init__(
        self,
        dim: int,
        kind: DenseKind = "flat",
        *,
        hnsw_m: int = 32,
        ef_construction: int = 200,
        ef_search: int = 128,
        nlist: int = 1024,
        nprobe: int = 32,
    ):
        if kind not in DENSE_KINDS:
            raise ValueError(f"kind must be one of {DENSE_KINDS}, not {kind!r}")
        if dim < 1:
            raise ValueError(f"dim must be positive, got {dim}")
        self.dim = dim
        self.kind = kind
        self.options = {"hnsw_m": hnsw_m, "ef_construction": ef_construction, "ef_search": ef_search,
                        "nlist": nlist, "nprobe": nprobe}
        self.ids: list[str] = []
        if kind == "flat":
            self.index = faiss.IndexFlatIP(dim)
        elif kind == "hnsw":
            self.index = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
            self.index.hnsw.efConstruction = ef_construction
        else:
            self._quantizer = faiss.IndexFlatIP(dim)
            self.index = faiss.IndexIVFFlat(self._quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        self._apply_search_options()

    def _apply_search_options(self) -> None:
        if self.kind == "hnsw":
            self.index.hnsw.efSearch = self.options["ef_search"]
        elif self.kind == "ivf":
            self.index.nprobe = self.options["nprobe"]

    @classmethod
    def build(cls, vectors: np.ndarray, ids: Sequence[str] | None = None, kind: DenseKind = "flat",
              **options: int) -> DenseIndex:
        x = _as_matrix(vectors, None, "vectors")
        index = cls(x.shape[1], kind, **options)
        index.add(x, ids)
        return index

    def __len__(self) -> int:
        return len(self.ids)

    def add(self, vectors: np.ndarray, ids: Sequence[str] | None = None) -> None:
        x = _as_matrix(vectors, self.dim, "vectors")
        new_ids = check_ids(ids, x.shape[0], start=len(self.ids))
        check_unique(self.ids + new_ids)
        if self.kind == "ivf" and not self.index.is_trained:
            if x.shape[0] < self.options["nlist"]:
                raise ValueError(f"an IVF index with nlist={self.options['nlist']} needs at least that many vectors "
                                 f"in its first add() to train on, got {x.shape[0]}")
            self.index.train(x)
        self.index.add(x)
        if self.kind == "ivf":
            self.index.make_direct_map()
        self.ids.extend(new_ids)

    def search(self, queries: np.ndarray, k: int) -> SearchResult:
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        q = _as_matrix(queries, self.dim, "queries")
        scores, rows = self.index.search(q, k)
        rows = rows.astype(np.int64)
        scores = np.where(rows >= 0, scores, -np.inf).astype(np.float32)
        return SearchResult(scores, rows)

    def vectors(self, rows: np.ndarray) -> np.ndarray:
        """Stored vectors of ``rows`` (any shape; -1 gives zeros), shape rows.shape + (dim,)."""
        rows = np.asarray(rows, dtype=np.int64)
        flat = rows.reshape(-1)
        out = np.zeros((flat.size, self.dim), dtype=np.float32)
        valid = flat >= 0
        if valid.any():
            out[valid] = self.index.reconstruct_batch(flat[valid])
        return out.reshape(*rows.shape, self.dim)

    def score(self, queries: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Exact inner products of query i with rows[i] (queries x m); -inf where rows is -1."""
        q = _as_matrix(queries, self.dim, "queries")
        rows = np.asarray(rows, dtype=np.int64)
        if rows.ndim != 2 or rows.shape[0] != q.shape[0]:
            raise ValueError(f"rows must be (queries x m) with {q.shape[0]} queries, got {rows.shape}")
        out = np.einsum("qd,qmd->qm", q, self.vectors(rows))
        return np.where(rows >= 0, out, -np.inf).astype(np.float32)

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> None:
        """Write ``index.json``, ``ids.json`` and ``dense.faiss``; the folder appears whole or not at all."""
        with atomic_folder(path, overwrite=overwrite) as tmp:
            faiss.write_index(self.index, os.path.join(tmp, "dense.faiss"))
            write_ids(tmp, self.ids)
            write_meta(tmp, "dense", dim=self.dim, index_kind=self.kind, options=self.options, count=len(self.ids))

    @classmethod
    def load(cls, path: str | os.PathLike) -> DenseIndex:
        meta = read_meta(path, "dense")
        index = cls(meta["dim"], meta["index_kind"], **meta["options"])
        index.index = faiss.read_index(os.path.join(os.fspath(path), "dense.faiss"))
        if index.index.ntotal != meta["count"] or index.index.d != meta["dim"]:
            raise ValueError(f"{path}: dense.faiss holds {index.index.ntotal} x {index.index.d}, index.json says "
                             f"{meta['count']} x {meta['dim']}")
        index._apply_search_options()
        index.ids = read_ids(path, meta["count"])
        return index


register_index("dense", DenseIndex)
