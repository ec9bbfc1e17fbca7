"""The file in which every folder trine writes records its model family: what a model class writes when it
saves and reads when it loads, below the family registry (:mod:`trine.modeling.families`), which imports
the model classes.

:data:`FAMILY_SETTINGS` names every built-in family and the settings it records beside its name (an LLM
reranker's prompt); :func:`trine.modeling.families.register_family` adds a family registered later.
"""

from __future__ import annotations

import json
import os
from typing import Any

from trine.errors import InputError, first_line

#: the file in which every folder trine writes records its model family (and the family's own settings, e.g. an
#: LLM reranker's prompt); FlagEmbedding and sentence-transformers ignore it
FAMILY_FILE = "trine_family.json"
#: where trine's rerankers recorded their family before every family did (still read)
LEGACY_FAMILY_FILE = "trine_reranker.json"
#: BGE-M3's head files (trine.modeling.trihead's COLBERT_FILE / SPARSE_FILE): a folder with both is tri-head
HEAD_FILES = ("colbert_linear.pt", "sparse_linear.pt")
#: the class name FlagEmbedding and the hub's bge-reranker-v2-minicpm-layerwise save a layer-wise reranker as
LAYERWISE_ARCHITECTURE = "LayerWiseMiniCPMForCausalLM"

_LLM_SETTINGS = (("prompt", str), ("sep_token", str))
#: every family's name -> the settings it records in FAMILY_FILE beside its name, and their types
FAMILY_SETTINGS: dict[str, tuple[tuple[str, type], ...]] = {
    "trihead": (),
    "encoder": (),
    "decoder": (),
    "cross-encoder": (),
    "llm-reranker": _LLM_SETTINGS,
    "llm-reranker-layerwise": (*_LLM_SETTINGS, ("start_layer", int), ("head_multi", bool)),
    "retromae": (),
}
_TYPE_NAMES = {str: "a string", int: "an integer", bool: "true or false"}


def record_family(folder: str | os.PathLike, name: str, **settings: Any) -> None:
    """Write :data:`FAMILY_FILE` into ``folder`` (a folder being written): the one writer every save path uses."""
    if name not in FAMILY_SETTINGS:
        raise ValueError(f"{name!r} is not a model family ({', '.join(sorted(FAMILY_SETTINGS))})")
    unknown = sorted(set(settings) - {k for k, _ in FAMILY_SETTINGS[name]})
    if unknown:
        raise ValueError(f"model family {name!r} records no {unknown}")
    with open(os.path.join(os.fspath(folder), FAMILY_FILE), "w", encoding="utf-8") as f:
        json.dump({"model_family": name, **settings}, f, indent=2)


def read_family_file(path: str | os.PathLike) -> dict[str, Any] | None:
    """What a folder's :data:`FAMILY_FILE` (or an older trine reranker's :data:`LEGACY_FAMILY_FILE`) records,
    checked: a known family and only its settings, of their types; None without such a file."""
    folder = os.fspath(path)
    file = next((os.path.join(folder, n) for n in (FAMILY_FILE, LEGACY_FAMILY_FILE)
                 if os.path.isfile(os.path.join(folder, n))), None)
    if file is None:
        return None
    try:
        with open(file, encoding="utf-8") as f:
            info = json.load(f)
    except (OSError, ValueError) as err:
        raise InputError(f"{file}: cannot read: {first_line(err)}") from err
    if not isinstance(info, dict) or not isinstance(info.get("model_family"), str):
        raise InputError(f"{file}: model_family: missing (an object with the folder's model family)")
    name = info["model_family"]
    if name not in FAMILY_SETTINGS:
        raise InputError(f"{file}: model_family: {name!r} is not a model family trine knows "
                         f"({', '.join(sorted(FAMILY_SETTINGS))})")
    types = dict(FAMILY_SETTINGS[name])
    unknown = sorted(set(info) - {"model_family", *types})
    if unknown:
        raise InputError(f"{file}: unknown keys {unknown} for model_family {name!r}"
                         + (f" (it records {', '.join(types)})" if types else " (it records no settings)"))
    for key, kind in types.items():
        value = info.get(key)
        if key in info and (not isinstance(value, kind) or (kind is int and isinstance(value, bool))):
            raise InputError(f"{file}: {key}: must be {_TYPE_NAMES.get(kind, kind.__name__)}")
    return info
