"""Decoder-only embedders: any causal LM backbone (``AutoModel``: Qwen2, Llama, Mistral, ...) read as an
embedder, FlagEmbedding's ``FlagLLMModel`` / ``BiDecoderOnlyEmbedderModel``.

The sentence vector is the final state of the last real token, which is an EOS appended to every text
(FlagEmbedding trains with ``add_eos_token=True``; here the tokenizer itself appends it, so training,
inference and the saved tokenizer agree, and truncation leaves room for it). Pooling finds the last
real token for right and left padding alike (:func:`trine.modeling.pooling.pool`). Queries take
FlagEmbedding's instruction template ``<instruct>{task}\\n<query>{query}``.

Only the dense output exists: :attr:`DecoderEmbedder.has_heads` is False, so an encoder asked for
lexical weights or multi-vectors says so. LoRA: :mod:`trine.modeling.lora` (``use_lora``); a folder
saved from a LoRA model is an adapter folder that loads on its base model.

In-context learning (FlagEmbedding's ICL variant, bge-en-icl): training with ``retrieval_use_examples``
puts examples drawn from the batch before each query (:class:`InContextExamples`); at inference
:func:`icl_query_format` makes the ``query_instruction_format`` of ``FlagICLModel``'s prompt (fixed
examples, then the query, then ``\n<response>``).
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Sequence

import torch
from torch import nn
from transformers import AutoModel, PreTrainedTokenizerBase

from trine.errors import InputError, MissingInputError, OptionError
from trine.io import write_folder
from trine.modeling.loading import check_loaded_model, load_from_folder, load_tokenizer, position_limit, resolve_model
from trine.modeling.pooling import check_pooling_method, pool

logger = logging.getLogger(__name__)

#: FlagEmbedding's instruction template of its decoder (ICL) embedders
QUERY_INSTRUCTION_FORMAT = "<instruct>{}\n<query>{}"
#: what follows a query in FlagEmbedding's ICL prompt (FlagICLModel's ``suffix``), and its examples' format
ICL_SUFFIX = "\n<response>"
EXAMPLE_FORMAT = "<instruct>{}\n<query>{}\n<response>{}"
EXAMPLE_KEYS = ("instruct", "query", "response")


def _escape(text: str) -> str:
    return text.replace("{", "{{").replace("}", "}}")


def icl_query_format(examples: Sequence[dict[str, str]], instruction: str | None = None, *,
                     query_instruction_format: str = QUERY_INSTRUCTION_FORMAT,
                     examples_instruction_format: str = EXAMPLE_FORMAT, suffix: str = ICL_SUFFIX) -> str:
    """The ``query_instruction_format`` of FlagEmbedding's ICL prompt (``FlagICLModel``): the in-context
    ``examples`` (``{"instruct", "query", "response"}``; ``instruct`` defaults to ``instruction``), each in
    ``examples_instruction_format``, joined by blank lines, then the query in ``query_instruction_format``,
    then ``suffix``. Give it to an ``Embedder`` with the task as ``query_instruction_for_retrieval``; the
    query maximum length then counts the examples too."""
    if isinstance(examples, dict) or not all(isinstance(ex, dict) for ex in examples):
        raise ValueError("examples_for_task must be a list of {'instruct', 'query', 'response'} objects")
    shown = []
    for i, ex in enumerate(examples):
        unknown = sorted(set(ex) - set(EXAMPLE_KEYS))
        if unknown:
            raise ValueError(f"examples_for_task[{i}]: unknown keys {unknown}; an example has {list(EXAMPLE_KEYS)}")
        values = [ex.get("instruct", instruction), ex.get("query", ""), ex.get("response", "")]
        if not all(isinstance(v, str) for v in values):
            raise ValueError(f"examples_for_task[{i}]: instruct (or the instruction), query and response must be "
                             "strings")
        shown.append(examples_instruction_format.replace("\\n", "\n").format(*values))
    prefix = "\n\n".join(shown) + "\n\n" if shown else ""
    return _escape(prefix) + query_instruction_format.replace("\\n", "\n") + _escape(suffix)


class InContextExamples:
    """FlagEmbedding's ICL training data: each query of a batch gets 0 to ``max_examples`` (drawn uniformly)
    in-context examples, (query, positive) pairs of *other* queries of the same batch (the query with its
    instruction, cut to ``example_query_max_len`` tokens; the positive cut to ``example_passage_max_len``),
    each written ``query + suffix + passage`` and followed by a blank line, before the query; the query ends
    with ``suffix``. Examples that would leave the query no room within ``query_max_len`` are left out. The
    draw is seeded by ``seed`` and the batch's queries, so a resumed run sees the same prompts."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, *, query_max_len: int, example_query_max_len: int = 64,
                 example_passage_max_len: int = 96, suffix: str = ICL_SUFFIX, max_examples: int = 5, seed: int = 0):
        for name, value in (("query_max_len", query_max_len), ("example_query_max_len", example_query_max_len),
                            ("example_passage_max_len", example_passage_max_len)):
            if value < 1:
                raise OptionError(f"{name}: must be a positive number of tokens, got {value}")
        self.tokenizer = tokenizer
        self.query_max_len = query_max_len
        self.example_query_max_len = example_query_max_len
        self.example_passage_max_len = example_passage_max_len
        self.suffix = suffix
        self.max_examples = max_examples
        self.seed = seed
        self._suffix_len = len(tokenizer(suffix, add_special_tokens=False)["input_ids"])
        self._specials = tokenizer.num_special_tokens_to_add()

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def __call__(self, queries: Sequence[str], positives: Sequence[str]) -> list[str]:
        """The queries (instructions already applied) with examples and suffix; ``positives[i]`` is query i's."""
        if len(queries) != len(positives):
            raise ValueError(f"{len(queries)} queries but {len(positives)} positives")
        rng = random.Random(f"{self.seed}\0{len(queries)}\0{queries[0] if queries else ''}")
        pairs = [(self.tokenizer.decode(self._ids(q)[: self.example_query_max_len]),
                  self.tokenizer.decode(self._ids(p)[: self.example_passage_max_len]))
                 for q, p in zip(queries, positives)]
        budget = self.query_max_len - self._specials - self._suffix_len
        out = []
        for i, query in enumerate(queries):
            query_ids = self._ids(query)
            k = rng.randint(0, self.max_examples)
            prefix = ""
            if k and len(pairs) > 1:
                picks = [j for j in rng.sample(range(len(pairs)), min(k + 1, len(pairs))) if j != i][:k]
                for j in picks:
                    longer = prefix + self.suffix.join(pairs[j]) + "\n\n"
                    if len(self._ids(longer)) + len(query_ids) > budget:
                        break
                    prefix = longer
            ids = self._ids(prefix + query)[: max(budget, 1)]
            out.append(self.tokenizer.decode(ids) + self.suffix)
        return out


def append_eos(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Make ``tokenizer`` end every encoding with its EOS token (in place; returns it), as FlagEmbedding's
    ``add_eos_token=True`` does for Llama tokenizers, for any fast tokenizer: its post-processor gains an
    EOS after each sequence (so ``truncation`` counts it, and ``save_pretrained`` keeps it). A tokenizer
    that already ends with EOS is left as it is. Also sets a pad token (the unknown token, else EOS, as
    FlagEmbedding) and right padding (training's gradient caching trims right-padded sub-batches)."""
    eos, eos_id = tokenizer.eos_token, tokenizer.eos_token_id
    if eos is None or eos_id is None:
        raise InputError(f"{getattr(tokenizer, 'name_or_path', 'tokenizer')}: eos_token: the tokenizer has none; a "
                         "decoder embedder pools the state of an EOS appended to each text")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token if tokenizer.unk_token is not None else eos
    tokenizer.padding_side = "right"
    if _ends_with_eos(tokenizer):
        return tokenizer
    if not getattr(tokenizer, "is_fast", False):
        raise InputError(f"{getattr(tokenizer, 'name_or_path', 'tokenizer')}: a slow tokenizer that does not append "
                         "EOS; trine appends it through a fast tokenizer's post-processor (tokenizer.json)")
    from tokenizers import processors

    append = processors.TemplateProcessing(single=f"$A:0 {eos}:0", pair=f"$A:0 {eos}:0 $B:1 {eos}:1",
                                           special_tokens=[(eos, eos_id)])
    backend = tokenizer.backend_tokenizer
    current = backend.post_processor
    backend.post_processor = append if current is None else processors.Sequence([current, append])
    if not _ends_with_eos(tokenizer):
        raise InputError(f"{getattr(tokenizer, 'name_or_path', 'tokenizer')}: could not make the tokenizer append "
                         "its EOS token")
    return tokenizer


def _ends_with_eos(tokenizer: PreTrainedTokenizerBase) -> bool:
    return all(ids and ids[-1] == tokenizer.eos_token_id for ids in tokenizer(["a", "b c"])["input_ids"])


class DecoderEmbedder(nn.Module):
    """A causal LM backbone with last-token pooling: dense vectors only.

    It has what :class:`trine.inference.Encoder` and the embedder trainer use of a model: ``tokenizer``,
    ``hidden_size``, ``max_positions``, ``has_heads`` (False), ``pooling_method``,
    ``normalize_embeddings``, ``forward(input_ids, attention_mask, return_dense=...)`` giving
    ``dense_vecs``, ``save_pretrained`` and ``load_weights`` (resuming).
    """

    has_heads = False
    colbert_linear = sparse_linear = None  # no heads (the trainer freezes the heads a mode does not train)
    family_name = "decoder"
    default_query_instruction_format = QUERY_INSTRUCTION_FORMAT

    def __init__(self, backbone: nn.Module, tokenizer: PreTrainedTokenizerBase, *,
                 pooling_method: str = "last_token", normalize_embeddings: bool = True):
        super().__init__()
        self.backbone = backbone
        self.tokenizer = append_eos(tokenizer)
        self.pooling_method = check_pooling_method(pooling_method)
        self.normalize_embeddings = normalize_embeddings
        if getattr(backbone.config, "pad_token_id", None) is None:
            backbone.config.pad_token_id = tokenizer.pad_token_id

    @property
    def hidden_size(self) -> int:
        return int(self.backbone.config.hidden_size)

    @property
    def max_positions(self) -> int | None:
        return position_limit(self.backbone.config)

    def head_parameters(self) -> list[nn.Parameter]:
        return []  # no lexical or ColBERT heads

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        *,
        pooling_method: str | None = None,
        normalize_embeddings: bool = True,
        dtype: torch.dtype = torch.float32,
        trust_remote_code: bool = False,
        attn_implementation: str | None = None,
        with_heads: bool = False,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        token: str | bool | None = None,
    ) -> DecoderEmbedder:
        """Load a causal LM folder (a ``...ForCausalLM`` checkpoint loads as its base model), or an adapter
        folder trine saved from a LoRA model (loaded on the base model its ``adapter_config.json``
        names, the adapter kept unmerged). ``pooling_method``: ``last_token`` unless given."""
        if with_heads:
            raise OptionError("model_family 'decoder' has no lexical or ColBERT heads (dense only): load it as an "
                              "Embedder, not an M3Embedder")
        # a folder, or a Hub id fetched into the Hugging Face cache (revision, cache_dir, token: of the id)
        path = resolve_model(path, revision=revision, cache_dir=cache_dir, token=token)
        tokenizer = load_tokenizer(path, trust_remote_code=trust_remote_code)
        backbone = load_from_folder(
            AutoModel.from_pretrained, path, "model", dtype=dtype, trust_remote_code=trust_remote_code,
            **({"attn_implementation": attn_implementation} if attn_implementation else {}),
        )
        if getattr(backbone.config, "is_encoder_decoder", False):
            raise InputError(f"{path}: an encoder-decoder model ({backbone.config.model_type}); model_family 'decoder' "
                             "takes decoder-only (causal LM) models")
        check_loaded_model(path, backbone, tokenizer)
        backbone.config.use_cache = False
        return cls(backbone, tokenizer, pooling_method=pooling_method or "last_token",
                   normalize_embeddings=normalize_embeddings)

    # ------------------------------------------------------------------ saving and resuming
    def save_pretrained(self, path: str | os.PathLike, *, atomic: bool = True, overwrite: bool = False) -> None:
        """Backbone (or, with LoRA, its adapter), tokenizer (appending EOS) and the sentence-transformers
        pooling config; ``atomic``: the folder appears whole or not at all."""
        write_folder(path, self._write, atomic=atomic, overwrite=overwrite)

    def _write(self, folder: str) -> None:
        from trine.modeling.trihead import TriHeadModel

        self.backbone.save_pretrained(folder, safe_serialization=True)
        self.tokenizer.save_pretrained(folder)
        # the one writer of the pooling files (last token, normalisation), shared with the tri-head model
        TriHeadModel._write_sentence_transformers_config(self, folder)
        from trine.modeling.family_file import record_family

        record_family(folder, self.family_name)

    def load_weights(self, folder: str | os.PathLike) -> None:
        """Load the weights :meth:`save_pretrained` wrote into this model (resuming training); an adapter
        checkpoint reloads base + adapter under the same parameter names."""
        folder = os.fspath(folder)
        if not os.path.isdir(folder):
            raise MissingInputError(f"{folder}: no checkpoint folder to resume from")
        dtype = next(self.backbone.parameters()).dtype
        loaded = load_from_folder(AutoModel.from_pretrained, folder, "checkpoint", dtype=dtype,
                                  config=self.backbone.config)
        self.backbone.load_state_dict(loaded.state_dict(), strict=True)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        *,
        cls_mask: torch.Tensor | None = None,
        return_dense: bool = True,
        return_sparse: bool = False,
        return_colbert_vecs: bool = False,
    ) -> dict[str, torch.Tensor]:
        """``dense_vecs`` (batch x hidden) of a padded batch (either padding side)."""
        if return_sparse or return_colbert_vecs:
            raise ValueError("a decoder embedder has no lexical or ColBERT output (dense only)")
        if not return_dense:
            raise ValueError("ask for return_dense: a decoder embedder has only the dense output")
        if cls_mask is not None:
            raise ValueError("MCLS inserts CLS tokens, which a decoder embedder has not (mcls_interval is for "
                             "encoders)")
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        dense = pool(hidden, attention_mask, self.pooling_method)
        return {"dense_vecs": torch.nn.functional.normalize(dense, dim=-1) if self.normalize_embeddings else dense}
