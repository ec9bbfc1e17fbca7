"""BGE-M3's lexical (sparse) head as a sentence-transformers module.

This file is copied into every ``trine export --to sentence-transformers`` sparse folder and loads
with ``SparseEncoder(folder, trust_remote_code=True)``; it needs only torch and sentence-transformers.
Per token ``relu(W h + b)``, zero at special tokens (cls/bos, sep/eos, pad, unk), then the maximum per
token id: a vocabulary-size vector (``sentence_embedding``), as trine's and FlagEmbedding's M3 give.
No sentence-transformers module expresses this exactly (``SpladePooling`` applies log1p over MLM
logits), hence this one.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from torch import nn

try:  # sentence-transformers >= 5.4 / 6
    from sentence_transformers.base.modules import Module
except ImportError:  # pragma: no cover - older sentence-transformers
    from sentence_transformers.models import Module


class M3LexicalWeights(Module):
    """``token_embeddings`` + ``input_ids`` -> ``sentence_embedding`` (batch x vocabulary)."""

    config_keys: list[str] = ["hidden_size", "vocab_size", "special_token_ids"]

    def __init__(self, hidden_size: int, vocab_size: int, special_token_ids: list[int] | None = None):
        super().__init__()
        self.hidden_size = int(hidden_size)
        self.vocab_size = int(vocab_size)
        self.special_token_ids = sorted(int(i) for i in (special_token_ids or []))
        self.linear = nn.Linear(self.hidden_size, 1)
        self.register_buffer("_special", torch.tensor(self.special_token_ids, dtype=torch.long), persistent=False)

    def forward(self, features: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        hidden = features["token_embeddings"]
        input_ids = features["input_ids"]
        weights = torch.relu(self.linear(hidden)).squeeze(-1)
        drop = torch.isin(input_ids, self._special.to(input_ids.device))
        if "attention_mask" in features:
            drop = drop | (features["attention_mask"] == 0)
        weights = torch.where(drop, torch.zeros_like(weights), weights)
        out = weights.new_zeros(weights.size(0), self.vocab_size)
        features["sentence_embedding"] = out.scatter_reduce(1, input_ids, weights, reduce="amax", include_self=True)
        return features

    def get_sentence_embedding_dimension(self) -> int:
        return self.vocab_size

    def get_embedding_dimension(self) -> int:
        return self.vocab_size

    def save(self, output_path: str, *args: Any, safe_serialization: bool = True, **kwargs: Any) -> None:
        self.save_config(output_path)
        self.save_torch_weights(output_path, safe_serialization=safe_serialization)

    @classmethod
    def load(cls, model_name_or_path: str, subfolder: str = "", token: bool | str | None = None,
             cache_folder: str | None = None, revision: str | None = None, local_files_only: bool = False,
             **kwargs: Any) -> M3LexicalWeights:
        hub = {"subfolder": subfolder, "token": token, "cache_folder": cache_folder, "revision": revision,
               "local_files_only": local_files_only}
        config = cls.load_config(model_name_or_path, **hub)
        model = cls(**config)
        return cls.load_torch_weights(model_name_or_path=model_name_or_path, model=model, **hub)


def _read_config(folder: str) -> dict[str, Any]:  # for readers without sentence-transformers' loader
    with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
        return json.load(f)
