"""text-embeddings-inference's routes, with its request and response shapes: ``POST /embed`` (dense),
``/embed_sparse`` (``[{index, value}]`` per text: the lexical weights), ``/embed_all`` (per-token vectors: the
ColBERT vectors), ``/rerank`` (the cross-encoder), ``/tokenize``."""

from __future__ import annotations

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, StrictBool

from trine.serving.common import (
    ApiError,
    ServerState,
    check_colbert_tokens,
    check_text,
    check_texts,
    json_response,
    state_of,
)

router = APIRouter()


class EmbedRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    inputs: str | list[str]
    normalize: StrictBool = True
    truncate: StrictBool | None = None


class SparseRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    inputs: str | list[str]
    truncate: StrictBool | None = None


class RerankRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    query: str
    texts: list[str]
    raw_scores: StrictBool = False
    return_text: StrictBool = False
    truncate: StrictBool | None = None


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    inputs: str | list[str]
    add_special_tokens: StrictBool = True


def _count(state: ServerState, route: str, texts: list[str], tokens: int) -> None:
    state.metrics.tokens.labels(route).inc(tokens)
    state.metrics.texts.labels(route).inc(len(texts))


@router.post("/embed")
async def embed(body: EmbedRequest, request: Request) -> JSONResponse:
    state = state_of(request)
    normalized = bool(getattr(state.embedder.model, "normalize_embeddings", True))
    if not body.normalize and normalized:
        raise ApiError(400, "normalize: this server's model normalises its vectors inside; normalize: false is not "
                            "available", "normalize")
    texts = await check_texts(state, body.inputs, "inputs", truncate=body.truncate)
    result = await state.batcher.encode(texts.texts, ("dense",), tokens=texts.tokens)
    vecs = np.asarray(result.dense_vecs, dtype=np.float32)
    if body.normalize and not normalized:
        vecs = vecs / np.maximum(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-12)
    _count(state, "/embed", texts.texts, texts.tokens)
    return await json_response(vecs.tolist())


@router.post("/embed_sparse")
async def embed_sparse(body: SparseRequest, request: Request) -> JSONResponse:
    state = state_of(request)
    state.need_outputs(["sparse"], "inputs")
    texts = await check_texts(state, body.inputs, "inputs", truncate=body.truncate)
    result = await state.batcher.encode(texts.texts, ("sparse",), tokens=texts.tokens)
    _count(state, "/embed_sparse", texts.texts, texts.tokens)
    return await json_response([
        [{"index": int(i), "value": float(w)} for i, w in sorted(weights.items(), key=lambda x: int(x[0]))]
        for weights in result.lexical_weights
    ])


@router.post("/embed_all")
async def embed_all(body: SparseRequest, request: Request) -> JSONResponse:
    state = state_of(request)
    state.need_outputs(["colbert"], "inputs")
    texts = await check_texts(state, body.inputs, "inputs", truncate=body.truncate)
    check_colbert_tokens(state, texts, "inputs")
    result = await state.batcher.encode(texts.texts, ("colbert",), tokens=texts.tokens)
    _count(state, "/embed_all", texts.texts, texts.tokens)
    return await json_response([np.asarray(v, dtype=np.float32).tolist() for v in result.colbert_vecs])


@router.post("/rerank")
async def rerank(body: RerankRequest, request: Request) -> JSONResponse:
    state = state_of(request)
    reranker = state.reranker
    if reranker is None:
        raise ApiError(404, "no reranker is loaded (start trine serve with --reranker)")
    check_text(state, body.query, "query")
    texts = await check_texts(state, body.texts, "texts", truncate=True)  # counts, emptiness; length: below
    pairs = [(body.query, t) for t in texts.texts]
    truncate = state.settings.truncate if body.truncate is None else body.truncate
    if not truncate:
        counts = await state.tokenize(lambda: [len(ids) for ids in state.pair_tokenizer(
            [q for q, _ in pairs], [p for _, p in pairs], truncation=False, verbose=False)["input_ids"]])
        for i, n in enumerate(counts):
            if n > reranker.max_length:
                raise ApiError(413, f"texts[{i}]: the query and this text are {n} tokens, more than the reranker's "
                                    f"{reranker.max_length} (send shorter text, or truncate: true)", f"texts[{i}]")
    scores = await state.run_model(lambda: reranker.compute_score(pairs, normalize=not body.raw_scores))
    _count(state, "/rerank", texts.texts, texts.tokens)
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    return JSONResponse([{"index": i, "score": float(scores[i]), **({"text": texts.texts[i]} if body.return_text
                                                                     else {})} for i in order])


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, request: Request) -> JSONResponse:
    state = state_of(request)
    texts = [body.inputs] if isinstance(body.inputs, str) else list(body.inputs)
    if not texts:
        raise ApiError(400, "inputs: empty input (send at least one text)", "inputs")
    limit = state.settings.max_texts_per_request
    if len(texts) > limit:
        raise ApiError(413, f"inputs: {len(texts)} texts, more than this server's limit of {limit} per request",
                       "inputs")
    for i, text in enumerate(texts):
        check_text(state, text, "inputs" if isinstance(body.inputs, str) else f"inputs[{i}]")
    tok = state.text_tokenizer
    special = set(tok.all_special_ids)

    def run() -> list[list[dict]]:
        enc = tok(texts, add_special_tokens=body.add_special_tokens, return_offsets_mapping=True,
                  truncation=False, verbose=False)
        out = []
        for text, ids, offsets in zip(texts, enc["input_ids"], enc["offset_mapping"]):
            pieces = tok.convert_ids_to_tokens(ids)
            out.append([{"id": int(i), "text": piece if i in special or start == stop else text[start:stop],
                         "special": i in special, "start": None if i in special else int(start),
                         "stop": None if i in special else int(stop)}
                        for i, piece, (start, stop) in zip(ids, pieces, offsets)])
        return out

    return await json_response(await state.tokenize(run))
