"""Qdrant collections through ``qdrant-client``: local mode (``path=`` a folder, or ``location=":memory:"``) or a
Qdrant server by URL (``url="http://host:6333"``), the same code for both.

Layout: one point per document (point id: a UUID derived from the document id, so writing a document
again replaces it), with named vectors ``dense`` (distance DOT), ``sparse`` (a sparse vector: the token id
is the dimension) and ``colbert`` (a multi-vector, comparator MAX_SIM, distance DOT: Qdrant's own
maxsim), and the payload ``doc_id``, ``seq`` (insertion number: trine's row order) and ``text``; trine's
metadata (model signature, options) in the collection's ``metadata``.

What local mode does (tried, qdrant-client 1.20): every vector kind, multi-vector MAX_SIM queries and
fusion queries (RRF with its ``k``; formula queries) work, computed in Python with NumPy over all points:
searches are always exact (HNSW settings are kept for a server, which builds the graph; ``dense_index=
"flat"`` asks a server for exact search too).

Scores: DOT over float32 vectors is the inner product trine's ``DenseIndex`` gives; the sparse score is the
dot product of lexical weights; the multi-vector score is Qdrant's sum over query tokens of the best
match, while trine's maxsim is the mean: :meth:`QdrantCollection.search` divides by the query's token count,
so scores equal trine's ``MultiVectorIndex``.
"""

from __future__ import annotations

import os
import uuid
from typing import Any

import numpy as np

from trine.errors import first_line
from trine.retrieval.collection import (
    BackendUnreachableError,
    Hits,
    ModelSignature,
    VectorCollection,
    register_engine,
    require,
)

DEFAULT_PATH = "trine_qdrant"
DENSE_INDEXES = ("flat", "hnsw")
ID_NAMESPACE = uuid.UUID("6f1c1f7e-3b7a-4c39-9b9c-7a2f3e1d5b10")
PAGE = 1024


def point_id(doc_id: str) -> str:
    """The Qdrant point id of a document id (Qdrant ids are integers or UUIDs)."""
    return str(uuid.uuid5(ID_NAMESPACE, doc_id))


class QdrantCollection(VectorCollection):
    """A trine collection in Qdrant (see the module). Make one with :meth:`create`, reach one with :meth:`open`."""

    backend = "qdrant"

    def __init__(self, client: Any, where: dict[str, Any], name: str, representations: tuple[str, ...],
                 signature: ModelSignature, options: dict[str, Any]):
        super().__init__(name, representations, signature, options)
        self.client = client
        self.where = where

    # ------------------------------------------------------------------ connect
    @staticmethod
    def connect(path: str | None = None, url: str | None = None, location: str | None = None,
                api_key: str | None = None, timeout: float = 10.0) -> tuple[Any, dict[str, Any]]:
        """A ``QdrantClient``: local mode on a folder (``path``, default ``trine_qdrant``) or in memory
        (``location=":memory:"``), or a server (``url``), reached within ``timeout`` seconds or
        :class:`BackendUnreachableError`."""
        qdrant_client = require("qdrant_client", "qdrant")
        given = [x for x in (path, url, location) if x is not None]
        if len(given) > 1:
            raise ValueError("qdrant: give one of path, url and location")
        if url is not None:
            client = qdrant_client.QdrantClient(url=url, api_key=api_key or os.environ.get("QDRANT_API_KEY"),
                                                timeout=int(max(timeout, 1)))
            try:
                client.get_collections()
            except Exception as err:  # the client raises transport errors of several libraries
                raise BackendUnreachableError(f"qdrant: cannot reach {url} within {timeout:g} s: "
                                              f"{first_line(err)}") from err
            return client, {"url": url}
        if location is not None:
            if location != ":memory:":
                raise ValueError(f"qdrant: location must be ':memory:' (a folder is path=, a server url=), "
                                 f"not {location!r}")
            return qdrant_client.QdrantClient(location=":memory:"), {"location": ":memory:"}
        path = os.path.abspath(path or DEFAULT_PATH)
        return qdrant_client.QdrantClient(path=path), {"path": path}

    def connection(self) -> dict[str, Any]:
        if self.where.get("location") == ":memory:":
            raise ValueError("qdrant: an in-memory collection cannot be saved and reached again; use path=")
        return dict(self.where)

    @classmethod
    def create(cls, name: str = "trine", *, representations: tuple[str, ...], signature: ModelSignature,
               path: str | None = None, url: str | None = None, location: str | None = None,
               api_key: str | None = None, dense_index: str = "flat", hnsw_m: int = 16, ef_construction: int = 200,
               ef_search: int = 128, store_text: bool = True, exist_ok: bool = False, timeout: float = 10.0,
               client: Any = None) -> QdrantCollection:
        """A new collection for documents of ``representations`` made by the model of ``signature``.
        ``exist_ok``: open the collection of that name instead when it exists (a resumed build), refused
        when it holds other representations or was made by another model. ``client``: an open client
        (local mode locks its folder: one client per folder and process)."""
        if dense_index not in DENSE_INDEXES:
            raise ValueError(f"dense_index must be one of {DENSE_INDEXES}, not {dense_index!r}")
        cls.check_sizes(representations, signature)
        if client is None:
            client, where = cls.connect(path, url, location, api_key, timeout)
        else:
            where = {"path": path} if path else {"url": url} if url else {"location": location or ":memory:"}
        if client.collection_exists(name):
            if not exist_ok:
                raise ValueError(f"qdrant collection {name!r} exists at {where}; open it, or drop it first")
            return cls._open(client, where, name).check_reopened(representations, signature)
        options = {"dense_index": dense_index, "hnsw_m": hnsw_m, "ef_construction": ef_construction,
                   "ef_search": ef_search, "store_text": store_text}
        collection = cls(client, where, name, tuple(representations), signature, options)
        collection._create()
        return collection

    def _create(self) -> None:
        from qdrant_client import models

        vectors: dict[str, Any] = {}
        hnsw = models.HnswConfigDiff(m=self.options["hnsw_m"], ef_construct=self.options["ef_construction"])
        if "dense" in self.representations:
            vectors["dense"] = models.VectorParams(size=self.signature.dense_dim, distance=models.Distance.DOT,
                                                   hnsw_config=hnsw)
        if "colbert" in self.representations:
            vectors["colbert"] = models.VectorParams(
                size=self.signature.colbert_dim, distance=models.Distance.DOT,
                multivector_config=models.MultiVectorConfig(comparator=models.MultiVectorComparator.MAX_SIM),
                hnsw_config=models.HnswConfigDiff(m=0))  # re-ranking only: no graph over every token (a server)
        sparse = {"sparse": models.SparseVectorParams()} if "sparse" in self.representations else None
        self.client.create_collection(self.name, vectors_config=vectors, sparse_vectors_config=sparse,
                                      metadata={"trine": self.meta()})

    @classmethod
    def open(cls, name: str = "trine", *, path: str | None = None, url: str | None = None,
             location: str | None = None, api_key: str | None = None, timeout: float = 10.0,
             client: Any = None) -> QdrantCollection:
        """The collection ``name`` (made by trine), its ids read."""
        if client is None:
            client, where = cls.connect(path, url, location, api_key, timeout)
        else:
            where = {"path": path} if path else {"url": url} if url else {"location": location or ":memory:"}
        if not client.collection_exists(name):
            raise ValueError(f"qdrant: no collection {name!r} at {where}")
        return cls._open(client, where, name)

    @classmethod
    def _open(cls, client: Any, where: dict[str, Any], name: str) -> QdrantCollection:
        metadata = client.get_collection(name).config.metadata or {}
        reps, sig, options = cls.parse_meta(metadata.get("trine"), f"qdrant collection {name!r} at {where}")
        collection = cls(client, where, name, reps, sig, options)
        collection.refresh()
        return collection

    def _engine_close(self) -> None:
        self.client.close()

    # ------------------------------------------------------------------ engine hooks
    def _engine_scan(self) -> list[tuple[str, int]]:
        pairs, offset = [], None
        while True:
            points, offset = self.client.scroll(self.name, limit=PAGE, offset=offset,
                                                with_payload=["doc_id", "seq"], with_vectors=False)
            pairs.extend((str(p.payload["doc_id"]), int(p.payload["seq"])) for p in points)
            if offset is None:
                return pairs

    def _engine_upsert(self, ids: list[str], seqs: list[int], reps: dict[str, Any],
                       texts: list[str] | None) -> None:
        from qdrant_client import models

        points = []
        for i, (d, s) in enumerate(zip(ids, seqs)):
            vector: dict[str, Any] = {}
            if "dense" in reps:
                vector["dense"] = reps["dense"][i].tolist()
            if "sparse" in reps:
                items = sorted(reps["sparse"][i].items())
                vector["sparse"] = models.SparseVector(indices=[t for t, _ in items], values=[w for _, w in items])
            if "colbert" in reps:
                vector["colbert"] = reps["colbert"][i].tolist()
            payload: dict[str, Any] = {"doc_id": d, "seq": s}
            if self.options["store_text"]:
                payload["text"] = texts[i] if texts is not None else ""
            points.append(models.PointStruct(id=point_id(d), vector=vector, payload=payload))
        self.client.upsert(self.name, points, wait=True)

    def _engine_delete(self, ids: list[str]) -> None:
        from qdrant_client import models

        self.client.delete(self.name, models.PointIdsList(points=[point_id(d) for d in ids]), wait=True)

    def _params(self, k: int) -> Any:
        from qdrant_client import models

        if "url" not in self.where:
            return None  # local mode is always exact and warns that search parameters have no effect
        if self.options["dense_index"] == "hnsw":
            return models.SearchParams(hnsw_ef=max(self.options["ef_search"], k))
        return models.SearchParams(exact=True)

    def _query(self, rep: str, q: Any) -> Any:
        from qdrant_client import models

        if rep == "sparse":
            items = sorted(q.items())
            return models.SparseVector(indices=[t for t, _ in items], values=[w for _, w in items])
        return q.tolist()

    def _engine_search(self, rep: str, queries: list[Any], k: int) -> Hits:
        from qdrant_client import models

        out: Hits = [[] for _ in queries]
        todo = [i for i, q in enumerate(queries) if rep != "sparse" or q]  # an empty lexical query matches nothing
        requests = [models.QueryRequest(query=self._query(rep, queries[i]), using=rep, limit=k,
                                        params=self._params(k), with_payload=["doc_id"]) for i in todo]
        for start in range(0, len(requests), 64):
            responses = self.client.query_batch_points(self.name, requests[start:start + 64])
            for i, res in zip(todo[start:start + 64], responses):
                # Qdrant's MAX_SIM sums the best matches over query tokens; trine's maxsim is their mean
                scale = 1.0 / len(queries[i]) if rep == "colbert" else 1.0
                out[i] = [(str(p.payload["doc_id"]), float(p.score) * scale) for p in res.points]
        return out

    def _engine_fetch(self, rep: str, ids: list[str]) -> dict[str, Any]:
        got: dict[str, Any] = {}
        for start in range(0, len(ids), PAGE):
            points = self.client.retrieve(self.name, [point_id(d) for d in ids[start:start + PAGE]],
                                          with_payload=["doc_id"], with_vectors=[rep])
            for p in points:
                v = p.vector[rep]
                d = str(p.payload["doc_id"])
                if rep == "sparse":
                    got[d] = {int(t): float(w) for t, w in zip(v.indices, v.values)}
                else:
                    got[d] = np.asarray(v, dtype=np.float32)
        return got

    def _engine_fused(self, reps: dict[str, list[Any]], k: int, weights: dict[str, float], fusion: str,
                      candidate_k: int, rrf_k: float) -> Hits:
        from qdrant_client import models

        if "colbert" in weights:
            raise ValueError("qdrant: engine fusion fuses dense and sparse lists; fuse ColBERT with HybridRetriever "
                             "over the collection's indexes (Qdrant's MAX_SIM serves the colbert index)")
        if fusion == "rrf" and float(rrf_k) != int(rrf_k):
            raise ValueError(f"qdrant: RRF's k is an integer, got {rrf_k}")
        first = list(weights)
        n = len(next(iter(reps.values())))
        out: Hits = []
        for i in range(n):
            modes = [m for m in first if m != "sparse" or reps[m][i]]
            if not modes:
                out.append([])
                continue
            prefetch = [models.Prefetch(query=self._query(m, reps[m][i]), using=m, limit=candidate_k,
                                        params=self._params(candidate_k)) for m in modes]
            if fusion == "rrf":
                if any(weights[m] != 1.0 for m in modes):
                    raise ValueError(f"qdrant: the RRF fusion takes no weights, got {weights}; use weights of 1")
                # Qdrant scores 1 / (rank + k - 1), rank from 1; trine 1 / (rrf_k + rank)
                query: Any = models.RrfQuery(rrf=models.Rrf(k=int(rrf_k) + 1))
            else:
                terms: list[Any] = [models.MultExpression(mult=[weights[m], f"$score[{j}]"])
                                    for j, m in enumerate(modes)]
                defaults = {f"$score[{j}]": 0.0 for j in range(len(modes))}
                query = models.FormulaQuery(formula=models.SumExpression(sum=terms), defaults=defaults)
            res = self.client.query_points(self.name, prefetch=prefetch, query=query, limit=k,
                                           with_payload=["doc_id"])
            out.append([(str(p.payload["doc_id"]), float(p.score)) for p in res.points])
        return out

    def _engine_drop(self) -> None:
        self.client.delete_collection(self.name)


register_engine("qdrant", QdrantCollection)
