"""Inference: ``Embedder`` (dense, FlagEmbedding's ``FlagModel``) and ``M3Embedder`` (three outputs).

Both share one encode path: tokenise once, length-sorted batches with out-of-memory back-off
(:func:`trine.inference.batching.run_batched`), and one multi-device pool
(:class:`trine.inference.pool.DevicePool`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch

from trine import scoring
from trine.inference.batching import pad_batch, run_batched, tokenize
from trine.inference.pool import (
    DeviceRunner,
    check_max_length,
    check_positive_int,
    check_token_budget,
    resolve_devices,
    resolve_dtype,
)
from trine.modeling.trihead import HeadInit, TriHeadModel

logger = logging.getLogger(__name__)


def _given(value: Any, default: Any) -> Any:
    """An argument, or the default when it is None (0 is a value, never "the default")."""
    return default if value is None else value


class _EncoderBase(DeviceRunner):
    """What every encoder shares: loading, devices, precision, instructions, the pool."""

    _with_heads = False

    def __init__(
        self,
        model_name_or_path: str | os.PathLike | TriHeadModel,
        *,
        normalize_embeddings: bool = True,
        pooling_method: str | None = None,
        use_fp16: bool = False,
        use_bf16: bool = False,
        devices: str | int | Sequence[str | int] | None = None,
        query_instruction_for_retrieval: str | None = None,
        query_instruction_format: str = "{}{}",
        passage_instruction_for_retrieval: str | None = None,
        passage_instruction_format: str = "{}{}",
        batch_size: int = 256,
        max_tokens_per_batch: int | Literal["auto"] | None = "auto",
        query_max_length: int = 512,
        passage_max_length: int = 512,
        mcls_interval: int | None = None,
        show_progress: bool = True,
        trust_remote_code: bool = False,
        _head_options: dict[str, Any] | None = None,
    ):
        check_token_budget(max_tokens_per_batch)
        self.devices = resolve_devices(devices)
        self.dtype = resolve_dtype(use_fp16, use_bf16)
        if mcls_interval is not None and mcls_interval < 1:
            raise ValueError(f"mcls_interval must be a positive number of tokens, got {mcls_interval}")
        if isinstance(model_name_or_path, TriHeadModel):
            model = model_name_or_path
            if pooling_method is not None:
                model.pooling_method = pooling_method
            model.normalize_embeddings = normalize_embeddings
        else:
            path = os.fspath(model_name_or_path)
            model = TriHeadModel.from_pretrained(
                path,
                with_heads=self._with_heads,
                pooling_method=pooling_method,
                normalize_embeddings=normalize_embeddings,
                dtype=self.dtype,
                trust_remote_code=trust_remote_code,
                **(_head_options or {}),
            )
        if mcls_interval is not None and model.pooling_method != "cls":
            raise ValueError("mcls_interval averages CLS states: it needs pooling_method 'cls'")
        batch_size = check_positive_int("batch_size", batch_size)
        query_max_length = check_max_length("query_max_length", query_max_length, model.max_positions)
        passage_max_length = check_max_length("passage_max_length", passage_max_length, model.max_positions)
        self.model = model.eval()
        self.tokenizer = model.tokenizer
        self.query_instruction_for_retrieval = query_instruction_for_retrieval
        self.query_instruction_format = query_instruction_format
        self.passage_instruction_for_retrieval = passage_instruction_for_retrieval
        self.passage_instruction_format = passage_instruction_format
        self.batch_size = batch_size
        self.max_tokens_per_batch = max_tokens_per_batch
        self.query_max_length = query_max_length
        self.passage_max_length = passage_max_length
        self.mcls_interval = mcls_interval
        self.show_progress = show_progress
        self._pool = None
        if len(self.devices) == 1:
            self._move_to(self.devices[0])

    # ------------------------------------------------------------------ instructions
    @staticmethod
    def texts_of(sentences: str | Sequence[str]) -> list[str]:
        """``sentences`` as a list of strings; anything else is a ValueError naming the item."""
        if isinstance(sentences, str):
            return [sentences]
        if sentences is None or not hasattr(sentences, "__iter__"):
            raise ValueError(f"sentences must be a string or a list of strings, got {type(sentences).__name__}")
        texts = list(sentences)
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise ValueError(f"sentences[{i}] must be a string, got {type(t).__name__}")
        return texts

    @staticmethod
    def apply_instruction(texts: list[str], instruction: str | None, instruction_format: str) -> list[str]:
        if instruction is None:
            return texts
        fmt = instruction_format.replace("\\n", "\n")
        return [fmt.format(instruction, t) for t in texts]

    # ------------------------------------------------------------------ the one encode loop
    @torch.inference_mode()
    def _encode_chunk(
        self,
        texts: list[str],
        *,
        device: str,
        max_length: int,
        batch_size: int,
        return_dense: bool,
        return_sparse: bool,
        return_colbert_vecs: bool,
    ) -> list[tuple[Any, Any, Any]]:
        """(dense row, lexical weights, multi-vectors) per text, in input order."""
        ids = tokenize(self.tokenizer, texts, max_length, self.mcls_interval)
        pad_id = self.tokenizer.pad_token_id
        cls_id = self.tokenizer.cls_token_id if self.mcls_interval is not None else None

        def run(idx: np.ndarray) -> list[tuple[Any, Any, Any]]:
            batch = pad_batch([ids[i] for i in idx], pad_id, device, cls_id)
            out = self.model(
                batch["input_ids"],
                batch["attention_mask"],
                cls_mask=batch.get("cls_mask"),
                return_dense=return_dense,
                return_sparse=return_sparse,
                return_colbert_vecs=return_colbert_vecs,
            )
            n = len(idx)
            dense = out["dense_vecs"].float().cpu().numpy() if return_dense else [None] * n
            lexical = (
                lexical_dicts(out["token_weights"].float().cpu().numpy(), batch["input_ids"].cpu().numpy())
                if return_sparse
                else [None] * n
            )
            if return_colbert_vecs:
                vecs = out["colbert_vecs"].float().cpu().numpy()
                mask = out["colbert_mask"].cpu().numpy()
                colbert = [vecs[r][mask[r]] for r in range(n)]
            else:
                colbert = [None] * n
            return list(zip(dense, lexical, colbert))

        return run_batched(
            [len(x) for x in ids],
            batch_size,
            run,
            max_tokens=self._max_tokens(device),
            desc="encode",
            show_progress=self.show_progress,
        )

    def _encode_rows(
        self,
        texts: list[str],
        max_length: int | None,
        batch_size: int | None,
        return_dense: bool,
        return_sparse: bool,
        return_colbert_vecs: bool,
    ) -> list[tuple[Any, Any, Any]]:
        # None is "the default"; 0 or a negative number is an error (never silently the default)
        max_length = check_max_length("max_length", _given(max_length, self.passage_max_length),
                                      self.model.max_positions)
        batch_size = check_positive_int("batch_size", _given(batch_size, self.batch_size))
        if not texts:
            return []
        chunks = self._run(
            "_encode_chunk",
            texts,
            max_length=max_length,
            batch_size=batch_size,
            return_dense=return_dense,
            return_sparse=return_sparse,
            return_colbert_vecs=return_colbert_vecs,
        )
        return [row for chunk in chunks for row in chunk]


def lexical_dicts(token_weights: np.ndarray, input_ids: np.ndarray) -> list[dict[str, float]]:
    """Per row: {str(token id): max weight} over positions with positive weight.

    Special tokens and padding already carry weight 0 (see ``lexical_token_weights``).
    """
    out = []
    for w, ids in zip(token_weights, input_ids):
        keep = w > 0
        ids_k, w_k = ids[keep], w[keep]
        if ids_k.size == 0:
            out.append({})
            continue
        order = np.argsort(ids_k, kind="stable")
        ids_s, w_s = ids_k[order], w_k[order]
        starts = np.flatnonzero(np.r_[True, ids_s[1:] != ids_s[:-1]])
        best = np.maximum.reduceat(w_s, starts)
        out.append(dict(zip(map(str, ids_s[starts].tolist()), best.tolist())))
    return out


class Embedder(_EncoderBase):
    """Dense embeddings from any encoder (FlagEmbedding's ``FlagModel``).

    ``pooling_method`` is ``cls``, ``mean`` or ``last_token``; left unset, a sentence-transformers
    folder's own pooling is used (mean for all-MiniLM-L6-v2), otherwise ``cls``.
    """

    _with_heads = False

    def encode(
        self,
        sentences: str | Sequence[str],
        batch_size: int | None = None,
        max_length: int | None = None,
        convert_to_numpy: bool = True,
        instruction: str | None = None,
        instruction_format: str = "{}{}",
    ) -> np.ndarray | torch.Tensor:
        single = isinstance(sentences, str)
        texts = self.apply_instruction(self.texts_of(sentences), instruction, instruction_format)
        rows = self._encode_rows(texts, max_length, batch_size, True, False, False)
        dim = self.model.hidden_size
        vecs = np.stack([r[0] for r in rows]) if rows else np.zeros((0, dim), dtype=np.float32)
        out = vecs[0] if single else vecs
        return out if convert_to_numpy else torch.from_numpy(out)

    def encode_queries(
        self, queries: str | Sequence[str], batch_size: int | None = None, max_length: int | None = None,
        convert_to_numpy: bool = True,
    ) -> np.ndarray | torch.Tensor:
        return self.encode(queries, batch_size, _given(max_length, self.query_max_length), convert_to_numpy,
                           self.query_instruction_for_retrieval, self.query_instruction_format)

    def encode_corpus(
        self, corpus: str | Sequence[str], batch_size: int | None = None, max_length: int | None = None,
        convert_to_numpy: bool = True,
    ) -> np.ndarray | torch.Tensor:
        return self.encode(corpus, batch_size, _given(max_length, self.passage_max_length), convert_to_numpy,
                           self.passage_instruction_for_retrieval, self.passage_instruction_format)


class M3Embedder(_EncoderBase):
    """Dense, lexical and multi-vector outputs from one pass (FlagEmbedding's ``BGEM3FlagModel``).

    ``encode`` returns ``{"dense_vecs", "lexical_weights", "colbert_vecs"}`` with FlagEmbedding's
    structures: an array (texts x dim), a list of {token id string: weight}, a list of
    (tokens-1 x colbert_dim) arrays; ``None`` for an output not asked for.
    """

    _with_heads = True

    def __init__(
        self,
        model_name_or_path: str | os.PathLike | TriHeadModel,
        *,
        return_dense: bool = True,
        return_sparse: bool = False,
        return_colbert_vecs: bool = False,
        colbert_dim: int = -1,
        init_missing_heads: HeadInit | None = None,
        **kwargs: Any,
    ):
        """``init_missing_heads`` ('random' or 'neutral') allows a folder without head files."""
        head_options = {"colbert_dim": colbert_dim, "init_missing_heads": init_missing_heads}
        super().__init__(model_name_or_path, _head_options=head_options, **kwargs)
        self.return_dense = return_dense
        self.return_sparse = return_sparse
        self.return_colbert_vecs = return_colbert_vecs

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
    ) -> dict[str, Any]:
        dense = self.return_dense if return_dense is None else return_dense
        sparse = self.return_sparse if return_sparse is None else return_sparse
        colbert = self.return_colbert_vecs if return_colbert_vecs is None else return_colbert_vecs
        single = isinstance(sentences, str)
        texts = self.apply_instruction(self.texts_of(sentences), instruction, instruction_format)
        rows = self._encode_rows(texts, max_length, batch_size, dense, sparse, colbert)
        result: dict[str, Any] = {"dense_vecs": None, "lexical_weights": None, "colbert_vecs": None}
        if dense:
            vecs = np.stack([r[0] for r in rows]) if rows else np.zeros((0, self.model.hidden_size), np.float32)
            result["dense_vecs"] = vecs[0] if single else vecs
        if sparse:
            result["lexical_weights"] = rows[0][1] if single else [r[1] for r in rows]
        if colbert:
            result["colbert_vecs"] = rows[0][2] if single else [r[2] for r in rows]
        return result

    def encode_queries(
        self, queries: str | Sequence[str], batch_size: int | None = None, max_length: int | None = None,
        return_dense: bool | None = None, return_sparse: bool | None = None,
        return_colbert_vecs: bool | None = None,
    ) -> dict[str, Any]:
        return self.encode(queries, batch_size, _given(max_length, self.query_max_length), return_dense, return_sparse,
                           return_colbert_vecs, self.query_instruction_for_retrieval, self.query_instruction_format)

    def encode_corpus(
        self, corpus: str | Sequence[str], batch_size: int | None = None, max_length: int | None = None,
        return_dense: bool | None = None, return_sparse: bool | None = None,
        return_colbert_vecs: bool | None = None,
    ) -> dict[str, Any]:
        return self.encode(corpus, batch_size, _given(max_length, self.passage_max_length), return_dense, return_sparse,
                           return_colbert_vecs, self.passage_instruction_for_retrieval,
                           self.passage_instruction_format)

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
        q = self.encode([p[0] for p in pairs], batch_size,
                        _given(max_query_length, self.query_max_length), True, True, True)
        p = self.encode([p[1] for p in pairs], batch_size,
                        _given(max_passage_length, self.passage_max_length), True, True, True)
        dense = np.einsum("nd,nd->n", q["dense_vecs"].astype(np.float64), p["dense_vecs"].astype(np.float64))
        sparse = [scoring.lexical_matching_score(a, b) for a, b in zip(q["lexical_weights"], p["lexical_weights"])]
        colbert = []
        step = 256
        for s in range(0, len(pairs), step):
            qv, qm = scoring.pad_vectors(q["colbert_vecs"][s : s + step])
            pv, pm = scoring.pad_vectors(p["colbert_vecs"][s : s + step])
            colbert.extend(scoring.colbert_scores_padded(qv, qm, pv, pm, pairwise=True).tolist())
        scores = scoring.hybrid_scores(dense, sparse, colbert, weights_for_different_modes)
        if single:
            return {k: float(v[0]) for k, v in scores.items()}
        return {k: v.tolist() for k, v in scores.items()}
