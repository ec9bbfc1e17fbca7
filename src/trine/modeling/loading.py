"""Reading a user's model folder: every problem is an :class:`~trine.errors.InputError` naming the
file (a missing folder, a truncated ``model.safetensors``, a garbage head file), never a library's
traceback or its advice (``transformers`` talks about internet connections, ``torch`` suggests
``weights_only=False``)."""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Callable
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
