"""The ``Index`` protocol: what every index backend does, so :class:`~trine.retrieval.HybridRetriever` (and
evaluation, mining) can use any of them: trine's in-memory indexes, or a vector-database collection.

An index holds documents of one representation (``"dense"`` vectors, ``"sparse"`` lexical weights or
``"colbert"`` multi-vectors, as ``M3Embedder.encode`` returns them; or ``"text"``, plain strings, for
indexes that tokenise texts themselves, as :class:`~trine.retrieval.BM25Index`) under row numbers ``0 .. len - 1``
in the order they were added; ``ids[row]`` is a document's id. Results and exact scores are in rows,
so indexes over the same documents (same ids, same order) fuse without id look-ups.

A backend is registered by the ``kind`` its :meth:`Index.save` writes into the folder's
``index.json`` (``register_index``), so a saved :class:`HybridRetriever` holding it loads again.
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Sequence
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np

from trine.retrieval.base import SearchResult, pad_results, top_k, unique_rows

Representation = Literal["dense", "sparse", "colbert", "text"]
#: the encoded representations (the modes of a HybridRetriever)
REPRESENTATIONS: tuple[str, ...] = ("dense", "sparse", "colbert")
#: every representation an index may hold: the encoded ones and plain texts (BM25)
INDEX_REPRESENTATIONS: tuple[str, ...] = (*REPRESENTATIONS, "text")
#: the ``M3Embedder.encode`` key each representation comes under
ENCODE_KEYS = {"dense": "dense_vecs", "sparse": "lexical_weights", "colbert": "colbert_vecs"}


@runtime_checkable
class Index(Protocol):
    """Search and exact scoring over documents of one representation.

    - ``representation``: ``"dense"`` (``dense_vecs``: a (docs x dim) float array), ``"sparse"``
      (``lexical_weights``: one ``{token: weight}`` mapping per document) or ``"colbert"``
      (``colbert_vecs``: one (tokens x dim) array per document) or ``"text"`` (plain strings, for an
      index that tokenises itself, e.g. BM25). Queries come in the same form.
    - ``ids``: the document id of each row (unique strings), ``len(index)`` rows.
    - ``build(docs, ids=None, **options)`` makes an index; ``add(docs, ids=None)`` appends rows
      (ids default to the row numbers); both refuse duplicate ids and bad values, leaving the index
      unchanged.
    - ``search(queries, k)``: each query's ``k`` best rows, best first, as a :class:`SearchResult`
      (padded with row -1 and score -inf); an approximate backend may miss rows.
    - ``score(queries, rows)``: exact scores of query ``i`` with ``rows[i]`` (a (queries x m) int
      array, -1 padding gives -inf); weighted fusion ranks by these, so they must be the numbers
      ``search`` returns for those rows (within float error).
    - ``save(path, overwrite=False)`` writes a folder whose ``index.json`` names the backend's
      ``kind`` (all or nothing: ``trine.io.atomic_folder``); ``load(path)`` reads it back.
    """

    @property
    def representation(self) -> str: ...

    @property
    def ids(self) -> Sequence[str]: ...

    def __len__(self) -> int: ...

    @classmethod
    def build(cls, docs: Any, /, ids: Sequence[str] | None = None) -> Index: ...

    def add(self, docs: Any, /, ids: Sequence[str] | None = None) -> None: ...

    def search(self, queries: Any, k: int) -> SearchResult: ...

    def score(self, queries: Any, rows: np.ndarray) -> np.ndarray: ...

    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> None: ...

    @classmethod
    def load(cls, path: str | os.PathLike) -> Index: ...


def check_index(index: Any, representation: str | None = None, what: str = "index") -> Index:
    """``index`` if it implements :class:`Index` (for ``representation`` when given); a clear error otherwise."""
    if not isinstance(index, Index):
        missing = [m for m in ("representation", "ids", "__len__", "build", "add", "search", "score", "save", "load")
                   if not hasattr(index, m)]
        raise TypeError(f"{what}: a {type(index).__name__} is not a trine Index (missing {', '.join(missing)})")
    if index.representation not in INDEX_REPRESENTATIONS:
        raise ValueError(f"{what}: representation {index.representation!r} is not one of {INDEX_REPRESENTATIONS}")
    if representation is not None and index.representation != representation:
        raise ValueError(f"{what}: expected an index over {representation!r}, got one over "
                         f"{index.representation!r} ({type(index).__name__})")
    return index


def rerank(index: Index, queries: Any, candidates: SearchResult | np.ndarray, k: int) -> SearchResult:
    """Re-order each query's candidate rows (duplicates and -1 ignored) by ``index.score``; keep the best ``k``."""
    rows = unique_rows(candidates.rows if isinstance(candidates, SearchResult) else candidates)
    if rows.shape[0] != len(queries):
        raise ValueError(f"{rows.shape[0]} candidate lists for {len(queries)} queries")
    scores = index.score(queries, rows)
    out = []
    for s, r in zip(scores, rows):
        valid = r >= 0
        out.append(top_k(s[valid], k, r[valid]) if valid.any() else (np.zeros(0), np.zeros(0, np.int64)))
    return pad_results(out, k)


# ---------------------------------------------------------------------- saved backends
_KINDS: dict[str, type] = {}
# trine's own kinds and the module that registers each: ``trine.retrieval`` exports lazily, so a
# backend's module may not be imported yet when a folder of its kind is loaded.
_BUILTIN_KINDS = {
    "bm25": "trine.retrieval.bm25",
    "dense": "trine.retrieval.dense",
    "milvus": "trine.retrieval.vectordb",
    "multivector": "trine.retrieval.multivector",
    "plaid": "trine.retrieval.plaid",
    "qdrant": "trine.retrieval.vectordb",
    "sparse": "trine.retrieval.sparse",
}


def register_index(kind: str, cls: type) -> None:
    """Let :func:`load_index` (and ``HybridRetriever.load``) read folders whose ``index.json`` says ``kind``."""
    if not hasattr(cls, "load"):
        raise TypeError(f"{cls.__name__} has no load(path)")
    if _KINDS.get(kind, cls) is not cls:
        raise ValueError(f"index kind {kind!r} is already registered to {_KINDS[kind].__name__}")
    _KINDS[kind] = cls


def load_index(path: str | os.PathLike) -> Index:
    """Load a saved index of any registered kind (the ``kind`` field of its ``index.json``)."""
    meta_path = os.path.join(os.fspath(path), "index.json")
    if not os.path.exists(meta_path):
        raise FileNotFoundError(f"{meta_path}: not found; is {path} a saved trine index?")
    with open(meta_path) as f:
        kind = json.load(f).get("kind")
    if kind not in _KINDS and kind in _BUILTIN_KINDS:
        importlib.import_module(_BUILTIN_KINDS[kind])
    if kind not in _KINDS:
        raise ValueError(f"{meta_path}: field 'kind' is {kind!r}; known index kinds are "
                         f"{sorted(set(_KINDS) | set(_BUILTIN_KINDS))} "
                         "(a backend registers its kind with trine.retrieval.register_index)")
    return check_index(_KINDS[kind].load(path), what=os.fspath(path))
