"""FlagEmbedding 1.4.2's inference classes as thin faces over trine's (import them from :mod:`trine.flag`).

Each face is a subclass of the trine class that does the work (:class:`~trine.inference.embedder.Embedder`,
:class:`~trine.inference.embedder.M3Embedder`, :class:`~trine.inference.reranker.Reranker`) whose constructor
and methods take FlagEmbedding's argument names, order and defaults and translate them; no encoding or scoring
happens here. Why faces and not trine's classes under FlagEmbedding's names: trine's own defaults differ where
FlagEmbedding's are surprising (``use_fp16=True`` on a CPU), and trine's classes refuse what FlagEmbedding
silently drops; a face keeps FlagEmbedding's defaults so a script needs only its import line changed.

Rules every face follows:

- An argument FlagEmbedding has and trine supports is passed on with FlagEmbedding's meaning and default.
- An argument trine does not support raises :class:`~trine.errors.OptionError` naming it and saying why (never a
  bare ``TypeError``); so does any name neither FlagEmbedding nor trine knows. Keyword options of trine's own
  class (``show_progress``, ``max_tokens_per_batch``, ...) are accepted too.
- ``use_fp16`` / ``use_bf16``: FlagEmbedding computes in float32 on a CPU whatever ``use_fp16`` says (its
  embedders' ``use_fp16=True`` default is for GPUs; its LLM rerankers keep ``use_bf16`` on a CPU); the faces do
  the same, where trine's own classes take the dtype literally.
- ``query_max_length`` / ``passage_max_length`` / ``max_length`` left unset are FlagEmbedding's 512, or the
  model's positions when it has fewer (FlagEmbedding would index past the position table).
- ``cache_dir``: passed to the trine class when its constructor takes one (Hub-id loading), else kept as the
  face's ``cache_dir`` attribute: trine loads local folders, for which FlagEmbedding ignores it too.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from trine.errors import OptionError
from trine.inference.embedder import Embedder, M3Embedder
from trine.inference.encoder import Encoder, _given
from trine.inference.pool import resolve_devices
from trine.inference.reranker import Reranker
from trine.modeling.decoder import EXAMPLE_FORMAT, ICL_SUFFIX, QUERY_INSTRUCTION_FORMAT, icl_query_format

__all__ = ["BGEM3FlagModel", "FlagAutoModel", "FlagAutoReranker", "FlagICLModel", "FlagLLMModel",
           "FlagLLMReranker", "FlagModel", "FlagReranker", "LayerWiseFlagLLMReranker"]

#: FlagEmbedding options trine has no equivalent of, and why (the message of the OptionError they raise)
REFUSED: dict[str, str] = {
    "peft_path": "trine does not stack a separate PEFT adapter at load time: load the adapter folder trine saved "
                 "by its own path (its adapter_config.json names the base model), or merge it first "
                 "(`trine merge-lora`)",
    "use_dataloader": "trine sorts the pairs by length and batches them itself (no torch DataLoader)",
    "num_workers": "trine sorts the pairs by length and batches them itself (no torch DataLoader workers)",
    "device": "pick the devices with the constructor's devices=",
    "compress_layers": "the lightweight reranker (bge-reranker-v2.5-gemma2-lightweight) is not in trine",
    "compress_layer": "the lightweight reranker (bge-reranker-v2.5-gemma2-lightweight) is not in trine",
    "compress_ratio": "the lightweight reranker (bge-reranker-v2.5-gemma2-lightweight) is not in trine",
}
#: options the faces set themselves (a face is one model family)
_FIXED = {"with_heads", "model_family", "backend", "self", "model_name_or_path", "kwargs", "cache_dir"}
#: options only an M3 (tri-head) model has
_HEAD_OPTIONS = {"colbert_dim", "init_missing_heads", "head_init_texts"}


def _keywords(function: Any) -> set[str]:
    return set(inspect.signature(function).parameters)


def _check(where: str, given: Mapping[str, Any], allowed: Iterable[str],
           refused: Mapping[str, str] | None = None) -> None:
    """Every name in ``given`` is in ``allowed``; otherwise an OptionError naming it, with why."""
    allowed, refused = set(allowed), refused or {}
    for name in given:
        if name in allowed:
            continue
        reason = refused.get(name) or REFUSED.get(name) or \
            "not an option of FlagEmbedding 1.4.2's " + where.split(".")[0] + " nor of the trine class it runs on"
        raise OptionError(f"{where}: {name}: {reason}")


def _precision(devices: Any, use_fp16: bool, use_bf16: bool, *, bf16_on_cpu: bool) -> dict[str, bool]:
    """FlagEmbedding's rule: on CPU devices only, fp16 (and for embedders bf16) becomes float32."""
    if all(d == "cpu" for d in resolve_devices(devices)):
        return {"use_fp16": False, "use_bf16": use_bf16 and bf16_on_cpu}
    return {"use_fp16": use_fp16, "use_bf16": use_bf16}


def _cache_dir(cls: type, cache_dir: str | os.PathLike | None) -> dict[str, Any]:
    """``cache_dir`` for the trine class's constructor, if it takes one (else the face records it)."""
    return {"cache_dir": cache_dir} if cache_dir is not None and "cache_dir" in _keywords(cls.__init__) else {}


def _init_dense(self: Embedder, face: str, model_name_or_path: Any, *, devices: Any, use_fp16: bool,
                use_bf16: bool, cache_dir: Any, convert_to_numpy: bool, extra: dict[str, Any],
                **options: Any) -> None:
    # trine's own Encoder options the face does not name itself (show_progress, max_tokens_per_batch, ...)
    _check(face, extra, _keywords(Encoder.__init__) - _FIXED - _HEAD_OPTIONS - _keywords(type(self).__init__),
           dict.fromkeys(_HEAD_OPTIONS, "sets up the lexical and ColBERT heads: an option of BGEM3FlagModel"))
    Embedder.__init__(self, model_name_or_path, devices=devices,
                      **_precision(devices, use_fp16, use_bf16, bf16_on_cpu=False),
                      **_cache_dir(Encoder, cache_dir), **options, **extra)
    self.cache_dir = cache_dir
    self.convert_to_numpy = convert_to_numpy


class FlagModel(Embedder):
    """FlagEmbedding's ``FlagModel`` (dense embeddings from an encoder) on trine's :class:`Embedder`.

    Differences from trine's ``Embedder``: ``use_fp16=True`` (on GPUs only, as FlagEmbedding) and
    ``pooling_method='cls'`` by default (trine's reads a sentence-transformers folder's pooling)."""

    def __init__(self, model_name_or_path: str | os.PathLike, normalize_embeddings: bool = True,
                 use_fp16: bool = True, use_bf16: bool = False, query_instruction_for_retrieval: str | None = None,
                 query_instruction_format: str = "{}{}", devices: str | Sequence[str] | None = None,
                 pooling_method: str = "cls", trust_remote_code: bool = False, cache_dir: str | None = None,
                 batch_size: int = 256, query_max_length: int | None = None, passage_max_length: int | None = None,
                 convert_to_numpy: bool = True, truncate_dim: int | None = None, **kwargs: Any):
        _init_dense(self, type(self).__name__, model_name_or_path, devices=devices, use_fp16=use_fp16,
                    use_bf16=use_bf16, cache_dir=cache_dir, convert_to_numpy=convert_to_numpy, extra=kwargs,
                    normalize_embeddings=normalize_embeddings,
                    query_instruction_for_retrieval=query_instruction_for_retrieval,
                    query_instruction_format=query_instruction_format, pooling_method=pooling_method,
                    trust_remote_code=trust_remote_code, batch_size=batch_size, query_max_length=query_max_length,
                    passage_max_length=passage_max_length, truncate_dim=truncate_dim)

    def encode(self, sentences: str | Sequence[str], batch_size: int | None = None, max_length: int | None = None,
               convert_to_numpy: bool | None = None, **kwargs: Any) -> Any:
        _check(f"{type(self).__name__}.encode", kwargs, ("instruction", "instruction_format"))
        return super().encode(sentences, batch_size, max_length, _given(convert_to_numpy, self.convert_to_numpy),
                              **kwargs)

    def encode_queries(self, queries: str | Sequence[str], batch_size: int | None = None,
                       max_length: int | None = None, convert_to_numpy: bool | None = None, **kwargs: Any) -> Any:
        _check(f"{type(self).__name__}.encode_queries", kwargs, ())
        return super().encode_queries(queries, batch_size, max_length,
                                      _given(convert_to_numpy, self.convert_to_numpy))

    def encode_corpus(self, corpus: str | Sequence[str], batch_size: int | None = None,
                      max_length: int | None = None, convert_to_numpy: bool | None = None, **kwargs: Any) -> Any:
        _check(f"{type(self).__name__}.encode_corpus", kwargs, ())
        return super().encode_corpus(corpus, batch_size, max_length, _given(convert_to_numpy, self.convert_to_numpy))


def _last_token_only(face: str, kwargs: dict[str, Any]) -> None:
    """FlagEmbedding's decoder embedders always pool the last token (it ignores ``pooling_method``; here any
    other value is an error)."""
    pooling = kwargs.pop("pooling_method", None)
    if pooling not in (None, "last_token"):
        raise OptionError(f"{face}: pooling_method: {pooling!r}; a decoder-only embedder pools the last token "
                          "(FlagEmbedding's FlagLLMModel and FlagICLModel too)")


class FlagLLMModel(FlagModel):
    """FlagEmbedding's ``FlagLLMModel`` (a decoder-only embedder, last-token pooling) on trine's :class:`Embedder`
    with ``model_family='decoder'``. Its query template defaults to FlagEmbedding's ``'Instruct: {}\\nQuery: {}'``
    (trine's decoder family's own default is the training template ``'<instruct>{}\\n<query>{}'``)."""

    def __init__(self, model_name_or_path: str | os.PathLike, normalize_embeddings: bool = True,
                 use_fp16: bool = True, use_bf16: bool = False, query_instruction_for_retrieval: str | None = None,
                 query_instruction_format: str = "Instruct: {}\nQuery: {}", devices: str | Sequence[str] | None = None,
                 trust_remote_code: bool = False, cache_dir: str | None = None, batch_size: int = 256,
                 query_max_length: int | None = None, passage_max_length: int | None = None,
                 convert_to_numpy: bool = True, truncate_dim: int | None = None, **kwargs: Any):
        _last_token_only(type(self).__name__, kwargs)
        _init_dense(self, type(self).__name__, model_name_or_path, devices=devices, use_fp16=use_fp16,
                    use_bf16=use_bf16, cache_dir=cache_dir, convert_to_numpy=convert_to_numpy, extra=kwargs,
                    model_family="decoder", normalize_embeddings=normalize_embeddings,
                    query_instruction_for_retrieval=query_instruction_for_retrieval,
                    query_instruction_format=query_instruction_format, trust_remote_code=trust_remote_code,
                    batch_size=batch_size, query_max_length=query_max_length,
                    passage_max_length=passage_max_length, truncate_dim=truncate_dim)


class FlagICLModel(FlagModel):
    """FlagEmbedding's ``FlagICLModel`` (bge-en-icl: in-context examples before each query) on trine's
    :class:`Embedder` (``model_family='decoder'``), the prompt built by :func:`trine.modeling.decoder.icl_query_format`.
    The examples are fixed at construction (FlagEmbedding's ``set_examples`` is not offered)."""

    def __init__(self, model_name_or_path: str | os.PathLike, normalize_embeddings: bool = True,
                 use_fp16: bool = True, use_bf16: bool = False, query_instruction_for_retrieval: str | None = None,
                 query_instruction_format: str = QUERY_INSTRUCTION_FORMAT, suffix: str = ICL_SUFFIX,
                 devices: str | Sequence[str] | None = None, examples_for_task: list[dict] | None = None,
                 examples_instruction_format: str = EXAMPLE_FORMAT, trust_remote_code: bool = False,
                 cache_dir: str | None = None, batch_size: int = 256, query_max_length: int | None = None,
                 passage_max_length: int | None = None, convert_to_numpy: bool = True,
                 truncate_dim: int | None = None, **kwargs: Any):
        _last_token_only(type(self).__name__, kwargs)
        template = icl_query_format(examples_for_task or [], query_instruction_for_retrieval,
                                    query_instruction_format=query_instruction_format,
                                    examples_instruction_format=examples_instruction_format, suffix=suffix)
        _init_dense(self, type(self).__name__, model_name_or_path, devices=devices, use_fp16=use_fp16,
                    use_bf16=use_bf16, cache_dir=cache_dir, convert_to_numpy=convert_to_numpy, extra=kwargs,
                    model_family="decoder", normalize_embeddings=normalize_embeddings,
                    query_instruction_for_retrieval=query_instruction_for_retrieval,
                    query_instruction_format=template, trust_remote_code=trust_remote_code, batch_size=batch_size,
                    query_max_length=query_max_length, passage_max_length=passage_max_length,
                    truncate_dim=truncate_dim)
        self.examples_for_task = examples_for_task
        self.suffix = suffix


class BGEM3FlagModel(M3Embedder):
    """FlagEmbedding's ``BGEM3FlagModel`` (dense, lexical and ColBERT outputs of one pass) on trine's
    :class:`M3Embedder`; ``use_fp16=True`` by default (GPUs only, as FlagEmbedding), ``pooling_method='cls'``."""

    def __init__(self, model_name_or_path: str | os.PathLike, normalize_embeddings: bool = True,
                 use_fp16: bool = True, use_bf16: bool = False, query_instruction_for_retrieval: str | None = None,
                 query_instruction_format: str = "{}{}", devices: str | Sequence[str] | None = None,
                 pooling_method: str = "cls", trust_remote_code: bool = False, cache_dir: str | None = None,
                 colbert_dim: int = -1, batch_size: int = 256, query_max_length: int | None = None,
                 passage_max_length: int | None = None, return_dense: bool = True, return_sparse: bool = False,
                 return_colbert_vecs: bool = False, truncate_dim: int | None = None, **kwargs: Any):
        _check(type(self).__name__, kwargs, _keywords(Encoder.__init__) - _FIXED - _keywords(type(self).__init__),
               {"convert_to_numpy": "BGE-M3's outputs are always numpy (FlagEmbedding ignores it)"})
        super().__init__(model_name_or_path, return_dense=return_dense, return_sparse=return_sparse,
                         return_colbert_vecs=return_colbert_vecs, normalize_embeddings=normalize_embeddings,
                         query_instruction_for_retrieval=query_instruction_for_retrieval,
                         query_instruction_format=query_instruction_format, devices=devices,
                         pooling_method=pooling_method, trust_remote_code=trust_remote_code, colbert_dim=colbert_dim,
                         batch_size=batch_size, query_max_length=query_max_length,
                         passage_max_length=passage_max_length, truncate_dim=truncate_dim,
                         **_precision(devices, use_fp16, use_bf16, bf16_on_cpu=False),
                         **_cache_dir(Encoder, cache_dir), **kwargs)
        self.cache_dir = cache_dir

    def encode(self, sentences: str | Sequence[str], batch_size: int | None = None, max_length: int | None = None,
               return_dense: bool | None = None, return_sparse: bool | None = None,
               return_colbert_vecs: bool | None = None, **kwargs: Any) -> Any:
        _check(f"{type(self).__name__}.encode", kwargs, ("instruction", "instruction_format"))
        return super().encode(sentences, batch_size, max_length, return_dense, return_sparse, return_colbert_vecs,
                              **kwargs)

    def encode_queries(self, queries: str | Sequence[str], batch_size: int | None = None,
                       max_length: int | None = None, return_dense: bool | None = None,
                       return_sparse: bool | None = None, return_colbert_vecs: bool | None = None,
                       **kwargs: Any) -> Any:
        _check(f"{type(self).__name__}.encode_queries", kwargs, ())
        return super().encode_queries(queries, batch_size, max_length, return_dense, return_sparse,
                                      return_colbert_vecs)

    def encode_corpus(self, corpus: str | Sequence[str], batch_size: int | None = None,
                      max_length: int | None = None, return_dense: bool | None = None,
                      return_sparse: bool | None = None, return_colbert_vecs: bool | None = None,
                      **kwargs: Any) -> Any:
        _check(f"{type(self).__name__}.encode_corpus", kwargs, ())
        return super().encode_corpus(corpus, batch_size, max_length, return_dense, return_sparse,
                                     return_colbert_vecs)

    def compute_score(self, sentence_pairs: Sequence[tuple[str, str]] | tuple[str, str],
                      batch_size: int | None = None, max_query_length: int | None = None,
                      max_passage_length: int | None = None,
                      weights_for_different_modes: Sequence[float] | None = None, **kwargs: Any) -> Any:
        _check(f"{type(self).__name__}.compute_score", kwargs, ())
        return super().compute_score(sentence_pairs, batch_size, max_query_length, max_passage_length,
                                     weights_for_different_modes)


# ------------------------------------------------------------------------------------------------ rerankers
class _RerankerFace(Reranker):
    """What the reranker faces share: one model family each, FlagEmbedding's ``compute_score(pairs, **kwargs)``."""

    family = "cross-encoder"
    score_options: tuple[str, ...] = ("batch_size", "query_max_length", "max_length", "normalize")

    def _init_face(self, model_name_or_path: Any, *, cache_dir: Any, peft_path: Any, extra: dict[str, Any],
                   use_fp16: bool, use_bf16: bool, devices: Any, **options: Any) -> None:
        face = type(self).__name__
        if peft_path is not None:
            raise OptionError(f"{face}: peft_path: {REFUSED['peft_path']}")
        # trine's own Reranker options the face does not name itself (show_progress, max_tokens_per_batch, ...)
        _check(face, extra, _keywords(Reranker.__init__) - _FIXED - _keywords(type(self).__init__))
        Reranker.__init__(self, model_name_or_path, model_family=self.family, devices=devices,
                          **_precision(devices, use_fp16, use_bf16, bf16_on_cpu=True),
                          **_cache_dir(Reranker, cache_dir), **options, **extra)
        self.cache_dir = cache_dir

    def compute_score(self, sentence_pairs: Sequence[tuple[str, str]] | tuple[str, str],
                      **kwargs: Any) -> list[float] | list[list[float]]:
        _check(f"{type(self).__name__}.compute_score", kwargs, self.score_options)
        return super().compute_score(sentence_pairs, **kwargs)


class FlagReranker(_RerankerFace):
    """FlagEmbedding's ``FlagReranker`` (a cross-encoder) on trine's :class:`Reranker`
    (``model_family='cross-encoder'``)."""

    def __init__(self, model_name_or_path: str | os.PathLike, use_fp16: bool = False,
                 query_instruction_for_rerank: str | None = None, query_instruction_format: str = "{}{}",
                 passage_instruction_for_rerank: str | None = None, passage_instruction_format: str = "{}{}",
                 trust_remote_code: bool = False, cache_dir: str | None = None,
                 devices: str | Sequence[str | int] | None = None, batch_size: int = 128,
                 query_max_length: int | None = None, max_length: int | None = None, normalize: bool = False,
                 **kwargs: Any):
        # use_bf16: trine's option (FlagEmbedding's FlagReranker has none)
        self._init_face(model_name_or_path, cache_dir=cache_dir, peft_path=None, extra=kwargs, use_fp16=use_fp16,
                        use_bf16=kwargs.pop("use_bf16", False), devices=devices,
                        query_instruction_for_rerank=query_instruction_for_rerank,
                        query_instruction_format=query_instruction_format,
                        passage_instruction_for_rerank=passage_instruction_for_rerank,
                        passage_instruction_format=passage_instruction_format, trust_remote_code=trust_remote_code,
                        batch_size=batch_size, query_max_length=query_max_length, max_length=max_length,
                        normalize=normalize)


class FlagLLMReranker(_RerankerFace):
    """FlagEmbedding's ``FlagLLMReranker`` (the "Yes" logit of a causal LM) on trine's :class:`Reranker`
    (``model_family='llm-reranker'``); ``peft_path`` is refused (see :data:`REFUSED`)."""

    family = "llm-reranker"
    score_options = ("batch_size", "query_max_length", "max_length", "normalize", "prompt")

    def __init__(self, model_name_or_path: str | os.PathLike, peft_path: str | None = None, use_fp16: bool = False,
                 use_bf16: bool = False, query_instruction_for_rerank: str | None = "A: ",
                 query_instruction_format: str = "{}{}", passage_instruction_for_rerank: str | None = "B: ",
                 passage_instruction_format: str = "{}{}", cache_dir: str | None = None,
                 trust_remote_code: bool = False, devices: str | Sequence[str | int] | None = None,
                 prompt: str | None = None, batch_size: int = 128, query_max_length: int | None = None,
                 max_length: int | None = None, normalize: bool = False, **kwargs: Any):
        self._init_face(model_name_or_path, cache_dir=cache_dir, peft_path=peft_path, extra=kwargs,
                        use_fp16=use_fp16, use_bf16=use_bf16, devices=devices,
                        query_instruction_for_rerank=query_instruction_for_rerank,
                        query_instruction_format=query_instruction_format,
                        passage_instruction_for_rerank=passage_instruction_for_rerank,
                        passage_instruction_format=passage_instruction_format, trust_remote_code=trust_remote_code,
                        prompt=prompt, batch_size=batch_size, query_max_length=query_max_length,
                        max_length=max_length, normalize=normalize)


class LayerWiseFlagLLMReranker(_RerankerFace):
    """FlagEmbedding's ``LayerWiseFlagLLMReranker`` (bge-reranker-v2-minicpm-layerwise: scores at chosen layers) on
    trine's :class:`Reranker` (``model_family='llm-reranker-layerwise'``)."""

    family = "llm-reranker-layerwise"
    score_options = ("batch_size", "query_max_length", "max_length", "normalize", "prompt", "cutoff_layers")

    def __init__(self, model_name_or_path: str | os.PathLike, peft_path: str | None = None, use_fp16: bool = False,
                 use_bf16: bool = False, query_instruction_for_rerank: str | None = "A: ",
                 query_instruction_format: str = "{}{}", passage_instruction_for_rerank: str | None = "B: ",
                 passage_instruction_format: str = "{}{}", cache_dir: str | None = None,
                 trust_remote_code: bool = False, devices: str | Sequence[str | int] | None = None,
                 cutoff_layers: list[int] | None = None, prompt: str | None = None, batch_size: int = 128,
                 query_max_length: int | None = None, max_length: int | None = None, normalize: bool = False,
                 **kwargs: Any):
        self._init_face(model_name_or_path, cache_dir=cache_dir, peft_path=peft_path, extra=kwargs,
                        use_fp16=use_fp16, use_bf16=use_bf16, devices=devices,
                        query_instruction_for_rerank=query_instruction_for_rerank,
                        query_instruction_format=query_instruction_format,
                        passage_instruction_for_rerank=passage_instruction_for_rerank,
                        passage_instruction_format=passage_instruction_format, trust_remote_code=trust_remote_code,
                        cutoff_layers=cutoff_layers, prompt=prompt, batch_size=batch_size,
                        query_max_length=query_max_length, max_length=max_length, normalize=normalize)


# ------------------------------------------------------------------------------------------------ auto classes
#: FlagEmbedding 1.4.2's ``model_class`` values and the faces they name (None: no trine equivalent, and why)
EMBEDDER_CLASSES: dict[str, type | None] = {
    "encoder-only-base": FlagModel, "encoder-only-m3": BGEM3FlagModel, "decoder-only-base": FlagLLMModel,
    "decoder-only-icl": FlagICLModel, "decoder-only-pseudo_moe": None,
}
RERANKER_CLASSES: dict[str, type | None] = {
    "encoder-only-base": FlagReranker, "decoder-only-base": FlagLLMReranker,
    "decoder-only-layerwise": LayerWiseFlagLLMReranker, "decoder-only-lightweight": None,
}
_NO_FACE = {"decoder-only-pseudo_moe": "FlagEmbedding's pseudo-MoE decoder embedder is not in trine",
            "decoder-only-lightweight": REFUSED["compress_layers"]}

_LAST = "last_token"
_E5_FMT = "Instruct: {}\nQuery: {}"
_BGE_LLM_FMT = "<instruct>{}\n<query>{}"
# name -> (model_class, pooling_method, trust_remote_code, query_instruction_format): FlagEmbedding 1.4.2's table
# of known model names (FlagAutoModel resolves a folder by its base name, or its parent's for "checkpoint-N")
_EMBEDDER_NAMES: dict[str, tuple[str, str, bool, str]] = {
    "bge-reasoner-embed-qwen3-8b-0923": ("decoder-only-base", _LAST, False, _E5_FMT),
    "bge-code-v1": ("decoder-only-base", _LAST, True, _BGE_LLM_FMT),
    "bge-en-icl": ("decoder-only-icl", _LAST, False, _BGE_LLM_FMT),
    "bge-multilingual-gemma2": ("decoder-only-base", _LAST, False, _BGE_LLM_FMT),
    "bge-m3": ("encoder-only-m3", "cls", False, "{}{}"),
    **{f"bge-{size}-{lang}{v}": ("encoder-only-base", "cls", False, "{}{}")
       for v in ("-v1.5", "") for lang in ("en", "zh") for size in ("large", "base", "small")},
    **{f"Qwen3-Embedding-{s}": ("decoder-only-base", _LAST, False, "Instruct: {}\nQuery:{}")
       for s in ("0.6B", "4B", "8B")},
    "e5-mistral-7b-instruct": ("decoder-only-base", _LAST, False, _E5_FMT),
    **{f"{p}e5-{s}{v}": ("encoder-only-base", "mean", False, "{}{}")
       for p, v, sizes in (("", "-v2", ("large", "base", "small")), ("multilingual-", "", ("large", "base", "small")),
                           ("", "", ("large", "base", "small"))) for s in sizes},
    "multilingual-e5-large-instruct": ("encoder-only-base", "mean", False, _E5_FMT),
    **{n: ("decoder-only-base", _LAST, True, _E5_FMT)
       for n in ("gte-Qwen2-7B-instruct", "gte-Qwen2-1.5B-instruct", "gte-Qwen1.5-7B-instruct")},
    **{n: ("encoder-only-base", "cls", True, "{}{}")
       for n in ("gte-multilingual-base", "gte-large-en-v1.5", "gte-base-en-v1.5")},
    **{f"gte-{s}": ("encoder-only-base", "mean", False, "{}{}") for s in ("large", "base", "small")},
    **{f"gte-{s}-zh": ("encoder-only-base", "cls", False, "{}{}") for s in ("large", "base", "small")},
    **{n: ("decoder-only-base", _LAST, False, _E5_FMT)
       for n in ("SFR-Embedding-2_R", "SFR-Embedding-Mistral", "Linq-Embed-Mistral")},
    "bce-embedding-base_v1": ("encoder-only-base", "cls", False, "{}{}"),
}
_RERANKER_NAMES: dict[str, str] = {
    **{n: "encoder-only-base" for n in ("bge-reranker-base", "bge-reranker-large", "bge-reranker-v2-m3",
                                        "jina-reranker-v2-base-multilingual", "gte-multilingual-reranker-base",
                                        "bce-reranker-base_v1", "jina-reranker-v1-turbo-en")},
    "bge-reranker-v2-gemma": "decoder-only-base",
    "bge-reranker-v2-minicpm-layerwise": "decoder-only-layerwise",
    "bge-reranker-v2.5-gemma2-lightweight": "decoder-only-lightweight",
}


def model_name(model_name_or_path: str | os.PathLike) -> str:
    """The name FlagEmbedding's auto classes look up: the folder's base name, or its parent's for a Trainer
    ``checkpoint-N`` folder (a trailing slash is ignored)."""
    path = os.fspath(model_name_or_path).rstrip("/\\")
    name = os.path.basename(path)
    return os.path.basename(os.path.dirname(path)) if name.startswith("checkpoint-") else name


def _face_of(table: dict[str, type | None], model_class: Any, where: str) -> type:
    key = getattr(model_class, "value", model_class)  # FlagEmbedding's enum members too
    if key not in table:
        raise OptionError(f"{where}: model_class: {key!r}; choose from {sorted(table)}")
    face = table[key]
    if face is None:
        raise OptionError(f"{where}: model_class: {key!r}: {_NO_FACE[key]}")
    return face


class FlagAutoModel:
    """FlagEmbedding's ``FlagAutoModel``: :meth:`from_finetuned` picks the embedder face by FlagEmbedding's rules."""

    def __init__(self) -> None:
        raise OptionError("FlagAutoModel: make one with FlagAutoModel.from_finetuned(model_name_or_path, ...)")

    @classmethod
    def from_finetuned(cls, model_name_or_path: str | os.PathLike, model_class: Any = None,
                       normalize_embeddings: bool = True, use_fp16: bool = True, use_bf16: bool = False,
                       query_instruction_for_retrieval: str | None = None, devices: Any = None,
                       pooling_method: str | None = None, trust_remote_code: bool | None = None,
                       query_instruction_format: str | None = None, truncate_dim: int | None = None,
                       **kwargs: Any) -> FlagModel | BGEM3FlagModel:
        """``model_class`` given: that face, with pooling ``cls`` (encoders) or ``last_token`` (decoders),
        ``trust_remote_code=False`` and the template ``'{}{}'`` unless given (FlagEmbedding's rule); else the
        face, pooling, remote-code flag and template of FlagEmbedding's table of known model names."""
        where = "FlagAutoModel.from_finetuned"
        if model_class is not None:
            face = _face_of(EMBEDDER_CLASSES, model_class, where)
            key = getattr(model_class, "value", model_class)
            defaults = (_LAST if key.startswith("decoder") else "cls", False, "{}{}")
        else:
            name = model_name(model_name_or_path)
            if name not in _EMBEDDER_NAMES:
                raise OptionError(f"{where}: model_class: {name!r} is not in FlagEmbedding's table of model names; "
                                  f"pass model_class (one of {sorted(EMBEDDER_CLASSES)})")
            key, *rest = _EMBEDDER_NAMES[name]
            face, defaults = EMBEDDER_CLASSES[key], tuple(rest)
        kwargs["pooling_method"] = _given(pooling_method, defaults[0])  # a decoder face checks it is last_token
        return face(model_name_or_path, normalize_embeddings=normalize_embeddings, use_fp16=use_fp16,
                    use_bf16=use_bf16, query_instruction_for_retrieval=query_instruction_for_retrieval,
                    query_instruction_format=_given(query_instruction_format, defaults[2]), devices=devices,
                    trust_remote_code=_given(trust_remote_code, defaults[1]), truncate_dim=truncate_dim, **kwargs)


class FlagAutoReranker:
    """FlagEmbedding's ``FlagAutoReranker``: :meth:`from_finetuned` picks the reranker face by FlagEmbedding's rules."""

    def __init__(self) -> None:
        raise OptionError("FlagAutoReranker: make one with FlagAutoReranker.from_finetuned(model_name_or_path, ...)")

    @classmethod
    def from_finetuned(cls, model_name_or_path: str | os.PathLike, model_class: Any = None, use_fp16: bool = False,
                       trust_remote_code: bool | None = None, **kwargs: Any) -> _RerankerFace:
        """``model_class`` given: that face; else the one FlagEmbedding's table of known names gives.
        ``trust_remote_code`` unset is ``False`` (every name in FlagEmbedding 1.4.2's table says so)."""
        where = "FlagAutoReranker.from_finetuned"
        if model_class is None:
            name = model_name(model_name_or_path)
            if name not in _RERANKER_NAMES:
                raise OptionError(f"{where}: model_class: {name!r} is not in FlagEmbedding's table of model names; "
                                  f"pass model_class (one of {sorted(RERANKER_CLASSES)})")
            model_class = _RERANKER_NAMES[name]
        face = _face_of(RERANKER_CLASSES, model_class, where)
        return face(model_name_or_path, use_fp16=use_fp16, trust_remote_code=bool(trust_remote_code), **kwargs)
