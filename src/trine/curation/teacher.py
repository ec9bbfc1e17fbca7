"""Teacher scores for (query, passage) pairs, and `trine score`, which adds them to a training file.

Every teacher is a *pair scorer*: ``scorer(queries, passages) -> scores`` (equal-length lists,
one float per pair). :class:`EmbedderScorer` wraps any trine embedder (dense, or an M3 model in
any of its score modes); :class:`RerankerScorer` wraps a cross-encoder with a FlagReranker-like
``compute_score(pairs, batch_size=, max_length=, normalize=)``. Filtering
(:mod:`trine.curation.filtering`) takes the same scorers.
"""

from __future__ import annotations

import time
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from tqdm.auto import tqdm

from trine import scoring
from trine.curation.common import (
    atomic_jsonl,
    check_output,
    dense_array,
    is_m3,
    iter_raw_rows,
    percentiles,
    quiet,
    read_records,
    write_row,
)

M3_MODES = ("dense", "sparse", "colbert", "sparse+dense", "colbert+sparse+dense")


class PairScorer(Protocol):
    """``scorer(queries, passages)``: the score of each (queries[i], passages[i]) pair."""

    def __call__(self, queries: Sequence[str], passages: Sequence[str]) -> np.ndarray: ...


def _check_pairs(queries: Sequence[str], passages: Sequence[str]) -> None:
    if len(queries) != len(passages):
        raise ValueError(f"{len(queries)} queries for {len(passages)} passages; a scorer takes pairs")


class EmbedderScorer:
    """Pair scores from a bi-encoder: queries with :meth:`encode_queries` (their instruction),
    passages with :meth:`encode_corpus`; each distinct text is encoded once per call.

    ``mode``: ``dense`` for an ``Embedder``; for an ``M3Embedder`` any of ``dense``, ``sparse``,
    ``colbert``, ``sparse+dense``, ``colbert+sparse+dense`` with ``weights`` (dense, sparse,
    colbert) as in ``M3Embedder.compute_score`` (weighted means), whose numbers these equal
    when no query instruction is set. :meth:`prime` keeps the encodings of passages that many
    calls will ask for (the rank check of `trine filter`).
    """

    def __init__(self, embedder: Any, mode: str = "dense", weights: Sequence[float] | None = None):
        m3 = is_m3(embedder)
        if mode not in (M3_MODES if m3 else ("dense",)):
            raise ValueError(f"mode {mode!r} is not available for a {type(embedder).__name__}; choose from "
                             f"{M3_MODES if m3 else ('dense',)}")
        if weights is not None and len(weights) != 3:
            raise ValueError(f"weights are (dense, sparse, colbert), got {list(weights)}")
        self.embedder, self.mode, self.weights = embedder, mode, weights
        self.m3 = m3
        parts = set(mode.split("+"))
        self.need = {"dense": "dense" in parts, "sparse": "sparse" in parts, "colbert": "colbert" in parts}
        self._primed: dict[str, tuple[Any, Any, Any]] = {}

    def _encode(self, texts: list[str], queries: bool) -> list[tuple[Any, Any, Any]]:
        if not texts:
            return []
        if not self.m3:
            fn = self.embedder.encode_queries if queries else self.embedder.encode_corpus
            vecs = dense_array(fn(texts))
            return [(v, None, None) for v in vecs]
        fn = self.embedder.encode_queries if queries else self.embedder.encode_corpus
        enc = fn(texts, return_dense=self.need["dense"], return_sparse=self.need["sparse"],
                 return_colbert_vecs=self.need["colbert"])
        n = len(texts)
        dense = dense_array(enc) if self.need["dense"] else [None] * n
        lexical = enc["lexical_weights"] if self.need["sparse"] else [None] * n
        colbert = enc["colbert_vecs"] if self.need["colbert"] else [None] * n
        return list(zip(dense, lexical, colbert))

    def prime(self, passages: Sequence[str]) -> None:
        todo = [t for t in dict.fromkeys(passages) if t not in self._primed]
        self._primed.update(zip(todo, self._encode(todo, queries=False)))

    def __call__(self, queries: Sequence[str], passages: Sequence[str]) -> np.ndarray:
        _check_pairs(queries, passages)
        if not queries:
            return np.zeros(0, dtype=np.float64)
        uq = list(dict.fromkeys(queries))
        up = [t for t in dict.fromkeys(passages) if t not in self._primed]
        q_reps = dict(zip(uq, self._encode(uq, queries=True)))
        p_reps = dict(zip(up, self._encode(up, queries=False)))
        p_reps.update((t, self._primed[t]) for t in dict.fromkeys(passages) if t in self._primed)
        qs = [q_reps[t] for t in queries]
        ps = [p_reps[t] for t in passages]
        n = len(qs)
        zeros = np.zeros(n, dtype=np.float64)
        dense = sparse = colbert = zeros
        if self.need["dense"]:
            dense = np.einsum("nd,nd->n", np.stack([q[0] for q in qs]).astype(np.float64),
                              np.stack([p[0] for p in ps]).astype(np.float64))
        if self.need["sparse"]:
            sparse = np.array([scoring.lexical_matching_score(q[1], p[1]) for q, p in zip(qs, ps)], dtype=np.float64)
        if self.need["colbert"]:
            out = []
            for s in range(0, n, 256):
                qv, qm = scoring.pad_vectors([q[2] for q in qs[s : s + 256]])
                pv, pm = scoring.pad_vectors([p[2] for p in ps[s : s + 256]])
                out.extend(scoring.colbert_scores_padded(qv, qm, pv, pm, pairwise=True).tolist())
            colbert = np.asarray(out, dtype=np.float64)
        if self.mode in ("dense", "sparse", "colbert"):
            return {"dense": dense, "sparse": sparse, "colbert": colbert}[self.mode]
        return scoring.hybrid_scores(dense, sparse, colbert, self.weights)[self.mode]


class RerankerScorer:
    """Pair scores from a cross-encoder exposing ``compute_score(pairs, batch_size=, max_length=, normalize=)``
    (trine's ``Reranker``, FlagEmbedding's ``FlagReranker``). Each distinct pair is scored once."""

    def __init__(self, reranker: Any, *, batch_size: int | None = None, max_length: int | None = None,
                 normalize: bool = False):
        if not callable(getattr(reranker, "compute_score", None)):
            raise TypeError(f"{type(reranker).__name__} has no compute_score(pairs, ...)")
        self.reranker = reranker
        self.options: dict[str, Any] = {"normalize": normalize}
        if batch_size is not None:
            self.options["batch_size"] = batch_size
        if max_length is not None:
            self.options["max_length"] = max_length

    def __call__(self, queries: Sequence[str], passages: Sequence[str]) -> np.ndarray:
        _check_pairs(queries, passages)
        if not queries:
            return np.zeros(0, dtype=np.float64)
        pairs = list(zip(queries, passages))
        unique = list(dict.fromkeys(pairs))
        scores = self.reranker.compute_score([list(p) for p in unique], **self.options)
        scores = np.atleast_1d(np.asarray(scores, dtype=np.float64))
        if scores.shape != (len(unique),):
            raise ValueError(f"the reranker returned {scores.shape} scores for {len(unique)} pairs")
        at = dict(zip(unique, scores.tolist()))
        return np.asarray([at[p] for p in pairs], dtype=np.float64)


def load_reranker_scorer(model_name_or_path: str, *, batch_size: int | None = None, max_length: int | None = None,
                         normalize: bool = False, **reranker_options: Any) -> RerankerScorer:
    """A :class:`RerankerScorer` over a :class:`trine.inference.reranker.Reranker` loaded from a folder."""
    from trine.inference.reranker import Reranker

    return RerankerScorer(Reranker(model_name_or_path, **reranker_options), batch_size=batch_size,
                          max_length=max_length, normalize=normalize)


@dataclass
class ScoreSummary:
    records: int = 0
    pairs: int = 0
    seconds: float = 0.0
    positive_scores: array = field(default_factory=lambda: array("f"))
    negative_scores: array = field(default_factory=lambda: array("f"))

    def lines(self) -> list[str]:
        return [
            f"records {self.records}, (query, passage) pairs scored {self.pairs} in {self.seconds:.1f} s",
            f"positive scores: {percentiles(self.positive_scores)}",
            f"negative scores: {percentiles(self.negative_scores)}",
        ]


def add_teacher_scores(input_file: str, output_file: str, scorer: PairScorer, *, chunk_size: int = 2048,
                       show_progress: bool = True) -> ScoreSummary:
    """Write ``output_file`` (atomically; never the input) with ``pos_scores`` / ``neg_scores`` from ``scorer``.

    Records are scored ``chunk_size`` at a time (all their pairs in one scorer call, each
    distinct text encoded once per call); rows are written as they are scored.
    """
    check_output(input_file, output_file)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    records = read_records(input_file)
    summary = ScoreSummary(records=len(records))
    started = time.perf_counter()
    raw_rows = iter_raw_rows(input_file)
    embedder = getattr(scorer, "embedder", None)
    bar = tqdm(total=len(records), desc="score", disable=not show_progress, unit="record")
    try:
        with atomic_jsonl(output_file) as out, quiet(embedder):
            for c0 in range(0, len(records), chunk_size):
                chunk = records[c0 : c0 + chunk_size]
                queries = [r.query for r in chunk for _ in (*r.pos, *r.neg)]
                passages = [t for r in chunk for t in (*r.pos, *r.neg)]
                scores = np.asarray(scorer(queries, passages), dtype=np.float64)
                if scores.shape != (len(passages),):
                    raise ValueError(f"the scorer returned {scores.shape} scores for {len(passages)} pairs")
                summary.pairs += len(passages)
                at = 0
                for r in chunk:
                    pos = scores[at : at + len(r.pos)].tolist()
                    at += len(r.pos)
                    neg = scores[at : at + len(r.neg)].tolist()
                    at += len(r.neg)
                    summary.positive_scores.extend(pos)
                    summary.negative_scores.extend(neg)
                    row = next(raw_rows)
                    row["pos_scores"] = pos
                    row["neg_scores"] = neg
                    write_row(out, row)
                bar.update(len(chunk))
    finally:
        bar.close()
    summary.seconds = time.perf_counter() - started
    return summary
