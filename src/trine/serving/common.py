"""What every route shares: the settings, the server's state (one encoder, reranker, retriever, batcher),
the API error, and the checks of the texts a request sends (count, emptiness, length)."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from trine.inference import Encoder, Reranker
from trine.modeling.fusion import DEFAULT_WEIGHTS, FusionSettings
from trine.retrieval import HybridRetriever
from trine.serving.batcher import Batcher, Overloaded
from trine.serving.metrics import ServerMetrics


@dataclass
class ServeSettings:
    """The server's limits and defaults (``trine serve``'s options).

    ``max_batch_texts`` / ``max_batch_tokens`` / ``max_wait_ms``: the dynamic batcher merges waiting requests
    into one encoder call of at most that many texts and tokens (text-embeddings-inference's
    ``--max-batch-tokens``; a single request above it is encoded alone), waiting at most that long for more
    after the first (the encoder then splits the call into its own length-sorted, padded-token-budgeted batches);
    ``max_queue``: requests waiting for the encoder beyond which a request gets 429;
    ``max_texts_per_request``: more texts in one request get 413; ``truncate``: a text longer than the
    model's maximum length is cut (True) or refused with 413 (False), unless a request says otherwise;
    ``colbert_rerank_k``: dense candidates of ``/search`` mode colbert; ``reranker_top_k``: candidates the reranker
    scores in ``/search`` with ``rerank: true`` (unless the request sends ``rerank_top_k``).
    """

    model_name: str = "trine"
    api_key: str | None = None
    max_batch_texts: int = 64
    max_batch_tokens: int = 16384
    max_wait_ms: float = 5.0
    max_queue: int = 256
    max_texts_per_request: int = 256
    truncate: bool = True
    retry_after_s: int = 1
    colbert_rerank_k: int = 100
    reranker_top_k: int = 100
    fusion: FusionSettings = field(default_factory=FusionSettings)

    def __post_init__(self) -> None:
        for name in ("max_batch_texts", "max_batch_tokens", "max_queue", "max_texts_per_request", "retry_after_s",
                     "colbert_rerank_k", "reranker_top_k"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.max_wait_ms, (int, float)) or self.max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be a number >= 0, got {self.max_wait_ms!r}")
        if self.api_key is not None and not self.api_key:
            raise ValueError("api_key may not be empty (leave it unset for an open server)")

    def fusion_weights(self, mode: str) -> list[float]:
        return list(self.fusion.weights.get(mode, DEFAULT_WEIGHTS[mode]))


class ApiError(Exception):
    """A request the server refuses: the HTTP status, a message, the body field it is about."""

    def __init__(self, status: int, message: str, field: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.field = field
        self.headers = headers or {}


@dataclass
class ServerState:
    """Everything one app serves from: built once by :func:`trine.serving.create_app`."""

    embedder: Encoder
    reranker: Reranker | None
    retriever: HybridRetriever | None
    settings: ServeSettings
    executor: ThreadPoolExecutor
    metrics: ServerMetrics
    batcher: Batcher
    documents: list[str] | None = None  # the index's document texts, by row (what /search's reranker reads)
    direct_waiting: int = 0  # model calls outside the batcher (rerank, search) admitted and not finished

    @contextlib.asynccontextmanager
    async def admit(self) -> AsyncIterator[None]:
        """A model call outside the batcher, refused (:class:`Overloaded`, 429) when as many requests as the
        queue holds are already waiting."""
        waiting = self.direct_waiting + self.batcher.depth
        if waiting >= self.settings.max_queue:
            raise Overloaded(f"{waiting} requests are waiting (--max-queue {self.settings.max_queue})")
        self.direct_waiting += 1
        try:
            yield
        finally:
            self.direct_waiting -= 1

    @property
    def tokenizer(self) -> Any:
        return self.embedder.tokenizer

    def max_length(self, kind: str | None) -> int:
        return self.embedder.query_max_length if kind == "query" else self.embedder.passage_max_length

    def instruction_for(self, kind: str | None, instruction: str | None, instruction_format: str) -> tuple[str | None,
                                                                                                            str]:
        if kind is None:
            return instruction, instruction_format
        return (getattr(self.embedder, f"{kind}_instruction_for_retrieval"),
                getattr(self.embedder, f"{kind}_instruction_format"))

    def token_counts(self, texts: list[str]) -> list[int]:
        enc = self.tokenizer(texts, truncation=False, return_attention_mask=False, return_token_type_ids=False,
                             verbose=False)
        return [len(ids) for ids in enc["input_ids"]]

    def need_outputs(self, outputs: Sequence[str], field: str) -> None:
        missing = [o for o in outputs if o not in self.embedder.outputs]
        if missing:
            raise ApiError(400, f"{field}: this model has no {' or '.join(missing)} output (it was loaded without "
                                "its BGE-M3 heads)", field)


def load_documents(path: str | os.PathLike, ids: Sequence[str]) -> list[str]:
    """The texts of the documents ``ids`` (an index's rows, in order) from a BEIR ``corpus.jsonl`` (``_id``,
    optional ``title``, ``text``; the text as ``trine eval`` encodes it: title, a space, text); an id the file
    lacks is an error naming it."""
    from trine.evaluation.data import RetrievalDataset, _load_corpus

    corpus_ids, texts = RetrievalDataset(_load_corpus(os.fspath(path), "_id"), {}, {}).passages()
    by_id = dict(zip(corpus_ids, texts))
    missing = [i for i in ids if i not in by_id]
    if missing:
        raise ValueError(f"{os.fspath(path)}: no document with _id {missing[0]!r} (of {len(missing)} of the index's "
                         f"{len(ids)} documents missing)")
    return [by_id[i] for i in ids]


def state_of(request: Request) -> ServerState:
    return request.app.state.trine


@dataclass
class Texts:
    """A request's texts after the checks: as sent, and the tokens they count (after truncation)."""

    texts: list[str]
    tokens: int


async def check_texts(state: ServerState, value: str | list[str], field: str, *, kind: str | None = None,
                      instruction: str | None = None, instruction_format: str = "{}{}",
                      truncate: bool | None = None, max_length: int | None = None) -> Texts:
    """``value`` (one string or a list) as a list, refused with 400 when empty (or holding an empty
    text), 413 when longer than ``max_texts_per_request`` or, without truncation, when a text has more
    tokens than the model reads."""
    texts = [value] if isinstance(value, str) else list(value)
    if not texts:
        raise ApiError(400, f"{field}: empty input (send at least one text)", field)
    limit = state.settings.max_texts_per_request
    if len(texts) > limit:
        raise ApiError(413, f"{field}: {len(texts)} texts, more than this server's limit of {limit} per request",
                       field)
    for i, text in enumerate(texts):
        if not text:
            where = field if isinstance(value, str) else f"{field}[{i}]"
            raise ApiError(400, f"{where}: empty text", where)
    instruction, instruction_format = state.instruction_for(kind, instruction, instruction_format)
    applied = Encoder.apply_instruction(texts, instruction, instruction_format)
    counts = await asyncio.get_running_loop().run_in_executor(None, state.token_counts, applied)
    max_length = max_length or state.max_length(kind)
    if not (state.settings.truncate if truncate is None else truncate):
        for i, n in enumerate(counts):
            if n > max_length:
                where = field if isinstance(value, str) else f"{field}[{i}]"
                raise ApiError(413, f"{where}: {n} tokens, more than the {max_length} this model reads (send "
                                    "shorter text, or truncate: true)", where)
    return Texts(texts, sum(min(n, max_length) for n in counts))
