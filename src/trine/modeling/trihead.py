"""The tri-head model: one encoder pass gives dense, lexical and multi-vector outputs.

Checkpoints use BGE-M3's layout: the backbone as a Hugging Face folder, plus
``colbert_linear.pt`` and ``sparse_linear.pt`` (plain state dicts of ``torch.nn.Linear``).
A real BGE-M3 folder loads unchanged, and FlagEmbedding's ``BGEM3FlagModel`` loads what
:meth:`TriHeadModel.save_pretrained` writes.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn
from transformers import AutoModel, PreTrainedTokenizerBase

from trine.errors import InputError, MissingInputError, OptionError, first_line
from trine.io import write_folder
from trine.modeling.heads import colbert_vectors, lexical_token_weights
from trine.modeling.lexical_init import fit_lexical_head
from trine.modeling.loading import (
    check_loaded_model,
    drop_missing_pooler,
    load_from_folder,
    load_state_dict_file,
    load_tokenizer,
    position_limit,
    resolve_model,
)
from trine.modeling.pooling import check_pooling_method, pool

logger = logging.getLogger(__name__)

COLBERT_FILE = "colbert_linear.pt"
SPARSE_FILE = "sparse_linear.pt"

HeadInit = Literal["random", "neutral", "bm25"]
#: the ways to start heads a folder lacks (``init_missing_heads``)
HEAD_INITS = ("random", "neutral", "bm25")


def sentence_transformers_pooling(path: str) -> str | None:
    """The pooling a sentence-transformers folder declares in ``1_Pooling/config.json``, if any."""
    cfg = os.path.join(path, "1_Pooling", "config.json")
    if not os.path.exists(cfg):
        return None
    try:
        with open(cfg, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as err:
        raise InputError(f"{cfg}: cannot read the pooling config: {first_line(err)}") from err
    if not isinstance(data, dict):
        raise InputError(f"{cfg}: the pooling config must be a JSON object")
    if data.get("pooling_mode_mean_tokens"):
        return "mean"
    if data.get("pooling_mode_cls_token"):
        return "cls"
    if data.get("pooling_mode_lasttoken"):
        return "last_token"
    raise ValueError(f"{cfg}: pooling mode not supported by trine (cls, mean or last token)")


def special_token_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Ids that never carry lexical weight: cls/bos, sep/eos, pad and unk (whichever exist)."""
    ids = set()
    for name in ("cls_token_id", "bos_token_id", "sep_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            ids.add(int(value))
    return sorted(ids)


def has_head_files(path: str | os.PathLike) -> bool:
    """Whether a model folder holds both BGE-M3 head files."""
    return all(os.path.exists(os.path.join(os.fspath(path), f)) for f in (COLBERT_FILE, SPARSE_FILE))


def _linear_out_features(state: dict[str, torch.Tensor], file: str) -> int:
    """The output size of a saved ``torch.nn.Linear`` (its 2-D ``weight`` is out x in)."""
    weight = state.get("weight")
    if weight is None or weight.dim() != 2:
        raise InputError(f"{file}: not a linear head: no 2-D 'weight' (keys: {', '.join(sorted(state)) or 'none'})")
    return int(weight.shape[0])


def _load_head(linear: nn.Linear, state: dict[str, torch.Tensor], file: str) -> None:
    try:
        linear.load_state_dict(state)
    except RuntimeError as err:
        shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in sorted(state.items()))
        raise InputError(f"{file}: head weights do not fit this model (hidden size {linear.in_features}, "
                         f"{linear.out_features} outputs): the file has {shapes}") from err


def init_head(linear: nn.Linear, how: HeadInit) -> None:
    """Initialise a new head.

    ``random``: PyTorch's default Linear init (what FlagEmbedding does).
    ``neutral``: a usable zero-shot start: the ColBERT head is the identity (maxsim over the
    normalised backbone states) and the lexical head gives every token weight 1 (scores count
    shared distinct tokens). ``neutral`` needs ``colbert_dim == hidden`` for the ColBERT head.
    ``bm25``: as ``neutral`` here; :meth:`TriHeadModel.from_pretrained` then fits the lexical head to
    BM25 term weights on texts (:func:`trine.modeling.lexical_init.fit_lexical_head`).
    """
    if how == "random":
        linear.reset_parameters()
        return
    if how not in HEAD_INITS:
        raise ValueError(f"unknown head initialisation {how!r}; choose from {', '.join(HEAD_INITS)}")
    with torch.no_grad():
        if linear.out_features == 1:
            linear.weight.zero_()
            linear.bias.fill_(1.0)
        elif linear.out_features == linear.in_features:
            linear.weight.copy_(torch.eye(linear.in_features))
            linear.bias.zero_()
        else:
            raise ValueError(
                f"'neutral' init needs a square ColBERT head; colbert_dim is {linear.out_features}, "
                f"hidden size {linear.in_features}"
            )


class TriHeadModel(nn.Module):
    """A ``transformers`` encoder with dense pooling, a lexical head and a ColBERT head.

    Build it with :meth:`from_pretrained`. With ``with_heads=False`` it is a dense-only model
    (the heads are ``None``).
    """

    def __init__(
        self,
        backbone: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        *,
        colbert_linear: nn.Linear | None = None,
        sparse_linear: nn.Linear | None = None,
        pooling_method: str = "cls",
        normalize_embeddings: bool = True,
    ):
        super().__init__()
        self.backbone = backbone
        self.tokenizer = tokenizer
        self.colbert_linear = colbert_linear
        self.sparse_linear = sparse_linear
        self.pooling_method = check_pooling_method(pooling_method)
        self.normalize_embeddings = normalize_embeddings
        self.vocab_size = int(backbone.config.vocab_size)
        self.register_buffer(
            "unused_token_ids", torch.tensor(special_token_ids(tokenizer), dtype=torch.long), persistent=False
        )

    @property
    def hidden_size(self) -> int:
        return int(self.backbone.config.hidden_size)

    @property
    def max_positions(self) -> int | None:
        """The longest input in tokens (special tokens included) the backbone's positions cover."""
        return position_limit(self.backbone.config)

    @property
    def has_heads(self) -> bool:
        return self.colbert_linear is not None and self.sparse_linear is not None

    @property
    def family_name(self) -> str:
        """Its model family (:mod:`trine.modeling.families`): ``trihead`` with heads, else ``encoder`` (dense)."""
        return "trihead" if self.has_heads else "encoder"

    # ------------------------------------------------------------------ loading and saving
    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        *,
        with_heads: bool = True,
        init_missing_heads: HeadInit | None = None,
        colbert_dim: int = -1,
        pooling_method: str | None = None,
        normalize_embeddings: bool = True,
        dtype: torch.dtype = torch.float32,
        trust_remote_code: bool = False,
        attn_implementation: str | None = None,
        head_init_texts: Sequence[str] | None = None,
        head_init_max_length: int = 256,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        token: str | bool | None = None,
    ) -> TriHeadModel:
        """Load a backbone folder and, with ``with_heads``, its BGE-M3 head files.

        A folder without head files raises unless ``init_missing_heads`` is ``"random"``,
        ``"neutral"`` or ``"bm25"``, in which case new heads are made and a warning says so.
        ``"bm25"`` fits the new lexical head to BM25 term weights over ``head_init_texts`` (a corpus:
        the training passages, or the documents to search; each read up to ``head_init_max_length``
        tokens) and starts the ColBERT head as ``neutral``.
        ``pooling_method`` unset: the folder's sentence-transformers pooling config (which
        :meth:`save_pretrained` writes), else ``cls``.
        """
        # a folder, or a Hub id fetched into the Hugging Face cache (revision, cache_dir, token: of the id)
        path = resolve_model(path, revision=revision, cache_dir=cache_dir, token=token)
        if init_missing_heads is not None and init_missing_heads not in HEAD_INITS:
            raise OptionError(f"init_missing_heads: {init_missing_heads!r}; choose from {', '.join(HEAD_INITS)}")
        if head_init_texts is not None and init_missing_heads != "bm25":
            raise OptionError("head_init_texts are the corpus of init_missing_heads='bm25' and go with it only")
        if pooling_method is None:
            pooling_method = sentence_transformers_pooling(path) or "cls"
        tokenizer = load_tokenizer(path, trust_remote_code=trust_remote_code)
        backbone, info = load_from_folder(
            AutoModel.from_pretrained, path, "model", dtype=dtype, trust_remote_code=trust_remote_code,
            output_loading_info=True,
            **({"attn_implementation": attn_implementation} if attn_implementation else {}),
        )
        check_loaded_model(path, backbone, tokenizer)
        drop_missing_pooler(backbone, info)
        colbert_linear = sparse_linear = None
        if with_heads:
            hidden = int(backbone.config.hidden_size)
            files = {name: os.path.join(path, name) for name in (COLBERT_FILE, SPARSE_FILE)}
            present = {name for name, f in files.items() if os.path.exists(f)}
            if present == set(files):
                states = {name: load_state_dict_file(f) for name, f in files.items()}
                # the ColBERT size is the saved head's (a model trained with colbert_dim 64 loads as such)
                saved_dim = _linear_out_features(states[COLBERT_FILE], files[COLBERT_FILE])
                if colbert_dim > 0 and colbert_dim != saved_dim:
                    raise OptionError(
                        f"colbert_dim: {colbert_dim} asked, but {files[COLBERT_FILE]} holds a {saved_dim}-dim "
                        "ColBERT head (leave colbert_dim at -1 to use the saved size)"
                    )
                colbert_linear = nn.Linear(hidden, saved_dim)
                sparse_linear = nn.Linear(hidden, 1)
                for linear, name in ((colbert_linear, COLBERT_FILE), (sparse_linear, SPARSE_FILE)):
                    _load_head(linear, states[name], files[name])
            elif init_missing_heads is None:
                missing = ", ".join(sorted(set(files) - present))
                raise MissingInputError(
                    f"{path}: no {missing}; this is not a tri-head (BGE-M3 layout) checkpoint. Pass "
                    "init_missing_heads='random', 'neutral' or 'bm25' to start new heads, or "
                    "with_heads=False for a dense-only model"
                )
            elif present:
                raise MissingInputError(
                    f"{path}: has {', '.join(sorted(present))} but not the other head file; refusing to mix "
                    "a trained head with a new one"
                )
            else:
                if init_missing_heads == "bm25" and head_init_texts is None:
                    raise OptionError(f"{path}: no head files, and init_missing_heads='bm25' fits the lexical head on "
                                      "a corpus: pass head_init_texts (trine finetune uses the training passages, "
                                      "trine eval the documents)")
                colbert_linear = nn.Linear(hidden, hidden if colbert_dim <= 0 else colbert_dim)
                sparse_linear = nn.Linear(hidden, 1)
                init_head(colbert_linear, init_missing_heads)
                init_head(sparse_linear, init_missing_heads)
                if init_missing_heads == "bm25":
                    fit_lexical_head(cls(backbone, tokenizer, colbert_linear=colbert_linear,
                                         sparse_linear=sparse_linear, pooling_method=pooling_method),
                                     head_init_texts, max_length=head_init_max_length)
                logger.warning(
                    "%s has no head files: initialised NEW %s lexical and ColBERT heads (untrained)",
                    path,
                    init_missing_heads,
                )
            colbert_linear.to(dtype)
            sparse_linear.to(dtype)
        return cls(
            backbone,
            tokenizer,
            colbert_linear=colbert_linear,
            sparse_linear=sparse_linear,
            pooling_method=pooling_method,
            normalize_embeddings=normalize_embeddings,
        )

    def head_parameters(self) -> list[nn.Parameter]:
        """The lexical and ColBERT heads' parameters (their own learning rate in training)."""
        return [p for m in (self.colbert_linear, self.sparse_linear) if m is not None for p in m.parameters()]

    def save_pretrained(self, path: str | os.PathLike, *, atomic: bool = True, overwrite: bool = False) -> None:
        """Write backbone, tokenizer and head files (BGE-M3 layout).

        ``atomic``: the folder appears whole or not at all (written aside, then renamed over any
        old one). The trainer writes into its own checkpoint folders with ``atomic=False``.
        """
        write_folder(path, self._write, atomic=atomic, overwrite=overwrite)

    def _write(self, folder: str) -> None:
        self.backbone.save_pretrained(folder, safe_serialization=True)
        self.tokenizer.save_pretrained(folder)
        self._write_sentence_transformers_config(folder)
        if self.has_heads:
            for linear, name in ((self.colbert_linear, COLBERT_FILE), (self.sparse_linear, SPARSE_FILE)):
                state = {k: v.detach().clone().cpu() for k, v in linear.state_dict().items()}
                torch.save(state, os.path.join(folder, name))
        from trine.modeling.family_file import record_family

        record_family(folder, self.family_name)

    def _write_sentence_transformers_config(self, folder: str) -> None:
        """Pooling and normalisation as sentence-transformers files: trine and sentence-transformers
        both read the dense recipe back from the folder (no silent 'mean pooling' guess downstream)."""
        modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                   {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
        if self.normalize_embeddings:
            modules.append({"idx": 2, "name": "2", "path": "2_Normalize",
                            "type": "sentence_transformers.models.Normalize"})
            os.makedirs(os.path.join(folder, "2_Normalize"), exist_ok=True)
        os.makedirs(os.path.join(folder, "1_Pooling"), exist_ok=True)
        pooling = {
            "word_embedding_dimension": self.hidden_size,
            "pooling_mode_cls_token": self.pooling_method == "cls",
            "pooling_mode_mean_tokens": self.pooling_method == "mean",
            "pooling_mode_max_tokens": False,
            "pooling_mode_mean_sqrt_len_tokens": False,
            "pooling_mode_weightedmean_tokens": False,
            "pooling_mode_lasttoken": self.pooling_method == "last_token",
            "include_prompt": True,
        }
        max_len = int(getattr(self.backbone.config, "max_position_embeddings", 512))
        if getattr(self.backbone.config, "model_type", "") in ("xlm-roberta", "roberta"):
            max_len -= 2  # positions start after the padding index
        files = {
            "modules.json": modules,
            os.path.join("1_Pooling", "config.json"): pooling,
            "sentence_bert_config.json": {"max_seq_length": min(max_len, 8192), "do_lower_case": False},
        }
        for name, data in files.items():
            with open(os.path.join(folder, name), "w") as f:
                json.dump(data, f, indent=2)

    def load_weights(self, folder: str | os.PathLike) -> None:
        """Load weights saved by :meth:`save_pretrained` into this model (resuming training).

        The backbone goes through ``transformers`` loading (which maps saved key names, e.g.
        BERT's LayerNorm gamma/beta, back to the module's names).
        """
        folder = os.fspath(folder)
        if not os.path.isdir(folder):
            raise MissingInputError(f"{folder}: no checkpoint folder to resume from")
        dtype = next(self.backbone.parameters()).dtype
        loaded = load_from_folder(AutoModel.from_pretrained, folder, "checkpoint", dtype=dtype,
                                  config=self.backbone.config)
        self.backbone.load_state_dict(loaded.state_dict(), strict=True)
        if self.has_heads:
            for linear, name in ((self.colbert_linear, COLBERT_FILE), (self.sparse_linear, SPARSE_FILE)):
                file = os.path.join(folder, name)
                _load_head(linear, load_state_dict_file(file), file)

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
        """Encode a padded batch.

        Returns (as asked) ``dense_vecs`` (batch x hidden), ``token_weights`` (batch x length,
        lexical weight per position, zero at special tokens) and ``colbert_vecs``
        (batch x length-1 x colbert_dim) with ``colbert_mask`` (batch x length-1).
        ``cls_mask`` marks CLS tokens inserted by MCLS: the dense vector averages them and they
        carry no multi-vector.
        """
        if not (return_dense or return_sparse or return_colbert_vecs):
            raise ValueError("ask for at least one of return_dense, return_sparse, return_colbert_vecs")
        if (return_sparse or return_colbert_vecs) and not self.has_heads:
            raise ValueError("this model was loaded without heads (dense only)")
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        out: dict[str, torch.Tensor] = {}
        if return_dense:
            dense = pool(hidden, attention_mask, self.pooling_method, cls_mask)
            out["dense_vecs"] = torch.nn.functional.normalize(dense, dim=-1) if self.normalize_embeddings else dense
        if return_sparse:
            out["token_weights"] = lexical_token_weights(self.sparse_linear, hidden, input_ids, self.unused_token_ids)
        if return_colbert_vecs:
            token_mask = attention_mask.bool()
            if cls_mask is not None:
                token_mask = token_mask & ~cls_mask
            out["colbert_vecs"] = colbert_vectors(self.colbert_linear, hidden, token_mask, self.normalize_embeddings)
            out["colbert_mask"] = token_mask[:, 1:]
        return out
