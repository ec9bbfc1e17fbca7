"""`trine mine`: hard negatives for a training file from a dense index over a candidate pool.

For each record: search the pool (exact inner product by default) for the query (with its
instruction), take the candidates ranked in ``range_for_sampling`` (0-based, end exclusive, as
FlagEmbedding's ``2-100``), drop positives, the query itself and duplicates, optionally drop
likely false negatives (score above ``(1 - relative_margin) x`` the lowest positive score), and
sample ``negative_number`` of what remains. Queries are searched in batches, so memory is the
pool's embeddings plus one batch of results, never a queries x pool matrix.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from trine.retrieval.dense import DenseIndex
from trine.training.data import DataError, Record, read_file

logger = logging.getLogger(__name__)

BACKFILL = ("random", "none", "error")


@dataclass
class MiningSummary:
    records: int = 0
    pool: int = 0
    dropped_as_positive_or_query: int = 0
    dropped_by_margin: int = 0
    backfilled: int = 0
    short: int = 0
    positive_scores: list[float] = field(default_factory=list)
    negative_scores: list[float] = field(default_factory=list)

    def lines(self) -> list[str]:
        def dist(xs: list[float]) -> str:
            if not xs:
                return "none"
            p = np.percentile(xs, [5, 50, 95])
            return f"p5 {p[0]:.3f}  median {p[1]:.3f}  p95 {p[2]:.3f}"

        return [
            f"records {self.records}, candidate pool {self.pool}",
            f"candidates dropped as a positive, the query or a duplicate: {self.dropped_as_positive_or_query}",
            f"candidates dropped by the relative margin (likely false negatives): {self.dropped_by_margin}",
            f"negatives back-filled at random: {self.backfilled}; records left short: {self.short}",
            f"positive scores: {dist(self.positive_scores)}",
            f"mined negative scores: {dist(self.negative_scores)}",
        ]


def parse_range(text: str) -> tuple[int, int]:
    try:
        lo, hi = (int(x) for x in text.split("-"))
    except ValueError:
        raise ValueError(f"range_for_sampling must look like 2-100, got {text!r}") from None
    if not 0 <= lo < hi:
        raise ValueError(f"range_for_sampling needs 0 <= start < end, got {text!r}")
    return lo, hi


def read_pool(path: str) -> list[str]:
    """A candidate pool: JSONL of {"text": str}; problems reported as file:line: field."""
    texts, problems = [], []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                problems.append(f"{path}:{number}: (line): not valid JSON: {err.msg}")
                continue
            text = obj.get("text") if isinstance(obj, dict) else None
            if not isinstance(text, str) or not text.strip():
                problems.append(f"{path}:{number}: text: missing or not a non-empty string")
                continue
            texts.append(text)
    if problems:
        raise DataError(problems)
    return texts


def mine_hard_negatives(
    input_file: str,
    output_file: str,
    embedder,  # trine.Embedder or trine.M3Embedder (dense vectors are used)
    *,
    candidate_pool: str | None = None,
    range_for_sampling: tuple[int, int] = (2, 100),
    negative_number: int = 15,
    relative_margin: float | None = None,
    backfill: str = "random",
    search_batch_size: int = 256,
    seed: int = 42,
) -> MiningSummary:
    """Write ``output_file`` (atomically; never the input) with mined ``neg`` lists."""
    if os.path.abspath(input_file) == os.path.abspath(output_file):
        raise ValueError(f"{output_file}: the output would overwrite the input; choose another output_file")
    if backfill not in BACKFILL:
        raise ValueError(f"backfill must be one of {BACKFILL}, got {backfill!r}")
    if negative_number < 1:
        raise ValueError(f"negative_number must be positive, got {negative_number}")
    if relative_margin is not None and not 0 <= relative_margin < 1:
        raise ValueError(f"relative_margin must be in [0, 1), got {relative_margin}")
    lo, hi = range_for_sampling
    problems: list[str] = []
    records = read_file(input_file, problems)[0]
    if problems:
        raise DataError(problems)
    with open(input_file, encoding="utf-8") as f:
        raw = [json.loads(line) for line in f if line.strip()]
    if candidate_pool is not None:
        pool = list(dict.fromkeys(read_pool(candidate_pool)))
    else:
        pool = list(dict.fromkeys(t for r in records for t in (*r.pos, *r.neg)))
    summary = MiningSummary(records=len(records), pool=len(pool))
    position = {t: i for i, t in enumerate(pool)}
    corpus = _dense(embedder.encode_corpus(pool))
    queries = _dense(embedder.encode_queries([r.query for r in records]))
    missing_pos = [t for r in records for t in r.pos if t not in position]
    pos_vecs = dict(zip(missing_pos, _dense(embedder.encode_corpus(missing_pos)))) if missing_pos else {}
    index = DenseIndex.build(corpus)
    depth = min(hi, len(pool))
    out_rows = []
    for start in range(0, len(records), search_batch_size):
        batch = records[start : start + search_batch_size]
        result = index.search(queries[start : start + len(batch)], depth)
        for offset, (record, rows, scores) in enumerate(zip(batch, result.rows, result.scores)):
            i = start + offset
            q = queries[i]
            pos_scores = [float(corpus[position[t]] @ q) if t in position else float(pos_vecs[t] @ q)
                          for t in record.pos]
            summary.positive_scores += pos_scores
            ceiling = None if relative_margin is None else (1 - relative_margin) * min(pos_scores)
            negatives = _pick(record, pool, rows[lo:depth], scores[lo:depth], ceiling, negative_number,
                              np.random.default_rng([seed, i]), summary, backfill)
            summary.negative_scores += [float(corpus[position[t]] @ q) for t in negatives]
            row = dict(raw[i])
            row["neg"] = negatives
            row.pop("neg_scores", None)  # scores of the old negatives no longer apply
            out_rows.append(row)
    tmp = output_file + ".tmp"
    os.makedirs(os.path.dirname(os.path.abspath(output_file)), exist_ok=True)
    with open(tmp, "w", encoding="utf-8") as f:
        for row in out_rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, output_file)
    return summary


def _dense(encoded) -> np.ndarray:
    vecs = encoded["dense_vecs"] if isinstance(encoded, dict) else encoded
    return np.asarray(vecs, dtype=np.float32)


def _pick(record: Record, pool: Sequence[str], rows: np.ndarray, scores: np.ndarray, ceiling: float | None,
          count: int, rng: np.random.Generator, summary: MiningSummary, backfill: str) -> list[str]:
    banned = {t.strip() for t in (*record.pos, record.query)}
    candidates, seen = [], set()
    for row, score in zip(rows.tolist(), scores.tolist()):
        if row < 0:
            continue
        text = pool[row]
        if text.strip() in banned or text in seen:
            summary.dropped_as_positive_or_query += 1
            continue
        if ceiling is not None and score > ceiling:
            summary.dropped_by_margin += 1
            continue
        candidates.append(text)
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
            avoid = banned | set(chosen)
            order = rng.permutation(len(pool))
            for j in order.tolist():
                if len(chosen) >= count:
                    break
                if pool[j].strip() not in avoid:
                    chosen.append(pool[j])
                    avoid.add(pool[j].strip())
                    summary.backfilled += 1
        if len(chosen) < count:
            summary.short += 1
    return chosen
