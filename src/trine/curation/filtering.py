"""`trine filter`: consistency filtering of weak pairs, and exact / near-duplicate removal.

C-Pack cleaned its unlabeled pairs with a reference model, dropping pairs it scored below 0.43.
Here a record is tested in file order, and the first failing test names its reason:

1. ``duplicate``: same normalised query and positives (case-folded, whitespace collapsed,
   positives as a set) as an earlier record;
2. ``low_score``: the reference scorer gives some positive less than ``min_score``;
3. ``rank``: some positive ranks below ``top_k`` among itself and ``rank_sample_size`` other
   records' positives (sampled per record with a seeded generator; all of them when there are
   no more than that), by the same scorer;
4. ``near_duplicate``: an earlier *kept* record's query and first positive both have cosine
   >= ``near_duplicate_threshold`` with this one's (dense vectors of ``dedup_embedder``).

A record with several positives is kept only if every positive passes. Records are processed
``chunk_size`` at a time and rows are written as they are decided; the near-duplicate test keeps
the kept records' vectors in two flat indexes (their size is that of a corpus's embeddings).
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from trine.curation.common import (
    atomic_jsonl,
    check_output,
    iter_raw_rows,
    percentiles,
    quiet,
    read_records,
    write_row,
)
from trine.curation.teacher import PairScorer
from trine.data.records import Record
from trine.io import check_distinct
from trine.progress import bar as progress_bar
from trine.retrieval.dense import DenseIndex

REASONS = ("duplicate", "low_score", "rank", "near_duplicate")
NEAR_DUPLICATE_NEIGHBOURS = 16  # earlier kept queries checked per record (the nearest ones)


@dataclass
class FilterSummary:
    records: int = 0
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)
    seconds: float = 0.0
    scores: list[float] = field(default_factory=list)

    def lines(self) -> list[str]:
        total = sum(self.dropped.values())
        reasons = ", ".join(f"{r} {self.dropped.get(r, 0)}" for r in REASONS)
        out = [f"records {self.records}: kept {self.kept}, dropped {total} ({reasons}) in {self.seconds:.1f} s"]
        if self.scores:
            out.append(f"reference scores of positives: {percentiles(self.scores)}")
        return out


def normalise(text: str) -> str:
    return " ".join(text.casefold().split())


def _dense(embedder: Any, texts: list[str]) -> np.ndarray:
    x = embedder.encode_result(texts, ("dense",)).dense_vecs
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def filter_pairs(
    input_file: str,
    output_file: str,
    *,
    scorer: PairScorer | None = None,
    min_score: float | None = None,
    top_k: int | None = None,
    rank_sample_size: int = 99,
    dedup: bool = True,
    near_duplicate_threshold: float | None = None,
    dedup_embedder: Any = None,
    dropped_file: str | None = None,
    seed: int = 42,
    chunk_size: int = 1024,
    show_progress: bool = True,
) -> FilterSummary:
    """Write the kept records to ``output_file`` and, optionally, the dropped ones with their reason
    (``{"line", "reason", "detail", "record"}`` per line) to ``dropped_file``; both atomically."""
    check_output(input_file, output_file)
    if dropped_file is not None:
        check_output(input_file, dropped_file, "dropped_file")
        check_distinct({"output_file": output_file, "dropped_file": dropped_file})
    if (min_score is not None or top_k is not None) and scorer is None:
        raise ValueError("min_score and top_k need a reference scorer")
    if top_k is not None and (top_k < 1 or rank_sample_size < 1):
        raise ValueError("top_k and rank_sample_size must be positive")
    if near_duplicate_threshold is not None:
        if not -1 <= near_duplicate_threshold <= 1:
            raise ValueError(f"near_duplicate_threshold is a cosine in [-1, 1], got {near_duplicate_threshold}")
        if dedup_embedder is None:
            raise ValueError("near_duplicate_threshold needs a dedup_embedder (any trine embedder)")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    records = read_records(input_file)
    summary = FilterSummary(records=len(records))
    started = time.perf_counter()

    sample_pool: list[str] = []
    if top_k is not None:
        sample_pool = list(dict.fromkeys(t for r in records for t in r.pos))
        prime = getattr(scorer, "prime", None)
        if prime is not None:  # embedder teachers: every positive encoded once, not once per sample
            with quiet(getattr(scorer, "embedder", None)):
                prime(sample_pool)

    seen_keys: set[tuple[str, tuple[str, ...]]] = set()
    q_index = p_index = None
    raw_rows = iter_raw_rows(input_file)
    bar = progress_bar(total=len(records), desc="filter", disable=not show_progress, unit="record")
    try:
        with contextlib.ExitStack() as stack:
            out = stack.enter_context(atomic_jsonl(output_file))
            dropped_out = stack.enter_context(atomic_jsonl(dropped_file)) if dropped_file is not None else None
            stack.enter_context(quiet(getattr(scorer, "embedder", None)))
            stack.enter_context(quiet(dedup_embedder))
            for c0 in range(0, len(records), chunk_size):
                chunk = records[c0 : c0 + chunk_size]
                verdict: list[tuple[str, str] | None] = [None] * len(chunk)
                if dedup:
                    for j, r in enumerate(chunk):
                        key = (normalise(r.query), tuple(sorted({normalise(p) for p in r.pos})))
                        if key in seen_keys:
                            verdict[j] = ("duplicate", "same normalised query and positives as an earlier record")
                        seen_keys.add(key)
                if scorer is not None and (min_score is not None or top_k is not None):
                    _consistency(chunk, verdict, scorer, min_score, top_k, rank_sample_size, sample_pool,
                                 seed, c0, summary)
                if near_duplicate_threshold is not None:
                    q_index, p_index = _near_duplicates(chunk, verdict, dedup_embedder, near_duplicate_threshold,
                                                        q_index, p_index)
                for j, r in enumerate(chunk):
                    row = next(raw_rows)
                    if verdict[j] is None:
                        summary.kept += 1
                        write_row(out, row)
                    else:
                        reason, detail = verdict[j]
                        summary.dropped[reason] += 1
                        if dropped_out is not None:
                            write_row(dropped_out, {"line": r.line, "reason": reason, "detail": detail,
                                                    "record": row})
                bar.update(len(chunk))
    finally:
        bar.close()
    summary.seconds = time.perf_counter() - started
    return summary


def _consistency(chunk: list[Record], verdict: list, scorer: PairScorer, min_score: float | None,
                 top_k: int | None, sample_size: int, sample_pool: Sequence[str], seed: int, c0: int,
                 summary: FilterSummary) -> None:
    todo = [j for j in range(len(chunk)) if verdict[j] is None]
    if not todo:
        return
    samples: dict[int, list[str]] = {}
    queries: list[str] = []
    passages: list[str] = []
    for j in todo:
        r = chunk[j]
        queries += [r.query] * len(r.pos)
        passages += list(r.pos)
        if top_k is not None:
            own = {normalise(p) for p in r.pos}
            rng = np.random.default_rng([seed, c0 + j])
            picked: list[str] = []
            exhaustive = sample_size >= len(sample_pool) - len(own)
            if exhaustive:  # as many as there are: every other positive
                picked = [t for t in sample_pool if normalise(t) not in own]
            chosen: set[str] = set()
            tries = 0
            while not exhaustive and len(picked) < sample_size and tries < 20 * sample_size:
                tries += 1
                t = sample_pool[int(rng.integers(len(sample_pool)))]
                if t not in chosen and normalise(t) not in own:
                    picked.append(t)
                    chosen.add(t)
            samples[j] = picked
            queries += [r.query] * len(picked)
            passages += picked
    scores = np.asarray(scorer(queries, passages), dtype=np.float64)
    at = 0
    for j in todo:
        r = chunk[j]
        pos = scores[at : at + len(r.pos)]
        at += len(r.pos)
        summary.scores.extend(pos.tolist())
        others = np.zeros(0)
        if top_k is not None:
            others = scores[at : at + len(samples[j])]
            at += len(samples[j])
        if min_score is not None and pos.min() < min_score:
            verdict[j] = ("low_score", f"reference score {pos.min():.4f} < min_score {min_score}")
            continue
        if top_k is not None:
            rank = 1 + int((others > pos.min()).sum())
            if rank > top_k:
                verdict[j] = ("rank", f"positive ranked {rank} among itself and {len(others)} sampled passages "
                                      f"(top_k {top_k})")


def _near_duplicates(chunk: list[Record], verdict: list, embedder: Any, threshold: float,
                     q_index: DenseIndex | None, p_index: DenseIndex | None) -> tuple[DenseIndex, DenseIndex]:
    todo = [j for j in range(len(chunk)) if verdict[j] is None]
    if not todo:
        return q_index, p_index
    q = _dense(embedder, [chunk[j].query for j in todo])
    p = _dense(embedder, [chunk[j].pos[0] for j in todo])
    earlier_hits = None
    if q_index is not None and len(q_index):
        earlier_hits = q_index.search(q, min(NEAR_DUPLICATE_NEIGHBOURS, len(q_index)))
    kept: list[int] = []  # positions in todo
    for a, j in enumerate(todo):
        match = None
        if earlier_hits is not None:
            near = (earlier_hits.rows[a] >= 0) & (earlier_hits.scores[a] >= threshold)
            rows, q_sims = earlier_hits.rows[a][near], earlier_hits.scores[a][near]
            if rows.size:
                p_sims = p_index.vectors(rows) @ p[a]
                close = np.flatnonzero(p_sims >= threshold)
                if close.size:
                    c = int(close[0])
                    match = f"cosine query {q_sims[c]:.4f}, positive {p_sims[c]:.4f} with line {q_index.ids[rows[c]]}"
        if match is None and kept:
            q_sims = q[kept] @ q[a]
            p_sims = p[kept] @ p[a]
            both = np.flatnonzero((q_sims >= threshold) & (p_sims >= threshold))
            if both.size:
                b = int(both[0])
                match = f"cosine query {q_sims[b]:.4f}, positive {p_sims[b]:.4f} with line {chunk[todo[kept[b]]].line}"
        if match is not None:
            verdict[j] = ("near_duplicate", match)
        else:
            kept.append(a)
    if kept:
        if q_index is None:
            q_index, p_index = DenseIndex(q.shape[1]), DenseIndex(p.shape[1])
        lines = [str(chunk[todo[a]].line) for a in kept]
        q_index.add(q[kept], lines)
        p_index.add(p[kept], lines)
    return q_index, p_index
