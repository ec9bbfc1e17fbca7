"""The layer-wise LLM reranker (FlagEmbedding's ``LayerWiseFlagLLMReranker``, bge-reranker-v2-minicpm-layerwise).

A decoder-only LM reads the same pair text as :class:`trine.modeling.llm_reranker.LLMReranker` (BOS, ``A: query``,
separator, ``B: passage``, separator, prompt; the "Yes" check, the two truncation rules and the prompt handling are
that class's, inherited). Instead of the LM head's "Yes" logit after the last layer, each layer ``k`` from
``start_layer`` to the last (``num_hidden_layers``) has a score: a one-output linear head (``head_multi``: one head
per layer; else one head shared by all layers) applied to the final norm of the hidden state after ``k`` layers at
the pair's last token. Scoring at a layer ``k`` below the last runs only the first ``k`` layers (early exit), which
is what the model is for: cheaper scores from a cut-off layer. New heads start from the LM head's "Yes" row, as in
FlagEmbedding's fine-tuning from a plain LM.

Training (:meth:`LayerwiseReranker.training_layers`): every layer from ``start_layer`` up is scored; the loss is the
reranker loss at each layer plus, without teacher scores, a distillation from the last layer's (detached) group
distribution to each earlier layer (FlagEmbedding's ``decoder_only.layerwise`` loss).

The backbone is any ``transformers`` decoder with ``layers`` and a final ``norm`` (Llama, Qwen2, Mistral, ...), loaded
with ``AutoModel``. MiniCPM, the architecture of bge-reranker-v2-minicpm-layerwise, is not in ``transformers``; its
hub folder ships remote code that no longer runs on ``transformers`` 5 (it imports helpers 5.x removed). trine
therefore implements MiniCPM itself (:mod:`trine.modeling.minicpm`: Llama's layers plus MiniCPM's two scalings),
registered as the ``minicpm`` model type, so such a folder (weights ``model.*``, heads ``lm_head.*``) loads with no
remote code.

A trine folder is the backbone (``save_pretrained``; with LoRA its adapter folder), the tokenizer, the heads in
:data:`HEADS_FILE` and :data:`~trine.modeling.llm_reranker.FAMILY_FILE` recording the family, prompt, separator,
``start_layer`` and ``head_multi``. A MiniCPM model without an adapter is saved in FlagEmbedding's layer-wise layout
instead (decoder ``model.*`` and heads ``lm_head.*`` in one checkpoint), which ``LayerWiseFlagLLMReranker`` loads.
"""

from __future__ import annotations

import contextlib
import json
import numbers
import os
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModel, PreTrainedTokenizerBase

from trine.errors import InputError, MissingInputError, OptionError
from trine.io import write_folder
from trine.modeling.family_file import FAMILY_FILE, LAYERWISE_ARCHITECTURE, read_family_file, record_family
from trine.modeling.llm_reranker import DEFAULT_SEP_TOKEN, LAYERWISE_FAMILY, LLMReranker
from trine.modeling.loading import check_finite, check_loaded_model, load_from_folder, load_tokenizer, resolve_model
from trine.modeling.lora import has_lora
from trine.modeling.minicpm import MiniCPMModel
from trine.modeling.minicpm import register as register_minicpm

register_minicpm()  # AutoModel reads MiniCPM folders (load_from_folder also registers it for such a folder)

FAMILY_NAME = LAYERWISE_FAMILY
HEADS_FILE = "layerwise_heads.safetensors"
#: FlagEmbedding's head types; only "simple" (one output per layer) scores pairs there: its "raw" and "complex"
#: heads give vocabulary-wide logits that its scoring code reads at the wrong index
HEAD_TYPES = ("simple",)
#: FlagEmbedding's default first scored layer
DEFAULT_START_LAYER = 8


# ----------------------------------------------------------------------------- checkpoint reading
def _config_json(path: str) -> dict[str, Any]:
    file = os.path.join(path, "config.json")
    if not os.path.isfile(file):
        return {}
    try:
        with open(file, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError) as err:
        raise InputError(f"{file}: cannot read: {err}") from err
    return config if isinstance(config, dict) else {}


def is_flag_layerwise_folder(path: str | os.PathLike) -> bool:
    """Whether a folder is a FlagEmbedding / hub layer-wise MiniCPM checkpoint (bge-reranker-v2-minicpm-layerwise)."""
    return LAYERWISE_ARCHITECTURE in (_config_json(os.fspath(path)).get("architectures") or [])


def _checkpoint_files(path: str) -> list[str]:
    """A checkpoint folder's weight files: safetensors (one or sharded), else PyTorch ``.bin`` (one or sharded)."""
    for single, index in (("model.safetensors", "model.safetensors.index.json"),
                          ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        file = os.path.join(path, index)
        if os.path.isfile(file):
            try:
                with open(file, encoding="utf-8") as f:
                    return sorted(set(json.load(f)["weight_map"].values()))
            except (OSError, ValueError, KeyError, AttributeError) as err:
                raise InputError(f"{file}: weight_map: cannot read: {err}") from err
        if os.path.isfile(os.path.join(path, single)):
            return [single]
    raise MissingInputError(f"{path}: no model.safetensors or pytorch_model.bin (the weights holding the LM head)")


def _read_tensors(path: str, wanted: Any) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint folder whose names ``wanted(name)`` accepts."""
    out: dict[str, torch.Tensor] = {}
    for name in _checkpoint_files(path):
        file = os.path.join(path, name)
        if name.endswith(".safetensors"):
            with safe_open(file, framework="pt") as f:
                out.update({k: f.get_tensor(k) for k in f.keys() if wanted(k)})
        else:
            out.update({k: v for k, v in torch.load(file, map_location="cpu", weights_only=True).items() if wanted(k)})
    return out


def _flag_heads(path: str) -> tuple[Any, bool, dict[str, torch.Tensor]]:
    """``start_layer``, ``head_multi`` and the heads (as a ModuleList state dict) of a FlagEmbedding layer-wise
    folder: ``lm_head.{i}.linear_head.weight`` (head_multi) or ``lm_head.linear_head.weight``."""
    config = _config_json(path)
    if config.get("head_type", "simple") not in HEAD_TYPES:
        raise InputError(f"{os.path.join(path, 'config.json')}: head_type: {config.get('head_type')!r}; trine "
                         f"scores with {HEAD_TYPES} heads")
    start, multi = config.get("start_layer", DEFAULT_START_LAYER), bool(config.get("head_multi", False))
    found = _read_tensors(path, lambda k: k.startswith("lm_head."))
    weights = {k[len("lm_head."):].replace("linear_head.", ""): v for k, v in found.items()}
    return start, multi, weights if multi else {f"0.{k}": v for k, v in weights.items()}


def _check_int(name: str, value: Any, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not low <= value <= high:
        raise OptionError(f"{name}: must be an integer in [{low}, {high}], got {value!r}")
    return int(value)


class LayerwiseReranker(LLMReranker):
    """A decoder scoring (query, passage) pairs at chosen layers with per-layer (or one shared) linear heads.

    ``model``: the ``transformers`` base decoder (where LoRA goes); ``heads``: ``num_hidden_layers - start_layer + 1``
    linear maps hidden -> 1 (``head_multi``) or one. ``forward(input_ids, attention_mask, cutoff_layers=None)``: one
    score per pair at the last layer, or, given a list of layers, a (layers, pairs) tensor.
    """

    family_name = FAMILY_NAME

    def __init__(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, heads: nn.ModuleList, *,
                 start_layer: int, prompt: str | None = None, sep_token: str = DEFAULT_SEP_TOKEN):
        super().__init__(model, tokenizer, prompt=prompt, sep_token=sep_token)
        if not isinstance(getattr(model, "layers", None), nn.ModuleList) or not isinstance(
                getattr(model, "norm", None), nn.Module):
            raise InputError(f"a {type(model).__name__} has no decoder layers and final norm (layers, norm) to score "
                             "layer by layer")
        self.num_layers = len(model.layers)
        self.start_layer = _check_int("start_layer", start_layer, 1, self.num_layers)
        expected = self.num_layers - self.start_layer + 1
        if len(heads) not in (1, expected):
            raise InputError(f"{len(heads)} layer heads for layers {self.start_layer}..{self.num_layers} "
                             f"({expected} with head_multi, else 1)")
        self.heads = heads

    # ------------------------------------------------------------------ layers
    def check_cutoff_layers(self, cutoff_layers: int | Sequence[int] | None) -> list[int]:
        """The layers asked for as a list (None: the last layer); each in [start_layer, num_hidden_layers], once."""
        if cutoff_layers is None:
            return [self.num_layers]
        single = isinstance(cutoff_layers, numbers.Integral) and not isinstance(cutoff_layers, bool)
        if not single and (isinstance(cutoff_layers, str) or not isinstance(cutoff_layers, Sequence)):
            raise OptionError(f"cutoff_layers: a layer number or a list of them, got {cutoff_layers!r}")
        layers = [cutoff_layers] if single else list(cutoff_layers)
        if not layers:
            raise OptionError("cutoff_layers: an empty list (name at least one layer)")
        layers = [_check_int("cutoff_layers", k, self.start_layer, self.num_layers) for k in layers]
        if len(set(layers)) != len(layers):
            raise OptionError(f"cutoff_layers: {layers} names a layer twice")
        return layers

    def training_layers(self) -> list[int]:
        """The layers training scores: every layer with a head, the last one last."""
        return list(range(self.start_layer, self.num_layers + 1))

    def _head(self, layer: int) -> nn.Module:
        return self.heads[layer - self.start_layer] if len(self.heads) > 1 else self.heads[0]

    @contextlib.contextmanager
    def _first_layers(self, n: int) -> Iterator[None]:
        """The backbone runs only its first ``n`` layers (early exit) inside the block."""
        if n == self.num_layers:
            yield
            return
        layers = self.model.layers
        self.model.layers = nn.ModuleList(list(layers)[:n])
        try:
            yield
        finally:
            self.model.layers = layers

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None, *,
                cutoff_layers: int | Sequence[int] | None = None) -> torch.Tensor:
        """Scores at each row's last real token (right or left padding): (pairs,) for None or one layer given as an
        int, else (len(cutoff_layers), pairs) in the order given."""
        layers = self.check_cutoff_layers(cutoff_layers)
        top = max(layers)
        captured: dict[int, torch.Tensor] = {}

        def keep(k: int):
            def hook(module: nn.Module, args: Any, output: Any) -> None:
                captured[k] = output[0] if isinstance(output, tuple) else output
            return hook

        hooks = [self.model.layers[k - 1].register_forward_hook(keep(k)) for k in set(layers) if k < top]
        try:
            with self._first_layers(top):
                final = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        finally:
            for h in hooks:
                h.remove()
        last = attention_mask.long().cumsum(-1).argmax(-1)  # each row's last position whose mask is 1
        rows = torch.arange(input_ids.size(0), device=input_ids.device)
        scores = []
        for k in layers:
            # the final norm is per token: normalising only the positions read equals normalising the whole state
            hidden = final[rows, last] if k == top else self.model.norm(captured[k][rows, last])
            scores.append(self._head(k)(hidden).squeeze(-1).float())
        if cutoff_layers is None or isinstance(cutoff_layers, numbers.Integral):
            return scores[0]
        return torch.stack(scores)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, dtype: torch.dtype = torch.float32,
                        trust_remote_code: bool = False, attn_implementation: str | None = None,
                        prompt: str | None = None, sep_token: str | None = None, start_layer: int | None = None,
                        head_multi: bool | None = None, head_type: str | None = None,
                        revision: str | None = None, cache_dir: str | os.PathLike | None = None,
                        token: str | bool | None = None) -> LayerwiseReranker:
        """Load a trine layer-wise reranker folder (or its LoRA adapter folder), a FlagEmbedding / hub layer-wise
        MiniCPM checkpoint, or a plain decoder (causal LM) folder, which gets new heads from its LM head's "Yes"
        row: ``start_layer`` (FlagEmbedding's 8), ``head_multi`` (False), ``head_type`` ("simple"). These three set
        up new heads only; a folder with heads keeps its own."""
        # a folder, or a Hub id fetched into the Hugging Face cache (revision, cache_dir, token: of the id)
        path = resolve_model(path, revision=revision, cache_dir=cache_dir, token=token)
        info = read_family_file(path) or {}
        if info.get("model_family", FAMILY_NAME) != FAMILY_NAME:
            raise InputError(f"{os.path.join(path, FAMILY_FILE)}: model_family: {info['model_family']!r}, not "
                             f"{FAMILY_NAME!r}")
        if head_type is not None and head_type not in HEAD_TYPES:
            raise OptionError(f"head_type: {head_type!r} is not supported; trine takes {HEAD_TYPES} (FlagEmbedding's "
                              "'raw' and 'complex' heads give vocabulary-wide logits it cannot score pairs with)")
        flag = is_flag_layerwise_folder(path)
        has_heads = os.path.isfile(os.path.join(path, HEADS_FILE)) or flag
        if has_heads and (start_layer is not None or head_multi is not None):
            raise OptionError(f"start_layer/head_multi: {path} has its layer heads already (they set up new heads)")
        tokenizer = load_tokenizer(path, trust_remote_code=trust_remote_code)
        model = load_from_folder(
            AutoModel.from_pretrained, path, "model", dtype=dtype, trust_remote_code=trust_remote_code,
            **({"attn_implementation": attn_implementation} if attn_implementation else {}),
        )
        if getattr(model.config, "is_encoder_decoder", False) or not isinstance(getattr(model, "layers", None),
                                                                                 nn.ModuleList):
            raise InputError(f"{path}: a {type(model).__name__} is not a decoder with a list of layers; model_family "
                             f"{FAMILY_NAME!r} takes decoder-only models")
        check_loaded_model(path, model, tokenizer)
        model.config.use_cache = False
        n_layers = len(model.layers)
        hidden = model.config.hidden_size
        if os.path.isfile(os.path.join(path, HEADS_FILE)):
            if "start_layer" not in info or "head_multi" not in info:
                raise InputError(f"{os.path.join(path, FAMILY_FILE)}: start_layer, head_multi: missing (the layout "
                                 f"of {HEADS_FILE})")
            start, multi = info["start_layer"], info["head_multi"]
            weights = load_file(os.path.join(path, HEADS_FILE))
            check_finite(weights.items(), os.path.join(path, HEADS_FILE))
        elif flag:
            start, multi, weights = _flag_heads(path)
            check_finite(weights.items(), path)
        else:
            start = DEFAULT_START_LAYER if start_layer is None else start_layer
            multi = bool(head_multi)
            if isinstance(start, bool) or not isinstance(start, int) or not 1 <= start <= n_layers:
                raise OptionError(f"start_layer: {start!r} is outside the model's layers 1..{n_layers} ({path})")
            weights = None
        start = _check_int(f"{path}: start_layer", start, 1, n_layers)
        count = n_layers - start + 1 if multi else 1
        heads = nn.ModuleList(nn.Linear(hidden, 1, bias=False) for _ in range(count))
        if weights is None:
            yes = cls._yes_row(path, model, tokenizer)
            with torch.no_grad():
                for head in heads:
                    head.weight.copy_(yes.view(1, -1))
        else:
            try:
                heads.load_state_dict({k: v.to(torch.float32) for k, v in weights.items()}, strict=True)
            except RuntimeError as err:
                raise InputError(f"{path}: the layer heads do not fit {count} heads of {hidden} inputs "
                                 f"(start_layer {start}, head_multi {multi}): {str(err).splitlines()[0]}") from err
        heads.to(dtype)
        return cls(model, tokenizer, heads, start_layer=start,
                   prompt=prompt if prompt is not None else info.get("prompt"),
                   sep_token=sep_token if sep_token is not None else info.get("sep_token", DEFAULT_SEP_TOKEN))

    @staticmethod
    def _yes_row(path: str, model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> torch.Tensor:
        """The LM head's row of "Yes" (the tied input embedding when the checkpoint has no separate head)."""
        yes = tokenizer("Yes", add_special_tokens=False)["input_ids"]
        if len(yes) != 1:
            raise InputError(f"{path}: 'Yes' is {len(yes)} tokens ({yes}); new layer heads start from its LM head row")
        found = _read_tensors(path, lambda k: k in ("lm_head.weight", "model.lm_head.weight"))
        if found:
            return next(iter(found.values()))[yes[0]].detach().float()
        if not getattr(model.config, "tie_word_embeddings", False):
            raise InputError(f"{path}: no lm_head.weight and the embeddings are not tied: no LM head to start the "
                             "layer heads from")
        return model.get_input_embeddings().weight[yes[0]].detach().float()

    # ------------------------------------------------------------------ saving and resuming
    def save_pretrained(self, path: str | os.PathLike, *, atomic: bool = True, overwrite: bool = False) -> None:
        write_folder(path, self._write, atomic=atomic, overwrite=overwrite)

    def _write(self, folder: str) -> None:
        if isinstance(self.model, MiniCPMModel) and not has_lora(self.model):
            self._write_flag_layout(folder)  # a MiniCPM model: the layout FlagEmbedding loads too
        else:
            self.model.save_pretrained(folder, safe_serialization=True)
            save_file({k: v.detach().contiguous().cpu() for k, v in self.heads.state_dict().items()},
                      os.path.join(folder, HEADS_FILE))
        self.tokenizer.save_pretrained(folder)
        record_family(folder, FAMILY_NAME, prompt=self.prompt, sep_token=self.sep_token,
                      start_layer=self.start_layer, head_multi=len(self.heads) > 1)

    def _write_flag_layout(self, folder: str) -> None:
        """FlagEmbedding's (and the hub's) layer-wise MiniCPM layout: one config naming ``LayerWiseMiniCPMForCausalLM``
        with ``start_layer``/``head_multi``/``head_type``, the decoder as ``model.*`` and the heads as ``lm_head.*``."""
        config = self.model.config.to_dict()
        multi = len(self.heads) > 1
        rope = config.get("rope_parameters") or {}
        config.update(architectures=[LAYERWISE_ARCHITECTURE], start_layer=self.start_layer, head_multi=multi,
                      head_type="simple", use_cache=False)
        if "rope_theta" in rope:  # FlagEmbedding's MiniCPM reads the rope base from here
            config["rope_theta"] = rope["rope_theta"]
        tensors = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        for i, head in enumerate(self.heads):
            tensors[f"lm_head.{i}.linear_head.weight" if multi else "lm_head.linear_head.weight"] = head.weight
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()},
                  os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, sort_keys=True)

    def load_weights(self, folder: str | os.PathLike) -> None:
        """Load weights :meth:`save_pretrained` wrote into this model (resuming training)."""
        folder = os.fspath(folder)
        if not os.path.isdir(folder):
            raise MissingInputError(f"{folder}: no checkpoint folder to resume from")
        dtype = next(self.model.parameters()).dtype
        loaded = load_from_folder(AutoModel.from_pretrained, folder, "checkpoint", dtype=dtype,
                                  config=self.model.config)
        self.model.load_state_dict(loaded.state_dict(), strict=True)
        file = os.path.join(folder, HEADS_FILE)
        if os.path.isfile(file):
            self.heads.load_state_dict(load_file(file), strict=True)
        elif is_flag_layerwise_folder(folder):
            self.heads.load_state_dict(_flag_heads(folder)[2], strict=True)
        else:
            raise MissingInputError(f"{folder}: no {HEADS_FILE} (nor lm_head.* weights) to resume the layer heads from")
