"""What every route shares: the settings, the server's state (one encoder, reranker, retriever, batcher),
the API error, and the checks of the texts a request sends (count, emptiness, length)."""

from __future__ import annotations

import asyncio
import copy
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import Field as PydanticField

from trine.data.text import check_template, text_problem
from trine.inference import Encoder, Reranker
from trine.modeling.fusion import DEFAULT_WEIGHTS, FusionSettings
from trine.retrieval import HybridRetriever
from trine.serving.batcher import Batcher, Ticket, Waiting, current_ticket
from trine.serving.metrics import ServerMetrics


@dataclass
class ServeSettings:
    """The server's limits and defaults (``trine serve``'s options).

    ``max_batch_texts`` / ``max_batch_tokens`` / ``max_wait_ms``: the dynamic batcher merges waiting requests
    into one encoder call of at most that many texts and tokens (text-embeddings-inference's
    ``--max-batch-tokens``; a single request above it is encoded alone), waiting at most that long for more
    after the first (the encoder then splits the call into its own length-sorted, padded-token-budgeted batches);
    ``max_queue``: requests waiting for the encoder beyond which a request gets 429;
    ``max_texts_per_request``: more texts in one request get 413; ``max_body_bytes``: a longer request body gets
    413 before it is read to the end (text-embeddings-inference's ``--payload-limit``, same default);
    ``max_text_chars``: a text (with its instruction) of more characters gets 413 before it is tokenised;
    ``max_colbert_tokens``: a request for ColBERT vectors (one vector per token: a 2 MB body could ask for gigabytes
    of them) holding more tokens gets 413;
    ``truncate``: a text longer than the model's maximum length is cut (True) or refused with 413 (False), unless a
    request says otherwise; ``allowed_hosts``: the names a request's ``Host`` header may carry (``*.example.com``
    matches sub-domains; None: any), against DNS rebinding of a server on a private address;
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
    max_body_bytes: int = 2_000_000
    max_text_chars: int = 100_000
    max_colbert_tokens: int = 8192
    truncate: bool = True
    allowed_hosts: tuple[str, ...] | None = None
    retry_after_s: int = 1
    colbert_rerank_k: int = 100
    reranker_top_k: int = 100
    fusion: FusionSettings = field(default_factory=FusionSettings)

    def __post_init__(self) -> None:
        for name in ("max_batch_texts", "max_batch_tokens", "max_queue", "max_texts_per_request", "max_body_bytes",
                     "max_text_chars", "max_colbert_tokens", "retry_after_s", "colbert_rerank_k", "reranker_top_k"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.max_wait_ms, (int, float)) or self.max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be a number >= 0, got {self.max_wait_ms!r}")
        if self.api_key is not None and not self.api_key:
            raise ValueError("api_key may not be empty (leave it unset for an open server)")
        if self.allowed_hosts is not None:
            hosts = tuple(h.strip().lower() for h in self.allowed_hosts)
            if not hosts or not all(hosts):
                raise ValueError("allowed_hosts: give at least one host name, none empty ('*' allows any)")
            self.allowed_hosts = None if "*" in hosts else hosts

    def host_allowed(self, host_header: str | None) -> bool:
        """Whether a request's ``Host`` header (``name``, ``name:port``, ``[v6]:port``) names an allowed host."""
        if self.allowed_hosts is None:
            return True
        if not host_header:
            return False
        host = host_header.strip().lower()
        if host.startswith("["):
            host = host[1:host.find("]")] if "]" in host else host
        elif host.count(":") == 1:
            host = host.split(":", 1)[0]
        return any(host == pattern or (pattern.startswith("*.") and host.endswith(pattern[1:]))
                   for pattern in self.allowed_hosts)

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
    waiting: Waiting = field(default_factory=Waiting)
    # Token counting, /tokenize and token decoding run in one thread of their own, on copies of the tokenizers: a
    # fast tokenizer keeps its truncation setting in shared state, so a count (no truncation) beside the model
    # thread's encoding (truncated) on one tokenizer let a 638-token batch reach a 512-position model.
    tokenizer_thread: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(max_workers=1, thread_name_prefix="trine-tokenize"))
    text_tokenizer: Any = None
    pair_tokenizer: Any = None

    def __post_init__(self) -> None:
        self.text_tokenizer = copy.deepcopy(self.embedder.tokenizer)
        if self.reranker is not None:
            self.pair_tokenizer = copy.deepcopy(self.reranker.tokenizer)

    async def tokenize(self, fn: Any) -> Any:
        """``fn()`` in the tokenizer thread (``fn`` uses :attr:`text_tokenizer` / :attr:`pair_tokenizer`)."""
        return await asyncio.get_running_loop().run_in_executor(self.tokenizer_thread, fn)

    def admit_request(self) -> Ticket:
        """A ticket for a request about to be read, or :class:`Overloaded` (429) when ``max_queue`` requests are
        already waiting: checked before the body is read or a text tokenised, so a refusal costs nothing."""
        return self.waiting.admit(self.settings.max_queue)

    async def run_model(self, fn: Any) -> Any:
        """``fn()`` in the model thread, for a model call outside the batcher (rerank, search): the request stops
        counting as waiting once the model thread starts it."""
        ticket = current_ticket.get()

        def run() -> Any:
            if ticket is not None:
                ticket.release()
            return fn()

        return await asyncio.get_running_loop().run_in_executor(self.executor, run)

    def max_length(self, kind: str | None) -> int:
        return self.embedder.query_max_length if kind == "query" else self.embedder.passage_max_length

    def instruction_for(self, kind: str | None, instruction: str | None, instruction_format: str) -> tuple[str | None,
                                                                                                            str]:
        if kind is None:
            return instruction, instruction_format
        return (getattr(self.embedder, f"{kind}_instruction_for_retrieval"),
                getattr(self.embedder, f"{kind}_instruction_format"))

    def token_counts(self, texts: list[str]) -> list[int]:
        enc = self.text_tokenizer(texts, truncation=False, return_attention_mask=False, return_token_type_ids=False,
                             verbose=False)
        return [len(ids) for ids in enc["input_ids"]]

    def need_outputs(self, outputs: Sequence[str], field: str) -> None:
        missing = [o for o in outputs if o not in self.embedder.outputs]
        if missing:
            raise ApiError(400, f"{field}: this model has no {' or '.join(missing)} output (it was loaded without "
                                "its BGE-M3 heads)", field)


def load_documents(path: str | os.PathLike, ids: Sequence[str]) -> list[str]:
    """The texts of the documents ``ids`` (an index's rows, in order) from a corpus file read by the one corpus
    reader (:func:`trine.data.read_corpus`: BEIR ``_id`` or FlagEmbedding's ``id``, optional ``title``,
    ``text``; the text as ``trine eval`` encodes it: title, a space, text); an id the file lacks is an
    error naming it."""
    from trine.data.corpus import DatasetFormatError, corpus_passages, id_field_of, read_corpus

    path = os.fspath(path)
    corpus_ids, texts = corpus_passages(read_corpus(path))
    by_id = dict(zip(corpus_ids, texts))
    missing = [i for i in ids if i not in by_id]
    if missing:
        raise DatasetFormatError(f"{path}: no document with {id_field_of(path)} {missing[0]!r} (of {len(missing)} "
                                 f"of the index's {len(ids)} documents missing)")
    return [by_id[i] for i in ids]


def state_of(request: Request) -> ServerState:
    return request.app.state.trine


@dataclass
class Texts:
    """A request's texts after the checks: as sent, and the tokens they count (after truncation)."""

    texts: list[str]
    tokens: int


#: a request's number: finite (JSON's NaN and Infinity, which Python's reader accepts, are refused with 422)
FiniteFloat = Annotated[float, PydanticField(allow_inf_nan=False, strict=True)]


def _where(field: str, value: str | list[str], i: int) -> str:
    return field if isinstance(value, str) else f"{field}[{i}]"


def check_colbert_tokens(state: ServerState, texts: Texts, field: str) -> None:
    """A request asking for ColBERT vectors: 413 beyond ``max_colbert_tokens`` tokens (after truncation)."""
    limit = state.settings.max_colbert_tokens
    if texts.tokens > limit:
        raise ApiError(413, f"{field}: ColBERT vectors for {texts.tokens} tokens, more than this server's limit of "
                            f"{limit} per request (--max-colbert-tokens; send fewer or shorter texts)", field)


def check_text(state: ServerState, text: str, field: str, extra_chars: int = 0) -> None:
    """One text of a request: refused with 400 when :func:`trine.data.text_problem` finds it empty, only white
    space or not valid Unicode, with 413 when it (and ``extra_chars`` of instruction) has more than
    ``max_text_chars`` characters: before any tokeniser sees it."""
    problem = text_problem(text)
    if problem:
        raise ApiError(400, f"{field}: {problem}", field)
    limit = state.settings.max_text_chars
    if len(text) + extra_chars > limit:
        raise ApiError(413, f"{field}: {len(text) + extra_chars} characters, more than this server's limit of {limit} "
                            "per text (--max-text-chars)", field)


def check_instruction(instruction: str | None, instruction_format: str, instruction_field: str,
                      format_field: str = "instruction_format") -> int:
    """A request's instruction and template, checked (a template is :func:`trine.data.text.check_template`'s:
    plain fields only, never a format spec); returns the characters they add to each text."""
    try:
        check_template(instruction_format.replace("\\n", "\n"), format_field)
    except ValueError as err:
        raise ApiError(400, str(err), format_field) from None
    if instruction is None:
        return 0
    problem = text_problem(instruction)
    if problem and problem != "empty text":  # an empty instruction is no instruction (FlagEmbedding's "")
        raise ApiError(400, f"{instruction_field}: {problem}", instruction_field)
    return len(instruction) + len(instruction_format)


async def check_texts(state: ServerState, value: str | list[str], field: str, *, kind: str | None = None,
                      instruction: str | None = None, instruction_format: str = "{}{}",
                      truncate: bool | None = None, max_length: int | None = None,
                      instruction_field: str = "prompt") -> Texts:
    """``value`` (one string or a list) as a list, refused with 400 when empty (or holding a text
    :func:`check_text` refuses), 413 when longer than ``max_texts_per_request``, when a text has more than
    ``max_text_chars`` characters or, without truncation, more tokens than the model reads. Tokenised in a worker
    thread, never on the event loop."""
    texts = [value] if isinstance(value, str) else list(value)
    if not texts:
        raise ApiError(400, f"{field}: empty input (send at least one text)", field)
    limit = state.settings.max_texts_per_request
    if len(texts) > limit:
        raise ApiError(413, f"{field}: {len(texts)} texts, more than this server's limit of {limit} per request",
                       field)
    extra = check_instruction(instruction, instruction_format, instruction_field)
    instruction, instruction_format = state.instruction_for(kind, instruction, instruction_format)
    if kind is not None and instruction is not None:
        extra = len(instruction) + len(instruction_format)
    for i, text in enumerate(texts):
        check_text(state, text, _where(field, value, i), extra)
    applied = Encoder.apply_instruction(texts, instruction, instruction_format)
    counts = await state.tokenize(lambda: state.token_counts(applied))
    max_length = max_length or state.max_length(kind)
    if not (state.settings.truncate if truncate is None else truncate):
        for i, n in enumerate(counts):
            if n > max_length:
                where = _where(field, value, i)
                raise ApiError(413, f"{where}: {n} tokens, more than the {max_length} this model reads (send "
                                    "shorter text, or truncate: true)", where)
    return Texts(texts, sum(min(n, max_length) for n in counts))


async def json_response(content: Any, status_code: int = 200) -> JSONResponse:
    """``JSONResponse(content)`` rendered in a worker thread: a large body of vectors is seconds of ``json.dumps``
    that would otherwise hold the event loop (and every other request's 429 or ``/health``)."""
    return await asyncio.get_running_loop().run_in_executor(None, lambda: JSONResponse(content, status_code))
