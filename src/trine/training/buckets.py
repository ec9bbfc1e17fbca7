"""`trine split-by-length`: training files cut into length buckets (BGE-M3's efficient batching).

Each record's length is the longest of its query, positives and negatives in tokens; records go
to ``<stem>_len-<lo>-<hi>.jsonl`` by FlagEmbedding's default edges (0, 500, 1000, ... 7000, inf).
With ``same_dataset_within_batch`` every batch then holds texts of similar length, and each
bucket can have its own batch size: the suggestion scales a batch that fits at a reference
length by the memory model (activation memory grows with batch x length, attention with
batch x length^2).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

from trine.data.corpus import list_data_files
from trine.data.reader import DataError, open_text
from trine.data.records import read_file
from trine.io import atomic_folder, check_output_path
from trine.modeling.loading import load_tokenizer, resolve_model

DEFAULT_EDGES = (0, 500, 1000, 2000, 3000, 4000, 5000, 6000, 7000)


@dataclass
class Bucket:
    lo: int
    hi: float
    count: int = 0
    total_tokens: int = 0

    @property
    def name(self) -> str:
        return f"len-{self.lo}-{'inf' if math.isinf(self.hi) else int(self.hi)}"

    @property
    def mean_length(self) -> float:
        return self.total_tokens / self.count if self.count else 0.0


def suggest_batch_size(length: float, reference_batch: int, reference_length: int, attention_share: float = 0.3) -> int:
    """Batch size that keeps activation memory of ``reference_batch`` texts of ``reference_length``.

    Memory per text ~ (1 - a) * L + a * L^2 / L_ref (linear activations plus attention scores,
    ``a`` the share of attention at the reference length).
    """
    if length <= 0:
        return reference_batch
    ratio = (1 - attention_share) * length / reference_length + attention_share * (length / reference_length) ** 2
    return max(1, int(reference_batch / ratio))


def split_by_length(
    inputs: Sequence[str],
    output_dir: str,
    tokenizer_path: str,
    *,
    edges: Sequence[int] = DEFAULT_EDGES,
    reference_batch: int | None = None,
    reference_length: int = 512,
    overwrite: bool = False,
) -> dict[str, list[Bucket]]:
    """Write the buckets of every input file into ``output_dir`` (atomically; never an input or a
    folder holding one; an existing folder only with ``overwrite``: :func:`trine.io.atomic_folder`)."""
    if list(edges) != sorted(set(edges)) or edges[0] != 0:
        raise ValueError(f"edges must increase from 0, got {list(edges)}")
    files = list_data_files(list(inputs))
    sources = [*inputs, *files]
    check_output_path(output_dir, inputs=sources, overwrite=overwrite)
    # a folder, or a Hub id fetched into the Hugging Face cache (a typo'd path is an error naming it, not a Hub id)
    tokenizer = load_tokenizer(resolve_model(tokenizer_path, what="tokenizer"))
    problems: list[str] = []
    parsed = {}
    for f in files:
        seen = len(problems)
        parsed[f] = read_file(f, problems)[0]
        if not parsed[f] and len(problems) == seen:
            problems.append(f"{f}: no records")
    if problems:
        raise DataError(problems)
    report: dict[str, list[Bucket]] = {}
    with atomic_folder(output_dir, inputs=sources, overwrite=overwrite) as tmp:
        for path, records in parsed.items():
            stem = os.path.splitext(os.path.basename(path))[0]
            buckets = [Bucket(lo, hi) for lo, hi in zip(edges, [*edges[1:], math.inf])]
            handles: dict[int, object] = {}
            with open_text(path) as src:  # validated above: UTF-8 (a byte-order mark is skipped)
                lines = [line for line in src if line.strip()]
            for record, line in zip(records, lines):
                texts = [record.query, *record.pos, *record.neg]
                lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=True)["input_ids"]]
                longest = max(lengths)
                b = next(i for i, bucket in enumerate(buckets) if bucket.lo <= longest < bucket.hi)
                buckets[b].count += 1
                buckets[b].total_tokens += longest
                if b not in handles:
                    handles[b] = open(os.path.join(tmp, f"{stem}_{buckets[b].name}.jsonl"), "w", encoding="utf-8")
                handles[b].write(line if line.endswith("\n") else line + "\n")
            for h in handles.values():
                h.close()
            report[path] = [b for b in buckets if b.count]
        with open(os.path.join(tmp, ".split_log.json"), "w") as f:
            json.dump({
                path: [{"file": f"{os.path.splitext(os.path.basename(path))[0]}_{b.name}.jsonl", "count": b.count,
                        "mean_length": round(b.mean_length, 1),
                        **({"suggested_batch_size": suggest_batch_size(b.mean_length, reference_batch,
                                                                      reference_length)}
                           if reference_batch else {})}
                       for b in buckets]
                for path, buckets in report.items()
            }, f, indent=2)
    return report
