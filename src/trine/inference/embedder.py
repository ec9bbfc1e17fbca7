"""FlagEmbedding's faces of the one encoder (:class:`trine.inference.encoder.Encoder`): ``Embedder``
(``FlagModel``: dense, ``encode`` returns an array) and ``M3Embedder`` (``BGEM3FlagModel``: three
outputs, ``encode`` returns the ``dense_vecs`` / ``lexical_weights`` / ``colbert_vecs`` dictionary).

Both only translate FlagEmbedding's arguments into :meth:`Encoder.encode_result`; trine's own code
calls that directly, whichever class it holds.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

import trine.scoring as scoring
from trine.inference.encoder import Encoder, _given
from trine.inference.result import OUTPUTS, EncodeResult
from trine.modeling.trihead import TriHeadModel

__all__ = ["Embedder", "M3Embedder"]


class Embedder(Encoder):
    """Dense embeddings from any encoder (FlagEmbedding's ``FlagModel``); the heads are not loaded.

    ``pooling_method`` is ``cls``, ``mean`` or ``last_token``; left unset, a sentence-transformers
    folder's own pooling is used (mean for all-MiniLM-L6-v2), otherwise ``cls``.
    """

    def __init__(self, model_name_or_path: str | os.PathLike | TriHeadModel, **kwargs: Any):
        super().__init__(model_name_or_path, with_heads=False, **kwargs)

    def encode(
        self,
        sentences: str | Sequence[str],
        batch_size: int | None = None,
        max_length: int | None = None,
        convert_to_numpy: bool = True,
        instruction: str | None = None,
        instruction_format: str = "{}{}",
    ) -> np.ndarray | torch.Tensor:
        return self._dense(sentences, convert_to_numpy, batch_size=batch_size, max_length=max_length,
                           instruction=instruction, instruction_format=instruction_format)

    def encode_queries(
        self, queries: str | Sequence[str], batch_size: int | None = None, max_length: int | None = None,
        convert_to_numpy: bool = True,
    ) -> np.ndarray | torch.Tensor:
        return self._dense(queries, convert_to_numpy, kind="query", batch_size=batch_size, max_length=max_length)

    def encode_corpus(
        self, corpus: str | Sequence[str], batch_size: int | None = None, max_length: int | None = None,
        convert_to_numpy: bool = True,
    ) -> np.ndarray | torch.Tensor:
        return self._dense(corpus, convert_to_numpy, kind="passage", batch_size=batch_size, max_length=max_length)

    def _dense(self, sentences: str | Sequence[str], convert_to_numpy: bool,
               **options: Any) -> np.ndarray | torch.Tensor:
        vecs = self.encode_result(sentences, ("dense",), **options).dense_vecs
        return vecs if convert_to_numpy else torch.from_numpy(vecs)


class M3Embedder(Encoder):
    """Dense, lexical and multi-vector outputs from one pass (FlagEmbedding's ``BGEM3FlagModel``).

    ``encode`` returns ``{"dense_vecs", "lexical_weights", "colbert_vecs"}`` (an
    :class:`EncodeResult`, a dict) with FlagEmbedding's structures: an array (texts x dim), a list
    of {token id string: weight}, a list of (tokens-1 x colbert_dim) arrays; ``None`` for an
    output not asked for. ``return_*`` given here are the defaults of every ``encode`` call.
    ``init_missing_heads`` ('random', 'neutral', or 'bm25' with ``head_init_texts``: the lexical head
    fitted to BM25 term weights over those texts) allows a folder without head files.
    ``backend="onnx"``: a ``trine export --to onnx`` folder run by ONNX Runtime (see :class:`Encoder`).
    """

    def __init__(
        self,
        model_name_or_path: str | os.PathLike | TriHeadModel,
        *,
        return_dense: bool = True,
        return_sparse: bool = False,
        return_colbert_vecs: bool = False,
        **kwargs: Any,
    ):
        super().__init__(model_name_or_path, with_heads=True, **kwargs)
        self.return_dense = return_dense
        self.return_sparse = return_sparse
        self.return_colbert_vecs = return_colbert_vecs

    def _outputs(self, dense: bool | None, sparse: bool | None, colbert: bool | None) -> tuple[str, ...]:
        flags = (_given(dense, self.return_dense), _given(sparse, self.return_sparse),
                 _given(colbert, self.return_colbert_vecs))
        return tuple(o for o, asked in zip(OUTPUTS, flags) if asked)

    def encode(
        self,
        sentences: str | Sequence[str],
        batch_size: int | None = None,
        max_length: int | None = None,
        return_dense: bool | None = None,
        return_sparse: bool | None = None,
        return_colbert_vecs: bool | None = None,
        instruction: str | None = None,
        instruction_format: str = "{}{}",
    ) -> EncodeResult:
        return self.encode_result(sentences, self._outputs(return_dense, return_sparse, return_colbert_vecs),
                                  batch_size=batch_size, max_length=max_length, instruction=instruction,
                                  instruction_format=instruction_format)

    def encode_queries(
        self, queries: str | Sequence[str], batch_size: int | None = None, max_length: int | None = None,
        return_dense: bool | None = None, return_sparse: bool | None = None,
        return_colbert_vecs: bool | None = None,
    ) -> EncodeResult:
        return self.encode_result(queries, self._outputs(return_dense, return_sparse, return_colbert_vecs),
                                  kind="query", batch_size=batch_size, max_length=max_length)

    def encode_corpus(
        self, corpus: str | Sequence[str], batch_size: int | None = None, max_length: int | None = None,
        return_dense: bool | None = None, return_sparse: bool | None = None,
        return_colbert_vecs: bool | None = None,
    ) -> EncodeResult:
        return self.encode_result(corpus, self._outputs(return_dense, return_sparse, return_colbert_vecs),
                                  kind="passage", batch_size=batch_size, max_length=max_length)

    # ------------------------------------------------------------------ FlagEmbedding's helpers
    def convert_id_to_token(
        self, lexical_weights: dict[str, float] | list[dict[str, float]]
    ) -> dict[str, float] | list[dict[str, float]]:
        single = isinstance(lexical_weights, dict)
        items = [lexical_weights] if single else lexical_weights
        out = [{self.tokenizer.decode([int(i)]): w for i, w in item.items()} for item in items]
        return out[0] if single else out

    @staticmethod
    def compute_lexical_matching_score(
        lexical_weights_1: dict[str, float] | list[dict[str, float]],
        lexical_weights_2: dict[str, float] | list[dict[str, float]],
    ) -> float | np.ndarray:
        if isinstance(lexical_weights_1, dict) and isinstance(lexical_weights_2, dict):
            return scoring.lexical_matching_score(lexical_weights_1, lexical_weights_2)
        if isinstance(lexical_weights_1, list) and isinstance(lexical_weights_2, list):
            return scoring.lexical_scores(lexical_weights_1, lexical_weights_2)
        raise TypeError("pass two dicts or two lists of dicts of lexical weights")

    @staticmethod
    def colbert_score(q_reps: np.ndarray, p_reps: np.ndarray) -> np.float32:
        return np.float32(scoring.colbert_score(q_reps, p_reps))

    def compute_score(
        self,
        sentence_pairs: Sequence[tuple[str, str]] | tuple[str, str],
        batch_size: int | None = None,
        max_query_length: int | None = None,
        max_passage_length: int | None = None,
        weights_for_different_modes: Sequence[float] | None = None,
    ) -> dict[str, list[float] | float]:
        """Scores of (query, passage) pairs under every mode (keys as FlagEmbedding's)."""
        scoring.check_mode_weights(weights_for_different_modes)  # before any encoding
        single = len(sentence_pairs) == 2 and isinstance(sentence_pairs[0], str)
        pairs = [tuple(sentence_pairs)] if single else [tuple(p) for p in sentence_pairs]
        if not pairs:
            return {k: [] for k in scoring.HYBRID_KEYS}
        for i, p in enumerate(pairs):
            if len(p) != 2 or not all(isinstance(t, str) for t in p):
                raise TypeError(f"sentence_pairs[{i}] is not a (query, passage) pair of strings")
        q = self.encode_result([p[0] for p in pairs], OUTPUTS, batch_size=batch_size,
                               max_length=_given(max_query_length, self.query_max_length))
        p = self.encode_result([p[1] for p in pairs], OUTPUTS, batch_size=batch_size,
                               max_length=_given(max_passage_length, self.passage_max_length))
        scores = scoring.paired_scores(q, p, weights_for_different_modes)
        if single:
            return {k: float(v[0]) for k, v in scores.items()}
        return {k: v.tolist() for k, v in scores.items()}
