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

import trine.scoring as scoring
from trine.curation.common import (
    atomic_jsonl,
    check_output,
    iter_raw_rows,
    percentiles,
    quiet,
    read_records,
    write_row,
)
from trine.inference.result import EncodeResult
from trine.modes import mode_outputs
from trine.progress import bar as progress_bar
from trine.scoring import HYBRID_KEYS, MODE_ALIASES

M3_MODES = HYBRID_KEYS


class PairScorer(Protocol):
    """``scorer(queries, passages)``: the score of each (queries[i], passages[i]) pair."""

    def __call__(self, queries: Sequence[str], passages: Sequence[str]) -> np.ndarray: ...


def _check_pairs(queries: Sequence[str], passages: Sequence[str]) -> None:
    if len(queries) != len(passages):
        raise ValueError(f"{len(queries)} queries for {len(passages)} passages; a scorer takes pairs")


class EmbedderScorer:
    """Pair scores from a bi-encoder (any trine encoder): queries encoded as queries (their
    instruction), passages as passages; each distinct text is encoded once per call.

    ``mode``: ``dense`` for a dense-only model (an ``Embedder``); for a model with heads (an
    ``M3Embedder``) any of ``dense``, ``sparse``, ``colbert``, ``sparse+dense``,
    ``colbert+sparse+dense`` with ``weights`` (dense, sparse, colbert): the numbers of
    ``M3Embedder.compute_score`` (the same :func:`trine.scoring.paired_scores`) when no query
    instruction is set. :meth:`prime` keeps the encodings of passages that many calls will ask
    for (the rank check of `trine filter`).
    """

    def __init__(self, embedder: Any, mode: str = "dense", weights: Sequence[float] | None = None):
        available = embedder.outputs
        # a pair is scored exactly in every mode: ColBERT needs its vectors alone (no dense first stage)
        modes = tuple(m for m in M3_MODES if set(mode_outputs(m, "full")) <= set(available))
        mode = MODE_ALIASES.get(mode, mode)
        if mode not in modes:
            raise ValueError(f"mode {mode!r} is not available for a {type(embedder).__name__} "
                             f"(outputs {', '.join(available)}); choose from {modes}")
        if weights is not None and len(weights) != 3:
            raise ValueError(f"weights are (dense, sparse, colbert), got {list(weights)}")
        self.embedder, self.mode, self.weights = embedder, mode, weights
        self.outputs = mode_outputs(mode, "full")
        self._primed: dict[str, tuple[Any, Any, Any]] = {}

    def _encode(self, texts: list[str], kind: str) -> list[tuple[Any, Any, Any]]:
        if not texts:
            return []
        return self.embedder.encode_result(texts, self.outputs, kind=kind).rows()

    def prime(self, passages: Sequence[str]) -> None:
        todo = [t for t in dict.fromkeys(passages) if t not in self._primed]
        self._primed.update(zip(todo, self._encode(todo, "passage")))

    def __call__(self, queries: Sequence[str], passages: Sequence[str]) -> np.ndarray:
        _check_pairs(queries, passages)
        if not queries:
            return np.zeros(0, dtype=np.float64)
        uq = list(dict.fromkeys(queries))
        up = [t for t in dict.fromkeys(passages) if t not in self._primed]
        q_reps = dict(zip(uq, self._encode(uq, "query")))
        p_reps = dict(zip(up, self._encode(up, "passage")))
        p_reps.update((t, self._primed[t]) for t in dict.fromkeys(passages) if t in self._primed)
        q = EncodeResult.from_rows([q_reps[t] for t in queries], self.outputs)
        p = EncodeResult.from_rows([p_reps[t] for t in passages], self.outputs)
        # the weights only enter the weighted means (a single mode takes any)
        return scoring.paired_scores(q, p, self.weights if "+" in self.mode else None)[self.mode]


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
    bar = progress_bar(total=len(records), desc="score", disable=not show_progress, unit="record")
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
