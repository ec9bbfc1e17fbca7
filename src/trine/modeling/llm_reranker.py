"""The decoder-only (LLM) reranker: a causal LM asked whether a passage answers a query; the pair's score is
the logit of the "Yes" token at the last position (FlagEmbedding's ``FlagLLMReranker`` / ``CrossDecoderModel``).

A pair reads ``[BOS] query \\n passage \\n prompt``: the BOS only when the tokenizer has one distinct from its
pad token, the query and passage with their instructions (inference defaults ``"A: "`` / ``"B: "``), the
separator ``sep_token`` (``"\\n"``) and the prompt (:data:`DEFAULT_PROMPT`). Lengths follow FlagEmbedding:
at inference (:meth:`LLMReranker.tokenize_pairs`) the query is cut to ``query_max_length`` tokens, the
passage to ``max_length`` and the pair (BOS, query, separator, passage) to ``max_length`` plus the separator
and prompt lengths, the passage losing its end; in training (:meth:`LLMReranker.tokenize_training_pairs`) the
query is cut to ``query_max_len + passage_max_len // 4``, the passage to ``passage_max_len + query_max_len // 2``
and the pair to ``query_max_len + passage_max_len`` less the separator and prompt lengths. trine pads on the
right and reads the score at each row's last real token (FlagEmbedding's training pads on the left, which
shifts the positions of shorter pairs in models that number positions from the first column).

A folder is a plain ``transformers`` causal-LM folder (or, trained with LoRA, an adapter folder on its base)
plus :data:`FAMILY_FILE` naming the family, the prompt and separator, so :class:`trine.Reranker`, ``trine eval
--reranker`` and ``trine score --reranker`` load it with no flag; FlagEmbedding's ``FlagLLMReranker`` loads the
same folder (merged, or with ``peft_path``).
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Sequence

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedTokenizerBase

from trine.errors import InputError, MissingInputError, OptionError
from trine.io import write_folder
from trine.modeling.family_file import FAMILY_FILE, read_family_file, record_family
from trine.modeling.loading import check_loaded_model, load_from_folder, load_tokenizer, position_limit, resolve_model

# the minicpm model type (a layer-wise reranker's backbone) is registered with AutoModel by the one folder
# loader, trine.modeling.loading.load_from_folder, when a folder is of that type: importing MiniCPM's code
# (transformers' Llama) here would cost every reranker, and `import trine`, seconds

FAMILY_NAME = "llm-reranker"
DEFAULT_PROMPT = ("Given a query A and a passage B, determine whether the passage contains an answer to the query "
                  "by providing a prediction of either 'Yes' or 'No'.")
DEFAULT_SEP_TOKEN = "\n"
#: FlagEmbedding's inference defaults for an LLM reranker's query and passage instructions
QUERY_INSTRUCTION = "A: "
PASSAGE_INSTRUCTION = "B: "
YES = "Yes"
#: the layer-wise reranker's family (trine.modeling.layerwise_reranker)
LAYERWISE_FAMILY = "llm-reranker-layerwise"


class LLMReranker(nn.Module):
    """A causal LM scoring (query, passage) pairs by its "Yes" logit after the prompt.

    It has what :class:`trine.Reranker` and the reranker trainer use of a model: ``model`` (the transformers
    model, where LoRA goes), ``tokenizer``, ``max_positions``, ``tokenize_pairs`` (inference lengths),
    ``forward(input_ids, attention_mask)`` giving one score per pair, ``save_pretrained`` and ``load_weights``.
    """

    family_name = FAMILY_NAME

    default_query_instruction = QUERY_INSTRUCTION
    default_passage_instruction = PASSAGE_INSTRUCTION

    def __init__(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, *, prompt: str | None = None,
                 sep_token: str = DEFAULT_SEP_TOKEN):
        super().__init__()
        if prompt is not None and not isinstance(prompt, str):
            raise OptionError(f"prompt: must be a string, got {type(prompt).__name__}")
        # FlagEmbedding's pad token for a tokenizer without one: the unknown token, else EOS
        if tokenizer.pad_token is None:
            fallback = tokenizer.unk_token if tokenizer.unk_token is not None else tokenizer.eos_token
            if fallback is None:
                raise InputError(f"{getattr(tokenizer, 'name_or_path', 'tokenizer')}: no pad, unknown or EOS token "
                                 "to pad with")
            tokenizer.pad_token = fallback
        self.model = model
        self.tokenizer = tokenizer
        self.prompt = DEFAULT_PROMPT if prompt is None else prompt
        self.set_sep_token(sep_token)
        yes = tokenizer(YES, add_special_tokens=False)["input_ids"]
        if len(yes) != 1:
            raise InputError(f"{getattr(tokenizer, 'name_or_path', 'tokenizer')}: {YES!r} is {len(yes)} tokens "
                             f"({yes}); an LLM reranker reads the logit of a one-token {YES!r}")
        self.yes_id = yes[0]
        bos = tokenizer.bos_token_id
        self.bos = [bos] if bos is not None and bos != tokenizer.pad_token_id else []
        if getattr(model.config, "pad_token_id", None) is None:
            model.config.pad_token_id = tokenizer.pad_token_id
        # transformers' causal LMs take the positions to compute logits at (older or remote-code ones may not)
        self._keeps_logits = "logits_to_keep" in inspect.signature(model.forward).parameters

    @property
    def max_positions(self) -> int | None:
        return position_limit(self.model.config)

    def set_sep_token(self, sep_token: str) -> None:
        """The separator between query, passage and prompt (saved with the model)."""
        if not isinstance(sep_token, str) or not sep_token:
            raise OptionError(f"sep_token: must be a non-empty string, got {sep_token!r}")
        self.sep_token = sep_token
        self.sep_ids = self._ids(sep_token)

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, dtype: torch.dtype = torch.float32,
                        trust_remote_code: bool = False, attn_implementation: str | None = None,
                        prompt: str | None = None, sep_token: str | None = None, revision: str | None = None,
                        cache_dir: str | os.PathLike | None = None, token: str | bool | None = None) -> LLMReranker:
        """Load a causal LM folder (a plain checkpoint, a trine LLM reranker, or an adapter folder trine saved from
        a LoRA model, loaded on the base model its ``adapter_config.json`` names). ``prompt``/``sep_token``: those
        the folder records (:data:`FAMILY_FILE`) unless given, else FlagEmbedding's."""
        # a folder, or a Hub id fetched into the Hugging Face cache (revision, cache_dir, token: of the id)
        path = resolve_model(path, revision=revision, cache_dir=cache_dir, token=token)
        info = read_family_file(path) or {}
        if info.get("model_family", FAMILY_NAME) != FAMILY_NAME:
            raise InputError(f"{os.path.join(path, FAMILY_FILE)}: model_family: {info['model_family']!r}, not "
                             f"{FAMILY_NAME!r}")
        tokenizer = load_tokenizer(path, trust_remote_code=trust_remote_code)
        model = load_from_folder(
            AutoModelForCausalLM.from_pretrained, path, "model", dtype=dtype, trust_remote_code=trust_remote_code,
            **({"attn_implementation": attn_implementation} if attn_implementation else {}),
        )
        if getattr(model.config, "is_encoder_decoder", False):
            raise InputError(f"{path}: an encoder-decoder model ({model.config.model_type}); model_family "
                             f"{FAMILY_NAME!r} takes decoder-only (causal LM) models")
        check_loaded_model(path, model, tokenizer)
        model.config.use_cache = False
        return cls(model, tokenizer, prompt=prompt if prompt is not None else info.get("prompt"),
                   sep_token=sep_token if sep_token is not None else info.get("sep_token", DEFAULT_SEP_TOKEN))

    # ------------------------------------------------------------------ saving and resuming
    def save_pretrained(self, path: str | os.PathLike, *, atomic: bool = True, overwrite: bool = False) -> None:
        """Model (or, with LoRA, its adapter), tokenizer and :data:`FAMILY_FILE`; ``atomic``: whole or not at all."""
        write_folder(path, self._write, atomic=atomic, overwrite=overwrite)

    def _write(self, folder: str) -> None:
        self.model.save_pretrained(folder, safe_serialization=True)
        self.tokenizer.save_pretrained(folder)
        record_family(folder, FAMILY_NAME, prompt=self.prompt, sep_token=self.sep_token)

    def load_weights(self, folder: str | os.PathLike) -> None:
        """Load weights :meth:`save_pretrained` wrote into this model (resuming training); an adapter checkpoint
        reloads base + adapter under the same parameter names."""
        folder = os.fspath(folder)
        if not os.path.isdir(folder):
            raise MissingInputError(f"{folder}: no checkpoint folder to resume from")
        dtype = next(self.model.parameters()).dtype
        loaded = load_from_folder(AutoModelForCausalLM.from_pretrained, folder, "checkpoint", dtype=dtype,
                                  config=self.model.config)
        self.model.load_state_dict(loaded.state_dict(), strict=True)

    # ------------------------------------------------------------------ pairs
    def _assemble(self, query_ids: Sequence[int], passage_ids: Sequence[int], limit: int,
                  prompt_ids: Sequence[int]) -> list[int]:
        """``[BOS] query sep passage`` cut to ``limit`` (the passage losing its end), then ``sep prompt``."""
        first = [*self.bos, *query_ids]
        second = [*self.sep_ids, *passage_ids]
        room = limit - len(first)
        if room < 0:
            raise ValueError(f"a query of {len(first)} tokens is longer than the {limit} tokens a pair may take "
                             "before the prompt; lower the query's maximum length")
        return [*first, *second[:room], *self.sep_ids, *prompt_ids]

    def _prompt_ids(self, prompts: Sequence[str | None] | None, n: int) -> list[list[int]]:
        if prompts is None:
            prompts = [None] * n
        if len(prompts) != n:
            raise ValueError(f"{len(prompts)} prompts for {n} pairs")
        cache: dict[str, list[int]] = {}
        return [cache.setdefault(p, self._ids(p)) for p in (self.prompt if p is None else p for p in prompts)]

    def tokenize_pairs(self, queries: Sequence[str], passages: Sequence[str], *, query_max_length: int,
                       max_length: int, prompts: Sequence[str | None] | None = None
                       ) -> tuple[list[list[int]], list[list[int]]]:
        """Token ids (and all-zero token types) of each pair at inference (``FlagLLMReranker``'s lengths);
        ``prompts``: a prompt per pair (None: the model's)."""
        if len(queries) != len(passages):
            raise ValueError(f"{len(queries)} queries for {len(passages)} passages")
        q = self.tokenizer(list(queries), add_special_tokens=False, truncation=True,
                           max_length=query_max_length)["input_ids"]
        p = self.tokenizer(list(passages), add_special_tokens=False, truncation=True,
                           max_length=max_length)["input_ids"]
        ids = [self._assemble(a, b, max_length + len(self.sep_ids) + len(pr), pr)
               for a, b, pr in zip(q, p, self._prompt_ids(prompts, len(q)))]
        return ids, [[0] * len(x) for x in ids]

    def tokenize_training_pairs(self, queries: Sequence[str], passages: Sequence[str], *, query_max_len: int,
                                passage_max_len: int, prompts: Sequence[str | None] | None = None
                                ) -> list[list[int]]:
        """Token ids of each pair in training (FlagEmbedding's decoder-only reranker dataset's lengths)."""
        if len(queries) != len(passages):
            raise ValueError(f"{len(queries)} queries for {len(passages)} passages")
        q = self.tokenizer(list(queries), add_special_tokens=False, truncation=True,
                           max_length=query_max_len + passage_max_len // 4)["input_ids"]
        p = self.tokenizer(list(passages), add_special_tokens=False, truncation=True,
                           max_length=passage_max_len + query_max_len // 2)["input_ids"]
        total = query_max_len + passage_max_len
        return [self._assemble(a, b, total - len(pr) - len(self.sep_ids), pr)
                for a, b, pr in zip(q, p, self._prompt_ids(prompts, len(q)))]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The "Yes" logit at each row's last real token (batch,), for right or left padding."""
        last = attention_mask.long().cumsum(-1).argmax(-1)  # each row's last position whose mask is 1
        rows = torch.arange(input_ids.size(0), device=input_ids.device)
        if self._keeps_logits:  # the LM head only at the (few) positions read: no batch x length x vocab tensor
            keep = torch.unique(last)
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=keep).logits
            return logits[rows, torch.searchsorted(keep, last), self.yes_id]
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits
        return logits[rows, last, self.yes_id]
