"""trine's own routes: ``POST /encode`` (dense, lexical and ColBERT outputs of one pass, FlagEmbedding's keys),
``POST /score`` (``M3Embedder.compute_score``'s modes and weights) and ``POST /search`` (the loaded index; with
``rerank: true`` its top ``rerank_top_k`` re-ranked by the loaded cross-encoder, as ``trine eval``'s
``rerank(<mode>)``)."""

from __future__ import annotations

import asyncio
import base64
from typing import Any, Literal

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt

import trine.scoring as scoring
from trine.evaluation.runner import EvalConfig, rerank_result
from trine.inference.result import OUTPUT_KEYS, OUTPUTS
from trine.modeling.fusion import FUSED_MODES, check_weights
from trine.modes import mode_outputs
from trine.retrieval import QueryReps, SearchResult
from trine.serving.common import (
    ApiError,
    FiniteFloat,
    ServerState,
    check_colbert_tokens,
    check_texts,
    json_response,
    state_of,
)

router = APIRouter()


class EncodeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    texts: str | list[str]
    kind: Literal["query", "passage"] | None = None
    outputs: list[str] | None = Field(default=None, description="of dense, sparse, colbert (default: all the "
                                                                "model has)")
    lexical: Literal["ids", "tokens"] = "ids"
    instruction: str | None = Field(default=None, alias="prompt")
    instruction_format: str = "{}{}"
    truncate: StrictBool | None = None
    encoding_format: Literal["float", "base64"] = Field(default="float", description=(
        "base64: each dense vector, and each text's ColBERT vectors (tokens x dim, row-major), as the base64 of "
        "little-endian float32"))


class ScoreRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    pairs: list[tuple[str, str]]
    weights_for_different_modes: list[FiniteFloat] | None = None
    max_query_length: StrictInt | None = Field(default=None, ge=1)
    max_passage_length: StrictInt | None = Field(default=None, ge=1)
    truncate: StrictBool | None = None


class SearchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    query: str
    k: StrictInt = Field(default=10, ge=1, le=10_000)
    mode: str = "dense"
    weights: list[FiniteFloat] | None = None
    normalization: str | None = None
    colbert_search: Literal["rerank", "full"] = "rerank"
    truncate: StrictBool | None = None
    rerank: StrictBool = Field(default=False, description="re-rank the mode's top rerank_top_k with the loaded "
                                                          "reranker")
    rerank_top_k: StrictInt | None = Field(default=None, ge=1, le=10_000, description=(
        "candidates the reranker scores (default: the server's --reranker-top-k, at least k)"))


def _outputs(state: ServerState, asked: list[str] | None) -> tuple[str, ...]:
    if asked is None:
        return state.embedder.outputs
    if not asked:
        raise ApiError(400, "outputs: empty (choose from dense, sparse, colbert)", "outputs")
    for i, name in enumerate(asked):
        if name not in OUTPUTS:
            raise ApiError(400, f"outputs[{i}]: unknown output {name!r}; choose from {list(OUTPUTS)}", f"outputs[{i}]")
    state.need_outputs(asked, "outputs")
    return tuple(o for o in OUTPUTS if o in asked)


def _floats(values: Any) -> list:
    return np.asarray(values, np.float32).tolist()


def _base64(values: Any) -> str:
    return base64.b64encode(np.ascontiguousarray(values, dtype="<f4").tobytes()).decode("ascii")


@router.post("/encode")
async def encode(body: EncodeRequest, request: Request) -> JSONResponse:
    state = state_of(request)
    outputs = _outputs(state, body.outputs)
    if body.kind is not None and body.instruction is not None:
        raise ApiError(400, f"instruction: kind {body.kind!r} uses the model's own {body.kind} instruction; send "
                            "an instruction without kind", "instruction")
    texts = await check_texts(state, body.texts, "texts", kind=body.kind, instruction=body.instruction,
                              instruction_format=body.instruction_format, truncate=body.truncate)
    if "colbert" in outputs:
        check_colbert_tokens(state, texts, "texts")
    result = await state.batcher.encode(texts.texts, outputs, tokens=texts.tokens, kind=body.kind,
                                        instruction=body.instruction, instruction_format=body.instruction_format)
    lexical = result.lexical_weights
    if lexical is not None and body.lexical == "tokens":
        decode, weights = state.text_tokenizer.decode, lexical
        lexical = await state.tokenize(lambda: [{decode([int(i)]): w for i, w in item.items()} for item in weights])
    array = _base64 if body.encoding_format == "base64" else _floats
    columns: dict[str, Any] = {
        "dense_vecs": None if result.dense_vecs is None else [array(v) for v in result.dense_vecs],
        "lexical_weights": lexical,
        "colbert_vecs": None if result.colbert_vecs is None else [array(v) for v in result.colbert_vecs],
    }
    keys = [OUTPUT_KEYS[o] for o in outputs]
    data = [{key: columns[key][i] for key in keys} for i in range(len(texts.texts))]
    state.metrics.tokens.labels("/encode").inc(texts.tokens)
    state.metrics.texts.labels("/encode").inc(len(texts.texts))
    return await json_response({"data": data, "model": state.settings.model_name,
                                "usage": {"prompt_tokens": texts.tokens, "total_tokens": texts.tokens}})


@router.post("/score")
async def score(body: ScoreRequest, request: Request) -> JSONResponse:
    state = state_of(request)
    try:
        scoring.check_mode_weights(body.weights_for_different_modes)
    except ValueError as err:
        raise ApiError(400, str(err), "weights_for_different_modes") from None
    if not body.pairs:
        raise ApiError(400, "pairs: empty input (send at least one [query, passage] pair)", "pairs")
    embedder = state.embedder
    q_len = body.max_query_length or embedder.query_max_length
    p_len = body.max_passage_length or embedder.passage_max_length
    limit = embedder.model.max_positions
    for name, value in (("max_query_length", q_len), ("max_passage_length", p_len)):
        if limit is not None and value > limit:
            raise ApiError(400, f"{name}: {value} is more than the model's {limit} positions", name)
    queries = await check_texts(state, [q for q, _ in body.pairs], "pairs[].query", truncate=body.truncate,
                                max_length=q_len)
    passages = await check_texts(state, [p for _, p in body.pairs], "pairs[].passage", truncate=body.truncate,
                                 max_length=p_len)
    outputs = embedder.outputs
    q, p = await asyncio.gather(state.batcher.encode(queries.texts, outputs, tokens=queries.tokens,
                                                     max_length=q_len),
                                state.batcher.encode(passages.texts, outputs, tokens=passages.tokens,
                                                     max_length=p_len))
    scores = scoring.paired_scores(q, p, body.weights_for_different_modes)
    tokens = queries.tokens + passages.tokens
    state.metrics.tokens.labels("/score").inc(tokens)
    state.metrics.texts.labels("/score").inc(2 * len(body.pairs))
    return JSONResponse({k: np.asarray(v, dtype=np.float64).tolist() for k, v in scores.items()})


def _rerank_top_k(state: ServerState, body: SearchRequest) -> int | None:
    """The candidates a re-ranked search scores with the reranker (None: no re-ranking)."""
    if not body.rerank:
        if body.rerank_top_k is not None:
            raise ApiError(400, "rerank_top_k: applies with rerank: true", "rerank_top_k")
        return None
    if state.reranker is None:
        raise ApiError(400, "rerank: no reranker is loaded (start trine serve with --reranker)", "rerank")
    if state.documents is None:
        raise ApiError(400, "rerank: the server has no document texts for the reranker (start trine serve with "
                            "--documents)", "rerank")
    if body.rerank_top_k is None:
        return max(body.k, state.settings.reranker_top_k)
    if body.rerank_top_k < body.k:
        raise ApiError(400, f"rerank_top_k: {body.rerank_top_k} candidates cannot give k={body.k} results; send at "
                            "least k", "rerank_top_k")
    return body.rerank_top_k


@router.post("/search")
async def search(body: SearchRequest, request: Request) -> JSONResponse:
    state = state_of(request)
    retriever = state.retriever
    if retriever is None:
        raise ApiError(404, "no index is loaded (start trine serve with --index)")
    try:
        mode = scoring.canonical_mode(body.mode)
    except ValueError as err:
        raise ApiError(400, f"mode: {err}", "mode") from None
    needs = mode_outputs(mode, body.colbert_search)
    lacking = [m for m in needs if m not in retriever.indexes]
    if lacking:
        raise ApiError(400, f"mode: {mode!r} needs the {' and '.join(lacking)} index, which the loaded index "
                            f"lacks (it has {', '.join(retriever.indexes)})", "mode")
    state.need_outputs(needs, "mode")
    fused = mode in FUSED_MODES
    weights = normalization = confidence = None
    if fused:
        # calibrated fusion's coefficients were fitted with fusion.json's weights and normalization: they
        # apply when the request takes both from it (weights or a normalization in the body fuse plainly)
        coefficients = state.settings.fusion.coefficients(mode)
        if coefficients is not None and body.weights is None and body.normalization is None:
            confidence = dict(zip(FUSED_MODES[mode], coefficients))
        try:
            weights = check_weights(mode, body.weights if body.weights is not None else state.settings.fusion_weights(
                mode), "weights")
            normalization = scoring.check_normalization(body.normalization or state.settings.fusion.normalization)
        except ValueError as err:
            field = "weights" if str(err).startswith("weights") else "normalization"
            raise ApiError(400, str(err), field) from None
    elif body.weights is not None or body.normalization is not None:
        field = "weights" if body.weights is not None else "normalization"
        raise ApiError(400, f"{field}: applies to the fused modes ({', '.join(FUSED_MODES)}), not {mode!r}", field)
    top = _rerank_top_k(state, body)
    texts = await check_texts(state, body.query, "query", kind="query", truncate=body.truncate)
    reps = QueryReps.from_encode(await state.batcher.encode(texts.texts, needs, tokens=texts.tokens,
                                                                kind="query"))
    k = body.k
    rerank_k = state.settings.colbert_rerank_k

    def run() -> tuple[SearchResult, SearchResult | None]:  # what trine eval runs for the same mode (and rerank)
        found = retriever.search_mode(reps, mode, top or k, colbert_search=body.colbert_search, rerank_k=rerank_k,
                                      weights=dict(zip(FUSED_MODES[mode], weights)) if fused else None,
                                      normalization=normalization or "none", confidence=confidence)
        if top is None:
            return found, None
        config = EvalConfig(reranker_top_k=top, reranker_max_length=state.reranker.max_length)
        return rerank_result(state.reranker, found, [body.query], state.documents, config), found

    result, first = await state.run_model(run)
    state.metrics.tokens.labels("/search").inc(texts.tokens)
    state.metrics.texts.labels("/search").inc(1)
    ids = retriever.ids
    hits = [{"id": ids[r], "score": float(s)} for r, s in zip(result.rows[0, :k].tolist(),
                                                              result.scores[0, :k].tolist()) if r >= 0]
    out: dict[str, Any] = {"mode": mode, "results": hits}
    if first is not None:  # each hit's score is the reranker's; its score in the mode beside it
        retrieval = dict(zip(first.rows[0].tolist(), first.scores[0].tolist()))
        for hit, r in zip(hits, result.rows[0].tolist()):
            hit["retrieval_score"] = float(retrieval[r])
        out["rerank_top_k"] = top
    if fused:
        out["weights"] = dict(zip(FUSED_MODES[mode], weights))
        out["normalization"] = normalization
    return JSONResponse(out)
