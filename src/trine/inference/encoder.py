"""The one encoder: any checkpoint, with or without BGE-M3 heads, to an :class:`EncodeResult`.

Tokenise once, length-sorted batches with out-of-memory back-off
(:func:`trine.inference.batching.run_batched`), one multi-device pool
(:class:`trine.inference.pool.DevicePool`). ``Embedder`` and ``M3Embedder``
(:mod:`trine.inference.embedder`) are FlagEmbedding's faces of it; trine's own code calls
:meth:`Encoder.encode_result`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from typing import Any, Literal

import numpy as np
import torch

from trine.data.text import check_template, format_instruction
from trine.errors import NonFiniteOutputError, OptionError
from trine.inference.batching import pad_batch, run_batched, tokenize
from trine.inference.pool import (
    DeviceRunner,
    check_max_length,
    check_positive_int,
    check_token_budget,
    resolve_devices,
    resolve_dtype,
)
from trine.inference.result import OUTPUTS, EncodeResult, check_outputs
from trine.modeling.families import ModelFamily, family_of, inference_loader, resolve_family
from trine.modeling.trihead import HeadInit, TriHeadModel

logger = logging.getLogger(__name__)

Kind = Literal["query", "passage"]
Backend = Literal["torch", "onnx"]
BACKENDS = ("torch", "onnx")


def _given(value: Any, default: Any) -> Any:
    """An argument, or the default when it is None (0 is a value, never "the default")."""
    return default if value is None else value


def _check_onnx_options(model: Any, *, devices: Any, **options: Any) -> None:
    """The options of ``backend="onnx"``: a folder holding ``trine export --to onnx``'s graph, on the
    CPU; what only the torch model has (precision, MCLS, pooling, head set-up, a model instance) is
    a ValueError naming the option."""
    from trine.inference.onnx_graph import OnnxGraph

    if not isinstance(model, (str, os.PathLike, OnnxGraph)):
        raise ValueError(f"backend='onnx' takes the folder of an ONNX export (trine export --to onnx), not a "
                         f"{type(model).__name__}")
    torch_only = {"use_fp16": False, "use_bf16": False, "mcls_interval": None, "pooling_method": None,
                  "trust_remote_code": False, "model_family": None, "colbert_dim": -1,
                  "init_missing_heads": None, "head_init_texts": None, "revision": None, "cache_dir": None,
                  "token": None}
    given = [k for k, default in torch_only.items()
             if (options[k] is not None if default is None else options[k] != default)]
    if given:
        raise ValueError(f"{', '.join(given)}: torch-only option(s), not with backend='onnx' (the exported graph "
                         "runs in float32 with the pooling, normalisation and heads it was exported with)")
    if devices is not None and ([devices] if isinstance(devices, (str, int)) else list(devices)) != ["cpu"]:
        raise ValueError(f"devices={devices!r}: backend='onnx' runs on the CPU only (devices='cpu' or None)")


class Encoder(DeviceRunner):
    """Dense vectors, and with BGE-M3 heads lexical weights and multi-vectors, from one encoder pass.

    ``with_heads`` loads the folder's head files (``colbert_dim`` and ``init_missing_heads``
    ('random', 'neutral', or 'bm25' with ``head_init_texts``, for a folder without them) go with
    it); without them the model is
    dense only. :attr:`outputs` says what this model can give; :meth:`encode_result` gives it.
    ``truncate_dim`` (Matryoshka): dense vectors cut to their first ``truncate_dim`` values, and
    L2-normalised again when the model normalises (``normalize_embeddings``); ``encode_result``
    takes it per call too. ``backend="onnx"``: ``model_name_or_path`` is a ``trine export --to onnx``
    folder, run by ONNX Runtime on the CPU per batch of the same tokenising and batching (the
    torch-only options are errors). ``model_name_or_path`` may be a Hugging Face Hub id (``org/name``, or
    ``org/name@revision``), fetched into the Hub cache (``cache_dir``; ``revision``, ``token``) as
    :func:`trine.modeling.loading.resolve_model` says; a local folder of that name wins. ``model_family``: a
    registered embedder family (``trihead``, ``encoder``, ``decoder``); unset, the one the folder records or its
    files show (:func:`trine.modeling.families.resolve_family`).
    """

    def __init__(
        self,
        model_name_or_path: str | os.PathLike | TriHeadModel,
        *,
        with_heads: bool = True,
        colbert_dim: int = -1,
        init_missing_heads: HeadInit | None = None,
        head_init_texts: Sequence[str] | None = None,
        normalize_embeddings: bool = True,
        pooling_method: str | None = None,
        use_fp16: bool = False,
        use_bf16: bool = False,
        devices: str | int | Sequence[str | int] | None = None,
        query_instruction_for_retrieval: str | None = None,
        query_instruction_format: str | None = None,
        passage_instruction_for_retrieval: str | None = None,
        passage_instruction_format: str = "{}{}",
        batch_size: int = 256,
        max_tokens_per_batch: int | Literal["auto"] | None = "auto",
        query_max_length: int | None = None,
        passage_max_length: int | None = None,
        mcls_interval: int | None = None,
        show_progress: bool = True,
        trust_remote_code: bool = False,
        model_family: str | None = None,
        truncate_dim: int | None = None,
        backend: Backend = "torch",
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        token: str | bool | None = None,
    ):
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))}, not {backend!r}")
        self.backend = backend
        if not with_heads and (colbert_dim != -1 or init_missing_heads is not None or head_init_texts is not None):
            raise TypeError("colbert_dim, init_missing_heads and head_init_texts set up the heads: they need "
                            "with_heads=True (an M3Embedder)")
        check_token_budget(max_tokens_per_batch)
        if backend == "onnx":
            _check_onnx_options(model_name_or_path, use_fp16=use_fp16, use_bf16=use_bf16, devices=devices,
                                mcls_interval=mcls_interval, pooling_method=pooling_method,
                                trust_remote_code=trust_remote_code, model_family=model_family,
                                colbert_dim=colbert_dim, init_missing_heads=init_missing_heads,
                                head_init_texts=head_init_texts, revision=revision, cache_dir=cache_dir,
                                token=token)
            devices = "cpu"
        self.devices = resolve_devices(devices)
        self.dtype = resolve_dtype(use_fp16, use_bf16)
        if mcls_interval is not None and mcls_interval < 1:
            raise ValueError(f"mcls_interval must be a positive number of tokens, got {mcls_interval}")
        if backend == "onnx":
            from trine.inference.onnx_graph import OnnxGraph

            model = model_name_or_path if isinstance(model_name_or_path, OnnxGraph) else \
                OnnxGraph(model_name_or_path, with_heads=with_heads)
            model.has_heads = model.has_heads and with_heads
            if normalize_embeddings != model.normalize_embeddings:
                raise ValueError(f"{model.path}: the ONNX graph was exported with normalize_embeddings="
                                 f"{model.normalize_embeddings}; it cannot be changed with backend='onnx'")
        elif isinstance(model_name_or_path, torch.nn.Module) and hasattr(model_name_or_path, "family_name"):
            model = model_name_or_path  # a loaded model of a trine family (TriHeadModel, DecoderEmbedder)
            if pooling_method is not None:
                model.pooling_method = pooling_method
            model.normalize_embeddings = normalize_embeddings
        elif not isinstance(model_name_or_path, (str, os.PathLike)):
            raise ValueError(f"backend='torch' takes a model folder or a TriHeadModel, not "
                             f"{type(model_name_or_path).__name__} (an ONNX graph needs backend='onnx')")
        else:
            # a folder, or a Hub id (org/name, org/name@revision) fetched into the Hugging Face cache; its
            # family the one given, else the one the folder records or shows (trine.modeling.families)
            family, path = resolve_family(model_name_or_path, "embedder", model_family=model_family,
                                          revision=revision, cache_dir=cache_dir, token=token)
            model = inference_loader(family.name)(
                path,
                with_heads=with_heads,
                pooling_method=pooling_method,
                normalize_embeddings=normalize_embeddings,
                dtype=self.dtype,
                trust_remote_code=trust_remote_code,
                **({"colbert_dim": colbert_dim, "init_missing_heads": init_missing_heads,
                    "head_init_texts": head_init_texts} if with_heads else {}),
            )
        if mcls_interval is not None and model.pooling_method != "cls":
            raise ValueError("mcls_interval averages CLS states: it needs pooling_method 'cls'")
        batch_size = check_positive_int("batch_size", batch_size)
        self.truncate_dim = check_truncate_dim(truncate_dim, model.hidden_size)
        query_max_length = check_max_length("query_max_length", query_max_length, model.max_positions)
        passage_max_length = check_max_length("passage_max_length", passage_max_length, model.max_positions)
        self.model = model.eval()
        self.tokenizer = model.tokenizer
        self.query_instruction_for_retrieval = query_instruction_for_retrieval
        # None: the model's own template (a decoder embedder's is FlagEmbedding's '<instruct>{}\n<query>{}')
        self.query_instruction_format = query_instruction_format if query_instruction_format is not None else \
            getattr(model, "default_query_instruction_format", "{}{}")
        check_template(self.query_instruction_format.replace("\\n", "\n"), "query_instruction_format")
        self.passage_instruction_for_retrieval = passage_instruction_for_retrieval
        self.passage_instruction_format = check_template(passage_instruction_format, "passage_instruction_format")
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
        return [format_instruction(instruction_format, instruction, t) for t in texts]

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
            self._check_finite(out, [texts[i] for i in idx])
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

    def _model_name(self) -> str:
        """The folder the model was loaded from, as a message names it."""
        path = getattr(self.model, "path", None)  # an ONNX graph
        config = getattr(getattr(self.model, "backbone", None), "config", None)
        return str(path or getattr(config, "_name_or_path", None) or type(self.model).__name__)

    def _check_finite(self, out: dict[str, torch.Tensor], texts: list[str]) -> None:
        """Refuse a batch whose outputs hold NaN or infinity, before any is turned into vectors: with finite
        weights (checked at load) it is an overflow, typically of float16 activations in a long text. Never
        written, indexed or returned: a NaN vector scores NaN against everything and poisons a whole index."""
        rows: dict[str, torch.Tensor] = {}  # per output: which texts of the batch hold a non-finite value
        if out.get("dense_vecs") is not None:
            rows["dense_vecs"] = ~torch.isfinite(out["dense_vecs"]).all(dim=-1)
        if out.get("token_weights") is not None:
            rows["lexical weights"] = ~torch.isfinite(out["token_weights"]).all(dim=-1)
        if out.get("colbert_vecs") is not None:  # padding positions are no vectors
            finite = torch.isfinite(out["colbert_vecs"]).all(dim=-1) | ~out["colbert_mask"].bool()
            rows["colbert_vecs"] = ~finite.all(dim=-1)
        for name, flags in rows.items():
            bad = torch.nonzero(flags).flatten().tolist()
            if not bad:
                continue
            dtype = str(self.dtype).removeprefix("torch.")
            hint = ("float16 overflows in this model: encode in float32 (no --fp16) or bfloat16 (--bf16)"
                    if self.dtype == torch.float16 else "the model's activations overflow or its weights are broken")
            text = texts[bad[0]]
            shown = repr(text[:60] + ("..." if len(text) > 60 else ""))
            raise NonFiniteOutputError(f"{self._model_name()}: the model gave NaN or infinite {name} ({dtype}) for "
                                       f"{len(bad)} of {len(texts)} texts of a batch, the first {shown}: {hint}")

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

    # ------------------------------------------------------------------ what every consumer calls
    @property
    def outputs(self) -> tuple[str, ...]:
        """What this model can give: ``("dense",)``, or with heads ``("dense", "sparse", "colbert")``."""
        return OUTPUTS if self.model.has_heads else ("dense",)

    @property
    def family(self) -> ModelFamily | None:
        """The model family of the loaded model (None for an ONNX graph, which is no trine family)."""
        return family_of(self.model) if hasattr(self.model, "family_name") else None

    def check_outputs(self, outputs: Iterable[str], where: str = "") -> tuple[str, ...]:
        """``outputs`` in order, each one this model gives; else an ``OptionError`` naming the model family
        and what it gives (an M3Embedder of a plain encoder started without heads gives dense only)."""
        outputs = check_outputs(outputs)
        missing = [o for o in outputs if o not in self.outputs]
        if missing:
            family = self.family
            if family is not None and self.outputs == family.outputs:
                family.check_outputs(outputs, where)
            what = family.describe() if family is not None else "this ONNX graph"
            raise OptionError(f"{where + ': ' if where else ''}{what} loaded with outputs {', '.join(self.outputs)}"
                              f": not {', '.join(missing)}")
        return outputs

    def encode_result(
        self,
        sentences: str | Sequence[str],
        outputs: Iterable[str] = ("dense",),
        *,
        kind: Kind | None = None,
        batch_size: int | None = None,
        max_length: int | None = None,
        instruction: str | None = None,
        instruction_format: str = "{}{}",
        truncate_dim: int | None = None,
    ) -> EncodeResult:
        """``outputs`` (of ``dense``, ``sparse``, ``colbert``) of ``sentences`` as an :class:`EncodeResult`.

        ``kind="query"`` or ``"passage"``: with this encoder's query (passage) instruction and
        maximum length, as ``encode_queries`` (``encode_corpus``); ``kind=None``: as ``encode``,
        with the ``instruction`` given (none by default) and the passage maximum length.
        ``max_length`` and ``batch_size`` left ``None`` take those defaults. One string gives one
        text's encodings (a vector, a dict, an array), a list gives lists. ``truncate_dim``: the
        dense vectors' leading dimensions kept (re-normalised when the model normalises); ``None``
        takes the encoder's ``truncate_dim`` (by default the full size).
        """
        outputs = check_outputs(outputs)
        dim = check_truncate_dim(truncate_dim, self.model.hidden_size) if truncate_dim is not None \
            else self.truncate_dim
        missing = [o for o in outputs if o not in self.outputs]
        if missing:
            family = self.family
            hint = ("the ONNX export has none, or was loaded as an Embedder" if family is None
                    else "load it with its BGE-M3 heads (an M3Embedder)" if family.new_heads
                    else f"{family.describe()} has only the dense output")
            raise ValueError(f"this model was loaded without heads (dense only): no {', '.join(missing)} output; "
                             + hint)
        if kind is not None:
            if kind not in ("query", "passage"):
                raise ValueError(f"kind must be 'query', 'passage' or None, not {kind!r}")
            if instruction is not None:
                raise ValueError(f"kind={kind!r} uses the encoder's own {kind} instruction; pass instruction "
                                 "with kind=None")
            instruction = getattr(self, f"{kind}_instruction_for_retrieval")
            instruction_format = getattr(self, f"{kind}_instruction_format")
            max_length = _given(max_length, getattr(self, f"{kind}_max_length"))
        single = isinstance(sentences, str)
        texts = self.apply_instruction(self.texts_of(sentences), instruction, instruction_format)
        rows = self._encode_rows(texts, max_length, batch_size, *(o in outputs for o in OUTPUTS))
        result = EncodeResult.from_rows(rows, outputs, self.model.hidden_size)
        if dim is not None and result.dense_vecs is not None:
            result["dense_vecs"] = truncate_dense(result.dense_vecs, dim, self.model.normalize_embeddings)
        return result.first() if single else result


def check_truncate_dim(truncate_dim: int | None, full_dim: int) -> int | None:
    """``truncate_dim`` checked: ``None``, or an integer from 1 to the dense size ``full_dim``."""
    if truncate_dim is None:
        return None
    if isinstance(truncate_dim, bool) or not isinstance(truncate_dim, (int, np.integer)) \
            or not 1 <= truncate_dim <= full_dim:
        raise ValueError(f"truncate_dim must be an integer from 1 to the dense size {full_dim}, got {truncate_dim!r}")
    return int(truncate_dim)


def truncate_dense(vecs: np.ndarray, dim: int, normalize: bool = True) -> np.ndarray:
    """Matryoshka truncation: the first ``dim`` values of each dense vector (rows of a 2-d array, or
    one vector), L2-normalised again when ``normalize``; the vectors unchanged when ``dim`` is their
    full size (or more)."""
    vecs = np.asarray(vecs)
    if dim >= vecs.shape[-1]:
        return vecs
    cut = np.ascontiguousarray(vecs[..., :dim])
    if normalize:
        norms = np.linalg.norm(cut, axis=-1, keepdims=True)
        cut = cut / np.maximum(norms, 1e-12).astype(cut.dtype)
    return cut


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
