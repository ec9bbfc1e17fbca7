"""Devices, precision, and the one multi-device pool shared by every encoder and reranker.

The pool starts one process per device once (not per call), each holding its own copy of
the model on its device, and keeps them until :meth:`DevicePool.close`.
"""

from __future__ import annotations

import logging
import queue
import traceback
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.multiprocessing as mp

from trine.errors import UserError
from trine.partition import contiguous_bounds

logger = logging.getLogger(__name__)

# Padded-token budget per batch on CPU under max_tokens_per_batch="auto": small batches keep the
# activations in cache; benchmarks/encode.py measured 4096 fastest among 4096-32768 (2 cores).
CPU_TOKENS_PER_BATCH = 4096


def check_positive_int(name: str, value: Any) -> int:
    """``value`` if it is a positive int (0 is never taken to mean "the default"); else ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


DEFAULT_MAX_LENGTH = 512


def check_max_length(name: str, value: Any, limit: int | None) -> int:
    """A token length: a positive int, at most the model's ``limit`` positions (when it has one).
    ``None`` (not given) is 512, or the model's positions when it has fewer."""
    if value is None:
        return DEFAULT_MAX_LENGTH if limit is None else min(DEFAULT_MAX_LENGTH, limit)
    value = check_positive_int(name, value)
    if limit is not None and value > limit:
        raise ValueError(f"{name} {value} is more than the model's {limit} positions")
    return value


def check_token_budget(value: Any) -> None:
    if not (value in (None, "auto") or (isinstance(value, int) and not isinstance(value, bool) and value > 0)):
        raise ValueError(f"max_tokens_per_batch: a positive int, 'auto' or None, not {value!r}")


def resolve_devices(devices: str | int | Sequence[str | int] | None) -> list[str]:
    """``None`` means one device: ``cuda:0`` when CUDA is present, else ``cpu``."""
    if devices is None:
        return ["cuda:0" if torch.cuda.is_available() else "cpu"]
    items = [devices] if isinstance(devices, (str, int)) else list(devices)
    if not items:
        raise ValueError("devices is an empty list")
    out = []
    for d in items:
        if isinstance(d, bool) or not isinstance(d, (str, int)):
            raise ValueError(f"a device is a string like 'cpu' or 'cuda:0', or a CUDA index; got {d!r}")
        name = f"cuda:{d}" if isinstance(d, int) else d
        try:
            torch.device(name)
        except RuntimeError as err:
            raise ValueError(f"unknown device {name!r}: {err}") from err
        if name.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device {name!r} asked for, but CUDA is not available")
        out.append(name)
    return out


def resolve_dtype(use_fp16: bool, use_bf16: bool) -> torch.dtype:
    if use_fp16 and use_bf16:
        raise ValueError("use_fp16 and use_bf16 are exclusive")
    return torch.float16 if use_fp16 else torch.bfloat16 if use_bf16 else torch.float32


def _worker(owner: Any, device: str, tasks: mp.Queue, results: mp.Queue) -> None:
    owner._move_to(device)
    while True:
        task = tasks.get()
        if task is None:
            return
        chunk_id, method, items, kwargs = task
        try:
            results.put((chunk_id, True, getattr(owner, method)(items, device=device, **kwargs)))
        except UserError as err:  # a refusal (a non-finite output): the parent raises it as it is, exit code 2
            results.put((chunk_id, False, err))
        except BaseException:  # report, the parent raises
            results.put((chunk_id, False, traceback.format_exc()))


class DevicePool:
    """Split work over several devices; results come back in input order."""

    def __init__(self, owner: Any, devices: Sequence[str]):
        ctx = mp.get_context("spawn")
        self.devices = list(devices)
        self.tasks: mp.Queue = ctx.Queue()
        self.results: mp.Queue = ctx.Queue()
        self.processes = []
        for device in self.devices:
            p = ctx.Process(target=_worker, args=(owner, device, self.tasks, self.results), daemon=True)
            p.start()
            self.processes.append(p)
        logger.info("started a device pool on %s", ", ".join(self.devices))

    def map(self, method: str, items: Sequence[Any], chunks_per_device: int = 1, **kwargs: Any) -> list[Any]:
        """Run ``owner.method(chunk, device=..., **kwargs)`` on contiguous chunks of ``items``."""
        n_chunks = max(1, min(len(items), len(self.devices) * chunks_per_device))
        chunks = [items[start:end] for start, end in contiguous_bounds(len(items), n_chunks) if end > start]
        for cid, chunk in enumerate(chunks):
            self.tasks.put((cid, method, list(chunk), kwargs))
        out: list[Any] = [None] * len(chunks)
        for _ in chunks:
            while True:
                try:
                    cid, ok, value = self.results.get(timeout=5)
                    break
                except queue.Empty:
                    dead = [p for p in self.processes if not p.is_alive()]
                    if dead:
                        self.close()
                        raise RuntimeError(f"a device-pool worker died (exit code {dead[0].exitcode})") from None
            if not ok:
                self.close()
                if isinstance(value, UserError):
                    raise value
                raise RuntimeError(f"device-pool worker failed:\n{value}")
            out[cid] = value
        return out

    def close(self) -> None:
        for p in self.processes:
            if p.is_alive():
                self.tasks.put(None)
        for p in self.processes:
            p.join(timeout=30)
            if p.is_alive():
                p.terminate()
        self.processes = []


class DeviceRunner:
    """What every encoder and reranker shares: its devices, moving the model, and running a method
    on one device or over the pool. Subclasses set ``devices``, ``dtype``, ``model`` and ``_pool``."""

    devices: list[str]
    dtype: torch.dtype
    model: torch.nn.Module
    _pool: DevicePool | None = None

    def _move_to(self, device: str) -> None:
        self.model.to(device=device, dtype=self.dtype)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_pool"] = None
        return state

    def close(self) -> None:
        """Stop the device pool, if one was started."""
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass

    def _run(self, method: str, items: list[Any], **kwargs: Any) -> list[Any]:
        """Run ``method`` on one device, or on chunks over the device pool; a list of chunk results.

        With several devices the model lives only in the pool's processes (this process keeps
        its CPU copy for pickling), so even one item goes through the pool.
        """
        if len(self.devices) == 1:
            return [getattr(self, method)(items, device=self.devices[0], **kwargs)]
        if self._pool is None:
            self._pool = DevicePool(self, self.devices)
        return self._pool.map(method, items, **kwargs)

    def _max_tokens(self, device: str) -> int | None:
        """The padded-token budget of a batch on ``device`` (``"auto"``: a budget on CPU only)."""
        budget = getattr(self, "max_tokens_per_batch", None)
        if budget == "auto":
            return CPU_TOKENS_PER_BATCH if torch.device(device).type == "cpu" else None
        return budget
