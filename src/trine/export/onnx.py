"""``trine export --to onnx``: one ONNX graph with every output, and :class:`OnnxM3Model` to run it.

The graph takes ``input_ids`` and ``attention_mask`` (int64, batch x length, both axes dynamic)
and gives ``dense_vecs`` (batch x hidden), and for a model with heads ``token_weights`` (batch x
length: the lexical weight per position, zero at special tokens and padding), ``colbert_vecs``
(batch x length-1 x colbert_dim) and ``colbert_mask`` (batch x length-1, which rows are real
multi-vectors). ``OUT`` also holds the tokenizer and ``trine_onnx.json`` (the recipe); with
``quantize="int8"`` a dynamically quantised ``model_int8.onnx`` beside the fp32 ``model.onnx``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from trine.cards import inherited_card, write_card
from trine.errors import OptionError
from trine.inference.batching import pad_batch, tokenize
from trine.inference.embedder import M3Embedder
from trine.inference.onnx_graph import MODEL_FILE, RECIPE_FILE, OnnxGraph
from trine.io import atomic_folder, check_output_path
from trine.modeling.families import resolve_family
from trine.modeling.pooling import pool
from trine.modeling.trihead import TriHeadModel, special_token_ids

logger = logging.getLogger(__name__)

INT8_FILE = "model_int8.onnx"
QUANTIZATIONS = ("int8",)
#: texts encoded at export to measure the int8 graph against fp32 (mixed lengths)
CHECK_TEXTS = (
    "grep",
    "How do I list the files in a directory, sorted by size?",
    "The tar command stores many files in one archive file and can compress it with gzip, bzip2 or xz; "
    "it can also list an archive's contents and extract some or all of its members.",
    "rsync copies files between hosts over ssh, sending only the differences between the source and the "
    "destination, and can keep permissions, times, owners and symbolic links.",
)


class _Graph(nn.Module):
    """What the ONNX graph computes: :meth:`TriHeadModel.forward` without MCLS, written with
    exportable operations (comparisons instead of ``isin``)."""

    def __init__(self, model: TriHeadModel):
        super().__init__()
        self.model = model
        self.register_buffer("special", torch.tensor(special_token_ids(model.tokenizer), dtype=torch.long),
                             persistent=False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        m = self.model
        hidden = m.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if m.pooling_method == "last_token":  # right padding always (pool's data-dependent test would be traced)
            last = attention_mask.sum(1) - 1
            dense = hidden[torch.arange(hidden.size(0), device=hidden.device), last]
        else:
            dense = pool(hidden, attention_mask, m.pooling_method)
        if m.normalize_embeddings:
            dense = torch.nn.functional.normalize(dense, dim=-1)
        if not m.has_heads:
            return (dense,)
        weights = torch.relu(m.sparse_linear(hidden)).squeeze(-1)
        drop = (input_ids.unsqueeze(-1) == self.special).any(-1) | (attention_mask == 0)
        weights = torch.where(drop, torch.zeros_like(weights), weights)
        mask = attention_mask[:, 1:] > 0
        vecs = m.colbert_linear(hidden[:, 1:]) * mask.unsqueeze(-1).to(hidden.dtype)
        if m.normalize_embeddings:
            vecs = torch.nn.functional.normalize(vecs, dim=-1)
        return dense, weights, vecs, mask


def _output_names(heads: bool) -> list[str]:
    return ["dense_vecs", "token_weights", "colbert_vecs", "colbert_mask"] if heads else ["dense_vecs"]


def export_onnx(model_path: str | os.PathLike, out: str | os.PathLike, *, opset: int = 18,
                quantize: str | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Write the ONNX export of ``model_path`` to ``out``; return the recipe written to ``trine_onnx.json``
    (with ``quantize``: ``int8_min_cosine``, the lowest cosine of the int8 dense vectors to fp32 over
    :data:`CHECK_TEXTS`)."""
    model_path = os.fspath(model_path)
    if quantize is not None and quantize not in QUANTIZATIONS:
        raise OptionError(f"--quantize: {quantize!r}; choose from {', '.join(QUANTIZATIONS)}")
    if isinstance(opset, bool) or not isinstance(opset, int) or not 14 <= opset <= 23:
        raise OptionError(f"--opset: an integer from 14 to 23, not {opset!r}")
    check_output_path(out, inputs=[model_path], overwrite=overwrite, what="export folder")
    family, _ = resolve_family(model_path, "embedder")
    family.check_export("onnx", model_path)
    heads = "sparse" in family.outputs  # the tri-head family; a plain encoder exports its dense output
    model = TriHeadModel.from_pretrained(model_path, with_heads=heads, attn_implementation="eager").eval()
    graph = _Graph(model).eval()
    example = pad_batch(tokenize(model.tokenizer, ["a short example", "a somewhat longer example text here"], 32),
                        model.tokenizer.pad_token_id, "cpu")
    names = _output_names(heads)
    recipe = {"format": "trine-onnx", "version": 1, "model_file": MODEL_FILE, "opset": opset, "outputs": names,
              "has_heads": heads, "pooling_method": model.pooling_method,
              "normalize_embeddings": model.normalize_embeddings, "vocab_size": model.vocab_size,
              "hidden_size": model.hidden_size, "max_positions": model.max_positions,
              "colbert_dim": model.colbert_linear.out_features if heads else None, "source": model_path}
    with atomic_folder(out, inputs=[model_path], overwrite=overwrite) as tmp:
        target = os.path.join(tmp, MODEL_FILE)
        axes = {"input_ids": {0: "batch", 1: "length"}, "attention_mask": {0: "batch", 1: "length"},
                "dense_vecs": {0: "batch"}}
        if heads:
            axes.update({"token_weights": {0: "batch", 1: "length"},
                         "colbert_vecs": {0: "batch", 1: "length_1"}, "colbert_mask": {0: "batch", 1: "length_1"}})
        with torch.no_grad():
            torch.onnx.export(graph, (example["input_ids"], example["attention_mask"]), target,
                              input_names=["input_ids", "attention_mask"], output_names=names,
                              dynamic_axes=axes, opset_version=opset, dynamo=False)
        model.tokenizer.save_pretrained(tmp)
        _write_recipe(tmp, recipe)
        if quantize == "int8":
            from onnxruntime.quantization import QuantType, quantize_dynamic

            quantize_dynamic(target, os.path.join(tmp, INT8_FILE), weight_type=QuantType.QInt8)
            fp32 = OnnxM3Model(tmp, show_progress=False).encode(list(CHECK_TEXTS))["dense_vecs"]
            int8 = OnnxM3Model(tmp, model_file=INT8_FILE, show_progress=False).encode(list(CHECK_TEXTS))["dense_vecs"]
            cos = np.sum(fp32 * int8, 1) / (np.linalg.norm(fp32, axis=1) * np.linalg.norm(int8, axis=1))
            recipe["int8_file"] = INT8_FILE
            recipe["int8_min_cosine"] = float(cos.min())
            _write_recipe(tmp, recipe)
        write_card(tmp, inherited_card(model_path, "export --to onnx", "onnx"),
                   name=os.path.basename(os.path.abspath(os.fspath(out))))
    return recipe


def _write_recipe(folder: str, recipe: dict[str, Any]) -> None:
    with open(os.path.join(folder, RECIPE_FILE), "w", encoding="utf-8") as f:
        json.dump(recipe, f, indent=2)


class OnnxM3Model(M3Embedder):
    """``M3Embedder(path, backend="onnx")`` with a choice of graph (``model_file``, e.g. the int8 one)
    and ONNX Runtime ``providers``: ``encode`` gives trine's :class:`EncodeResult` through the one
    encoder's tokenising and length-sorted batching."""

    def __init__(self, path: str | os.PathLike, *, model_file: str | None = None, batch_size: int = 64,
                 max_length: int | None = None, providers: Sequence[str] | None = None, show_progress: bool = True):
        super().__init__(OnnxGraph(path, model_file=model_file, providers=providers), backend="onnx",
                         batch_size=batch_size, query_max_length=max_length, passage_max_length=max_length,
                         show_progress=show_progress)

    @property
    def recipe(self) -> dict[str, Any]:
        return self.model.recipe
