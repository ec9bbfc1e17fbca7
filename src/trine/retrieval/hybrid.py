"""Hybrid search: weighted fusion of exact scores over the union of candidate lists, and reciprocal-rank fusion.

Weighted fusion follows FlagEmbedding's MLDR/MKQA recipe: candidates are the union of each
first-stage list (e.g. dense top-k and sparse top-k), and every mode's score is computed exactly
for every candidate of the union (a document found only by the sparse index still gets its exact
dense score), then ``sum_m w_m * s_m`` ranks them. Lexical and BM25 scores are on another scale
than cosines, so each mode's scores may first be normalised per query over the union
(``normalization="minmax"`` or ``"zscore"``; :func:`trine.scoring.normalize_scores`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from trine.retrieval.base import SearchResult, atomic_folder, pad_results, read_meta, top_k, unique_rows, write_meta
from trine.retrieval.dense import DenseIndex
from trine.retrieval.multivector import MultiVectorIndex
from trine.retrieval.plaid import ColbertPlaidIndex
from trine.retrieval.protocol import ENCODE_KEYS, REPRESENTATIONS, Index, check_index, load_index, rerank
from trine.retrieval.sparse import SparseIndex
from trine.scoring import check_normalization, fuse_scores

MODES = REPRESENTATIONS
#: the sub-folder of a saved HybridRetriever that holds each mode's index
PART_FOLDERS = {"dense": "dense", "sparse": "sparse", "colbert": "multivector"}
#: the multi-vector index kinds ``from_encoded`` builds: exact maxsim over the vectors, or compressed (PLAID)
COLBERT_KINDS = ("exact", "plaid")
Scorer = Callable[[np.ndarray], np.ndarray]


def union_rows(results: Sequence[SearchResult]) -> np.ndarray:
    """Per query, the sorted union of the rows of several results, padded with -1 (queries x m)."""
    if not results:
        raise ValueError("union of no results")
    n = len(results[0])
    if any(len(r) != n for r in results):
        raise ValueError("results to fuse must cover the same queries")
    return unique_rows(np.concatenate([r.rows for r in results], axis=1))


def weighted_fusion(candidates: Sequence[SearchResult], scorers: Sequence[Scorer], weights: Sequence[float],
                    k: int, *, normalization: str = "none", confidence: Sequence[float] | None = None) -> SearchResult:
    """Rank the union of ``candidates`` by ``sum_m weights[m] * normalize(scorers[m](rows))``, best ``k`` per query.

    Each scorer takes a (queries x m) row matrix (-1 padding) and returns exact scores of that shape.
    ``normalization`` (:data:`trine.scoring.NORMALIZATIONS`) puts each mode's scores on one scale per
    query over that query's union of candidates before weighting: ``none`` (raw scores, FlagEmbedding's
    recipe), ``minmax`` or ``zscore`` (:func:`trine.scoring.normalize_scores`). ``confidence``: calibrated
    fusion's per-head coefficients (:func:`trine.scoring.fuse_scores`), ``None`` for plain weights.
    """
    if len(scorers) != len(weights) or not scorers:
        raise ValueError(f"{len(scorers)} scorers for {len(weights)} weights")
    check_normalization(normalization)
    rows = union_rows(candidates)
    scores = []
    for scorer in scorers:
        s = np.asarray(scorer(rows), dtype=np.float64)
        if s.shape != rows.shape:
            raise ValueError(f"a scorer returned shape {s.shape} for rows {rows.shape}")
        scores.append(s)
    return rank_candidates(rows, fuse_scores(scores, weights, rows >= 0, normalization, confidence), k)


def rank_candidates(rows: np.ndarray, scores: np.ndarray, k: int) -> SearchResult:
    """Per query, the best ``k`` of its candidate ``rows`` (-1 padding) by ``scores`` of the same shape."""
    out = []
    for s, r in zip(scores, rows):
        valid = r >= 0
        out.append(top_k(s[valid], k, r[valid]) if valid.any() else (np.zeros(0), np.zeros(0, np.int64)))
    return pad_results(out, k)


def reciprocal_rank_fusion(results: Sequence[SearchResult], k: int, rrf_k: float = 60.0,
                           weights: Sequence[float] | None = None) -> SearchResult:
    """Score ``sum_lists w / (rrf_k + rank)`` (rank from 1) over the lists a document appears in."""
    if weights is not None and len(weights) != len(results):
        raise ValueError(f"{len(weights)} weights for {len(results)} result lists")
    ws = [1.0] * len(results) if weights is None else [float(w) for w in weights]
    rows = union_rows(results)
    out = []
    for i in range(len(rows)):
        fused: dict[int, float] = {}
        for res, w in zip(results, ws):
            for rank, r in enumerate(res.rows[i].tolist(), start=1):
                if r >= 0:
                    fused[r] = fused.get(r, 0.0) + w / (rrf_k + rank)
        if not fused:
            out.append((np.zeros(0), np.zeros(0, np.int64)))
            continue
        r_arr = np.fromiter(fused.keys(), dtype=np.int64, count=len(fused))
        s_arr = np.fromiter(fused.values(), dtype=np.float64, count=len(fused))
        out.append(top_k(s_arr, k, r_arr))
    return pad_results(out, k)


@dataclass
class QueryReps:
    """Encoded queries: any of dense vectors, lexical weights, multi-vectors (``M3Embedder.encode`` keys)."""

    dense_vecs: np.ndarray | None = None
    lexical_weights: Sequence[Mapping[str, float]] | None = None
    colbert_vecs: Sequence[np.ndarray] | None = None

    @classmethod
    def from_encode(cls, out: Mapping[str, Any]) -> QueryReps:
        unknown = set(out) - {"dense_vecs", "lexical_weights", "colbert_vecs"}
        if unknown:
            raise ValueError(f"unknown representation keys {sorted(unknown)}")
        return cls(out.get("dense_vecs"), out.get("lexical_weights"), out.get("colbert_vecs"))


class HybridRetriever:
    """Indexes of several modes over the same documents (same ids, same order), searched and fused.

    Any :class:`~trine.retrieval.Index` serves a mode, keyed by its ``representation``:
    ``HybridRetriever(dense, sparse, multivector)`` (trine's indexes or any others) or
    ``HybridRetriever(indexes={"dense": ..., "sparse": ..., "colbert": ...})``.

    ``search(reps, k, weights={"dense": 1, "sparse": 0.3})`` fuses the modes named in ``weights``;
    candidates come from ``candidate_modes`` (dense and/or sparse first-stage lists of
    ``candidate_k`` each) and every weighted mode is scored exactly on their union.
    ``fusion="rrf"`` fuses the ranked lists of the weighted modes instead (a mode without its own
    first stage, such as colbert, contributes the re-ranked union of candidates).
    """

    def __init__(self, dense: Index | None = None, sparse: Index | None = None, multivector: Index | None = None,
                 *, indexes: Mapping[str, Index] | None = None):
        given = {m: i for m, i in (("dense", dense), ("sparse", sparse), ("colbert", multivector)) if i is not None}
        for mode, index in (indexes or {}).items():
            if mode not in MODES:
                raise ValueError(f"unknown mode {mode!r}; modes are {MODES}")
            if mode in given:
                raise ValueError(f"the {mode} index is given twice")
            given[mode] = index
        if not given:
            raise ValueError("a HybridRetriever needs at least one index")
        self.indexes: dict[str, Index] = {m: check_index(given[m], m, f"the {m} index") for m in MODES if m in given}
        first, *others = self.indexes.values()
        for other in others:
            if len(other) != len(first) or list(other.ids) != list(first.ids):
                raise ValueError("the indexes must hold the same document ids in the same order")

    @property
    def ids(self) -> Sequence[str]:
        return next(iter(self.indexes.values())).ids

    @property
    def dense(self) -> Index | None:
        return self.indexes.get("dense")

    @property
    def sparse(self) -> Index | None:
        return self.indexes.get("sparse")

    @property
    def multivector(self) -> Index | None:
        return self.indexes.get("colbert")

    @classmethod
    def from_encoded(cls, docs: Mapping[str, Any], ids: Sequence[str] | None = None, dense_kind: str = "flat",
                     *, colbert_kind: str = "exact", colbert_options: Mapping[str, Any] | None = None,
                     colbert_index: Index | None = None, **dense_options: int) -> HybridRetriever:
        """trine's indexes for whichever of ``dense_vecs``, ``lexical_weights``, ``colbert_vecs`` ``docs``
        holds (the dictionary ``M3Embedder.encode`` returns). ``colbert_kind``: ``"exact"``
        (:class:`MultiVectorIndex`, the vectors as they are) or ``"plaid"`` (:class:`~trine.retrieval.plaid.
        ColbertPlaidIndex`, compressed, built with ``colbert_options``); ``colbert_index``: one built
        already (from shards, say) instead of ``colbert_vecs``."""
        if colbert_kind not in COLBERT_KINDS:
            raise ValueError(f"colbert_kind must be one of {COLBERT_KINDS}, not {colbert_kind!r}")
        if colbert_options and colbert_kind != "plaid":
            raise ValueError(f"colbert_options {sorted(colbert_options)} are the plaid index's; colbert_kind is "
                             f"{colbert_kind!r}")
        reps = QueryReps.from_encode(docs)
        if colbert_index is not None and reps.colbert_vecs is not None:
            raise ValueError("give colbert_vecs or colbert_index, not both")
        indexes: dict[str, Index] = {}
        if reps.dense_vecs is not None:
            indexes["dense"] = DenseIndex.build(reps.dense_vecs, ids, kind=dense_kind, **dense_options)
        if reps.lexical_weights is not None:
            indexes["sparse"] = SparseIndex.build(reps.lexical_weights, ids)
        if colbert_index is not None:
            indexes["colbert"] = colbert_index
        elif reps.colbert_vecs is not None and colbert_kind == "plaid":
            indexes["colbert"] = ColbertPlaidIndex.build(reps.colbert_vecs, ids, **dict(colbert_options or {}))
        elif reps.colbert_vecs is not None:
            indexes["colbert"] = MultiVectorIndex.build(reps.colbert_vecs, ids)
        return cls(indexes=indexes)

    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> None:
        """One folder with ``dense/``, ``sparse/``, ``multivector/`` (the modes present), each saved by its
        index; all or nothing."""
        with atomic_folder(path, overwrite=overwrite) as tmp:
            for mode, index in self.indexes.items():
                index.save(os.path.join(tmp, PART_FOLDERS[mode]))
            write_meta(tmp, "hybrid", parts=[PART_FOLDERS[m] for m in self.indexes])

    @classmethod
    def load(cls, path: str | os.PathLike) -> HybridRetriever:
        """Each part is loaded by the index kind its own ``index.json`` names (``register_index``)."""
        meta = read_meta(path, "hybrid")
        modes = {folder: mode for mode, folder in PART_FOLDERS.items()}
        unknown = set(meta["parts"]) - set(modes)
        if unknown:
            raise ValueError(f"{path}: index.json names unknown parts {sorted(unknown)}")
        return cls(indexes={modes[f]: load_index(os.path.join(os.fspath(path), f)) for f in meta["parts"]})

    def _index(self, mode: str) -> Index:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; modes are {MODES}")
        if mode not in self.indexes:
            raise ValueError(f"mode {mode!r} needs its index, which this retriever was not given")
        return self.indexes[mode]

    @staticmethod
    def _reps(reps: QueryReps, mode: str) -> Any:
        rep = getattr(reps, ENCODE_KEYS[mode])
        if rep is None:
            raise ValueError(f"mode {mode!r} needs the queries' {ENCODE_KEYS[mode]}")
        return rep

    def first_stage(self, reps: QueryReps, mode: str, k: int) -> SearchResult:
        """One mode's own top ``k`` (its index's search; trine's multi-vector index: exact full search)."""
        return self._index(mode).search(self._reps(reps, mode), k)

    def scorer(self, reps: QueryReps, mode: str) -> Scorer:
        index, rep = self._index(mode), self._reps(reps, mode)
        return lambda rows: index.score(rep, rows)

    def search_mode(self, reps: QueryReps, mode: str, k: int, *, colbert_search: str = "rerank",
                    rerank_k: int = 100, weights: Mapping[str, float] | None = None,
                    normalization: str = "none", confidence: Mapping[str, float] | None = None) -> SearchResult:
        """One score mode's top ``k`` (what ``trine eval`` and ``trine serve``'s /search run): ``dense`` or
        ``sparse`` by its own index; ``colbert`` by the multi-vector index's own search (``colbert_search=
        "full"``: exact maxsim over the corpus, or a plaid index's candidate generation and decompressed maxsim)
        or over the dense top ``rerank_k`` (``"rerank"``, FlagEmbedding's recipe); a fused mode
        (``sparse+dense``, ``colbert+sparse+dense``) by weighted fusion of ``weights`` ({mode: weight})
        over the dense and sparse top ``k`` (``confidence``: calibrated fusion's {mode: coefficient},
        :func:`trine.scoring.fuse_scores`)."""
        if mode in ("dense", "sparse") or (mode == "colbert" and colbert_search == "full"):
            return self.first_stage(reps, mode, k)
        if mode == "colbert":
            if colbert_search != "rerank":
                raise ValueError(f"colbert_search must be 'rerank' or 'full', not {colbert_search!r}")
            candidates = self.first_stage(reps, "dense", rerank_k)
            return self._index("colbert").rerank(self._reps(reps, "colbert"), candidates, min(k, rerank_k))
        if mode in ("sparse+dense", "colbert+sparse+dense"):
            if weights is None:
                raise ValueError(f"mode {mode!r} needs its weights")
            return self.search(reps, k, weights, candidate_k=k, normalization=normalization, confidence=confidence)
        raise ValueError(f"unknown search mode {mode!r}")

    def search(self, reps: QueryReps, k: int, weights: Mapping[str, float], *,
               candidate_modes: Sequence[str] = ("dense", "sparse"), candidate_k: int = 100,
               fusion: str = "weighted", rrf_k: float = 60.0, normalization: str = "none",
               confidence: Mapping[str, float] | None = None) -> SearchResult:
        """The best ``k`` documents per query, fusing the modes named in ``weights`` (see the class);
        ``normalization`` (weighted fusion only): each mode's scores per query over the union of
        candidates, as :func:`weighted_fusion`; ``confidence`` (weighted fusion only): calibrated fusion's
        {mode: coefficient} for modes named in ``weights`` (:func:`trine.scoring.fuse_scores`)."""
        check_normalization(normalization)
        if confidence is not None:
            if fusion != "weighted":
                raise ValueError("confidence applies to weighted fusion; rrf fuses ranks, not scores")
            unknown = sorted(set(confidence) - set(weights))
            if unknown:
                raise ValueError(f"confidence names modes {unknown} that weights does not")
        if fusion not in ("weighted", "rrf"):
            raise ValueError(f"fusion must be 'weighted' or 'rrf', not {fusion!r}")
        if fusion == "rrf" and normalization != "none":
            raise ValueError("normalization applies to weighted fusion; rrf fuses ranks, not scores")
        if not weights:
            raise ValueError("weights must name at least one mode")
        for mode in list(weights) + list(candidate_modes):
            self._index(mode)
        bad = [m for m in candidate_modes if m == "colbert"]
        if bad or not candidate_modes:
            raise ValueError("candidate_modes must be a non-empty choice of 'dense' and 'sparse'")
        candidates = [self.first_stage(reps, m, candidate_k) for m in candidate_modes]
        modes = list(weights)
        if fusion == "weighted":
            return weighted_fusion(candidates, [self.scorer(reps, m) for m in modes],
                                   [weights[m] for m in modes], k, normalization=normalization,
                                   confidence=None if confidence is None else
                                   [float(confidence.get(m, 0.0)) for m in modes])
        lists = []
        by_mode = dict(zip(candidate_modes, candidates))
        for m in modes:
            if m in by_mode:
                lists.append(by_mode[m])
            else:  # a mode without its own first stage ranks the union of candidates
                rows = union_rows(candidates)
                lists.append(rerank(self._index(m), self._reps(reps, m), rows, max(rows.shape[1], 1)))
        return reciprocal_rank_fusion(lists, k, rrf_k, [weights[m] for m in modes])
