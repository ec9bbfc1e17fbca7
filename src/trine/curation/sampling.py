"""Sampling hard negatives from a query's ranked candidates: drop positives, the query and
duplicates, drop likely false negatives above a score ceiling, sample, and back-fill."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from trine.data.reader import DataError
from trine.data.records import Record

BACKFILL = ("random", "none", "error")


@dataclass
class SamplingCounts:
    """What sampling dropped and filled, over every query."""

    dropped_as_positive_or_query: int = 0
    dropped_by_margin: int = 0
    backfilled: int = 0
    short: int = 0


def pick_negatives(record: Record, pool: Sequence[str], rows: np.ndarray, scores: np.ndarray, ceiling: float | None,
                   count: int, rng: np.random.Generator, counts: SamplingCounts, backfill: str) -> list[int]:
    """Pool rows of ``count`` negatives for ``record`` from its ranked candidates (``rows`` and their
    ``scores``, best first; -1 is padding), in rank order, back-filled ones after; ``counts`` adds
    what was dropped and filled."""
    banned = {t.strip() for t in (*record.pos, record.query)}
    candidates: list[int] = []
    seen: set[str] = set()
    for row, score in zip(rows.tolist(), scores.tolist()):
        if row < 0:
            continue
        text = pool[row].strip()
        if text in banned or text in seen:
            counts.dropped_as_positive_or_query += 1
            continue
        if ceiling is not None and score > ceiling:
            counts.dropped_by_margin += 1
            continue
        candidates.append(row)
        seen.add(text)
    if len(candidates) > count:
        picks = rng.choice(len(candidates), size=count, replace=False)
        return [candidates[j] for j in sorted(picks)]
    chosen = list(candidates)
    if len(chosen) < count:
        if backfill == "error":
            raise DataError([f"line {record.line}: neg: only {len(chosen)} candidates left, {count} asked "
                             "(backfill='random' fills from the pool)"])
        if backfill == "random":
            avoid = banned | seen
            tries = 0
            while len(chosen) < count and tries < 20 * count:  # rejection sampling: no O(pool) work per query
                tries += 1
                j = int(rng.integers(len(pool)))
                if pool[j].strip() not in avoid:
                    chosen.append(j)
                    avoid.add(pool[j].strip())
                    counts.backfilled += 1
            if len(chosen) < count:  # a pool that is mostly banned texts: scan it once
                for j in rng.permutation(len(pool)).tolist():
                    if len(chosen) >= count:
                        break
                    if pool[j].strip() not in avoid:
                        chosen.append(j)
                        avoid.add(pool[j].strip())
                        counts.backfilled += 1
        if len(chosen) < count:
            counts.short += 1
    return chosen
