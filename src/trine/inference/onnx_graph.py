"""Running a ``trine export --to onnx`` graph with ONNX Runtime: :class:`OnnxGraph`, what the one
encoder (:class:`trine.inference.encoder.Encoder` with ``backend="onnx"``) calls in place of a model.

It lives in ``inference`` (not beside the exporter in ``trine.export.onnx``) because the encoder
needs it and the exporter needs the encoder: the shared piece sits in the lower layer, so neither
imports its way back into the other. The file names are the export's layout, read here and written
by the exporter.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from trine.errors import InputError, MissingInputError
from trine.modeling.loading import load_tokenizer

MODEL_FILE = "model.onnx"
RECIPE_FILE = "trine_onnx.json"


class OnnxGraph:
    """An ONNX export run by ONNX Runtime in place of a :class:`TriHeadModel`: what the one encoder
    (:class:`trine.inference.encoder.Encoder` with ``backend="onnx"``) calls per batch. It takes the
    padded ``input_ids`` / ``attention_mask`` tensors and gives the model's outputs as CPU tensors;
    tokenising, batching and the lexical dicts stay the encoder's. ``with_heads=False`` asks for the
    dense output only."""

    def __init__(self, path: str | os.PathLike, *, model_file: str | None = None,
                 providers: Sequence[str] | None = None, with_heads: bool = True):
        import onnxruntime as ort

        self.path = os.fspath(path)
        recipe_file = os.path.join(self.path, RECIPE_FILE)
        if not os.path.isfile(recipe_file):
            raise MissingInputError(f"{self.path}: no {RECIPE_FILE}; not a trine ONNX export (trine export --to onnx)")
        try:
            with open(recipe_file, encoding="utf-8") as f:
                self.recipe = json.load(f)
        except (OSError, ValueError) as err:
            raise InputError(f"{recipe_file}: cannot read: {err}") from err
        file = os.path.join(self.path, model_file or self.recipe.get("model_file", MODEL_FILE))
        if not os.path.isfile(file):
            raise MissingInputError(f"{self.path}: no {os.path.basename(file)}; not a trine ONNX export "
                                    "(trine export --to onnx)")
        self.tokenizer = load_tokenizer(self.path)
        self.file = file
        self.session = ort.InferenceSession(file, providers=list(providers or ["CPUExecutionProvider"]))
        self.has_heads = bool(self.recipe["has_heads"]) and with_heads
        self.hidden_size = int(self.recipe["hidden_size"])
        self.max_positions = self.recipe.get("max_positions")
        self.pooling_method = self.recipe["pooling_method"]
        self.normalize_embeddings = bool(self.recipe["normalize_embeddings"])

    def eval(self) -> OnnxGraph:
        return self

    def fingerprint_parts(self) -> list[bytes]:
        """What identifies this graph's outputs (the embedding cache's key): the graph file's bytes, the
        recipe, and whether heads are asked for."""
        with open(self.file, "rb") as f:
            graph = f.read()
        return [graph, json.dumps(self.recipe, sort_keys=True).encode(), str(self.has_heads).encode()]

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> OnnxGraph:
        """Nothing to move: the encoder allows the ONNX backend on the CPU in float32 only."""
        return self

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, cls_mask: Any = None,
                 return_dense: bool = True, return_sparse: bool = False, return_colbert_vecs: bool = False
                 ) -> dict[str, torch.Tensor]:
        names = ["dense_vecs"] if return_dense or not self.has_heads else []
        if return_sparse:
            names.append("token_weights")
        if return_colbert_vecs:
            names += ["colbert_vecs", "colbert_mask"]
        feeds = {"input_ids": input_ids.cpu().numpy(), "attention_mask": attention_mask.cpu().numpy()}
        return {k: torch.from_numpy(np.asarray(v)) for k, v in zip(names, self.session.run(names, feeds))}
