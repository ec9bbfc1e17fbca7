"""LoRA adapters (``peft``) for every model family: the one place that adds, saves, loads and merges them.

The adapter goes on the family's ``transformers`` model (the tri-head backbone, the decoder backbone, the
cross-encoder's classifier model) through ``transformers``' own adapter support, so the model stays a
``transformers`` model: its ``save_pretrained`` writes an adapter folder (``adapter_config.json`` +
``adapter_model.safetensors``) that ``peft.PeftModel.from_pretrained(base, folder)`` loads on the base
model, ``AutoModel.from_pretrained(folder)`` loads it back (base + adapter), and resuming reloads the
same parameter names. :func:`merge_lora_folder` (``trine merge-lora``) writes a plain merged model.

Options and defaults are FlagEmbedding's (``use_lora``, ``lora_rank`` 64, ``lora_alpha`` 16,
``lora_dropout`` 0.1, ``target_modules``, ``modules_to_save``); ``target_modules`` left unset is
FlagEmbedding's list of a decoder's projections for decoder models, and peft's per-architecture
default for the others.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from trine.errors import InputError, MissingInputError, OptionError, first_line
from trine.io import write_folder

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
#: FlagEmbedding's default ``target_modules`` for decoder-only models
DECODER_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# peft's task types, by the transformers class the adapter was put on (what merge-lora loads the base as)
TASK_TYPES = {"FEATURE_EXTRACTION": "AutoModel", "SEQ_CLS": "AutoModelForSequenceClassification",
              "CAUSAL_LM": "AutoModelForCausalLM"}


@dataclass(frozen=True)
class LoraOptions:
    lora_rank: int = 64
    lora_alpha: float = 16
    lora_dropout: float = 0.1
    target_modules: tuple[str, ...] | None = None
    modules_to_save: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.lora_rank, bool) or not isinstance(self.lora_rank, int) or self.lora_rank < 1:
            raise OptionError(f"lora_rank: must be a positive integer, got {self.lora_rank!r}")
        if not self.lora_alpha > 0:
            raise OptionError(f"lora_alpha: must be > 0, got {self.lora_alpha!r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise OptionError(f"lora_dropout: must be in [0, 1), got {self.lora_dropout!r}")
        for name in ("target_modules", "modules_to_save"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, str) or not all(isinstance(v, str) and v for v in value) or not value:
                raise OptionError(f"{name}: must be a non-empty list of module names, got {value!r}")
            object.__setattr__(self, name, tuple(value))

    @classmethod
    def from_arguments(cls, model_args: Any) -> LoraOptions:
        """The LoRA options of a command's model arguments (FlagEmbedding's names)."""
        return cls(lora_rank=model_args.lora_rank, lora_alpha=model_args.lora_alpha,
                   lora_dropout=model_args.lora_dropout,
                   target_modules=tuple(model_args.target_modules) if model_args.target_modules else None,
                   modules_to_save=tuple(model_args.modules_to_save) if model_args.modules_to_save else None)


def has_lora(model: nn.Module) -> bool:
    """Whether ``model`` (a transformers model) carries a LoRA adapter."""
    return bool(getattr(model, "_hf_peft_config_loaded", False))


def is_adapter_folder(path: str | os.PathLike) -> bool:
    return os.path.isfile(os.path.join(os.fspath(path), ADAPTER_CONFIG))


def add_lora(model: nn.Module, options: LoraOptions, *, base_path: str | os.PathLike, task_type: str,
             default_targets: Sequence[str] | None = None, extra_modules_to_save: Sequence[str] = ()) -> nn.Module:
    """Put a new LoRA adapter on a ``transformers`` model (in place; returns it): only the adapter (and
    ``modules_to_save``) train, the base weights are frozen. ``base_path``: the folder the base weights
    were loaded from, recorded (absolute, or as its Hub id and commit) in the adapter's config for loading and merging;
    ``task_type``: a key of :data:`TASK_TYPES` (the class the base loads as); ``default_targets``: the
    modules adapted when ``options.target_modules`` is unset, those the model has (a decoder family's:
    :data:`DECODER_TARGET_MODULES`, FlagEmbedding's; None: peft's default for the architecture);
    ``extra_modules_to_save``: modules a family always trains in full (a new classifier), those it has."""
    from peft import LoraConfig

    if task_type not in TASK_TYPES:
        raise ValueError(f"task_type must be one of {sorted(TASK_TYPES)}, got {task_type!r}")
    if has_lora(model):
        raise OptionError("use_lora: the model already carries a LoRA adapter (an adapter folder was loaded); "
                          "merge it first (trine merge-lora) to train a new one on top")
    targets = options.target_modules or (tuple(default_targets) if default_targets else None)
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    if targets is not None:
        targets = [t for t in targets if t in present] if options.target_modules is None else list(targets)
        unknown = [t for t in targets if t not in present]
        if unknown or not targets:
            raise OptionError(f"target_modules: {unknown or list(options.target_modules or ())} name no module of "
                              f"this {type(model).__name__}; its linear layers are named "
                              f"{sorted(n for n, m in model.named_modules() if isinstance(m, nn.Linear))[:8]} ...")
    extra = [m for m in extra_modules_to_save if m in present]  # e.g. a classifier named "classifier" or "score"
    saved = list(dict.fromkeys([*(options.modules_to_save or ()), *extra])) or None
    unknown = [m for m in saved or () if m not in present]
    if unknown:
        raise OptionError(f"modules_to_save: {unknown} name no module of this {type(model).__name__}")
    config = LoraConfig(r=options.lora_rank, lora_alpha=options.lora_alpha, lora_dropout=options.lora_dropout,
                        target_modules=targets, modules_to_save=saved, task_type=task_type, inference_mode=False)
    try:
        model.add_adapter(config)
    except ValueError as err:  # peft: no default target modules for this architecture
        raise OptionError(f"target_modules: {first_line(err)} (set target_modules)") from err
    from trine.modeling.loading import hub_repo_of

    # a base fetched from the Hub is recorded as its id and commit (peft's fields), not as this machine's cache path:
    # the adapter then loads and merges wherever it is copied, on the very weights it was trained on
    repo = hub_repo_of(base_path)
    peft_config = model.peft_config["default"]
    peft_config.base_model_name_or_path = repo or os.path.abspath(os.fspath(base_path))
    peft_config.revision = os.path.basename(os.path.normpath(os.fspath(base_path))) if repo else None
    model.peft_config["default"].inference_mode = False
    return model


def adapter_config(folder: str | os.PathLike) -> dict[str, Any]:
    """An adapter folder's ``adapter_config.json``, checked to be a LoRA adapter."""
    file = os.path.join(os.fspath(folder), ADAPTER_CONFIG)
    if not os.path.isfile(file):
        raise MissingInputError(f"{folder}: not a LoRA adapter folder (no {ADAPTER_CONFIG})")
    try:
        with open(file, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError) as err:
        raise InputError(f"{file}: cannot read the adapter config: {first_line(err)}") from err
    kind = config.get("peft_type") if isinstance(config, dict) else type(config).__name__
    if kind != "LORA":
        raise InputError(f"{file}: peft_type: not a LoRA adapter ({kind!r})")
    if not any(os.path.isfile(os.path.join(os.fspath(folder), w)) for w in ADAPTER_WEIGHTS):
        raise MissingInputError(f"{folder}: no adapter weights ({' or '.join(ADAPTER_WEIGHTS)})")
    return config


def base_model_path(folder: str | os.PathLike, base: str | os.PathLike | None = None, *,
                    revision: str | None = None, cache_dir: str | os.PathLike | None = None) -> str:
    """The base model folder of an adapter: ``base`` when given, else the one its config records; either may be
    a Hub id (``revision``, ``cache_dir``: of that id)."""
    config = adapter_config(folder)
    path = os.fspath(base) if base is not None else config.get("base_model_name_or_path")
    if base is None and revision is None:
        revision = config.get("revision")  # the commit of a recorded Hub id
    if not path:
        raise InputError(f"{os.path.join(os.fspath(folder), ADAPTER_CONFIG)}: base_model_name_or_path: not set; "
                         "name the base model folder (--base)")
    from trine.modeling.loading import resolve_model

    # a folder, or a Hub id (the base a LoRA run started from may be one), fetched into the Hugging Face cache
    return resolve_model(path, revision=revision, cache_dir=cache_dir,
                         what=f"the base model of the adapter {os.fspath(folder)} (name it with --base)")


def merge_lora_folder(adapter_dir: str | os.PathLike, out: str | os.PathLike, *,
                      base: str | os.PathLike | None = None, overwrite: bool = False) -> str:
    """Write the base model with the adapter of ``adapter_dir`` merged into its weights, as a plain
    ``transformers`` folder at ``out``, with the adapter folder's other files (tokenizer, BGE-M3 head
    files, pooling config) copied beside it. ``out`` appears whole or not at all."""
    import transformers
    from peft import PeftModel

    adapter_dir = os.fspath(adapter_dir)
    config = adapter_config(adapter_dir)
    base_path = base_model_path(adapter_dir, base)
    task = config.get("task_type") or "FEATURE_EXTRACTION"
    if task not in TASK_TYPES:
        raise InputError(f"{os.path.join(adapter_dir, ADAPTER_CONFIG)}: task_type: {task!r} is not one trine "
                         f"writes ({', '.join(sorted(TASK_TYPES))})")
    from trine.modeling.loading import drop_missing_pooler, load_from_folder

    auto = getattr(transformers, TASK_TYPES[task])
    kwargs = {"num_labels": 1} if task == "SEQ_CLS" else {}
    model, info = load_from_folder(auto.from_pretrained, base_path, "base model", output_loading_info=True, **kwargs)
    if task == "FEATURE_EXTRACTION":  # an encoder's pooler (a classifier's is part of its head)
        drop_missing_pooler(model, info)
    try:
        merged = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    except (ValueError, RuntimeError, KeyError) as err:
        raise InputError(f"{adapter_dir}: the adapter does not fit the base model {base_path}: "
                         f"{first_line(err)}") from err
    skip = {ADAPTER_CONFIG, *ADAPTER_WEIGHTS, "training_args.bin"}

    def write(folder: str) -> None:
        for name in sorted(os.listdir(adapter_dir)):
            src = os.path.join(adapter_dir, name)
            if name in skip or name.startswith(".") or name.startswith("checkpoint-") or name == "runs":
                continue
            if os.path.isdir(src):
                shutil.copytree(src, os.path.join(folder, name))
            else:
                shutil.copy2(src, os.path.join(folder, name))
        merged.save_pretrained(folder, safe_serialization=True)
        from trine.modeling.family_file import FAMILY_FILE, recognise_family, record_family

        if not os.path.isfile(os.path.join(folder, FAMILY_FILE)):  # a foreign adapter: its files tell the family
            record_family(folder, recognise_family(folder, "embedder" if task == "FEATURE_EXTRACTION" else "reranker"))

    write_folder(out, write, overwrite=overwrite, inputs=[adapter_dir, base_path])
    return os.fspath(out)
