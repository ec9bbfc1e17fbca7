"""Reading a user's model folder: every problem is an :class:`~trine.errors.InputError` naming the
file (a missing folder, a truncated ``model.safetensors``, a garbage head file), never a library's
traceback or its advice (``transformers`` talks about internet connections, ``torch`` suggests
``weights_only=False``)."""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Callable, Iterable
from typing import Any

import torch

from trine.errors import InputError, MissingInputError, UserError, first_line


def check_model_folder(path: str | os.PathLike) -> str:
    """``path`` as a string, if it is a folder (trine loads local folders only, never a Hub id)."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        what = "a file, not a model folder" if os.path.exists(path) else "no such model folder"
        raise MissingInputError(f"{path}: {what} (trine loads local folders only)")
    return path


def _is_resource_error(err: BaseException) -> bool:
    return isinstance(err, (ImportError, MemoryError, torch.OutOfMemoryError, UserError))


def _culprit(folder: str, err: BaseException) -> str:
    """The file in ``folder`` a loading error comes from, when the error does not say."""
    if type(err).__name__ == "SafetensorError":
        from safetensors import safe_open

        for file in sorted(glob.glob(os.path.join(folder, "*.safetensors"))):
            try:
                with safe_open(file, "pt"):
                    pass
            except Exception:  # noqa: BLE001 - the first file that does not open is the one to name
                return file
    if isinstance(err, json.JSONDecodeError):
        for file in sorted(glob.glob(os.path.join(folder, "*.json"))):
            try:
                with open(file, encoding="utf-8") as f:
                    json.load(f)
            except (ValueError, OSError):
                return file
    return folder


# model types trine implements itself, registered with transformers' Auto classes by their module
# (imported only for a folder of that type: MiniCPM's module imports transformers' Llama code)
OWN_MODEL_TYPES = {"minicpm": "trine.modeling.minicpm"}


def register_own_model_type(path: str) -> None:
    """Register trine's implementation of the folder's ``model_type`` when it is one of :data:`OWN_MODEL_TYPES`
    (a layer-wise MiniCPM reranker), so that ``AutoModel`` and its kin read the folder."""
    try:
        with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
            model_type = json.load(f).get("model_type")
    except (OSError, ValueError, AttributeError):
        return  # no readable config: the loader itself reports the folder
    if model_type in OWN_MODEL_TYPES:
        import importlib

        importlib.import_module(OWN_MODEL_TYPES[model_type]).register()


def load_from_folder(load: Callable[..., Any], path: str, what: str, **kwargs: Any) -> Any:
    """``load(path, **kwargs)`` (a ``transformers`` ``from_pretrained``) for a local folder; a folder it
    cannot read raises :class:`InputError` naming the file where it can. A folder of a model type
    trine implements itself (MiniCPM) has it registered first."""
    register_own_model_type(path)
    try:
        return load(path, **kwargs)
    except Exception as err:
        if _is_resource_error(err):
            raise
        hint = " (a truncated or corrupt file?)" if type(err).__name__ == "SafetensorError" else ""
        raise InputError(f"{_culprit(path, err)}: cannot load the {what}: {first_line(err)}{hint}") from err


def load_state_dict_file(file: str) -> dict[str, torch.Tensor]:
    """A ``torch.save``d state dict (e.g. BGE-M3's ``colbert_linear.pt``), read with ``weights_only=True``."""
    if not os.path.isfile(file):
        raise MissingInputError(f"{file}: no such file")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:
        if _is_resource_error(err):
            raise
        raise InputError(f"{file}: cannot read the weights: the file is truncated, corrupt or not a PyTorch "
                         f"state dict ({type(err).__name__})") from err
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise InputError(f"{file}: not a state dict (a mapping of names to tensors), got {type(state).__name__}")
    check_finite(state.items(), file)
    return state


# Position tables that start after the padding index: their first pad_token_id + 1 rows are no positions.
_PADDING_OFFSET_MODELS = ("roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "longformer", "data2vec-text")


def position_limit(config: Any) -> int | None:
    """The longest input, in tokens, a backbone's position table covers (None: no such limit known)."""
    n = getattr(config, "max_position_embeddings", None)
    if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
        return None
    if getattr(config, "model_type", "") in _PADDING_OFFSET_MODELS:
        pad = getattr(config, "pad_token_id", None)
        n -= (1 if pad is None else int(pad)) + 1
    return n


# ------------------------------------------------------------------ a model that loads but cannot be right
#: a tokenizer knowing fewer tokens than this share of the embedding rows does not belong to the model. Real
#: models pad their tables for speed (Qwen2: 151,665 tokens for 151,936 rows, DeBERTa-v3 128,001 for 128,100,
#: Phi-2 50,295 for 51,200: all above 95%); a folder without its ``tokenizer.json`` falls back to a
#: tokenizer of its special tokens only (5 tokens for BERT's 30,522 rows), which maps every word to unk.
MIN_TOKENIZER_SHARE = 0.5


def _weights_file(folder: str) -> str:
    """The one weights file of ``folder`` to name in a message, else the folder (sharded, adapters, ...)."""
    found = [name for name in ("model.safetensors", "pytorch_model.bin", "adapter_model.safetensors",
                               "adapter_model.bin") if os.path.isfile(os.path.join(folder, name))]
    return os.path.join(folder, found[0]) if len(found) == 1 else folder


def check_finite(tensors: Iterable[tuple[str, torch.Tensor]], where: str) -> None:
    """Refuse weights holding NaN or infinite values (a diverged training run, a corrupt or hostile file):
    every vector such a model gives is NaN, which no index, score or server should ever see. ``where``:
    the file (or folder) named in the :class:`InputError`."""
    with torch.no_grad():
        for name, tensor in tensors:
            if tensor.is_complex():
                tensor = torch.view_as_real(tensor)
            if not tensor.is_floating_point() or tensor.device.type == "meta" or tensor.numel() == 0:
                continue
            # min and max in one pass, without a mask as large as the tensor (isfinite().all() took 60 times as
            # long on a CPU for BGE-M3's embedding table): NaN propagates into both, an infinity shows in one
            low, high = torch.aminmax(tensor.detach())
            if bool(torch.isfinite(low)) and bool(torch.isfinite(high)):
                continue
            bad = int((~torch.isfinite(tensor)).sum())
            raise InputError(f"{where}: weight {name!r}: {bad} of {tensor.numel()} values are NaN or infinite "
                             "(a diverged or corrupt checkpoint); trine refuses to load it")


def check_tokenizer_fits(folder: str, tokenizer: Any, model: torch.nn.Module) -> None:
    """Refuse a tokenizer that does not belong to the model's vocabulary: one that gives ids beyond the input
    embedding table (an index error, or on a GPU a device assert, at the first such token), or one much smaller
    than the table (see :data:`MIN_TOKENIZER_SHARE`: every word would be unknown, and the vectors garbage)."""
    try:
        embeddings = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):  # remote code without the accessor
        embeddings = None
    rows = getattr(embeddings, "num_embeddings", None)
    if not isinstance(rows, int):
        return  # no token embedding table to compare with (a model trine does not know the shape of)
    # sizes, not get_vocab(): building the dict of a 250,002-piece vocabulary takes seconds
    size = len(tokenizer)
    base = int(getattr(tokenizer, "vocab_size", size))  # ids 0 .. base - 1, then the added tokens' own ids
    top = max(base - 1, max(getattr(tokenizer, "added_tokens_decoder", {}) or {}, default=-1))
    if top >= rows:
        raise InputError(f"{folder}: the tokenizer gives token ids up to {top} but the model's embedding table has "
                         f"{rows} rows: the tokenizer does not belong to this model")
    if size < MIN_TOKENIZER_SHARE * rows:
        raise InputError(f"{folder}: the tokenizer knows {size} tokens but the model's embedding table has {rows} "
                         "rows: the tokenizer does not belong to this model (a missing tokenizer.json? the tokenizer "
                         "files of another model?)")


def check_loaded_model(folder: str, model: torch.nn.Module, tokenizer: Any) -> None:
    """The checks every family loader runs on what it loaded from ``folder``, before anyone encodes with it:
    a tokenizer that fits the embedding table (:func:`check_tokenizer_fits`) and finite weights
    (:func:`check_finite`). Head files are checked as they are read (:func:`load_state_dict_file`)."""
    check_tokenizer_fits(folder, tokenizer, model)
    check_finite(model.named_parameters(), _weights_file(folder))
