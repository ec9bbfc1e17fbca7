"""RetroMAE pre-training (stage 1 of BGE and BGE-M3): an MLM encoder plus a one-layer "enhanced decoder".

The encoder is a masked-LM model (BERT or RoBERTa/XLM-R family) that reads whole-word-masked
text and predicts the masked tokens. Its final CLS state is the sentence vector. The decoder is
one transformer layer whose attention takes its *queries* from a position-only stream (position
embedding + sentence vector at every position) and its *keys/values* from a context stream (the
sentence vector in slot 0, then the embeddings of the original tokens). Each query row gets its
own attention mask: a random whole-word subset of tokens and the row's own position are hidden,
slot 0 (the sentence vector) is always visible. The decoder reconstructs every token through the
encoder's MLM head, so what it cannot see must come from the sentence vector (Xiao et al., 2022,
"RetroMAE", enhanced decoding). Loss = encoder MLM loss + decoder reconstruction loss.

After pre-training only the encoder is kept: :meth:`RetroMAEModel.save_encoder` writes a plain
Hugging Face folder (model + tokenizer) that ``trine finetune`` loads as a backbone.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Literal

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForMaskedLM, PreTrainedModel, PreTrainedTokenizerBase
from transformers.activations import ACT2FN

from trine.errors import InputError
from trine.io import atomic_folder
from trine.modeling.loading import check_finite, check_loaded_model, load_from_folder, load_tokenizer, resolve_model

logger = logging.getLogger(__name__)

DECODER_FILE = "retromae_decoder.safetensors"
PositionExtension = Literal["copy", "interpolate"]


# ---------------------------------------------------------------------------------------------- position table
def position_offset(embeddings: nn.Module) -> int:
    """Rows of the position table before the first real position: RoBERTa/XLM-R number positions
    from ``padding_idx + 1`` (row ``padding_idx`` is the padding row), BERT from 0."""
    padding_idx = getattr(embeddings, "padding_idx", None)
    return 0 if padding_idx is None else int(padding_idx) + 1


def _embeddings(model: nn.Module) -> nn.Module:
    base = getattr(model, "base_model", model)
    embeddings = getattr(base, "embeddings", None)
    if embeddings is None or not isinstance(getattr(embeddings, "position_embeddings", None), nn.Embedding):
        raise ValueError(
            f"{type(model).__name__}: no learned absolute position table (embeddings.position_embeddings); "
            "RetroMAE and position extension need a BERT- or RoBERTa-style encoder (not rotary/relative positions)"
        )
    return embeddings


def extend_position_embeddings(
    model: PreTrainedModel,
    new_size: int,
    mode: PositionExtension = "copy",
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> None:
    """Grow the learned position table to ``new_size`` rows in place (BGE-M3 went from 514 to 8194 rows).

    ``copy``: the old rows stay as they are and the new rows repeat the real positions cyclically
    (position ``offset + k`` takes old row ``offset + k % (old - offset)``). ``interpolate``: the
    real positions are linearly resampled over the longer range (first and last rows kept). The
    rows before ``offset`` (RoBERTa/XLM-R's unused and padding rows) are kept in both modes.
    ``config.max_position_embeddings``, the ``position_ids``/``token_type_ids`` buffers and the
    tokenizer's ``model_max_length`` follow.
    """
    if mode not in ("copy", "interpolate"):
        raise ValueError(f"position extension mode must be copy or interpolate, got {mode!r}")
    embeddings = _embeddings(model)
    table: nn.Embedding = embeddings.position_embeddings
    old, hidden = table.weight.shape
    if new_size <= old:
        raise ValueError(f"extend_position_embeddings: {new_size} rows is not more than the current {old}")
    offset = position_offset(embeddings)
    real = table.weight.detach()[offset:]
    with torch.no_grad():
        if mode == "copy":
            index = torch.arange(new_size - offset, device=real.device) % real.shape[0]
            grown = real[index]
        else:
            grown = F.interpolate(real.t().unsqueeze(0).float(), size=new_size - offset, mode="linear",
                                  align_corners=True)[0].t().to(real.dtype)
        weight = torch.cat([table.weight.detach()[:offset], grown], dim=0)
    new_table = nn.Embedding(new_size, hidden, padding_idx=table.padding_idx, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        new_table.weight.copy_(weight)
    embeddings.position_embeddings = new_table
    device = table.weight.device
    if isinstance(getattr(embeddings, "position_ids", None), torch.Tensor):
        embeddings.position_ids = torch.arange(new_size, device=device).expand((1, -1))
    if isinstance(getattr(embeddings, "token_type_ids", None), torch.Tensor):
        embeddings.token_type_ids = torch.zeros((1, new_size), dtype=torch.long, device=device)
    model.config.max_position_embeddings = new_size
    base = getattr(model, "base_model", model)
    if base.config is not model.config:
        base.config.max_position_embeddings = new_size
    if tokenizer is not None:
        tokenizer.model_max_length = new_size - offset
    logger.info("position table extended from %d to %d rows (%s)", old, new_size, mode)


# ---------------------------------------------------------------------------------------------- the decoder
class EnhancedDecoderLayer(nn.Module):
    """One post-LayerNorm transformer layer (BERT's shape) with separate query and key/value streams."""

    def __init__(self, hidden_size: int, num_heads: int, intermediate_size: int, *, hidden_act: str = "gelu",
                 layer_norm_eps: float = 1e-12, hidden_dropout: float = 0.1, attention_dropout: float = 0.1):
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden size {hidden_size} is not a multiple of {num_heads} heads")
        self.num_heads = num_heads
        self.query = nn.Linear(hidden_size, hidden_size)
        self.key = nn.Linear(hidden_size, hidden_size)
        self.value = nn.Linear(hidden_size, hidden_size)
        self.attention_output = nn.Linear(hidden_size, hidden_size)
        self.attention_norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.intermediate = nn.Linear(hidden_size, intermediate_size)
        self.act = ACT2FN[hidden_act]
        self.output = nn.Linear(intermediate_size, hidden_size)
        self.output_norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.dropout = nn.Dropout(hidden_dropout)
        self.attention_dropout = attention_dropout

    @classmethod
    def from_config(cls, config: Any) -> EnhancedDecoderLayer:
        layer = cls(
            config.hidden_size, config.num_attention_heads, config.intermediate_size,
            hidden_act=config.hidden_act if isinstance(config.hidden_act, str) else "gelu",
            layer_norm_eps=config.layer_norm_eps, hidden_dropout=config.hidden_dropout_prob,
            attention_dropout=config.attention_probs_dropout_prob,
        )
        std = float(getattr(config, "initializer_range", 0.02))
        for module in layer.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=std)
                nn.init.zeros_(module.bias)
        return layer

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        return x.view(b, n, self.num_heads, d // self.num_heads).transpose(1, 2)

    def forward(self, query: torch.Tensor, context: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """``query`` (B x L x H) attends over ``context`` (B x L x H); ``visible`` (B x L x L, bool):
        row i may attend to context slot j."""
        q, k, v = self._heads(self.query(query)), self._heads(self.key(context)), self._heads(self.value(context))
        attn = F.scaled_dot_product_attention(
            q, k, v, attn_mask=visible[:, None], dropout_p=self.attention_dropout if self.training else 0.0
        )
        attn = attn.transpose(1, 2).reshape(query.shape)
        h = self.attention_norm(query + self.dropout(self.attention_output(attn)))
        return self.output_norm(h + self.dropout(self.output(self.act(self.intermediate(h)))))


def mlm_head(lm: PreTrainedModel) -> nn.Module:
    """The masked-LM head (hidden states -> vocabulary logits) of a BERT- or RoBERTa-family MLM model."""
    for name in ("cls", "lm_head"):
        head = getattr(lm, name, None)
        if isinstance(head, nn.Module):
            return head
    raise ValueError(f"{type(lm).__name__}: no MLM head found (BERT's `cls` or RoBERTa's `lm_head`)")


def _masked_lm_loss(head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over the labelled positions only (logits never cover the whole batch x length)."""
    keep = labels != -100
    if not bool(keep.any()):
        return hidden.sum() * 0.0
    logits = head(hidden[keep])
    return F.cross_entropy(logits.float(), labels[keep])


# ---------------------------------------------------------------------------------------------- the model
class RetroMAEModel(nn.Module):
    """The masked-LM encoder and the enhanced decoder; ``forward`` returns ``loss`` and its parts."""

    def __init__(self, lm: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, decoder: EnhancedDecoderLayer):
        super().__init__()
        self.lm = lm
        self.tokenizer = tokenizer
        self.decoder = decoder
        mlm_head(lm)  # fail early on a model without one
        self.position_offset = position_offset(_embeddings(lm))

    @property
    def head(self) -> nn.Module:
        """The encoder's MLM head, shared by the decoder (a property: not a second registered copy)."""
        return mlm_head(self.lm)

    @property
    def embeddings(self) -> nn.Module:
        return _embeddings(self.lm)

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        *,
        extend_position_embeddings_to: int | None = None,
        position_extension: PositionExtension = "copy",
        allow_new_mlm_head: bool = False,
        dtype: torch.dtype = torch.float32,
        trust_remote_code: bool = False,
        attn_implementation: str | None = None,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        token: str | bool | None = None,
    ) -> RetroMAEModel:
        """Load an MLM checkpoint (its MLM head is shared by encoder and decoder) and add a new decoder.

        A folder without MLM head weights is an error unless ``allow_new_mlm_head`` (the head then
        starts from the model's own initialisation, output weights tied to the word embeddings
        where the config ties them). A folder holding ``retromae_decoder.safetensors`` (a trine
        pre-training checkpoint) gets its decoder back.
        """
        # a folder, or a Hub id fetched into the Hugging Face cache (revision, cache_dir, token: of the id)
        path = resolve_model(path, revision=revision, cache_dir=cache_dir, token=token)
        tokenizer = load_tokenizer(path, trust_remote_code=trust_remote_code)
        if not getattr(tokenizer, "is_fast", False):
            raise InputError(f"{path}: RetroMAE needs a fast tokenizer (tokenizer.json) to find whole words")
        if tokenizer.mask_token_id is None:
            raise InputError(f"{path}: the tokenizer has no mask token")
        lm, info = load_from_folder(
            AutoModelForMaskedLM.from_pretrained, path, "masked-LM model", dtype=dtype,
            trust_remote_code=trust_remote_code, output_loading_info=True,
            **({"attn_implementation": attn_implementation} if attn_implementation else {}),
        )
        check_loaded_model(path, lm, tokenizer)
        missing = sorted(k for k in info["missing_keys"] if not k.startswith(lm.base_model_prefix + "."))
        if missing:
            if not allow_new_mlm_head:
                raise InputError(
                    f"{path}: no MLM head weights ({', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''}); "
                    "RetroMAE trains through the MLM head. Pass allow_new_mlm_head to start a new one"
                )
            logger.warning("%s has no MLM head weights: a NEW head starts from the model's own initialisation", path)
        if extend_position_embeddings_to is not None:
            extend_position_embeddings(lm, extend_position_embeddings_to, position_extension, tokenizer)
        decoder = EnhancedDecoderLayer.from_config(lm.config).to(dtype)
        model = cls(lm, tokenizer, decoder)
        decoder_file = os.path.join(path, DECODER_FILE)
        if os.path.exists(decoder_file):
            state = load_file(decoder_file)
            check_finite(state.items(), decoder_file)
            model.decoder.load_state_dict(state)
        return model

    # -------------------------------------------------------------------------------------- forward
    def forward(
        self,
        encoder_input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        encoder_labels: torch.Tensor,
        decoder_input_ids: torch.Tensor,
        decoder_visible: torch.Tensor,
        decoder_labels: torch.Tensor,
    ) -> dict[str, Any]:
        """Encoder MLM on the masked input, then the decoder reconstructs ``decoder_labels`` from the
        sentence vector and the tokens each row may see (``decoder_visible``, B x L x L)."""
        base = self.lm.base_model
        hidden = base(input_ids=encoder_input_ids, attention_mask=attention_mask).last_hidden_state
        encoder_loss = _masked_lm_loss(self.head, hidden, encoder_labels)
        sentence = hidden[:, :1]  # the CLS state: the sentence vector

        embeddings = self.embeddings
        length = decoder_input_ids.shape[1]
        positions = torch.arange(self.position_offset, self.position_offset + length, device=hidden.device)
        positions = positions.unsqueeze(0).expand(decoder_input_ids.shape[0], -1)
        context = embeddings(input_ids=decoder_input_ids, position_ids=positions)
        context = torch.cat([sentence, context[:, 1:]], dim=1)
        query = embeddings.position_embeddings(positions) + sentence
        decoded = self.decoder(query, context, decoder_visible)
        decoder_loss = _masked_lm_loss(self.head, decoded, decoder_labels)
        loss = encoder_loss + decoder_loss
        return {"loss": loss, "parts": {"encoder_mlm": encoder_loss.detach(), "decoder": decoder_loss.detach()}}

    def activation_checkpointing_enable(
        self, activation_checkpointing_kwargs: dict[str, Any] | None = None, **kwargs: Any
    ) -> None:
        """Called by the Trainer for ``--gradient_checkpointing``: checkpoints the encoder's layers."""
        if hasattr(self.lm, "activation_checkpointing_enable"):
            self.lm.activation_checkpointing_enable(activation_checkpointing_kwargs=activation_checkpointing_kwargs,
                                                    **kwargs)
        else:  # transformers 4
            self.lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=activation_checkpointing_kwargs)

    gradient_checkpointing_enable = activation_checkpointing_enable

    # -------------------------------------------------------------------------------------- saving
    def _write_encoder(self, folder: str) -> None:
        from trine.modeling.family_file import record_family

        self.lm.save_pretrained(folder, safe_serialization=True)
        self.tokenizer.save_pretrained(folder)
        # the pre-trained encoder is a plain (dense-only) encoder backbone for trine finetune
        record_family(folder, "encoder")

    def save_encoder(self, path: str | os.PathLike, *, overwrite: bool = False, card: Any = None) -> str:
        """The encoder (MLM model + tokenizer) as a plain Hugging Face folder, written atomically:
        the backbone ``trine finetune --model_name_or_path`` takes; ``card`` (a
        :class:`trine.cards.ModelCard`) goes in as its README.md."""
        with atomic_folder(path, overwrite=overwrite) as tmp:
            self._write_encoder(tmp)
            if card is not None:
                from trine.cards import write_card

                write_card(tmp, card, name=os.path.basename(os.path.abspath(os.fspath(path))))
        return os.path.abspath(os.fspath(path))

    def save_checkpoint(self, folder: str | os.PathLike) -> None:
        """Encoder folder plus the decoder's weights (for resuming pre-training)."""
        folder = os.fspath(folder)
        os.makedirs(folder, exist_ok=True)
        self._write_encoder(folder)
        state = {k: v.detach().contiguous().cpu() for k, v in self.decoder.state_dict().items()}
        save_file(state, os.path.join(folder, DECODER_FILE))

    def load_checkpoint(self, folder: str | os.PathLike) -> None:
        """Load weights written by :meth:`save_checkpoint` into this model (resuming)."""
        folder = os.fspath(folder)
        decoder_file = os.path.join(folder, DECODER_FILE)
        if not os.path.exists(decoder_file):
            raise FileNotFoundError(f"{folder}: no {DECODER_FILE}; not a trine pre-training checkpoint")
        dtype = next(self.lm.parameters()).dtype
        loaded = AutoModelForMaskedLM.from_pretrained(folder, dtype=dtype, config=self.lm.config)
        self.lm.load_state_dict(loaded.state_dict(), strict=True)
        self.decoder.load_state_dict(load_file(decoder_file))

