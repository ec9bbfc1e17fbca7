"""The file in which every folder trine writes records its model family, and the family a folder trine did not
write shows by its files: what a model class writes when it saves and reads when it loads, below the family
registry (:mod:`trine.modeling.families`), which imports the model classes.

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
    info = _read_json(file)
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


def _read_json(file: str) -> Any:
    """A JSON file's value; unreadable: an :class:`InputError` naming it."""
    try:
        with open(file, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as err:
        raise InputError(f"{file}: cannot read: {first_line(err)}") from err


def _json(file: str) -> dict[str, Any] | None:
    """A JSON object file, None when absent; unreadable: an :class:`InputError` naming it."""
    if not os.path.isfile(file):
        return None
    data = _read_json(file)
    if not isinstance(data, dict):
        raise InputError(f"{file}: not a JSON object")
    return data


def _is_causal(config: dict[str, Any]) -> bool:
    """Whether a ``config.json`` is a decoder-only (causal) LM's: ``...ForCausalLM`` architectures, or a base
    model of a type transformers has a causal LM for and no masked LM (Qwen2Model, LlamaModel; not BertModel)."""
    archs = [str(a) for a in config.get("architectures") or []]
    if archs and all(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        return True
    if config.get("is_encoder_decoder"):
        return False
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    kind = config.get("model_type")
    return kind in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and kind not in MODEL_FOR_MASKED_LM_MAPPING_NAMES


def recognise_family(path: str | os.PathLike, role: str | None = None) -> str:
    """The family of a folder trine did not write, from its files: a LoRA adapter by its task (a causal-LM
    adapter is an LLM reranker's, a sequence classifier's a cross-encoder's, a feature extractor's the family
    of its base model); BGE-M3's two head files: ``trihead``; a layer-wise MiniCPM reranker; a sequence
    classifier: ``cross-encoder``; a causal LM: ``decoder`` as an embedder, ``llm-reranker`` as a reranker
    (``role`` says which; without one it is an error); any other encoder (a plain ``BertModel``, a
    sentence-transformers folder): ``encoder``, dense only. Nothing to tell by, or files that contradict each
    other: an :class:`InputError` naming the folder and what was found."""
    folder = os.fspath(path)
    heads = [n for n in HEAD_FILES if os.path.isfile(os.path.join(folder, n))]
    if len(heads) == 1:
        raise InputError(f"{folder}: has {heads[0]} but not {next(n for n in HEAD_FILES if n not in heads)}: not "
                         "a tri-head (BGE-M3 layout) folder, nor a plain one")
    adapter = _json(os.path.join(folder, "adapter_config.json"))
    config = _json(os.path.join(folder, "config.json"))
    found = "adapter_config.json" if adapter is not None else "config.json"
    if adapter is not None:
        task = adapter.get("task_type") or "FEATURE_EXTRACTION"
        if task in ("CAUSAL_LM", "SEQ_CLS"):
            name = "llm-reranker" if task == "CAUSAL_LM" else "cross-encoder"
            if heads:
                raise InputError(f"{folder}: a {task} LoRA adapter (a reranker's) beside BGE-M3 head files")
            return name
        base = adapter.get("base_model_name_or_path")
        if not isinstance(base, str) or not base:
            raise InputError(f"{folder}/adapter_config.json: base_model_name_or_path: not set; cannot tell the "
                             "family of the adapter's base model")
        from trine.modeling.loading import resolve_model

        config = _json(os.path.join(resolve_model(base, what=f"the base model of the adapter {folder}"),
                                    "config.json"))
        found = f"the base model {base}"
    if config is None:
        raise InputError(f"{folder}: not a model folder trine can read: no config.json or adapter_config.json "
                         f"(found: {', '.join(sorted(os.listdir(folder))[:8]) or 'nothing'})")
    archs = [str(a) for a in config.get("architectures") or []]
    if LAYERWISE_ARCHITECTURE in archs:
        return "llm-reranker-layerwise"
    if archs and all(a.endswith("ForSequenceClassification") for a in archs):
        if heads:
            raise InputError(f"{folder}: a sequence classifier ({', '.join(archs)}) beside BGE-M3 head files")
        return "cross-encoder"
    if heads:
        return "trihead"
    if _is_causal(config):
        if role is None:
            raise InputError(f"{folder}: a causal LM ({', '.join(archs) or config.get('model_type')}, {found}): "
                             "a decoder embedder or an LLM reranker; name the family (model_family)")
        return "llm-reranker" if role == "reranker" else "decoder"
    return "encoder"
