"""Vector-database collections: one collection holds every representation of each passage (dense vectors,
lexical weights, ColBERT multi-vectors) with its id and text, and shows each representation as a trine
:class:`~trine.retrieval.Index` (:meth:`VectorCollection.index`), so :class:`~trine.retrieval.HybridRetriever`,
``trine eval`` and ``trine mine`` search the database a user deploys, unchanged.

The engines (:mod:`trine.retrieval.milvus`, :mod:`trine.retrieval.qdrant`) implement a few hooks
(create, scan, upsert, delete, search, fetch, fused search); this module owns what they share, and sits
below them (they import it, it imports neither; :mod:`trine.retrieval.vectordb` above both chooses one):

- **rows**: the Index protocol numbers documents ``0 .. len - 1``. Every stored document carries a
  ``seq`` number (its insertion order); rows are the ranks of the live documents' ``seq``, so an update
  keeps a document's row and a delete shifts later rows down by one. ``ids`` is read from the engine when
  a collection is opened (:meth:`VectorCollection.refresh` reads it again after another writer).
- **exact scores**: ``score(queries, rows)`` fetches the stored vectors and computes the scores trine's
  own indexes compute (inner products of the stored float32 vectors, the sparse dot product, maxsim), so
  weighted fusion over a collection ranks as over trine's indexes.
- **the model a collection belongs to**: dimensions and the tokenizer's vocabulary (size and a
  fingerprint) are stored with the collection; opening it for another model, or adding vectors of
  another size or token ids outside the vocabulary, is refused with a message that says so.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from types import ModuleType
from typing import Any

import numpy as np

from trine.errors import UserError
from trine.retrieval.base import SearchResult, check_ids, check_unique, pad_results, read_meta, write_meta
from trine.retrieval.protocol import ENCODE_KEYS, REPRESENTATIONS, rerank
from trine.scoring import colbert_scores_padded, pad_vectors

logger = logging.getLogger(__name__)

#: the backends a collection may live in (``trine`` is trine's own in-memory indexes)
BACKENDS = ("trine", "milvus", "qdrant")
#: the database engines, by backend name: each engine's module registers its class (:func:`register_engine`)
ENGINES: dict[str, type[VectorCollection]] = {}
EXTRA_HINT = "pip install trine[vectordb]"
#: metadata format of a collection made by trine
COLLECTION_FORMAT = 1
Hits = list[list[tuple[str, float]]]


def require(module: str, backend: str) -> ModuleType:
    """Import ``module`` for ``backend`` only when that backend is used; a clear error naming the extra if missing."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(f"the {backend} backend needs the package {module.split('.')[0]!r}, which is not "
                          f"installed: {EXTRA_HINT}") from err


def register_engine(backend: str, cls: type[VectorCollection]) -> None:
    """Called at the end of an engine's module (``milvus.py``, ``qdrant.py``): the engines import this module
    for the base class, so it cannot import them; :mod:`trine.retrieval.vectordb`, above both, imports them."""
    if ENGINES.get(backend, cls) is not cls:
        raise ValueError(f"vector-database backend {backend!r} is already registered to {ENGINES[backend].__name__}")
    ENGINES[backend] = cls


def engine_class(backend: str) -> type[VectorCollection]:
    """The collection class of a registered database backend."""
    if backend not in ENGINES:
        known = ", ".join(b for b in BACKENDS if b != "trine")
        raise ValueError(f"unknown vector-database backend {backend!r}; choose from {known} "
                         "(import trine.retrieval.vectordb to register them)")
    return ENGINES[backend]


class CollectionMismatchError(UserError):
    """A collection was made by another model (dimensions or vocabulary differ), or holds other representations."""


class BackendUnreachableError(UserError, ConnectionError):
    """A vector-database server could not be reached at the URI given."""


@dataclass(frozen=True)
class ModelSignature:
    """What a collection's vectors depend on: the dense and ColBERT sizes and the tokenizer's vocabulary
    (lexical weights are keyed by its token ids). ``None``: not known (that representation is absent)."""

    dense_dim: int | None = None
    colbert_dim: int | None = None
    vocab_size: int | None = None
    vocab_fingerprint: str | None = None
    model: str | None = None

    @classmethod
    def of_tokenizer(cls, tokenizer: Any, **fields: Any) -> ModelSignature:
        """A signature with the vocabulary of ``tokenizer`` (its size and a hash of its token -> id map)."""
        vocab = tokenizer.get_vocab()
        digest = hashlib.sha1(json.dumps(sorted(vocab.items()), ensure_ascii=False).encode()).hexdigest()[:16]
        return cls(vocab_size=len(vocab), vocab_fingerprint=digest, **fields)

    @classmethod
    def of_encoder(cls, encoder: Any, outputs: Sequence[str]) -> ModelSignature:
        """The signature of what ``encoder`` (an ``Encoder``) gives for ``outputs``: one short text is encoded
        to learn the ColBERT size."""
        probe = encoder.encode_result(["probe"], outputs, kind="query") if outputs else {}
        dense = probe.get("dense_vecs") if outputs else None
        colbert = probe.get("colbert_vecs") if outputs else None
        name = getattr(getattr(encoder, "model", None), "name_or_path", None)
        fields = {"dense_dim": int(dense.shape[1]) if dense is not None else None,
                  "colbert_dim": int(colbert[0].shape[1]) if colbert is not None else None,
                  "model": str(name) if name else None}
        if "sparse" in outputs:
            return cls.of_tokenizer(encoder.tokenizer, **fields)
        return cls(**fields)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def check(self, other: ModelSignature, where: str) -> None:
        """Raise :class:`CollectionMismatchError` where ``other`` (the model used now) disagrees with this one
        (the collection's); fields either side does not know are not compared."""
        problems = []
        for name, what in (("dense_dim", "it holds dense vectors of size {}, the model gives {}"),
                           ("colbert_dim", "it holds ColBERT vectors of size {}, the model gives {}"),
                           ("vocab_size", "its lexical weights are over a vocabulary of {} tokens, the model gives "
                                          "{}"),
                           ("vocab_fingerprint", "its vocabulary (fingerprint {}) is not the model's ({})")):
            mine, theirs = getattr(self, name), getattr(other, name)
            if mine is not None and theirs is not None and mine != theirs:
                problems.append(what.format(mine, theirs))
        if problems:
            made_by = f" (made by {self.model})" if self.model else ""
            raise CollectionMismatchError(f"{where}: this collection was made by another model{made_by}: "
                                          + "; ".join(problems))


def _check_docs(docs: Mapping[str, Any], representations: Sequence[str], sig: ModelSignature
                ) -> tuple[int, dict[str, Any]]:
    """The documents' count and each representation's values, checked against the collection's signature."""
    unknown = set(docs) - set(ENCODE_KEYS.values())
    if unknown:
        raise ValueError(f"unknown representation keys {sorted(unknown)}; expected {sorted(ENCODE_KEYS.values())}")
    out: dict[str, Any] = {}
    counts = set()
    for rep in representations:
        key = ENCODE_KEYS[rep]
        if docs.get(key) is None:
            raise ValueError(f"this collection holds {', '.join(representations)}: the documents lack {key}")
        value = docs[key]
        if rep == "dense":
            value = np.ascontiguousarray(np.asarray(value, dtype=np.float32))
            if value.ndim != 2 or value.shape[1] != sig.dense_dim:
                raise CollectionMismatchError(f"dense_vecs of shape {value.shape}: this collection holds dense "
                                              f"vectors of size {sig.dense_dim} (made by another model?)")
            if not np.isfinite(value).all():
                raise ValueError("dense_vecs contain NaN or infinite values")
        elif rep == "sparse":
            value = [sparse_items(w, f"lexical_weights[{i}]", sig.vocab_size) for i, w in enumerate(value)]
        else:
            value = [np.ascontiguousarray(np.asarray(v, dtype=np.float32)) for v in value]
            for i, v in enumerate(value):
                if v.ndim != 2 or v.shape[1] != sig.colbert_dim or v.shape[0] == 0:
                    raise CollectionMismatchError(f"colbert_vecs[{i}] of shape {v.shape}: this collection holds "
                                                  f"ColBERT vectors of size {sig.colbert_dim} (made by another model?)")
                if not np.isfinite(v).all():
                    raise ValueError(f"colbert_vecs[{i}] contains NaN or infinite values")
        counts.add(len(value))
        out[rep] = value
    if len(counts) > 1:
        raise ValueError(f"the representations hold different numbers of documents: {sorted(counts)}")
    return (counts.pop() if counts else 0), out


def sparse_items(weights: Mapping[str, float], where: str, vocab_size: int | None) -> dict[int, float]:
    """Lexical weights ``{token id string: weight}`` as ``{sparse dimension: weight}``: the token id is the
    dimension; zero weights are dropped; negative, non-finite weights and ids outside the vocabulary are errors."""
    if not isinstance(weights, Mapping):
        raise TypeError(f"{where} is a {type(weights).__name__}, not a {{token id: weight}} mapping")
    out: dict[int, float] = {}
    for token, w in weights.items():
        try:
            t = int(token)
        except (TypeError, ValueError):
            raise ValueError(f"{where}: key {token!r} is not a token id; vector databases index token ids "
                             "(M3Embedder's lexical_weights)") from None
        w = float(w)
        if not np.isfinite(w) or w < 0:
            raise ValueError(f"{where}: weight of token {token!r} is {w}; lexical weights must be finite and >= 0")
        if t < 0 or (vocab_size is not None and t >= vocab_size):
            raise CollectionMismatchError(f"{where}: token id {t} is outside this collection's vocabulary of "
                                          f"{vocab_size} tokens (made by another model?)")
        if w > 0:
            out[t] = w
    return out


class VectorCollection:
    """A collection of passages in a vector database, every representation of a passage in one record.

    Subclasses implement the ``_engine_*`` hooks. Public operations: :meth:`add` (new ids only),
    :meth:`upsert` (adds or replaces by id, keeping a replaced document's row), :meth:`delete`,
    :meth:`index` (one representation as a trine Index), :meth:`retriever` (a HybridRetriever over all of
    them), :meth:`engine_search` (fusion done by the engine), :meth:`drop`.
    """

    backend = "?"

    def __init__(self, name: str, representations: Sequence[str], signature: ModelSignature,
                 options: Mapping[str, Any]):
        self.name = name
        self.representations = tuple(r for r in REPRESENTATIONS if r in representations)
        self.signature = signature
        self.options = dict(options)
        self.closed = False
        self.ids: list[str] = []
        self._seq: list[int] = []
        self._row: dict[str, int] = {}

    # ------------------------------------------------------------------ engine hooks
    def _engine_scan(self) -> list[tuple[str, int]]:
        """``(id, seq)`` of every stored document."""
        raise NotImplementedError

    def _engine_upsert(self, ids: list[str], seqs: list[int], reps: dict[str, Any],
                       texts: list[str] | None) -> None:
        raise NotImplementedError

    def _engine_flush(self) -> None:
        """Make written documents durable and searchable at full speed (after a whole upsert)."""

    def _engine_delete(self, ids: list[str]) -> None:
        raise NotImplementedError

    def _engine_search(self, rep: str, queries: list[Any], k: int) -> Hits:
        """Per query, ``(id, score)`` of the engine's best ``k``, best first."""
        raise NotImplementedError

    def _engine_fetch(self, rep: str, ids: list[str]) -> dict[str, Any]:
        """The stored ``rep`` of each id: a float32 vector, a ``{dimension: weight}`` dict, a (tokens x dim) array."""
        raise NotImplementedError

    def _engine_fused(self, reps: dict[str, list[Any]], k: int, weights: dict[str, float], fusion: str,
                      candidate_k: int, rrf_k: float) -> Hits:
        raise NotImplementedError

    def _engine_drop(self) -> None:
        raise NotImplementedError

    def connection(self) -> dict[str, Any]:
        """What :meth:`open` needs to reach this collection again (written by a view's ``save``)."""
        raise NotImplementedError

    @classmethod
    def open(cls, name: str, **connection: Any) -> VectorCollection:
        raise NotImplementedError

    def close(self) -> None:
        """Release the client (an embedded database's file lock)."""
        self.closed = True
        self._engine_close()

    def _engine_close(self) -> None:
        raise NotImplementedError

    # ------------------------------------------------------------------ rows
    def meta(self) -> dict[str, Any]:
        """What trine stores with the collection."""
        return {"trine_collection": COLLECTION_FORMAT, "representations": list(self.representations),
                "signature": self.signature.to_dict(), "options": self.options}

    @staticmethod
    def parse_meta(raw: Any, where: str) -> tuple[tuple[str, ...], ModelSignature, dict[str, Any]]:
        meta = json.loads(raw) if isinstance(raw, str) else raw
        if not isinstance(meta, Mapping) or meta.get("trine_collection") != COLLECTION_FORMAT:
            raise CollectionMismatchError(f"{where}: not a collection made by trine (no trine metadata of format "
                                          f"{COLLECTION_FORMAT})")
        return tuple(meta["representations"]), ModelSignature(**meta["signature"]), dict(meta["options"])

    def refresh(self) -> None:
        """Read the stored ids again (rows: the ranks of their insertion numbers)."""
        pairs = sorted(self._engine_scan(), key=lambda p: p[1])
        self.ids = [p[0] for p in pairs]
        self._seq = [p[1] for p in pairs]
        self._row = {d: i for i, d in enumerate(self.ids)}

    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, doc_id: str) -> bool:
        return doc_id in self._row

    def rows_of(self, ids: Sequence[str]) -> np.ndarray:
        return np.array([self._row[str(d)] for d in ids], dtype=np.int64)

    def check_model(self, signature: ModelSignature) -> None:
        """Refuse a model whose dimensions or vocabulary differ from this collection's."""
        self.signature.check(signature, f"{self.backend} collection {self.name!r}")

    @staticmethod
    def check_sizes(representations: Sequence[str], signature: ModelSignature) -> None:
        """A new collection of dense or ColBERT vectors must know their size."""
        for rep, field in (("dense", "dense_dim"), ("colbert", "colbert_dim")):
            if rep in representations and not getattr(signature, field):
                raise ValueError(f"a collection of {rep} vectors needs their size ({field})")

    def check_reopened(self, representations: Sequence[str], signature: ModelSignature) -> VectorCollection:
        """This existing collection, if it holds ``representations`` made by the model of ``signature``."""
        if set(self.representations) != set(representations):
            raise CollectionMismatchError(f"{self.backend} collection {self.name!r} holds "
                                          f"{', '.join(self.representations)}, not {', '.join(representations)}")
        self.check_model(signature)
        return self

    # ------------------------------------------------------------------ writes
    def upsert(self, docs: Mapping[str, Any], ids: Sequence[str], texts: Sequence[str] | None = None,
               batch_size: int = 256) -> None:
        """Add documents, or replace those whose id is stored (a replaced document keeps its row), in
        batches of ``batch_size`` (each batch is one engine write: a build killed between batches keeps
        what it wrote). ``docs``: ``M3Embedder.encode`` output holding every representation of the collection."""
        count, reps = _check_docs(docs, self.representations, self.signature)
        new_ids = check_ids(ids, count)
        check_unique(new_ids)
        if texts is not None and len(texts) != count:
            raise ValueError(f"{len(texts)} texts for {count} documents")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        nxt = (max(self._seq) + 1) if self._seq else 0
        seqs = []
        for d in new_ids:
            if d in self._row:
                seqs.append(self._seq[self._row[d]])
            else:
                seqs.append(nxt)
                nxt += 1
        for start in range(0, count, batch_size):
            sl = slice(start, start + batch_size)
            self._engine_upsert(new_ids[sl], seqs[sl], {r: v[sl] for r, v in reps.items()},
                                None if texts is None else [str(t) for t in texts[sl]])
            for d, s in zip(new_ids[sl], seqs[sl]):
                if d not in self._row:
                    self._row[d] = len(self.ids)
                    self.ids.append(d)
                    self._seq.append(s)
        self._engine_flush()

    def add(self, docs: Mapping[str, Any], ids: Sequence[str] | None = None, texts: Sequence[str] | None = None,
            batch_size: int = 256) -> None:
        """Append new documents (ids default to the row numbers); an id already stored is an error."""
        count = len(next(iter(v for v in docs.values() if v is not None), []))
        new_ids = check_ids(ids, count, start=len(self.ids))
        check_unique(self.ids + new_ids)
        self.upsert(docs, new_ids, texts, batch_size)

    def delete(self, ids: Sequence[str]) -> None:
        """Remove documents by id (unknown ids are an error); later rows move down."""
        ids = [str(d) for d in ids]
        missing = [d for d in ids if d not in self._row]
        if missing:
            raise KeyError(f"ids not in the collection: {missing[:5]}")
        self._engine_delete(ids)
        gone = set(ids)
        keep = [i for i, d in enumerate(self.ids) if d not in gone]
        self.ids = [self.ids[i] for i in keep]
        self._seq = [self._seq[i] for i in keep]
        self._row = {d: i for i, d in enumerate(self.ids)}

    def drop(self) -> None:
        """Delete the whole collection from the database."""
        self._engine_drop()
        self.ids, self._seq, self._row = [], [], {}

    # ------------------------------------------------------------------ reads
    def _result(self, hits: Hits, k: int, positive: bool = False) -> SearchResult:
        out = []
        for per_query in hits:
            pairs = [(s, self._row[d]) for d, s in per_query if d in self._row and (not positive or s > 0)]
            pairs.sort(key=lambda p: (-p[0], p[1]))
            pairs = pairs[:k]
            out.append((np.array([p[0] for p in pairs], dtype=np.float32),
                        np.array([p[1] for p in pairs], dtype=np.int64)))
        return pad_results(out, k)

    def search(self, rep: str, queries: Any, k: int) -> SearchResult:
        """One representation's best ``k`` rows per query, by the engine."""
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        qs = self._queries(rep, queries)
        return self._result(self._engine_search(rep, qs, k), k, positive=rep == "sparse")

    def _queries(self, rep: str, queries: Any) -> list[Any]:
        if rep not in self.representations:
            raise ValueError(f"{self.backend} collection {self.name!r} holds {', '.join(self.representations)}, "
                             f"not {rep}")
        if rep == "dense":
            q = np.asarray(queries, dtype=np.float32)
            q = q[None, :] if q.ndim == 1 else q
            if q.ndim != 2 or q.shape[1] != self.signature.dense_dim:
                raise CollectionMismatchError(f"queries of shape {q.shape}: {self.backend} collection {self.name!r} "
                                              f"holds dense vectors of size {self.signature.dense_dim}")
            return list(q)
        if rep == "sparse":
            return [sparse_items(w, f"query {i}", self.signature.vocab_size) for i, w in enumerate(queries)]
        out = [np.asarray(v, dtype=np.float32) for v in queries]
        for i, v in enumerate(out):
            if v.ndim != 2 or v.shape[1] != self.signature.colbert_dim:
                raise CollectionMismatchError(f"query {i}: multi-vectors of shape {v.shape}: {self.backend} collection "
                                              f"{self.name!r} holds ColBERT vectors of size "
                                              f"{self.signature.colbert_dim}")
        return out

    def score(self, rep: str, queries: Any, rows: np.ndarray) -> np.ndarray:
        """Exact scores of query i with rows[i] from the stored vectors (-inf where rows is -1): inner
        product (dense), sparse dot product (lexical), maxsim (ColBERT), as trine's indexes compute them."""
        qs = self._queries(rep, queries)
        rows = np.asarray(rows, dtype=np.int64)
        if rows.ndim != 2 or rows.shape[0] != len(qs):
            raise ValueError(f"rows must be (queries x m) with {len(qs)} queries, got {rows.shape}")
        wanted = sorted(set(rows[rows >= 0].tolist()))
        stored = self._engine_fetch(rep, [self.ids[r] for r in wanted]) if wanted else {}
        out = np.full(rows.shape, -np.inf, dtype=np.float64)
        for i, q in enumerate(qs):
            valid = np.flatnonzero(rows[i] >= 0)
            if not valid.size:
                continue
            docs = [stored[self.ids[r]] for r in rows[i, valid].tolist()]
            if rep == "dense":
                out[i, valid] = np.stack(docs) @ q
            elif rep == "sparse":
                out[i, valid] = [sum(w * d.get(t, 0.0) for t, w in q.items()) for d in docs]
            else:
                qv, qm = pad_vectors([q])
                pv, pm = pad_vectors(docs)
                out[i, valid] = colbert_scores_padded(qv, qm, pv, pm)[0].numpy()
        return out.astype(np.float32) if rep != "sparse" else out

    def fetch(self, rep: str, ids: Sequence[str]) -> list[Any]:
        """The stored ``rep`` of each id (dense: float32 vectors; sparse: ``{token id string: weight}``;
        colbert: (tokens x dim) arrays)."""
        if rep not in self.representations:
            raise ValueError(f"this collection holds {', '.join(self.representations)}, not {rep}")
        ids = [str(d) for d in ids]
        missing = [d for d in ids if d not in self._row]
        if missing:
            raise KeyError(f"ids not in the collection: {missing[:5]}")
        got = self._engine_fetch(rep, ids)
        if rep == "sparse":
            return [{str(t): float(w) for t, w in got[d].items()} for d in ids]
        return [got[d] for d in ids]

    def engine_search(self, queries: Mapping[str, Any], k: int, weights: Mapping[str, float], *,
                      fusion: str = "rrf", candidate_k: int = 100, rrf_k: float = 60.0) -> SearchResult:
        """Hybrid search fused by the engine itself (one request per query batch): ``fusion="rrf"``
        (``sum w / (rrf_k + rank)``, rank from 1, over each mode's top ``candidate_k``: the numbers of
        :func:`trine.retrieval.reciprocal_rank_fusion`) or ``"weighted"`` (``sum w * score`` over the lists a
        document is in: a document missing from a list gets 0 there, unlike ``HybridRetriever.search``,
        which scores every candidate exactly in every mode). ``queries``: encode output (``dense_vecs``, ...)."""
        if fusion not in ("rrf", "weighted"):
            raise ValueError(f"fusion must be 'rrf' or 'weighted', not {fusion!r}")
        if not weights:
            raise ValueError("weights must name at least one mode")
        reps = {}
        for mode in weights:
            if ENCODE_KEYS.get(mode) is None or queries.get(ENCODE_KEYS[mode]) is None:
                raise ValueError(f"mode {mode!r} needs the queries' {ENCODE_KEYS.get(mode, mode)}")
            reps[mode] = self._queries(mode, queries[ENCODE_KEYS[mode]])
        hits = self._engine_fused(reps, k, {m: float(w) for m, w in weights.items()}, fusion, candidate_k, rrf_k)
        return self._result(hits, k)

    def index(self, rep: str) -> CollectionIndex:
        """The representation ``rep`` of this collection as a trine Index."""
        if rep not in self.representations:
            raise ValueError(f"this collection holds {', '.join(self.representations)}, not {rep}")
        return CollectionIndex(self, rep)

    def indexes(self) -> dict[str, CollectionIndex]:
        return {rep: self.index(rep) for rep in self.representations}

    def retriever(self) -> Any:
        """A :class:`~trine.retrieval.HybridRetriever` over every representation of this collection."""
        from trine.retrieval.hybrid import HybridRetriever

        return HybridRetriever(indexes=self.indexes())


class CollectionIndex:
    """One representation of a :class:`VectorCollection` as a trine :class:`~trine.retrieval.Index`: search by
    the engine, exact scores from the stored vectors, rows shared with the collection's other views.

    ``add`` writes to the collection, so it needs a collection holding only this representation (a
    document of a multi-representation collection is written whole: :meth:`VectorCollection.add`).
    ``save`` writes a folder naming the backend, its connection and the collection (not the vectors, which
    stay in the database); ``load`` connects again.
    """

    def __init__(self, collection: VectorCollection, representation: str):
        self.collection = collection
        self.representation = representation

    @property
    def ids(self) -> list[str]:
        return self.collection.ids

    @property
    def dim(self) -> int | None:
        """The vector size (dense or ColBERT; None for lexical weights)."""
        sig = self.collection.signature
        return {"dense": sig.dense_dim, "colbert": sig.colbert_dim}.get(self.representation)

    def __len__(self) -> int:
        return len(self.collection)

    @classmethod
    def build(cls, docs: Any, /, ids: Sequence[str] | None = None, *, backend: str = "milvus",
              representation: str = "dense", **options: Any) -> CollectionIndex:
        """A new collection (``backend``'s ``create(**options)``) holding ``docs`` of ``representation``."""
        collection_cls = engine_class(backend)
        rep_docs = {ENCODE_KEYS[representation]: docs}
        sig = signature_of(rep_docs)
        collection = collection_cls.create(representations=(representation,), signature=sig, **options)
        collection.add(rep_docs, ids)
        return collection.index(representation)

    def add(self, docs: Any, /, ids: Sequence[str] | None = None) -> None:
        if self.collection.representations != (self.representation,):
            raise ValueError(f"this collection holds {', '.join(self.collection.representations)}: add documents "
                             "through the collection (every representation at once)")
        self.collection.add({ENCODE_KEYS[self.representation]: docs}, ids)

    def search(self, queries: Any, k: int) -> SearchResult:
        return self.collection.search(self.representation, queries, k)

    def score(self, queries: Any, rows: np.ndarray) -> np.ndarray:
        return self.collection.score(self.representation, queries, rows)

    def rerank(self, queries: Any, candidates: SearchResult | np.ndarray, k: int) -> SearchResult:
        """Re-order each query's candidate rows by exact scores from the stored vectors (ColBERT: maxsim)."""
        return rerank(self, queries, candidates, k)

    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> None:
        """A folder whose ``index.json`` names the backend, the connection and the collection; all or nothing."""
        from trine.retrieval.base import atomic_folder

        with atomic_folder(path, overwrite=overwrite) as tmp:
            write_meta(tmp, self.collection.backend, collection=self.collection.name,
                       representation=self.representation, connection=self.collection.connection(),
                       count=len(self))

    @classmethod
    def load(cls, path: str | os.PathLike) -> CollectionIndex:
        with open(os.path.join(os.fspath(path), "index.json")) as f:
            kind = json.load(f).get("kind")
        meta = read_meta(path, kind)
        # the parts of a saved HybridRetriever share one client: an embedded database locks its files
        key = (kind, meta["collection"], json.dumps(meta["connection"], sort_keys=True))
        collection = _LOADED.get(key)
        if collection is None or collection.closed:
            collection = _LOADED[key] = engine_class(kind).open(meta["collection"], **meta["connection"])
        return collection.index(meta["representation"])


#: collections opened by CollectionIndex.load, by (backend, name, connection)
_LOADED: dict[tuple[str, str, str], VectorCollection] = {}


def signature_of(docs: Mapping[str, Any], tokenizer: Any = None, model: str | None = None) -> ModelSignature:
    """The signature of encoded documents (sizes read from the arrays; the vocabulary from ``tokenizer`` when given)."""
    dense = docs.get("dense_vecs")
    colbert = docs.get("colbert_vecs")
    fields = {"dense_dim": int(np.asarray(dense).shape[1]) if dense is not None else None,
              "colbert_dim": int(np.asarray(colbert[0]).shape[1]) if colbert is not None else None, "model": model}
    if tokenizer is not None and docs.get("lexical_weights") is not None:
        return ModelSignature.of_tokenizer(tokenizer, **fields)
    return ModelSignature(**fields)


def default_location(backend: str, key: str) -> str:
    """Where an embedded database keeps a collection trine made for a command on its own (``trine eval`` and
    ``trine mine`` without ``--uri``): ``~/.cache/trine/vectordb/<key>/milvus.db`` (Milvus Lite) or
    ``.../<key>/qdrant`` (Qdrant local mode). ``key`` is the collection's name, which by default is a hash of the
    model and the documents, so no two corpora and no user's files share a database (a file in the working
    folder could be one the user keeps, or another run's)."""
    if backend not in ("milvus", "qdrant"):
        raise ValueError(f"unknown vector-database backend {backend!r}; choose from milvus, qdrant")
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in key).strip(".") or "trine"
    folder = os.path.join(os.path.expanduser("~"), ".cache", "trine", "vectordb", safe)
    os.makedirs(folder, exist_ok=True)
    return os.path.join(folder, "milvus.db" if backend == "milvus" else "qdrant")


def connection_of(backend: str, uri: str | None, default_key: str | None = None) -> dict[str, Any]:
    """The connection keywords of a ``--uri``: Milvus takes it as it is (a ``.db`` file: Milvus Lite; a URL:
    a server); Qdrant takes ``http(s)://``: a server, ``:memory:``, or a folder (local mode). No ``uri``: with
    ``default_key``, trine's cache (:func:`default_location`), else the engine's default in the working folder
    (``trine index``, documented there)."""
    if not uri and default_key is not None:
        uri = default_location(backend, default_key)
        logger.info("%s collection %r: no --uri given, kept in %s", backend, default_key, uri)
    if backend == "milvus":
        return {"uri": uri} if uri else {}
    if backend == "qdrant":
        if not uri:
            return {}
        if uri.startswith(("http://", "https://")):
            return {"url": uri}
        return {"location": uri} if uri == ":memory:" else {"path": uri}
    raise ValueError(f"unknown vector-database backend {backend!r}; choose from milvus, qdrant")
