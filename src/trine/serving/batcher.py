"""Dynamic batching: concurrent requests merged into one call of the one encoder.

Requests wait in a bounded queue; one worker task takes the first, then more for at most
``max_wait_ms`` while the batch stays within ``max_batch_texts`` texts and ``max_batch_tokens`` tokens
(the requests' token counts after truncation, which the routes measured when they checked the texts;
a request over the budget on its own still goes, alone), and encodes all their texts with one
:meth:`trine.inference.Encoder.encode_result` call per set of encode options (kind, instruction,
maximum length) in the model thread, so the encoder's own batching routine (length-sorted batches,
token budget, out-of-memory back-off, device pool) does the work. Each request gets its rows back.
A full queue raises :class:`Overloaded` at once (the routes answer 429), never waiting.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import logging
import threading
from collections.abc import Iterable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

from trine.inference import Encoder, EncodeResult
from trine.inference.result import check_outputs

logger = logging.getLogger(__name__)


class Overloaded(Exception):
    """The queue is full: the request was not accepted."""


class Waiting:
    """The count of requests admitted and not yet taken up by the model (being read, tokenised, or queued):
    what ``max_queue`` bounds. Thread-safe: a ticket may be released in the model thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.count = 0

    def admit(self, limit: int) -> Ticket:
        with self._lock:
            if self.count >= limit:
                raise Overloaded(f"{self.count} requests are waiting (--max-queue {limit})")
            self.count += 1
        return Ticket(self)

    def _release(self) -> None:
        with self._lock:
            self.count -= 1


class Ticket:
    """One admitted request's place among the waiting: released once, when the model takes the request up (the
    batcher's worker takes its job, the model thread starts its call) or when the request ends, whichever is
    first."""

    def __init__(self, waiting: Waiting):
        self._waiting: Waiting | None = waiting

    def release(self) -> None:
        waiting, self._waiting = self._waiting, None
        if waiting is not None:
            waiting._release()


#: the ticket of the request being served in this task (set by the server's admission middleware)
current_ticket: contextvars.ContextVar[Ticket | None] = contextvars.ContextVar("trine_ticket", default=None)


@dataclass
class _Job:
    texts: list[str]
    tokens: int
    outputs: tuple[str, ...]
    options: tuple[Any, ...]  # (kind, instruction, instruction_format, max_length): one encode call per value
    future: asyncio.Future = field(repr=False)
    ticket: Ticket | None = field(default=None, repr=False)


class Batcher:
    """The queue and its worker (start it inside the server's event loop with :meth:`start`)."""

    def __init__(self, encoder: Encoder, executor: Executor, *, max_batch_texts: int, max_batch_tokens: int,
                 max_wait_ms: float, max_queue: int, on_batch: Any = None):
        self.encoder = encoder
        self.executor = executor
        self.max_batch_texts = max_batch_texts
        self.max_batch_tokens = max_batch_tokens
        self.max_wait_s = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self.on_batch = on_batch  # called with the texts and tokens of each encoder call
        self._jobs: collections.deque[_Job] = collections.deque()
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None

    @property
    def depth(self) -> int:
        """Requests waiting (not yet taken by the worker)."""
        return len(self._jobs)

    def start(self) -> None:
        self._wakeup = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="trine-batcher")

    async def stop(self) -> None:
        """Finish what was accepted, then stop the worker."""
        while self._jobs:
            await asyncio.sleep(0.01)
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    async def encode(self, texts: list[str], outputs: Iterable[str], *, tokens: int, kind: str | None = None,
                     instruction: str | None = None, instruction_format: str = "{}{}",
                     max_length: int | None = None) -> EncodeResult:
        """``encode_result(texts, outputs, ...)`` of these texts, computed together with other waiting requests';
        ``tokens``: what the texts count (after instruction and truncation), for the batch's token budget."""
        if self._wakeup is None:
            raise RuntimeError("the batcher was not started")
        if len(self._jobs) >= self.max_queue:
            raise Overloaded(f"{len(self._jobs)} requests are waiting (--max-queue {self.max_queue})")
        job = _Job(list(texts), int(tokens), check_outputs(outputs),
                   (kind, instruction, instruction_format, max_length), asyncio.get_running_loop().create_future(),
                   current_ticket.get())
        self._jobs.append(job)
        self._wakeup.set()
        return await job.future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._wakeup is not None
        while True:
            while not self._jobs:
                self._wakeup.clear()
                await self._wakeup.wait()
            batch = [self._take()]
            n, tokens = len(batch[0].texts), batch[0].tokens
            deadline = loop.time() + self.max_wait_s
            while n < self.max_batch_texts and tokens < self.max_batch_tokens:
                if self._jobs:
                    head = self._jobs[0]
                    if n + len(head.texts) > self.max_batch_texts or tokens + head.tokens > self.max_batch_tokens:
                        break  # it starts the next batch
                    batch.append(self._take())
                    n += len(head.texts)
                    tokens += head.tokens
                    continue
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), remaining)
                except asyncio.TimeoutError:
                    break
            await self._encode_batch(batch)

    def _take(self) -> _Job:
        job = self._jobs.popleft()
        if job.ticket is not None:
            job.ticket.release()
        return job

    async def _encode_batch(self, batch: list[_Job]) -> None:
        groups: dict[tuple[Any, ...], list[_Job]] = {}
        for job in batch:
            if not job.future.cancelled():
                groups.setdefault(job.options, []).append(job)
        for (kind, instruction, instruction_format, max_length), jobs in groups.items():
            texts = [t for job in jobs for t in job.texts]
            outputs = check_outputs({o for job in jobs for o in job.outputs})
            if self.on_batch is not None:
                self.on_batch(len(texts), sum(job.tokens for job in jobs))

            def run(texts: list[str] = texts, outputs: tuple[str, ...] = outputs, kind: Any = kind,
                    instruction: Any = instruction, instruction_format: Any = instruction_format,
                    max_length: Any = max_length) -> EncodeResult:
                return self.encoder.encode_result(texts, outputs, kind=kind, instruction=instruction,
                                                  instruction_format=instruction_format, max_length=max_length)

            try:
                result = await asyncio.get_running_loop().run_in_executor(self.executor, run)
            except Exception as err:  # every waiting request gets the error; the worker goes on
                logger.exception("encoding a batch of %d texts failed", len(texts))
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(err)
                continue
            rows = result.rows()
            start = 0
            for job in jobs:
                part = rows[start : start + len(job.texts)]
                start += len(job.texts)
                if not job.future.done():
                    job.future.set_result(EncodeResult.from_rows(part, job.outputs, self.encoder.model.hidden_size))
