"""Vector databases as trine indexes: the one place that knows every engine and chooses one by name.

The shared machinery (rows, exact scores, the model signature, :class:`VectorCollection` and its
:class:`CollectionIndex` views) is :mod:`trine.retrieval.collection`; the engines
(:mod:`trine.retrieval.milvus`, :mod:`trine.retrieval.qdrant`) subclass it and register themselves there.
This module sits above all three, so nothing imports its way back into itself: importing it registers the
engines (their modules import their client libraries only when a collection is made or opened) and the
``milvus`` / ``qdrant`` index kinds that :func:`trine.retrieval.load_index` reads.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import trine.retrieval.milvus as milvus
import trine.retrieval.qdrant as qdrant
from trine.retrieval.collection import (
    BACKENDS,
    BackendUnreachableError,
    CollectionIndex,
    CollectionMismatchError,
    ModelSignature,
    VectorCollection,
    connection_of,
    default_location,
    engine_class,
    require,
    signature_of,
)
from trine.retrieval.hybrid import HybridRetriever
from trine.retrieval.protocol import ENCODE_KEYS, REPRESENTATIONS, register_index

__all__ = ["BACKENDS", "BackendUnreachableError", "CollectionIndex", "CollectionMismatchError", "ModelSignature",
           "VectorCollection", "collection_class", "collection_retriever", "connection_of", "default_location",
           "open_collection", "require", "signature_of"]

#: the engine modules, imported above for their registrations
ENGINE_MODULES = (milvus, qdrant)


def collection_class(backend: str) -> type[VectorCollection]:
    """The collection class of a database backend (its module is imported, not yet its client library)."""
    return engine_class(backend)


def open_collection(backend: str, name: str, **connection: Any) -> VectorCollection:
    """An existing collection of ``backend`` (``uri=`` for Milvus; ``path=``/``url=``/``location=`` for Qdrant)."""
    return engine_class(backend).open(name, **connection)


register_index("milvus", CollectionIndex)
register_index("qdrant", CollectionIndex)


def collection_retriever(backend: str, docs: Mapping[str, Any], ids: Sequence[str], *, name: str,
                         uri: str | None = None, dense_index: str = "flat", texts: Sequence[str] | None = None,
                         tokenizer: Any = None, model: str | None = None, batch_size: int = 256) -> Any:
    """A :class:`~trine.retrieval.HybridRetriever` over the collection ``name`` of ``backend`` holding ``docs``
    (encode output) under ``ids``, in that order: the collection is made, or (made earlier by the same model
    from the same documents) completed and brought up to date by id; a collection holding other documents is
    refused. ``backend="trine"``: trine's in-memory indexes. No ``uri``: an embedded database in trine's cache
    (:func:`default_location`, keyed by ``name``)."""
    if backend == "trine":
        return HybridRetriever.from_encoded(docs, ids, dense_kind=dense_index)
    present = {k: v for k, v in docs.items() if v is not None}
    reps = tuple(r for r in REPRESENTATIONS if ENCODE_KEYS[r] in present)
    sig = signature_of(present, tokenizer, model)
    collection = engine_class(backend).create(name, representations=reps, signature=sig, exist_ok=True,
                                                  dense_index=dense_index, store_text=texts is not None,
                                                  **connection_of(backend, uri, default_key=name))
    if model and collection.signature.model and collection.signature.model != model:
        raise CollectionMismatchError(f"{backend} collection {name!r} was made by {collection.signature.model}, not "
                                      f"{model}; use another collection name")
    collection.upsert(present, list(ids), texts, batch_size=batch_size)
    if collection.ids != [str(d) for d in ids]:
        raise CollectionMismatchError(f"{backend} collection {name!r} holds {len(collection)} documents, not these "
                                      f"{len(ids)} in this order; use another collection name, or drop it")
    return collection.retriever()
