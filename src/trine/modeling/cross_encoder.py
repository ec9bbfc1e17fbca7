"""The cross-encoder (reranker): a (query, passage) pair in, one relevance logit out.

A checkpoint is a plain Hugging Face sequence-classification folder with one label, so
FlagEmbedding's ``FlagReranker`` and ``transformers`` load what trine saves, and the other way
round. Pairs are assembled from token ids with the tokenizer's own special-token template
(:class:`PairTemplate`), so queries and passages are tokenised once, with no decode/re-encode.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModelForSequenceClassification, PreTrainedTokenizerBase

from trine.errors import InputError, MissingInputError
from trine.io import write_folder
from trine.modeling.loading import check_loaded_model, load_from_folder, load_tokenizer, position_limit, resolve_model

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PairTemplate:
    """Where a tokenizer puts its special tokens around a pair: ``prefix A middle B suffix``,
    with the token type of each of the five parts (e.g. BERT: [CLS] A [SEP] | B [SEP], types 0/1;
    XLM-R: <s> A </s></s> B </s>, all type 0)."""

    prefix: tuple[int, ...]
    middle: tuple[int, ...]
    suffix: tuple[int, ...]
    types: tuple[int, int, int, int, int]  # prefix, A, middle, B, suffix

    @property
    def num_special(self) -> int:
        return len(self.prefix) + len(self.middle) + len(self.suffix)

    @classmethod
    def from_tokenizer(cls, tokenizer: PreTrainedTokenizerBase) -> PairTemplate:
        """Read the template off the tokenizer's encoding of a probe pair."""
        first, second = "alpha", "omega"
        a = tokenizer(first, add_special_tokens=False)["input_ids"]
        b = tokenizer(second, add_special_tokens=False)["input_ids"]
        enc = tokenizer(first, second, return_token_type_ids=True)
        ids, types = enc["input_ids"], enc.get("token_type_ids") or [0] * len(enc["input_ids"])
        i = _find(ids, a, 0)
        j = _find(ids, b, i + len(a))
        if i < 0 or j < 0:
            raise ValueError(f"cannot read the pair template of {type(tokenizer).__name__}: {ids}")
        parts = (ids[:i], ids[i + len(a) : j], ids[j + len(b) :])
        spans = ((0, i), (i, i + len(a)), (i + len(a), j), (j, j + len(b)), (j + len(b), len(ids)))
        part_types = []
        for lo, hi in spans:
            seen = set(types[lo:hi]) or {types[min(lo, len(types) - 1)]}
            if len(seen) != 1:
                raise ValueError(f"{type(tokenizer).__name__}: mixed token types inside one part of a pair")
            part_types.append(seen.pop())
        return cls(tuple(parts[0]), tuple(parts[1]), tuple(parts[2]), tuple(part_types))  # type: ignore[arg-type]

    def build(
        self, query_ids: Sequence[int], passage_ids: Sequence[int], max_length: int
    ) -> tuple[list[int], list[int]]:
        """``prefix q middle p suffix``, the passage cut so the whole is at most ``max_length``."""
        room = max_length - self.num_special - len(query_ids)
        if room < 1:
            raise ValueError(f"a query of {len(query_ids)} tokens leaves no room for the passage in "
                             f"max_length {max_length}; lower query_max_length")
        p = list(passage_ids[:room])
        ids = [*self.prefix, *query_ids, *self.middle, *p, *self.suffix]
        t = self.types
        type_ids = ([t[0]] * len(self.prefix) + [t[1]] * len(query_ids) + [t[2]] * len(self.middle)
                    + [t[3]] * len(p) + [t[4]] * len(self.suffix))
        return ids, type_ids


def _find(seq: list[int], sub: list[int], start: int) -> int:
    for i in range(start, len(seq) - len(sub) + 1):
        if seq[i : i + len(sub)] == sub:
            return i
    return -1


class CrossEncoder(nn.Module):
    """A sequence-classification backbone with one output: the pair's relevance logit."""

    family_name = "cross-encoder"

    def __init__(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase):
        super().__init__()
        if int(getattr(model.config, "num_labels", 1)) != 1:
            raise ValueError(f"a reranker has one output; this model has {model.config.num_labels} labels")
        self.model = model
        self.tokenizer = tokenizer
        self.template = PairTemplate.from_tokenizer(tokenizer)
        self.uses_token_types = "token_type_ids" in tokenizer.model_input_names and \
            int(getattr(model.config, "type_vocab_size", 0) or 0) > 1
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tokenizer.pad_token_id

    @property
    def max_positions(self) -> int | None:
        """The longest pair in tokens (special tokens included) the backbone's positions cover."""
        return position_limit(self.model.config)

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        *,
        new_classifier: bool = False,
        dtype: torch.dtype = torch.float32,
        trust_remote_code: bool = False,
        attn_implementation: str | None = None,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        token: str | bool | None = None,
    ) -> CrossEncoder:
        """Load a reranker folder. A folder without classifier weights (a plain backbone, e.g. to
        start training) loads only with ``new_classifier=True``; a warning names the new weights."""
        # a folder, or a Hub id fetched into the Hugging Face cache (revision, cache_dir, token: of the id)
        path = resolve_model(path, revision=revision, cache_dir=cache_dir, token=token)
        tokenizer = load_tokenizer(path, trust_remote_code=trust_remote_code)
        model, info = load_from_folder(
            AutoModelForSequenceClassification.from_pretrained, path, "reranker", num_labels=1, dtype=dtype,
            trust_remote_code=trust_remote_code, output_loading_info=True,
            **({"attn_implementation": attn_implementation} if attn_implementation else {}),
        )
        check_loaded_model(path, model, tokenizer)
        missing = sorted(info["missing_keys"])
        if missing:
            if not new_classifier:
                raise InputError(
                    f"{path}: not a trained reranker: no weights for {', '.join(missing[:6])}"
                    f"{' ...' if len(missing) > 6 else ''}. Pass new_classifier=True to start a new "
                    "classifier (for training)"
                )
            logger.warning("%s: initialised NEW reranker weights (untrained): %s", path, ", ".join(missing))
        return cls(model, tokenizer)

    def save_pretrained(self, path: str | os.PathLike, *, atomic: bool = True, overwrite: bool = False) -> None:
        """Model and tokenizer as a Hugging Face folder; ``atomic``: appears whole or not at all."""
        write_folder(path, self._write, atomic=atomic, overwrite=overwrite)

    def _write(self, folder: str) -> None:
        from trine.modeling.family_file import record_family

        self.model.save_pretrained(folder, safe_serialization=True)
        self.tokenizer.save_pretrained(folder)
        record_family(folder, self.family_name)

    def load_weights(self, folder: str | os.PathLike) -> None:
        """Load weights saved by :meth:`save_pretrained` into this model (resuming training)."""
        folder = os.fspath(folder)
        if not os.path.isdir(folder):
            raise MissingInputError(f"{folder}: no checkpoint folder to resume from")
        dtype = next(self.model.parameters()).dtype
        loaded = load_from_folder(AutoModelForSequenceClassification.from_pretrained, folder, "checkpoint",
                                  dtype=dtype, config=self.model.config)
        self.model.load_state_dict(loaded.state_dict(), strict=True)

    def tokenize_pairs(
        self,
        queries: Sequence[str],
        passages: Sequence[str],
        *,
        query_max_length: int,
        max_length: int,
    ) -> tuple[list[list[int]], list[list[int]]]:
        """Token ids and token types of each pair: the query cut to ``query_max_length`` tokens,
        the passage to what is left of ``max_length`` (FlagReranker's rule)."""
        if len(queries) != len(passages):
            raise ValueError(f"{len(queries)} queries for {len(passages)} passages")
        if query_max_length + self.template.num_special >= max_length:
            raise ValueError(f"query_max_length {query_max_length} leaves no room for a passage in "
                             f"max_length {max_length}")
        q = self.tokenizer(list(queries), add_special_tokens=False, truncation=True, max_length=query_max_length,
                           return_attention_mask=False, return_token_type_ids=False)["input_ids"]
        p = self.tokenizer(list(passages), add_special_tokens=False, truncation=True, max_length=max_length,
                           return_attention_mask=False, return_token_type_ids=False)["input_ids"]
        built = [self.template.build(a, b, max_length) for a, b in zip(q, p)]
        return [b[0] for b in built], [b[1] for b in built]

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """One logit per pair (batch,)."""
        extra = {"token_type_ids": token_type_ids} if self.uses_token_types and token_type_ids is not None else {}
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **extra).logits.view(-1)
