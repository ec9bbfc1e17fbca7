"""A compressed multi-vector (ColBERT) index with its own candidate generation: PLAID / ColBERTv2 residual
compression, trine's own code over numpy and faiss's k-means.

Why this and not a package: ``fast-plaid`` 1.7.0 (the engine PyLate uses) is built per torch version and
its newest build (1.7.0.2110) requires ``torch==2.11.0`` exactly, while trine is on torch 2.13.0;
``fastembed``'s MUVERA encodes fixed-dimensional vectors for candidate generation but compresses nothing.
The compression and the search below are a few hundred lines of numpy (faiss for k-means).

Compression (ColBERTv2): k-means centroids over a seeded sample of the token vectors; each token is
stored as the id of its nearest centroid plus its residual (vector - centroid) quantised to ``nbits``
per dimension: per dimension, ``2**nbits - 1`` bucket cutoffs (the residuals' quantiles in the sample)
and ``2**nbits`` bucket weights (the quantiles at the buckets' middles). A token decompresses to
``centroid + weights[d, bucket_d]`` per dimension, re-normalised when the indexed vectors are unit
length (ColBERT and BGE-M3 vectors are), as ColBERTv2 does. Or (``pq_bytes``) the residual is
product-quantised: ``pq_bytes`` sub-vectors of ``dim / pq_bytes`` dimensions, each stored as the byte
naming the nearest of 256 codewords (faiss's k-means per sub-space, on the sample's residuals); it
decompresses to ``centroid + concat(codeword_j)``, re-normalised alike. Both store whole bytes per
token, so one lookup table (byte position x byte value -> that byte's dimensions) decompresses either.
With ``opq`` (the default with ``pq_bytes``) the residuals are first rotated by an orthonormal matrix
learned on the sample (OPQ, faiss's ``OPQMatrix``): centroids and codewords are kept in the rotated
space, where inner products are the same, and each query is rotated once before it is scored.

Token pooling (``pool_factor``, Clavie et al. 2024, as PyLate's ``pool_factor``): before anything
else, each document's token vectors are clustered (Ward's hierarchical clustering) into
``ceil(tokens / pool_factor)`` groups and each group replaced by its mean (re-normalised for unit
vectors): fewer stored vectors per document, at the cost of a maxsim over merged tokens.

Search (PLAID): per query, the query tokens' scores against every centroid; the ``nprobe`` best
centroids of each query token give the candidate documents (an inverted list centroid -> documents);
an approximate maxsim from the centroid scores alone (each document's token replaced by its centroid)
keeps the best ``interaction_factor * ncandidates``; a full centroid interaction (every token of theirs
replaced by its centroid, PLAID's third stage) keeps the best ``ncandidates`` of those; exact maxsim on
their decompressed vectors ranks them. ``score`` gives
that same decompressed maxsim, so fusion and re-ranking through this index agree with its search.

A build from parts (``trine encode``'s shards) is resumable: :func:`build_plaid` keeps the trained codec
and each compressed part in a work folder, and a run again after a kill redoes only what is missing;
the result equals a build in one go (the sample is drawn by global token number, so the partition into
parts changes nothing).
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

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
from trine.retrieval.multivector import _stack
from trine.retrieval.protocol import register_index, rerank
from trine.scoring import colbert_scores_flat

KIND = "plaid"
NBITS = (1, 2, 4)
#: defaults of the build options (index.json records the values used)
#: nbits None: 2, or no scalar residual where pq_bytes is given (nbits and pq_bytes are two codings of it);
#: opq None: on with pq_bytes (a learned rotation of the residuals before product quantisation), else off
DEFAULTS: dict[str, Any] = {"nbits": None, "pq_bytes": None, "opq": None, "pool_factor": 1, "ncentroids": None,
                            "nprobe": 8, "ncandidates": 256, "interaction_factor": 1, "sample_tokens": 1 << 18,
                            "kmeans_niter": 20, "seed": 0}
DEFAULT_NBITS = 2
Part = Callable[[], tuple[Sequence[str], Sequence[np.ndarray]]]


def default_ncentroids(tokens: int) -> int:
    """``2 ** floor(log2(4 * sqrt(tokens)))``: a quarter of ColBERTv2's rule (16 * sqrt), so that
    k-means stays minutes on a few CPU cores at a million passages; ``ncentroids`` sets it."""
    return max(1, 2 ** int(math.floor(math.log2(max(4.0 * math.sqrt(max(tokens, 1)), 1.0)))))


def check_options(options: dict[str, Any]) -> dict[str, Any]:
    """The build options with their defaults; an unknown option or a bad value raises."""
    unknown = sorted(set(options) - set(DEFAULTS))
    if unknown:
        raise TypeError(f"unknown plaid index options {unknown}; options are {sorted(DEFAULTS)}")
    out = {**DEFAULTS, **options}
    if out["pq_bytes"] is not None:
        _positive("pq_bytes", out["pq_bytes"])
        if out["nbits"] is not None:
            raise ValueError(f"nbits {out['nbits']} and pq_bytes {out['pq_bytes']}: two codings of the residual; "
                             "give one")
    elif out["nbits"] is None:
        out["nbits"] = DEFAULT_NBITS
    if out["pq_bytes"] is None and out["nbits"] not in NBITS:
        raise ValueError(f"nbits must be one of {NBITS}, not {out['nbits']!r}")
    if out["opq"] is None:
        out["opq"] = out["pq_bytes"] is not None
    elif not isinstance(out["opq"], bool):
        raise ValueError(f"opq must be true or false, not {out['opq']!r}")
    elif out["opq"] and out["pq_bytes"] is None:
        raise ValueError("opq rotates the residual for product quantisation: it goes with pq_bytes, not nbits")
    for name in ("nprobe", "ncandidates", "interaction_factor", "sample_tokens", "kmeans_niter", "pool_factor"):
        _positive(name, out[name])
    if out["ncentroids"] is not None:
        _positive("ncentroids", out["ncentroids"])
    if not isinstance(out["seed"], int) or isinstance(out["seed"], bool):
        raise ValueError(f"seed must be an integer, not {out['seed']!r}")
    return out


def _positive(name: str, value: Any) -> None:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, not {value!r}")


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The concatenation of ``arange(s, s + n)`` for each (start, length), vectorised."""
    lengths = np.asarray(lengths, dtype=np.int64)
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    shift = np.repeat(np.asarray(starts, dtype=np.int64) - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths)
    return np.arange(total, dtype=np.int64) + shift


def _check_vectors(colbert_vecs: Sequence[np.ndarray], dim: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Documents' (tokens x dim) arrays as one float32 (total tokens x dim) array, and their lengths
    (multivector's checks; no documents: empty arrays)."""
    if not len(colbert_vecs):
        return np.zeros((0, dim or 0), dtype=np.float32), np.zeros(0, dtype=np.int64)
    return _stack(colbert_vecs, dim, np.float32)


def sample_positions(total: int, sample_tokens: int, seed: int) -> np.ndarray:
    """Sorted global token numbers of the training sample (all tokens when there are few)."""
    if total <= sample_tokens:
        return np.arange(total, dtype=np.int64)
    return np.sort(np.random.default_rng(seed).choice(total, size=sample_tokens, replace=False))


# ------------------------------------------------------------------------------------------ codec
@dataclass
class PlaidCodec:
    """What compresses a token: centroids (ncentroids x dim), whether decompressed vectors are
    re-normalised (``normalized``: the indexed vectors are unit length), and the residual's coding: either
    ``nbits`` with per-dimension bucket ``cutoffs`` (dim x 2**nbits - 1) and ``weights`` (dim x 2**nbits),
    or product-quantiser ``codebooks`` (pq_bytes x 256 x dim / pq_bytes), optionally after an orthonormal
    ``rotation`` (dim x dim, OPQ): then the centroids and codebooks live in the rotated space (``x @
    rotation.T``), which keeps every inner product, so queries are rotated once (:meth:`to_codec_space`) and
    scored against the stored tokens there; :meth:`decompress` rotates back."""

    centroids: np.ndarray
    cutoffs: np.ndarray | None
    weights: np.ndarray | None
    nbits: int | None
    normalized: bool
    codebooks: np.ndarray | None = None
    rotation: np.ndarray | None = None

    def __post_init__(self) -> None:
        dim = self.dim
        if self.rotation is not None and (self.codebooks is None or self.rotation.shape != (dim, dim)):
            raise ValueError(f"a rotation {self.rotation.shape} goes with product-quantiser codebooks and is "
                             f"dim x dim ({dim})")
        if self.codebooks is not None:
            m = self.codebooks.shape[0]
            if (self.nbits is not None or self.cutoffs is not None or self.weights is not None
                    or self.codebooks.shape != (m, 256, dim // max(m, 1)) or m * self.codebooks.shape[2] != dim):
                raise ValueError(f"codec shapes do not match: centroids {self.centroids.shape}, codebooks "
                                 f"{self.codebooks.shape} (and no scalar residual with them)")
            # a byte's value at byte position j is codeword j: the codebooks are the lookup table
            self._flat_lookup = np.ascontiguousarray(self.codebooks.reshape(m * 256, -1), dtype=np.float32)
        else:
            if self.nbits not in NBITS or self.cutoffs is None or self.weights is None:
                raise ValueError(f"a scalar residual codec needs nbits in {NBITS}, cutoffs and weights")
            buckets = 1 << self.nbits
            if self.cutoffs.shape != (dim, buckets - 1) or self.weights.shape != (dim, buckets):
                raise ValueError(f"codec shapes do not match: centroids {self.centroids.shape}, cutoffs "
                                 f"{self.cutoffs.shape}, weights {self.weights.shape} for nbits {self.nbits}")
            per_byte = 8 // self.nbits
            # residual of each packed byte value at each byte position: one gather decompresses a token
            shifts = np.arange(per_byte - 1, -1, -1) * self.nbits
            buckets_of_byte = (np.arange(256)[:, None] >> shifts[None, :]) & (buckets - 1)  # (256 x per_byte)
            dims = np.arange(self.packed_bytes)[:, None, None] * per_byte + np.arange(per_byte)[None, None, :]
            lookup = self.weights[dims, buckets_of_byte[None, :, :]].astype(np.float32)  # (bytes x 256 x per_byte)
            self._flat_lookup = np.ascontiguousarray(lookup.reshape(-1, per_byte))
            self._shifts = shifts
        self._byte_base = (np.arange(self.packed_bytes, dtype=np.intp) * 256)[None, :]

    @property
    def dim(self) -> int:
        return int(self.centroids.shape[1])

    @property
    def ncentroids(self) -> int:
        return int(self.centroids.shape[0])

    @property
    def packed_bytes(self) -> int:
        """Residual bytes per token."""
        if self.codebooks is not None:
            return int(self.codebooks.shape[0])
        assert self.nbits is not None
        return self.dim * self.nbits // 8

    @property
    def nbytes(self) -> int:
        """Bytes of the codec's arrays (centroids, and cutoffs and weights or codebooks and the rotation)."""
        return sum(int(a.nbytes) for a in (self.centroids, self.cutoffs, self.weights, self.codebooks, self.rotation)
                   if a is not None)

    @property
    def code_dtype(self) -> type:
        return np.uint16 if self.ncentroids <= 1 << 16 else np.int32

    def to_codec_space(self, vectors: np.ndarray) -> np.ndarray:
        """``vectors`` (n x dim) as float32 in the space the codec stores tokens in (rotated with OPQ)."""
        v = np.ascontiguousarray(vectors, dtype=np.float32)
        return v if self.rotation is None else v @ self.rotation.T

    @classmethod
    def train(cls, sample: np.ndarray, nbits: int | None, ncentroids: int, kmeans_niter: int, seed: int,
              pq_bytes: int | None = None, opq: bool = False) -> PlaidCodec:
        """k-means (faiss, seeded) over ``sample``, then the residuals' per-dimension quantiles (``nbits``) or
        their product quantiser (``pq_bytes``: 256 codewords per sub-space, faiss's k-means, seeded), after
        ``opq``'s rotation of the residuals (faiss's OPQMatrix, ``kmeans_niter`` alternations) where asked."""
        import faiss

        sample = np.ascontiguousarray(sample, dtype=np.float32)
        dim = sample.shape[1]
        if pq_bytes is not None:
            if dim % pq_bytes:
                raise ValueError(f"pq_bytes {pq_bytes} must divide the vectors' dim {dim}")
            if sample.shape[0] < 256:
                raise ValueError(f"pq_bytes: 256 codewords per sub-space need at least 256 sampled token vectors, "
                                 f"not {sample.shape[0]}")
        elif (dim * nbits) % 8:
            raise ValueError(f"dim {dim} x nbits {nbits} must be a multiple of 8 (whole bytes per token)")
        if ncentroids > sample.shape[0]:
            raise ValueError(f"ncentroids {ncentroids} is more than the {sample.shape[0]} sampled token vectors")
        normalized = bool(np.all(np.abs(np.linalg.norm(sample, axis=1) - 1.0) < 1e-3))
        kmeans = faiss.Kmeans(dim, ncentroids, niter=kmeans_niter, seed=seed, spherical=normalized, verbose=False)
        kmeans.train(sample)
        centroids = np.ascontiguousarray(kmeans.centroids, dtype=np.float32)
        codes = _assign(centroids, sample)
        residuals = sample - centroids[codes]
        if pq_bytes is not None:
            rotation = None
            if opq:
                matrix = faiss.OPQMatrix(dim, pq_bytes)
                matrix.niter = kmeans_niter
                inner = faiss.ProductQuantizer(dim, pq_bytes, 8)  # OPQMatrix's own, without faiss's stderr warning
                inner.cp.min_points_per_centroid = 1  # on small samples (the rotation is the same)
                matrix.pq = inner
                matrix.train(np.ascontiguousarray(residuals))
                rotation = faiss.vector_to_array(matrix.A).reshape(dim, dim).astype(np.float32)
                centroids = np.ascontiguousarray(centroids @ rotation.T)
                residuals = np.ascontiguousarray(residuals @ rotation.T)
            sub = dim // pq_bytes
            codebooks = np.empty((pq_bytes, 256, sub), dtype=np.float32)
            for j in range(pq_bytes):
                km = faiss.Kmeans(sub, 256, niter=kmeans_niter, seed=seed + 1 + j, verbose=False)
                km.train(np.ascontiguousarray(residuals[:, j * sub:(j + 1) * sub]))
                codebooks[j] = km.centroids
            return cls(centroids, None, None, None, normalized, codebooks, rotation)
        buckets = 1 << nbits
        cutoffs = np.quantile(residuals, np.arange(1, buckets) / buckets, axis=0).T.astype(np.float32)
        weights = np.quantile(residuals, (np.arange(buckets) + 0.5) / buckets, axis=0).T.astype(np.float32)
        return cls(centroids, np.ascontiguousarray(cutoffs), np.ascontiguousarray(weights), nbits, normalized)

    def compress(self, vectors: np.ndarray, batch: int = 8192) -> tuple[np.ndarray, np.ndarray]:
        """(centroid ids, packed residual buckets (tokens x packed_bytes) uint8) of (tokens x dim) vectors."""
        codes = np.empty(len(vectors), dtype=self.code_dtype)
        packed = np.empty((len(vectors), self.packed_bytes), dtype=np.uint8)
        for start in range(0, len(vectors), batch):
            v = self.to_codec_space(vectors[start:start + batch])
            c = _assign(self.centroids, v)
            residuals = v - self.centroids[c]
            codes[start:start + len(v)] = c
            if self.codebooks is not None:  # nearest codeword of each sub-vector
                sub = self.codebooks.shape[2]
                for j in range(self.codebooks.shape[0]):
                    packed[start:start + len(v), j] = _assign(self.codebooks[j], residuals[:, j * sub:(j + 1) * sub])
                continue
            bucket = np.zeros(residuals.shape, dtype=np.uint8)
            for j in range(self.cutoffs.shape[1]):  # bucket = how many cutoffs are <= the residual
                bucket += residuals >= self.cutoffs[None, :, j]
            grouped = bucket.reshape(len(v), self.packed_bytes, 8 // self.nbits).astype(np.uint16)
            packed[start:start + len(v)] = (grouped << self._shifts[None, None, :]).sum(-1).astype(np.uint8)
        return codes, packed

    def decompress(self, codes: np.ndarray, packed: np.ndarray) -> np.ndarray:
        """(tokens x dim) float32 vectors of stored tokens: centroid + bucket weights or codewords
        (re-normalised when the indexed vectors were unit length), rotated back with OPQ."""
        out = self.decompress_in_codec_space(codes, packed)
        return out if self.rotation is None else out @ self.rotation

    def decompress_in_codec_space(self, codes: np.ndarray, packed: np.ndarray) -> np.ndarray:
        """:meth:`decompress` before the rotation back (what scores against :meth:`to_codec_space` queries)."""
        rows = packed.astype(np.intp) + self._byte_base  # row of each (token, byte) in the flat lookup table
        out = self.centroids.take(codes.astype(np.intp), axis=0)
        out += self._flat_lookup.take(rows, axis=0).reshape(len(codes), self.dim)
        if self.normalized:
            out /= np.maximum(np.sqrt(np.einsum("td,td->t", out, out)), 1e-12)[:, None]
        return out

    def save(self, folder: str) -> None:
        np.save(os.path.join(folder, "centroids.npy"), self.centroids)
        if self.codebooks is not None:
            np.save(os.path.join(folder, "codebooks.npy"), self.codebooks)
            if self.rotation is not None:
                np.save(os.path.join(folder, "rotation.npy"), self.rotation)
            return
        np.save(os.path.join(folder, "cutoffs.npy"), self.cutoffs)
        np.save(os.path.join(folder, "weights.npy"), self.weights)

    @classmethod
    def load(cls, folder: str, nbits: int | None, normalized: bool, opq: bool = False) -> PlaidCodec:
        """The codec saved in ``folder``: product-quantised where ``nbits`` is None (rotated first with
        ``opq``), else scalar."""
        def arr(name: str) -> np.ndarray:
            return np.load(os.path.join(folder, f"{name}.npy"))

        if nbits is None:
            return cls(arr("centroids"), None, None, None, normalized, arr("codebooks"),
                       arr("rotation") if opq else None)
        return cls(arr("centroids"), arr("cutoffs"), arr("weights"), nbits=nbits, normalized=normalized)


def pool_tokens(vectors: np.ndarray, pool_factor: int) -> np.ndarray:
    """One document's (tokens x dim) vectors pooled into ``ceil(tokens / pool_factor)`` (Ward's hierarchical
    clustering, scipy, its first ``tokens - ceil(tokens / pool_factor)`` merges: exactly that many clusters, so
    a pooled document's length is known from its length alone): each cluster's mean, re-normalised when the
    vectors are unit length. ``pool_factor`` 1, or a document of one token, is left as it is."""
    n = len(vectors)
    target = -(-n // pool_factor)
    if pool_factor == 1 or n <= 1 or target >= n:
        return np.asarray(vectors, dtype=np.float32)
    from scipy.cluster.hierarchy import linkage

    v = np.asarray(vectors, dtype=np.float64)
    gram = v @ v.T  # Euclidean distances from one product (scipy's pdist is slower on 100k short documents)
    squared = np.diag(gram)
    upper = np.triu_indices(n, 1)
    distances = np.sqrt(np.maximum(squared[:, None] + squared[None, :] - 2.0 * gram, 0.0)[upper])
    merges = linkage(distances, method="ward")[: n - target, :2].astype(np.int64)
    parent = np.arange(2 * n - 1)
    for step, (a, b) in enumerate(merges):  # merge `step` makes cluster n + step out of a and b
        parent[a] = parent[b] = n + step
    roots = np.arange(n)
    while True:  # follow each token up to its cluster among the applied merges
        up = parent[roots]
        if np.array_equal(up, roots):
            break
        roots = up
    labels = np.unique(roots, return_inverse=True)[1].reshape(-1)
    members = np.zeros((target, n))
    members[labels, np.arange(n)] = 1.0
    pooled = (members @ v) / members.sum(1, keepdims=True)
    if np.all(np.abs(np.sqrt(squared) - 1.0) < 1e-3):
        pooled /= np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)
    return pooled.astype(np.float32)


def pooled_lengths(lengths: np.ndarray, pool_factor: int) -> np.ndarray:
    """Documents' token counts after :func:`pool_tokens`: ``ceil(tokens / pool_factor)``."""
    return -(-np.asarray(lengths, dtype=np.int64) // pool_factor)


def _pooled(part: Part, pool_factor: int) -> Part:
    """``part`` with each document's vectors pooled (:func:`pool_tokens`); ``part`` itself for factor 1."""
    if pool_factor == 1:
        return part

    def read() -> tuple[Sequence[str], Sequence[np.ndarray]]:
        part_ids, vecs = part()
        return part_ids, [pool_tokens(v, pool_factor) if np.ndim(v) == 2 else v for v in vecs]

    return read


def _assign(centroids: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """Each vector's nearest centroid (L2; for unit vectors and centroids, the best inner product)."""
    scores = np.ascontiguousarray(vectors, dtype=np.float32) @ centroids.T
    scores -= 0.5 * (centroids * centroids).sum(1)[None, :]  # argmax of v.c - |c|^2 / 2 = argmin of |v - c|^2
    return scores.argmax(1).astype(np.int64)


# ------------------------------------------------------------------------------------------ index
class ColbertPlaidIndex:
    """Compressed token vectors per document (``colbert_vecs``), searched by centroid interaction
    (PLAID) and ranked by maxsim on decompressed vectors. Implements :class:`trine.retrieval.Index`.

    Build options (:data:`DEFAULTS`): ``nbits`` (1, 2 or 4 bits per dimension of the residual) or
    ``pq_bytes`` (a product-quantised residual of that many bytes), ``pool_factor`` (token pooling),
    ``ncentroids`` (default :func:`default_ncentroids` of the token count), ``sample_tokens`` (token
    vectors k-means and the residual coding learn from), ``kmeans_niter``, ``seed``; search options
    ``nprobe`` (centroids probed per query token), ``ncandidates`` (documents decompressed and scored
    exactly per query) and ``interaction_factor`` (``interaction_factor * ncandidates`` documents get the
    full centroid interaction), which ``search`` also takes per call.
    """

    representation = "colbert"

    def __init__(self, codec: PlaidCodec, codes: np.ndarray, packed: np.ndarray, offsets: np.ndarray,
                 ids: list[str], options: dict[str, Any]):
        self.codec = codec
        self.codes = codes
        self.packed = packed
        self.offsets = offsets
        self.ids = ids
        self.options = options
        self.dim = codec.dim
        self._index_centroids()

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def nprobe(self) -> int:
        return int(self.options["nprobe"])

    @property
    def ncandidates(self) -> int:
        return int(self.options["ncandidates"])

    @property
    def interaction_factor(self) -> int:
        return int(self.options["interaction_factor"])

    @property
    def bytes_per_token(self) -> float:
        """Stored bytes per stored token: centroid id and packed residual (the codec and offsets are extra;
        with token pooling, a stored token stands for about ``pool_factor`` of the document's)."""
        return float(self.codes.itemsize + self.packed.shape[1])

    @property
    def nbytes(self) -> int:
        """All the bytes of the stored arrays: centroid ids, residual codes, offsets and the codec (ids.json's
        document ids are not counted)."""
        return int(self.codes.nbytes + self.packed.nbytes + self.offsets.nbytes + self.codec.nbytes)

    def _index_centroids(self) -> None:
        """The inverted list centroid -> documents holding a token of it (CSR, documents sorted)."""
        self._centroids_t = np.ascontiguousarray(self.codec.centroids.T)
        lengths = np.diff(self.offsets)
        doc_of_token = np.repeat(np.arange(len(lengths), dtype=np.int64), lengths)
        pairs = np.unique(doc_of_token * self.codec.ncentroids + self.codes.astype(np.int64))
        docs, cents = pairs // self.codec.ncentroids, pairs % self.codec.ncentroids
        order = np.argsort(cents, kind="stable")  # docs stay sorted within a centroid
        self._cell_docs = docs[order]
        self._cell_offsets = np.concatenate([[0], np.cumsum(np.bincount(cents, minlength=self.codec.ncentroids))])

    # ------------------------------------------------------------------ building
    @classmethod
    def build(cls, colbert_vecs: Sequence[np.ndarray], ids: Sequence[str] | None = None,
              **options: Any) -> ColbertPlaidIndex:
        """Train the codec on a sample of ``colbert_vecs``' tokens and compress them all (see the class)."""
        if len(colbert_vecs) == 0:
            raise ValueError("colbert_vecs is empty: nothing to index")
        doc_ids = check_ids(ids, len(colbert_vecs))
        return build_plaid([lambda: (doc_ids, colbert_vecs)], **options)

    def add(self, colbert_vecs: Sequence[np.ndarray], ids: Sequence[str] | None = None) -> None:
        """Append documents, compressed with the trained codec (not re-trained); on bad input nothing changes."""
        new_ids = check_ids(ids, len(colbert_vecs), start=len(self.ids))
        check_unique(self.ids + new_ids)
        if not new_ids:
            return
        pooled = _pooled(lambda: (new_ids, colbert_vecs), int(self.options["pool_factor"]))()[1]
        vectors, lengths = _check_vectors(pooled, self.dim)
        codes, packed = self.codec.compress(vectors)
        self.codes = np.concatenate([self.codes, codes])
        self.packed = np.concatenate([self.packed, packed])
        self.offsets = np.concatenate([self.offsets, self.offsets[-1] + np.cumsum(lengths)]).astype(np.int64)
        self.ids.extend(new_ids)
        self._index_centroids()

    # ------------------------------------------------------------------ scoring
    def doc_vectors(self, row: int) -> np.ndarray:
        """Row ``row``'s decompressed (tokens x dim) vectors."""
        a, b = int(self.offsets[row]), int(self.offsets[row + 1])
        return self.codec.decompress(self.codes[a:b], self.packed[a:b])

    def _check_queries(self, queries: Sequence[np.ndarray]) -> None:
        for i, q in enumerate(queries):
            if np.ndim(q) != 2 or np.shape(q)[1] != self.dim:
                raise ValueError(f"query {i}: multi-vectors of shape {np.shape(q)}; expected (tokens x {self.dim})")
            if not np.isfinite(q).all():
                raise ValueError(f"query {i}: multi-vectors contain NaN or infinite values")

    def _maxsim(self, query: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Maxsim of one query, given in the codec's space (:meth:`PlaidCodec.to_codec_space`), with the
        decompressed vectors of ``rows`` (trine.scoring's maxsim, unpadded)."""
        lengths = np.diff(self.offsets)[rows]
        pos = _ranges(self.offsets[rows], lengths)
        return colbert_scores_flat(query, self.codec.decompress_in_codec_space(self.codes[pos], self.packed[pos]),
                                   lengths)

    def score(self, queries: Sequence[np.ndarray], rows: np.ndarray) -> np.ndarray:
        """Maxsim of query i on the decompressed vectors of rows[i] (queries x m): the numbers ``search``
        ranks by; -inf where rows is -1."""
        rows = np.asarray(rows, dtype=np.int64)
        if rows.ndim != 2 or rows.shape[0] != len(queries):
            raise ValueError(f"rows must be (queries x m) with {len(queries)} queries, got {rows.shape}")
        if rows.size and rows.max() >= len(self.ids):
            raise ValueError(f"row {int(rows.max())} is out of range for an index of {len(self.ids)} documents")
        self._check_queries(queries)
        out = np.full(rows.shape, -np.inf, dtype=np.float32)
        for i, q in enumerate(queries):
            valid = rows[i] >= 0
            if valid.any():
                out[i, valid] = self._maxsim(self.codec.to_codec_space(q), rows[i, valid])
        return out

    def rerank(self, queries: Sequence[np.ndarray], candidates: SearchResult | np.ndarray, k: int) -> SearchResult:
        """Re-order each query's candidate rows by decompressed maxsim; keep the best ``k``."""
        return rerank(self, queries, candidates, k)

    # ------------------------------------------------------------------ search
    def candidates(self, query: np.ndarray, nprobe: int | None = None, ncandidates: int | None = None,
                   interaction_factor: int | None = None) -> np.ndarray:
        """One query's candidate rows (sorted): documents holding one of each query token's ``nprobe``
        best centroids, cut to the ``interaction_factor * ncandidates`` best by approximate maxsim over the
        probed centroids' scores (each document's tokens replaced by their centroids; tokens in unprobed
        centroids left out), then to the ``ncandidates`` best by maxsim over all their tokens' centroids."""
        return self._candidates(self.codec.to_codec_space(query), nprobe, ncandidates, interaction_factor)

    def _candidates(self, q: np.ndarray, nprobe: int | None, ncandidates: int | None,
                    interaction_factor: int | None) -> np.ndarray:
        """:meth:`candidates` of a query given in the codec's space."""
        nprobe = self.nprobe if nprobe is None else nprobe
        ncandidates = self.ncandidates if ncandidates is None else ncandidates
        factor = self.interaction_factor if interaction_factor is None else interaction_factor
        _positive("nprobe", nprobe)
        _positive("ncandidates", ncandidates)
        _positive("interaction_factor", factor)
        if q.shape[0] == 0:
            return np.zeros(0, dtype=np.int64)
        centroid_scores = q @ self._centroids_t  # (query tokens x centroids)
        probe = min(nprobe, self.codec.ncentroids)
        best = np.argpartition(-centroid_scores, probe - 1, axis=1)[:, :probe]
        cells = np.unique(best)
        lengths = self._cell_offsets[cells + 1] - self._cell_offsets[cells]
        pair_docs = self._cell_docs[_ranges(self._cell_offsets[cells], lengths)]  # (cell, doc) postings probed
        pair_cells = np.repeat(cells, lengths)
        order = np.argsort(pair_docs, kind="stable")
        pair_docs, pair_cells = pair_docs[order], pair_cells[order]
        docs, first = np.unique(pair_docs, return_index=True)
        if docs.size <= ncandidates:
            return docs
        # approximate maxsim over the probed centroids each document holds (its other tokens count 0: a lower
        # bound, PLAID's pruned centroid interaction), from the postings alone
        approx = np.maximum.reduceat(centroid_scores[:, pair_cells], first, axis=1).sum(0)
        kept = np.sort(top_k(approx, ncandidates * factor, docs)[1])
        if kept.size <= ncandidates:
            return kept
        # full centroid interaction: each kept document's every token replaced by its centroid (the stored ids)
        lengths = np.diff(self.offsets)[kept]
        has = lengths > 0
        kept, lengths = kept[has], lengths[has]
        token_cells = self.codes[_ranges(self.offsets[kept], lengths)].astype(np.intp)
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        full = np.maximum.reduceat(centroid_scores[:, token_cells], starts, axis=1).sum(0)
        return np.sort(top_k(full, ncandidates, kept)[1])

    def search(self, queries: Sequence[np.ndarray], k: int, *, nprobe: int | None = None,
               ncandidates: int | None = None, interaction_factor: int | None = None) -> SearchResult:
        """Each query's best ``k`` rows by decompressed maxsim over its candidates (see :meth:`candidates`)."""
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        self._check_queries(queries)
        out = []
        for query in queries:
            q = self.codec.to_codec_space(query)
            rows = self._candidates(q, nprobe, ncandidates, interaction_factor)
            out.append(top_k(self._maxsim(q, rows), k, rows) if rows.size else
                       (np.zeros(0), np.zeros(0, np.int64)))
        return pad_results(out, k)

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> None:
        """Write ``index.json``, ``ids.json``, the codec and ``codes.npy``, ``residuals.npy``,
        ``offsets.npy``; all or nothing."""
        with atomic_folder(path, overwrite=overwrite) as tmp:
            self.codec.save(tmp)
            np.save(os.path.join(tmp, "codes.npy"), self.codes)
            np.save(os.path.join(tmp, "residuals.npy"), self.packed)
            np.save(os.path.join(tmp, "offsets.npy"), self.offsets)
            write_ids(tmp, self.ids)
            write_meta(tmp, KIND, count=len(self.ids), dim=self.dim, tokens=int(self.offsets[-1]),
                       ncentroids=self.codec.ncentroids, normalized=self.codec.normalized, options=self.options)

    @classmethod
    def load(cls, path: str | os.PathLike) -> ColbertPlaidIndex:
        meta = read_meta(path, KIND)
        folder = os.fspath(path)
        options = check_options({"opq": False, **meta["options"]})  # an index saved before OPQ has none
        codec = PlaidCodec.load(folder, options["nbits"], bool(meta["normalized"]), options["opq"])
        codes = np.load(os.path.join(folder, "codes.npy"))
        packed = np.load(os.path.join(folder, "residuals.npy"))
        offsets = np.load(os.path.join(folder, "offsets.npy"))
        if (codec.dim != meta["dim"] or codes.shape != (meta["tokens"],) or offsets.size != meta["count"] + 1
                or packed.shape != (meta["tokens"], codec.packed_bytes) or int(offsets[-1]) != meta["tokens"]):
            raise ValueError(f"{folder}: the arrays do not match index.json")
        return cls(codec, codes, packed, offsets, read_ids(folder, meta["count"]), options)


# ------------------------------------------------------------------------------- resumable build
def build_plaid(parts: Sequence[Part], work_dir: str | os.PathLike | None = None,
                **options: Any) -> ColbertPlaidIndex:
    """A :class:`ColbertPlaidIndex` over documents given in parts (each a function returning (ids,
    colbert_vecs), read when needed), equal to one build over their concatenation.

    With ``work_dir``, every step is kept there as it finishes (the token counts, the codec, each
    compressed part, each written whole); run again with the same parts and options after a kill, only
    what is missing is done. Other options or other parts than the work folder was made with are
    refused. The caller removes ``work_dir`` once the index is saved (:func:`remove_work_dir`).
    """
    opts = check_options(options)
    raw, parts = parts, [_pooled(p, opts["pool_factor"]) for p in parts]
    work = None if work_dir is None else os.fspath(work_dir)
    if work is not None:
        os.makedirs(work, exist_ok=True)
    # the pooled token counts follow from the documents' own (no clustering in this pass)
    lengths = _step(work, "lengths", lambda: [pooled_lengths(_check_vectors(p()[1], None)[1], opts["pool_factor"])
                                              for p in raw], _save_lengths, _load_lengths)
    if len(lengths) != len(parts):
        raise ValueError(f"{work}: made for {len(lengths)} parts, given {len(parts)}")
    total = int(sum(int(x.sum()) for x in lengths))
    if total == 0:
        raise ValueError("colbert_vecs hold no token vectors: nothing to index")
    ncentroids = opts["ncentroids"] or min(default_ncentroids(total), min(total, opts["sample_tokens"]))
    settings = {**opts, "ncentroids": ncentroids, "tokens": total, "parts": [len(x) for x in lengths]}
    if work is not None:
        _check_settings(work, settings)

    def train() -> PlaidCodec:
        positions = sample_positions(total, opts["sample_tokens"], opts["seed"])
        sample, start = [], 0
        for part, n in zip(parts, lengths):
            size = int(n.sum())
            lo, hi = np.searchsorted(positions, [start, start + size])
            if hi > lo:
                sample.append(_check_vectors(part()[1], None)[0][positions[lo:hi] - start])
            start += size
        return PlaidCodec.train(np.concatenate(sample), opts["nbits"], ncentroids, opts["kmeans_niter"], opts["seed"],
                                opts["pq_bytes"], opts["opq"])

    codec = _step(work, "codec", train, lambda f, c: (c.save(f), _write_json(f, "codec.json", {
        "normalized": c.normalized})), lambda f: PlaidCodec.load(f, opts["nbits"], _read_json(f, "codec.json")[
            "normalized"], opts["opq"]))
    all_ids: list[str] = []
    codes, packed, offsets = [], [], [np.zeros(1, dtype=np.int64)]
    for number, (part, n) in enumerate(zip(parts, lengths)):
        def compress(part: Part = part, n: np.ndarray = n, number: int = number) -> tuple[list[str], np.ndarray,
                                                                                          np.ndarray, np.ndarray]:
            part_ids, vecs = part()
            vectors, part_lengths = _check_vectors(vecs, codec.dim)
            if not np.array_equal(part_lengths, n) or len(part_ids) != len(n):
                raise ValueError(f"part {number} changed since {work} was made (other documents)")
            return [str(i) for i in part_ids], *codec.compress(vectors), part_lengths

        part_ids, c, p, n_ = _step(work, f"part-{number:05d}", compress, _save_part, _load_part)
        all_ids.extend(part_ids)
        codes.append(c)
        packed.append(p)
        offsets.append(offsets[-1][-1] + np.cumsum(n_))
    check_unique(all_ids)
    return ColbertPlaidIndex(codec, np.concatenate(codes), np.concatenate(packed),
                             np.concatenate(offsets).astype(np.int64), all_ids,
                             {**opts, "ncentroids": ncentroids})


def remove_work_dir(work_dir: str | os.PathLike) -> None:
    """Remove a :func:`build_plaid` work folder (after the index it made is saved)."""
    shutil.rmtree(os.fspath(work_dir), ignore_errors=True)


def _step(work: str | None, name: str, make: Callable[[], Any], save: Callable[[str, Any], None],
          load: Callable[[str], Any]) -> Any:
    """``make()``, or what an earlier run kept in ``work/name``; kept there (whole or not at all) when new."""
    if work is None:
        return make()
    folder = os.path.join(work, name)
    if os.path.isdir(folder):
        return load(folder)
    value = make()
    with atomic_folder(folder) as tmp:
        save(tmp, value)
    return value


def _check_settings(work: str, settings: dict[str, Any]) -> None:
    path = os.path.join(work, "settings.json")
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        if old != settings:
            diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
            raise ValueError(f"{path}: an unfinished plaid build with other {', '.join(diff)}; build with the same "
                             "options and documents, or remove the folder to start again")
        return
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(settings, f)
    os.replace(tmp, path)


def _write_json(folder: str, name: str, value: Any) -> None:
    with open(os.path.join(folder, name), "w") as f:
        json.dump(value, f)


def _read_json(folder: str, name: str) -> Any:
    with open(os.path.join(folder, name)) as f:
        return json.load(f)


def _save_lengths(folder: str, lengths: list[np.ndarray]) -> None:
    np.savez(os.path.join(folder, "lengths.npz"), *lengths)


def _load_lengths(folder: str) -> list[np.ndarray]:
    with np.load(os.path.join(folder, "lengths.npz")) as z:
        return [z[f"arr_{i}"] for i in range(len(z.files))]


def _save_part(folder: str, part: tuple[list[str], np.ndarray, np.ndarray, np.ndarray]) -> None:
    ids, codes, packed, lengths = part
    write_ids(folder, ids)
    np.save(os.path.join(folder, "codes.npy"), codes)
    np.save(os.path.join(folder, "residuals.npy"), packed)
    np.save(os.path.join(folder, "lengths.npy"), lengths)


def _load_part(folder: str) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    lengths = np.load(os.path.join(folder, "lengths.npy"))
    return (read_ids(folder, len(lengths)), np.load(os.path.join(folder, "codes.npy")),
            np.load(os.path.join(folder, "residuals.npy")), lengths)


register_index(KIND, ColbertPlaidIndex)
