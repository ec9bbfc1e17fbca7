"""Milvus collections through ``pymilvus``: embedded Milvus Lite (a local ``.db`` file, the default: nothing to
start) or a Milvus server by URI (``http://host:19530``), the same code for both.

Layout (what Milvus Lite 3.2 supports, tried: FLOAT_VECTOR with FLAT / HNSW / IVF indexes, SPARSE_FLOAT_VECTOR
with an inverted index, ``hybrid_search`` with the weighted and RRF rankers; it has no FLOAT16 vectors and
no array-of-struct / multi-vector fields, so no engine-side MaxSim):

- collection ``name``: ``id`` (VARCHAR primary key), ``seq`` (insertion number: trine's row order),
  ``dense`` (FLOAT_VECTOR, metric IP, index ``FLAT``: exact, or ``HNSW``), ``sparse``
  (SPARSE_FLOAT_VECTOR, metric IP, ``SPARSE_INVERTED_INDEX``: the token id is the dimension), ``text``
  (VARCHAR, optional); trine's metadata (model signature, options) in the collection property ``trine``.
- collection ``name__colbert``: one row per ColBERT token vector (``doc_id``, ``tok``, ``vec``), the
  layout Milvus's own ColBERT recipe uses. ColBERT scores are trine's exact maxsim over the stored vectors
  (re-ranking candidates); a full ColBERT search takes the documents of each query token's nearest token
  vectors (``colbert_token_k`` per query token) as candidates and re-ranks them exactly.

Scores: dense vectors are stored as float32 and searched by inner product, so they are the inner
products trine's ``DenseIndex`` gives (cosines for a normalising model); lexical scores are the sparse
dot product of the lexical weights (float32 as stored), as trine's ``SparseIndex``.
"""

from __future__ import annotations

import json
import logging
import os
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

DEFAULT_URI = "trine_milvus.db"
DENSE_INDEXES = {"flat": "FLAT", "hnsw": "HNSW"}
TEXT_LIMIT = 65535  # Milvus's VARCHAR maximum length
ID_LIMIT = 1024
TOKENS_SUFFIX = "__colbert"
FETCH_CHUNK = 512
RESULT_WINDOW = 16384  # Milvus's largest offset + limit of one query
#: Milvus refuses an empty sparse vector; a passage without lexical weights stores weight 1 at this dimension,
#: beyond every vocabulary (no query has it, so no score changes), left out again when read
EMPTY_SPARSE_DIM = 2**32 - 2


def _is_server(uri: str) -> bool:
    return uri.startswith(("http://", "https://", "tcp://", "grpc://", "unix:"))


def _id_list(ids: list[str]) -> str:
    """A Milvus filter literal of string ids (JSON string escapes are Milvus's)."""
    return json.dumps(ids, ensure_ascii=False)


class MilvusCollection(VectorCollection):
    """A trine collection in Milvus (see the module). Make one with :meth:`create`, reach one with :meth:`open`."""

    backend = "milvus"

    def __init__(self, client: Any, uri: str, name: str, representations: tuple[str, ...],
                 signature: ModelSignature, options: dict[str, Any]):
        super().__init__(name, representations, signature, options)
        self.client = client
        self.uri = uri
        self.tokens_name = name + TOKENS_SUFFIX

    # ------------------------------------------------------------------ connect
    @staticmethod
    def connect(uri: str = DEFAULT_URI, token: str | None = None, timeout: float = 10.0) -> Any:
        """A ``MilvusClient`` for ``uri``: a server URL, or a local file for Milvus Lite; an unreachable
        server fails within ``timeout`` seconds with :class:`BackendUnreachableError`."""
        pymilvus = require("pymilvus", "milvus")
        uri = str(uri)
        if not _is_server(uri):
            parent = os.path.dirname(os.path.abspath(uri))
            if not os.path.isdir(parent):
                raise BackendUnreachableError(f"milvus: {uri}: the folder {parent} does not exist (Milvus Lite "
                                              "makes the file, not its folder)")
        try:
            return pymilvus.MilvusClient(uri=uri, token=token or os.environ.get("MILVUS_TOKEN", ""), timeout=timeout)
        except pymilvus.MilvusException as err:
            raise BackendUnreachableError(f"milvus: cannot reach {uri} within {timeout:g} s: {first_line(err)}") \
                from err

    def connection(self) -> dict[str, Any]:
        return {"uri": self.uri if _is_server(self.uri) else os.path.abspath(self.uri)}

    @classmethod
    def create(cls, name: str = "trine", *, representations: tuple[str, ...], signature: ModelSignature,
               uri: str = DEFAULT_URI, token: str | None = None, dense_index: str = "flat", hnsw_m: int = 16,
               ef_construction: int = 200, ef_search: int = 128, colbert_token_k: int = 32,
               store_text: bool = True, exist_ok: bool = False, timeout: float = 10.0) -> MilvusCollection:
        """A new collection for documents of ``representations`` made by the model of ``signature``.
        ``exist_ok``: open the collection of that name instead when it exists (a resumed build), refused
        when it holds other representations or was made by another model."""
        if dense_index not in DENSE_INDEXES:
            raise ValueError(f"dense_index must be one of {tuple(DENSE_INDEXES)}, not {dense_index!r}")
        cls.check_sizes(representations, signature)
        if "dense" not in representations and "sparse" not in representations:
            raise ValueError("milvus: a collection holds dense or sparse vectors (a Milvus collection needs a vector "
                             "field); ColBERT vectors go beside them")
        client = cls.connect(uri, token, timeout)
        if client.has_collection(name):
            if not exist_ok:
                raise ValueError(f"milvus collection {name!r} exists at {uri}; open it, or drop it first")
            return cls._open(client, uri, name).check_reopened(representations, signature)
        options = {"dense_index": dense_index, "hnsw_m": hnsw_m, "ef_construction": ef_construction,
                   "ef_search": ef_search, "colbert_token_k": colbert_token_k, "store_text": store_text}
        collection = cls(client, uri, name, tuple(representations), signature, options)
        collection._create()
        return collection

    def _vector_index(self, params: Any, field: str) -> None:
        if self.options["dense_index"] == "hnsw":
            params.add_index(field, index_type="HNSW", metric_type="IP",
                             params={"M": self.options["hnsw_m"], "efConstruction": self.options["ef_construction"]})
        else:
            params.add_index(field, index_type="FLAT", metric_type="IP")

    def _create(self) -> None:
        # Milvus Lite's in-process server logs a traceback for a timestamp call it does not implement while
        # pymilvus creates a collection (harmless: pymilvus carries on); keep it out of the user's log
        grpc_logger = logging.getLogger("grpc._server")
        level = grpc_logger.level
        grpc_logger.setLevel(logging.CRITICAL)
        try:
            self._create_collections()
        finally:
            grpc_logger.setLevel(level)

    def _create_collections(self) -> None:
        from pymilvus import DataType

        c, sig = self.client, self.signature
        schema = c.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=ID_LIMIT)
        schema.add_field("seq", DataType.INT64)
        params = c.prepare_index_params()
        if "dense" in self.representations:
            schema.add_field("dense", DataType.FLOAT_VECTOR, dim=sig.dense_dim)
            self._vector_index(params, "dense")
        if "sparse" in self.representations:
            schema.add_field("sparse", DataType.SPARSE_FLOAT_VECTOR)
            params.add_index("sparse", index_type="SPARSE_INVERTED_INDEX", metric_type="IP")
        if self.options["store_text"]:
            schema.add_field("text", DataType.VARCHAR, max_length=TEXT_LIMIT)
        if "colbert" in self.representations:
            tokens = c.create_schema(auto_id=False, enable_dynamic_field=False)
            tokens.add_field("pk", DataType.VARCHAR, is_primary=True, max_length=ID_LIMIT + 12)
            tokens.add_field("doc_id", DataType.VARCHAR, max_length=ID_LIMIT)
            tokens.add_field("tok", DataType.INT64)
            tokens.add_field("vec", DataType.FLOAT_VECTOR, dim=sig.colbert_dim)
            token_params = c.prepare_index_params()
            self._vector_index(token_params, "vec")
            if c.has_collection(self.tokens_name):
                c.drop_collection(self.tokens_name)  # left by a create killed before the main collection existed
            c.create_collection(self.tokens_name, schema=tokens, index_params=token_params,
                                consistency_level="Strong")
            c.load_collection(self.tokens_name)
        # the main collection last: its existence (with the metadata) is what marks a collection made
        c.create_collection(self.name, schema=schema, index_params=params, consistency_level="Strong",
                            properties={"trine": json.dumps(self.meta())})
        c.load_collection(self.name)

    @classmethod
    def open(cls, name: str = "trine", *, uri: str = DEFAULT_URI, token: str | None = None,
             timeout: float = 10.0) -> MilvusCollection:
        """The collection ``name`` at ``uri`` (made by trine), its ids read."""
        client = cls.connect(uri, token, timeout)
        if not client.has_collection(name):
            raise ValueError(f"milvus: no collection {name!r} at {uri}")
        return cls._open(client, uri, name)

    @classmethod
    def _open(cls, client: Any, uri: str, name: str) -> MilvusCollection:
        where = f"milvus collection {name!r} at {uri}"
        reps, sig, options = cls.parse_meta(client.describe_collection(name).get("properties", {}).get("trine"),
                                            where)
        collection = cls(client, uri, name, reps, sig, options)
        client.load_collection(name)
        if "colbert" in reps:
            client.load_collection(collection.tokens_name)
        collection.refresh()
        return collection

    def _engine_close(self) -> None:
        self.client.close()

    # ------------------------------------------------------------------ engine hooks
    def _engine_scan(self) -> list[tuple[str, int]]:
        if not _is_server(self.uri):  # Milvus Lite has no server timestamps for an iterator: one query
            count = int(self.client.get_collection_stats(self.name)["row_count"])
            if not count:
                return []
            rows = self.client.query(self.name, filter="seq >= 0", output_fields=["seq"], limit=count)
            return [(str(r["id"]), int(r["seq"])) for r in rows]
        logger = logging.getLogger("pymilvus")
        level = logger.level
        logger.setLevel(logging.ERROR)  # Milvus Lite's iterator warns that it keeps client-side timestamps
        try:
            it = self.client.query_iterator(self.name, batch_size=2000, filter="", output_fields=["seq"])
            pairs = []
            while True:
                batch = it.next()
                if not batch:
                    break
                pairs.extend((str(r["id"]), int(r["seq"])) for r in batch)
            it.close()
        finally:
            logger.setLevel(level)
        return pairs

    def _engine_upsert(self, ids: list[str], seqs: list[int], reps: dict[str, Any],
                       texts: list[str] | None) -> None:
        rows = []
        for i, (d, s) in enumerate(zip(ids, seqs)):
            if len(d.encode()) > ID_LIMIT:
                raise ValueError(f"document id {d[:40]!r}...: longer than Milvus's {ID_LIMIT}-byte VARCHAR key")
            row: dict[str, Any] = {"id": d, "seq": s}
            if "dense" in reps:
                row["dense"] = reps["dense"][i]
            if "sparse" in reps:
                row["sparse"] = reps["sparse"][i] or {EMPTY_SPARSE_DIM: 1.0}
            if self.options["store_text"]:
                text = texts[i] if texts is not None else ""
                if len(text.encode()) > TEXT_LIMIT:
                    raise ValueError(f"document {d!r}: its text has {len(text.encode())} bytes, over Milvus's "
                                     f"VARCHAR limit of {TEXT_LIMIT}; make the collection without texts "
                                     "(store_text=False, --no-text)")
                row["text"] = text
            rows.append(row)
        if "colbert" in reps:  # token vectors first: a document counts as stored once its main row is
            self.client.delete(self.tokens_name, filter=f"doc_id in {_id_list(ids)}")
            tokens = [{"pk": f"{d}\x1f{t}", "doc_id": d, "tok": t, "vec": v}
                      for d, vecs in zip(ids, reps["colbert"]) for t, v in enumerate(vecs)]
            for start in range(0, len(tokens), 4096):
                self.client.insert(self.tokens_name, tokens[start:start + 4096])
        self.client.upsert(self.name, rows)

    def _engine_flush(self) -> None:
        # sealed segments: Milvus Lite searches and filters them several times faster than its write buffer
        self.client.flush(self.name)
        if "colbert" in self.representations:
            self.client.flush(self.tokens_name)

    def _engine_delete(self, ids: list[str]) -> None:
        self.client.delete(self.name, ids=ids)
        if "colbert" in self.representations:
            self.client.delete(self.tokens_name, filter=f"doc_id in {_id_list(ids)}")

    def _search_params(self, k: int) -> dict[str, Any]:
        params: dict[str, Any] = {"metric_type": "IP"}
        if self.options["dense_index"] == "hnsw":
            params["params"] = {"ef": max(self.options["ef_search"], k)}
        return params

    def _engine_search(self, rep: str, queries: list[Any], k: int) -> Hits:
        if rep == "colbert":
            return self._colbert_search(queries, k)
        out: Hits = [[] for _ in queries]
        todo = [i for i, q in enumerate(queries) if rep == "dense" or q]  # an empty lexical query matches nothing
        if todo:
            data = [queries[i].tolist() if rep == "dense" else queries[i] for i in todo]
            params = self._search_params(k) if rep == "dense" else {"metric_type": "IP"}
            res = self.client.search(self.name, data, anns_field=rep, limit=k, search_params=params)
            for i, hits in zip(todo, res):
                out[i] = [(str(h["id"]), float(h["distance"])) for h in hits]
        return out

    def _colbert_search(self, queries: list[np.ndarray], k: int) -> Hits:
        """Candidates: the documents of each query token's ``colbert_token_k`` nearest token vectors;
        ranked by exact maxsim over the stored vectors."""
        token_k = max(self.options["colbert_token_k"], 1)
        candidates = []
        for q in queries:
            res = self.client.search(self.tokens_name, [v.tolist() for v in q], anns_field="vec", limit=token_k,
                                     search_params=self._search_params(token_k), output_fields=["doc_id"])
            candidates.append(sorted({str(h["entity"]["doc_id"]) for hits in res for h in hits} & set(self._row)))
        rows = np.full((len(queries), max((len(c) for c in candidates), default=0)), -1, dtype=np.int64)
        for i, c in enumerate(candidates):
            rows[i, :len(c)] = self.rows_of(c)
        scores = self.score("colbert", queries, rows)  # one fetch of every candidate's stored vectors
        return [list(zip(c, scores[i, :len(c)].tolist())) for i, c in enumerate(candidates)]

    def _engine_fetch(self, rep: str, ids: list[str]) -> dict[str, Any]:
        got: dict[str, Any] = {}
        if rep == "colbert":
            per_doc: dict[str, list[tuple[int, list[float]]]] = {d: [] for d in ids}
            todo = [ids[s:s + 128] for s in range(0, len(ids), 128)]
            while todo:  # one query per part; a part whose tokens fill Milvus's result window is split
                part = todo.pop()
                rows = self.client.query(self.tokens_name, filter=f"doc_id in {_id_list(part)}",
                                         output_fields=["doc_id", "tok", "vec"], limit=RESULT_WINDOW)
                if len(rows) >= RESULT_WINDOW and len(part) > 1:
                    todo += [part[:len(part) // 2], part[len(part) // 2:]]
                    continue
                for r in rows:
                    per_doc[str(r["doc_id"])].append((int(r["tok"]), r["vec"]))
            for d, toks in per_doc.items():
                toks.sort(key=lambda t: t[0])
                got[d] = np.asarray([v for _, v in toks], dtype=np.float32).reshape(len(toks), -1)
            return got
        for start in range(0, len(ids), FETCH_CHUNK):
            for r in self.client.get(self.name, ids=ids[start:start + FETCH_CHUNK], output_fields=[rep]):
                v = r[rep]
                got[str(r["id"])] = np.asarray(v, dtype=np.float32) if rep == "dense" else \
                    {int(t): float(w) for t, w in v.items() if int(t) != EMPTY_SPARSE_DIM}
        return got

    def _engine_fused(self, reps: dict[str, list[Any]], k: int, weights: dict[str, float], fusion: str,
                      candidate_k: int, rrf_k: float) -> Hits:
        from pymilvus import AnnSearchRequest, RRFRanker, WeightedRanker

        if "colbert" in weights:
            raise ValueError("milvus: ColBERT vectors are not a vector field Milvus fuses (Milvus Lite has no "
                             "multi-vector fields); fuse with HybridRetriever over the collection's indexes")
        modes = list(weights)
        if fusion == "rrf":
            if any(w != 1.0 for w in weights.values()):
                raise ValueError(f"milvus: the RRF ranker takes no weights, got {weights}; use weights of 1")
            ranker = RRFRanker(rrf_k)
        else:
            ranker = WeightedRanker(*[weights[m] for m in modes], norm_score=False)
        n = len(next(iter(reps.values())))
        out: Hits = []
        for i in range(n):  # one request per query: an empty lexical query is left out of its own request
            requests = []
            for m in modes:
                q = reps[m][i]
                if m == "sparse" and not q:
                    continue
                params = self._search_params(candidate_k) if m == "dense" else {"metric_type": "IP"}
                requests.append(AnnSearchRequest([q.tolist() if m == "dense" else q], m, params, candidate_k))
            if not requests:
                out.append([])
                continue
            if len(requests) < len(modes) and fusion == "weighted":
                kept = [m for m in modes if m != "sparse" or reps[m][i]]
                ranker_i = WeightedRanker(*[weights[m] for m in kept], norm_score=False)
            else:
                ranker_i = ranker
            res = self.client.hybrid_search(self.name, requests, ranker_i, limit=k)
            out.append([(str(h["id"]), float(h["distance"])) for h in res[0]])
        return out

    def _engine_drop(self) -> None:
        if "colbert" in self.representations:
            self.client.drop_collection(self.tokens_name)
        self.client.drop_collection(self.name)


register_engine("milvus", MilvusCollection)
