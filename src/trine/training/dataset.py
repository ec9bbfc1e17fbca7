"""The epoch plan: which records form each step's batch on each rank.

A seeded plan shared by every rank (same seed, same epoch -> same plan) cuts the data into
global batches of ``batch_size x world_size``; rank r takes the r-th slice. With
``same_dataset_within_batch`` each global batch comes from one file (and every rank is on that
file at that step), so per-file batch sizes and per-file in-batch-negative switches hold.
Negatives are resampled from each record's pool every epoch.

FlagEmbedding's data options live here too: record types set each batch's group size
(:func:`trine.data.records.type_group_size`) and a ``symmetric_*`` file's default batch size
(:meth:`TrainFile.resolved_batch_size`); ``shuffle_ratio`` shuffles long positives
(:func:`shuffle_text`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from trine.data.reader import DataError
from trine.data.records import Record, TrainFile, type_group_size

LENGTH_WINDOW = 64  # global batches sorted together by length when group_by_length is on


@dataclass
class Example:
    """One query with its sampled group: ``passages[0]`` is the positive."""

    query: str
    passages: list[str]
    teacher_scores: list[float] | None
    prompt: str | None
    kind: str = "normal"  # the record's type (symmetric_sts / symmetric_clustering: passages read as queries)


SHUFFLE_MIN_CHARS = 100  # FlagEmbedding shuffles only texts longer than this many characters


def shuffle_text(text: str, ratio: float, rng: np.random.Generator) -> str:
    """FlagEmbedding's ``shuffle_ratio`` augmentation (``_shuffle_text``): with probability
    ``ratio`` a text longer than 100 characters is cut into three chunks of ``len // 3 + 1``
    characters, shuffled and joined with spaces. (Draws from ``rng`` only when it may shuffle.)"""
    if ratio <= 0 or len(text) <= SHUFFLE_MIN_CHARS or rng.random() >= ratio:
        return text
    size = len(text) // 3 + 1
    chunks = [text[i : i + size] for i in range(0, len(text), size)]
    return " ".join(chunks[i] for i in rng.permutation(len(chunks)))


def sample_group(
    record: Record, group_size: int, rng: np.random.Generator, fill_pool: list[str] | None,
    shuffle_ratio: float = 0.0,
) -> Example:
    """One positive and ``group_size - 1`` negatives from the record's pools (resampled every epoch);
    the positive shuffled by :func:`shuffle_text` (FlagEmbedding shuffles the positive only)."""
    p = int(rng.integers(len(record.pos)))
    passages = [shuffle_text(record.pos[p], shuffle_ratio, rng)]
    scores = [record.pos_scores[p]] if record.pos_scores is not None else None
    need = group_size - 1
    if need:
        if len(record.neg) >= need:
            picks = rng.choice(len(record.neg), size=need, replace=False)
            passages += [record.neg[i] for i in picks]
            if scores is not None and record.neg_scores is not None:
                scores += [record.neg_scores[i] for i in picks]
        else:
            passages += list(record.neg)
            own = set(record.pos) | set(record.neg) | {record.query}
            tries = 0
            while len(passages) < group_size:
                tries += 1
                if not fill_pool or tries > 100 * group_size:
                    raise DataError([f"line {record.line}: neg: too few other passages to fill negatives from"])
                cand = fill_pool[int(rng.integers(len(fill_pool)))]
                if cand not in own:
                    passages.append(cand)
                    own.add(cand)
    return Example(record.query, passages, scores if scores is not None and len(scores) == group_size else None,
                   record.prompt, record.kind)


@dataclass
class PlannedBatch:
    file_index: int
    record_indices: np.ndarray  # the global batch, rank slices taken in __getitem__


class EpochPlanDataset(torch.utils.data.Dataset):
    """Item i of an epoch is this rank's local batch for step i (a list of :class:`Example`)."""

    def __init__(
        self,
        files: list[TrainFile],
        *,
        train_group_size: int,
        default_batch_size: int,
        world_size: int = 1,
        rank: int = 0,
        seed: int = 42,
        same_dataset_within_batch: bool = False,
        group_by_length: bool = False,
        shuffle_ratio: float = 0.0,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.files = files
        self.group_size = train_group_size
        self.world_size = world_size
        self.rank = rank
        self.seed = seed
        self.same_dataset = same_dataset_within_batch
        self.group_by_length = group_by_length
        if not 0.0 <= shuffle_ratio <= 1.0:
            raise ValueError(f"shuffle_ratio must be between 0 and 1, got {shuffle_ratio}")
        self.shuffle_ratio = shuffle_ratio
        if not same_dataset_within_batch:
            if any(f.batch_size is not None for f in files):
                raise ValueError("per-file batch sizes need same_dataset_within_batch (each batch from one file)")
            if len({f.in_batch_negatives for f in files}) > 1:
                raise ValueError("files differ in in_batch_negatives; that needs same_dataset_within_batch")
            typed = [f for f in files if f.kind != "normal"]
            if typed:
                raise ValueError(f"{typed[0].path}: type: {typed[0].kind!r} records need same_dataset_within_batch "
                                 "(a batch is of one type; FlagEmbedding ignores type without it)")
        self.batch_sizes = [f.resolved_batch_size(default_batch_size) for f in files]
        self.fill_pools = [sorted({t for r in f.records for t in (*r.pos, *r.neg)}) for f in files]
        self.epoch = 0
        self._plan = self._make_plan(0)
        if not self._plan:
            raise ValueError(
                "no complete global batch: every file has fewer records than batch_size x world_size "
                f"({[b * world_size for b in self.batch_sizes]})"
            )

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch = epoch
            self._plan = self._make_plan(epoch)

    def _make_plan(self, epoch: int) -> list[PlannedBatch]:
        rng = np.random.default_rng([self.seed, epoch])
        if self.same_dataset:
            groups = [(i, np.arange(len(f.records))) for i, f in enumerate(self.files)]
        else:
            groups = [(-1, np.arange(sum(len(f.records) for f in self.files)))]
        plan = []
        for file_index, idx in groups:
            gbs = self.batch_sizes[max(file_index, 0)] * self.world_size
            idx = rng.permutation(idx)
            idx = idx[: len(idx) // gbs * gbs]
            if self.group_by_length and len(idx):
                window = gbs * LENGTH_WINDOW
                parts = []
                for s in range(0, len(idx), window):
                    chunk = idx[s : s + window]
                    lengths = np.array([self._length(file_index, int(j)) for j in chunk])
                    parts.append(chunk[np.argsort(-lengths, kind="stable")])
                idx = np.concatenate(parts)
            plan += [PlannedBatch(file_index, idx[s : s + gbs]) for s in range(0, len(idx), gbs)]
        order = rng.permutation(len(plan))
        return [plan[i] for i in order]

    def _locate(self, file_index: int, j: int) -> tuple[int, int]:
        if file_index >= 0:
            return file_index, j
        for f_i, f in enumerate(self.files):
            if j < len(f.records):
                return f_i, j
            j -= len(f.records)
        raise IndexError(j)

    def _length(self, file_index: int, j: int) -> int:
        f_i, r_i = self._locate(file_index, j)
        r = self.files[f_i].records[r_i]
        return len(r.query) + max(len(p) for p in r.pos)

    def __len__(self) -> int:
        return len(self._plan)

    @property
    def num_examples(self) -> int:
        """Queries per epoch over all ranks (the plan's items are batches, not examples)."""
        return sum(len(b.record_indices) for b in self._plan)

    def __getitem__(self, step: int) -> dict[str, Any]:
        batch = self._plan[step]
        bs = len(batch.record_indices) // self.world_size
        mine = batch.record_indices[self.rank * bs : (self.rank + 1) * bs]
        group = self.batch_group_size(batch)
        examples: list[Example] = []
        in_batch = True
        for j in mine.tolist():
            f_i, r_i = self._locate(batch.file_index, j)
            in_batch = self.files[f_i].in_batch_negatives
            rng = np.random.default_rng([self.seed, self.epoch, f_i, r_i])
            examples.append(sample_group(self.files[f_i].records[r_i], group, rng, self.fill_pools[f_i],
                                         self.shuffle_ratio))
        return {"examples": examples, "in_batch_negatives": in_batch}

    def batch_group_size(self, batch: PlannedBatch) -> int:
        """The group size of a global batch (the same on every rank): ``train_group_size`` for
        ``normal`` files, else its type's (:func:`type_group_size`). For ``symmetric_class``
        FlagEmbedding takes the first record's negatives on each rank; trine the fewest over the
        global batch (the same when the records have as many negatives each, as label sets do)."""
        if batch.file_index < 0:
            return self.group_size
        file = self.files[batch.file_index]
        if file.kind == "normal":
            return self.group_size
        return min(type_group_size(file.kind, self.group_size, len(file.records[int(j)].neg))
                   for j in batch.record_indices)
