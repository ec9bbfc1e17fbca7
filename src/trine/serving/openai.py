"""OpenAI's ``POST /v1/embeddings``: the dense vectors, as floats or base64 (little-endian float32)."""

from __future__ import annotations

import base64
from typing import Literal

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictInt

from trine.inference.encoder import truncate_dense
from trine.serving.common import ApiError, check_texts, json_response, state_of

router = APIRouter()


class EmbeddingsRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI's clients send fields (user, ...) that change nothing here

    input: str | list[str]
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: StrictInt | None = Field(default=None, description="keep the first N dimensions, renormalised "
                                                                   "(an integer, as OpenAI's schema)")


def shorten(vecs: np.ndarray, dimensions: int | None, dim: int, normalized: bool) -> np.ndarray:
    """The first ``dimensions`` of each vector (Matryoshka truncation, :func:`trine.inference.encoder.truncate_dense`),
    renormalised when the model normalises; a ``dimensions`` outside 1..``dim`` is a 400."""
    if dimensions is None or dimensions == dim:
        return vecs
    if not 1 <= dimensions <= dim:
        raise ApiError(400, f"dimensions: must be between 1 and the model's {dim}, got {dimensions}", "dimensions")
    return truncate_dense(vecs, dimensions, normalized).astype(np.float32)


@router.post("/v1/embeddings")
async def embeddings(body: EmbeddingsRequest, request: Request) -> JSONResponse:
    state = state_of(request)
    if body.model is not None and body.model != state.settings.model_name:
        raise ApiError(404, f"model: this server serves {state.settings.model_name!r}, not {body.model!r} (send its "
                            "name, or none; trine serve --served-model-name sets it)", "model")
    shorten(np.zeros((0, state.embedder.model.hidden_size), np.float32), body.dimensions,
            state.embedder.model.hidden_size, False)  # a bad `dimensions` is refused before any work
    texts = await check_texts(state, body.input, "input")
    result = await state.batcher.encode(texts.texts, ("dense",), tokens=texts.tokens)
    model = state.embedder.model
    vecs = shorten(np.asarray(result.dense_vecs, dtype=np.float32), body.dimensions,
                   np.asarray(result.dense_vecs).shape[1],
                   bool(getattr(model, "normalize_embeddings", True)))
    state.metrics.tokens.labels("/v1/embeddings").inc(texts.tokens)
    state.metrics.texts.labels("/v1/embeddings").inc(len(texts.texts))
    if body.encoding_format == "base64":
        data = [base64.b64encode(v.astype("<f4").tobytes()).decode("ascii") for v in vecs]
    else:
        data = vecs.tolist()
    return await json_response({
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(data)],
        "model": state.settings.model_name,
        "usage": {"prompt_tokens": texts.tokens, "total_tokens": texts.tokens},
    })
