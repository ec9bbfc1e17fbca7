"""The one batching routine: tokenise once, sort by length, run batches, restore the order.

Batch size backs off (halves) on a real out-of-memory error only; any other error propagates.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from trine.progress import bar as progress_bar

logger = logging.getLogger(__name__)


def is_out_of_memory(err: BaseException) -> bool:
    """True only for allocation failures (CUDA, MPS or the CPU allocator)."""
    if isinstance(err, torch.OutOfMemoryError):
        return True
    if isinstance(err, RuntimeError):
        msg = str(err)
        return "out of memory" in msg.lower() or "can't allocate memory" in msg or "DefaultCPUAllocator" in msg
    return False


def mcls_content_budget(max_length: int, interval: int) -> int:
    """Largest content length c with c + ceil(c / interval) + 1 <= max_length (CLS per chunk + SEP)."""
    c = max_length - 2
    while c > 0 and c + math.ceil(c / interval) + 1 > max_length:
        c -= 1
    return max(c, 0)


def insert_mcls(ids: list[int], cls_id: int, interval: int, max_length: int) -> list[int]:
    """[CLS] t1..tn [SEP] -> [CLS] t1..t_k [CLS] t_k+1..t_2k ... [SEP], at most ``max_length`` long."""
    if len(ids) < 2 or ids[0] != cls_id:
        raise ValueError("MCLS needs a tokenizer that starts every text with its CLS token")
    content = ids[1:-1][: mcls_content_budget(max_length, interval)]
    out = []
    for start in range(0, max(len(content), 1), interval):
        out.append(cls_id)
        out.extend(content[start : start + interval])
    out.append(ids[-1])
    return out


def tokenize(
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    max_length: int,
    mcls_interval: int | None = None,
) -> list[list[int]]:
    """Token ids per text (no padding), truncated to ``max_length`` (MCLS tokens included)."""
    if mcls_interval is None:
        enc = tokenizer(list(texts), truncation=True, max_length=max_length, return_attention_mask=False,
                        return_token_type_ids=False)
        return enc["input_ids"]
    enc = tokenizer(list(texts), truncation=False, return_attention_mask=False, return_token_type_ids=False,
                    verbose=False)
    cls_id = tokenizer.cls_token_id
    return [insert_mcls(ids, cls_id, mcls_interval, max_length) for ids in enc["input_ids"]]


def pad_batch(
    seqs: Sequence[Sequence[int]],
    pad_id: int,
    device: torch.device | str,
    cls_id: int | None = None,
    token_types: Sequence[Sequence[int]] | None = None,
    pad_to_multiple_of: int | None = None,
) -> dict[str, torch.Tensor]:
    """Right-pad token id lists into ``input_ids``/``attention_mask`` (and ``cls_mask`` for MCLS,
    ``token_type_ids`` for pairs when ``token_types`` are given; padding gets type 0)."""
    if len(seqs) == 0:
        raise ValueError("pad_batch needs at least one sequence")
    width = max(len(s) for s in seqs)
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    ids = np.full((len(seqs), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(seqs), width), dtype=np.int64)
    types = np.zeros((len(seqs), width), dtype=np.int64) if token_types is not None else None
    for row, s in enumerate(seqs):
        ids[row, : len(s)] = s
        mask[row, : len(s)] = 1
        if types is not None:
            types[row, : len(s)] = token_types[row]
    batch = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)}
    if types is not None:
        batch["token_type_ids"] = torch.from_numpy(types)
    if cls_id is not None:
        batch["cls_mask"] = batch["input_ids"] == cls_id
    return {k: v.to(device) for k, v in batch.items()}


def run_batched(
    lengths: Sequence[int],
    batch_size: int,
    run: Callable[[np.ndarray], list[Any]],
    *,
    max_tokens: int | None = None,
    desc: str = "encode",
    show_progress: bool = True,
) -> list[Any]:
    """Call ``run(indices)`` on length-sorted batches; return its per-item results in input order.

    On out-of-memory the failing batch is retried at half the size, and the smaller size is
    kept for the rest of the run.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, (int, np.integer))
                                   or max_tokens < 1):
        raise ValueError(f"max_tokens must be a positive integer or None, got {max_tokens!r}")
    n = len(lengths)
    results: list[Any] = [None] * n
    order = np.argsort(-np.asarray(lengths, dtype=np.int64), kind="stable")
    pos = 0
    bar = progress_bar(total=n, desc=desc, disable=not show_progress or n == 0, leave=False)
    while pos < n:
        size = batch_size
        if max_tokens is not None:
            size = max(1, min(size, max_tokens // max(int(lengths[order[pos]]), 1)))
        idx = order[pos : pos + size]
        try:
            out = run(idx)
        except (RuntimeError, torch.OutOfMemoryError) as err:
            if not is_out_of_memory(err) or size == 1:
                raise
            batch_size = max(1, size // 2)
            if max_tokens is not None:
                max_tokens = max(1, max_tokens // 2)
            logger.warning("out of memory at batch size %d; retrying with %d", size, batch_size)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            continue
        if len(out) != len(idx):
            raise AssertionError(f"batch function returned {len(out)} results for {len(idx)} inputs")
        for i, r in zip(idx.tolist(), out):
            results[i] = r
        pos += len(idx)
        bar.update(len(idx))
    bar.close()
    return results
