"""The pre-training corpus: checked whole in one streaming pass, then streamed in batches per rank."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
from torch.utils.data import IterableDataset, get_worker_info

from trine.data.corpus import iter_texts as corpus_texts
from trine.data.corpus import scan_texts
from trine.data.reader import DataError

TEXT_FIELDS = {"text"}
RECORD_NAME = "pre-training record"


def iter_texts(path: str) -> Iterator[str]:
    """The texts of one corpus file, read line by line; a bad line raises :class:`DataError`."""
    return corpus_texts(path, allowed_fields=TEXT_FIELDS, record_name=RECORD_NAME)


def scan_corpus(paths: list[str]) -> tuple[list[str], int]:
    """Check every line of every file in one streaming pass; return the files and the number of texts.
    Raises :class:`DataError` listing every problem."""
    return scan_texts(paths, allowed_fields=TEXT_FIELDS, record_name=RECORD_NAME)


class TextStream(IterableDataset):
    """Batches of texts streamed from JSONL files; one item is one batch of this rank.

    Rank ``r`` of ``W`` takes records ``r, r + W, ...`` (in file order), shuffles them through a
    buffer of ``shuffle_buffer_size`` texts (seeded by seed, epoch and rank) and yields
    ``num_records // (batch_size * W)`` batches per epoch, the same number on every rank. With
    DataLoader workers, worker ``k`` of ``K`` yields batches ``k, k + K, ...`` (the DataLoader
    interleaves them back into order).
    """

    def __init__(self, files: list[str], num_records: int, *, batch_size: int, world_size: int = 1, rank: int = 0,
                 seed: int = 0, shuffle_buffer_size: int = 10000):
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.files = list(files)
        self.num_records = num_records
        self.batch_size = batch_size
        self.world_size = world_size
        self.rank = rank
        self.seed = seed
        self.shuffle_buffer_size = shuffle_buffer_size
        self.batches_per_epoch = num_records // (batch_size * world_size)
        if self.batches_per_epoch == 0:
            raise DataError([f"{len(self.files)} file(s) hold {num_records} texts: fewer than one global batch "
                             f"({batch_size} x {world_size} processes)"])
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.batches_per_epoch

    @property
    def num_examples(self) -> int:
        """Texts per epoch over all ranks."""
        return self.batches_per_epoch * self.batch_size * self.world_size

    def _rank_texts(self) -> Iterator[str]:
        index = 0
        for path in self.files:
            for text in iter_texts(path):
                if index % self.world_size == self.rank:
                    yield text
                index += 1

    def _shuffled(self, texts: Iterator[str], rng: np.random.Generator) -> Iterator[str]:
        size = self.shuffle_buffer_size
        if size <= 1:
            yield from texts
            return
        buffer: list[str] = []
        for text in texts:
            if len(buffer) < size:
                buffer.append(text)
                continue
            i = int(rng.integers(size))
            yield buffer[i]
            buffer[i] = text
        for i in rng.permutation(len(buffer)):
            yield buffer[i]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        rng = np.random.default_rng([self.seed, self.epoch, self.rank])
        batch: list[str] = []
        number = 0
        for text in self._shuffled(self._rank_texts(), rng):
            batch.append(text)
            if len(batch) < self.batch_size:
                continue
            if number % workers == worker:
                yield {"epoch": self.epoch, "rank": self.rank, "batch": number, "texts": batch}
            number += 1
            batch = []
            if number == self.batches_per_epoch:
                return
