"""The model-family registry: the family is the unit every command and Python face loads a model as.

The trainers and the training entry points build a model through here (``model_family`` in the
model arguments) instead of naming a class, so a new family (a decoder-only LLM embedder, LoRA
adapters over a backbone) is one :func:`register_family` call: no trainer edit. A family says which
role it plays (``embedder``, ``reranker``, ``pretraining``), what an embedder gives (``outputs``:
dense, sparse, colbert), what it can be exported as, and how it loads for inference; a command
accepts only families of its role and asks the family, not the class or the files, what it can do.

:func:`resolve_family` is the one door from a model reference (a folder or a Hub id) to its family:
the family the folder records in :data:`FAMILY_FILE` (every folder trine writes has one, written by
:func:`record_family`), else the family its files show (:func:`recognise_family`: BGE-M3 head files,
a sentence-transformers or plain encoder folder, a causal LM, a LoRA adapter, a sequence classifier,
a layer-wise reranker).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from trine.errors import InputError, OptionError
from trine.modeling.family_file import (  # noqa: F401  (re-exported: the family file is part of the family contract)
    FAMILY_FILE,
    FAMILY_SETTINGS,
    HEAD_FILES,
    LAYERWISE_ARCHITECTURE,
    LEGACY_FAMILY_FILE,
    read_family_file,
    recognise_family,
    record_family,
)
from trine.modeling.lora import DECODER_TARGET_MODULES

ROLES = ("embedder", "reranker", "pretraining")

@dataclass(frozen=True)
class ModelFamily:
    name: str
    role: str
    # (model arguments, training arguments, **context) -> the model to train; reads the fields it needs.
    # context: what the command has read that a family may use (the embedder trainer passes
    # ``passages``, its training passages, and ``passage_max_len``, for a lexical head fitted on them)
    from_arguments: Callable[..., Any]
    description: str = ""
    # (path, **options) -> the model at inference (embedder families: what trine.inference.Encoder runs)
    load: Callable[..., Any] | None = None
    # LoRA (use_lora): the attribute of the built model holding the transformers model the adapter goes on,
    # the peft task type it is (trine.modeling.lora.TASK_TYPES), and modules always trained in full;
    # None: the family takes no LoRA
    lora_attribute: str | None = None
    lora_task_type: str = "FEATURE_EXTRACTION"
    lora_modules_to_save: tuple[str, ...] = ()
    # the modules LoRA adapts when target_modules is not given (None: peft's default for the architecture)
    lora_target_modules: tuple[str, ...] | None = None
    # what an embedder gives (of trine.inference.result.OUTPUTS); a reranker scores pairs and gives none
    outputs: tuple[str, ...] = ()
    # whether init_missing_heads can start new lexical and ColBERT heads on it (a plain encoder)
    new_heads: bool = False
    # what `trine export --to` writes of it (sentence-transformers, onnx)
    exports: tuple[str, ...] = ()
    # the settings the family records in FAMILY_FILE beside its name, and their types
    settings: tuple[tuple[str, type], ...] = ()

    def describe(self) -> str:
        """The family and what it can do, for messages: ``model family 'encoder' (an embedder: dense)``."""
        does = f"an embedder: {', '.join(self.outputs)}" if self.role == "embedder" else \
            "a reranker: scores query-passage pairs" if self.role == "reranker" else "a pre-training model"
        return f"model family {self.name!r} ({does})"

    def check_export(self, target: str, where: str = "") -> None:
        """Refuse an export (``trine export --to target``) this family has none of, naming what it has."""
        if target not in self.exports:
            head = f"{where}: " if where else ""
            has = f"it exports to {', '.join(self.exports)}" if self.exports else "trine exports no model of it"
            raise OptionError(f"{head}{self.describe()}: no {target} export ({has})")

    def check_outputs(self, outputs: Sequence[str], where: str = "") -> None:
        """Refuse outputs this family does not give, naming the family and what it gives (an
        :class:`OptionError`: exit code 2 on the command line)."""
        missing = [o for o in outputs if o not in self.outputs]
        if missing:
            head = f"{where}: " if where else ""
            # library words; the command line shows them as its flags (trine.config.command_line_words)
            hint = (". Pass init_missing_heads='random', 'neutral' or 'bm25' to start new heads"
                    if self.new_heads else "")
            raise OptionError(f"{head}{self.describe()} does not give {', '.join(missing)}{hint}")


FAMILIES: dict[str, ModelFamily] = {}


def register_family(family: ModelFamily, *, replace: bool = False) -> ModelFamily:
    if family.role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {family.role!r}")
    if family.name in FAMILIES and not replace:
        raise ValueError(f"model family {family.name!r} is already registered")
    known = FAMILY_SETTINGS.get(family.name)
    if known is not None and not replace and tuple(known) != tuple(family.settings):
        raise ValueError(f"model family {family.name!r}: settings {family.settings} differ from the recorded "
                         f"ones {known} (trine.modeling.family_file.FAMILY_SETTINGS)")
    FAMILIES[family.name] = family
    FAMILY_SETTINGS[family.name] = tuple(family.settings)  # a family registered later records its settings too
    return family


def get_family(name: str, role: str) -> ModelFamily:
    """The registered family ``name`` of ``role``; an :class:`OptionError` listing the choices otherwise."""
    known = sorted(n for n, f in FAMILIES.items() if f.role == role)
    family = FAMILIES.get(name)
    if family is None or family.role != role:
        raise OptionError(f"model_family: {name!r} is not a registered {role} family; choose from {known}")
    return family


def family_of(model: Any) -> ModelFamily:
    """The family of a loaded model (its ``family_name``, which trine's model classes declare)."""
    name = getattr(model, "family_name", None)
    if name not in FAMILIES:
        raise OptionError(f"a {type(model).__name__} declares no trine model family (family_name)")
    return FAMILIES[name]


def resolve_family(reference: str | os.PathLike, role: str | None = None, *, model_family: str | None = None,
                   revision: str | None = None, cache_dir: str | os.PathLike | None = None,
                   token: str | bool | None = None, what: str = "model") -> tuple[ModelFamily, str]:
    """``(family, local folder)`` of a model reference (a folder, or a Hub id fetched through
    :func:`trine.modeling.loading.resolve_model`): ``model_family`` when given, else the family the folder
    records (:func:`read_family_file`), else the one its files show (:func:`recognise_family`). A family of
    another ``role`` than the command's is an :class:`InputError` naming the folder, the family and what it does."""
    from trine.modeling.loading import resolve_model

    path = resolve_model(reference, revision=revision, cache_dir=cache_dir, token=token, what=what)
    if model_family is not None:
        family = get_family(model_family, role) if role is not None else FAMILIES.get(model_family)
        if family is None:
            raise OptionError(f"model_family: {model_family!r} is not a registered family; choose from "
                              f"{sorted(FAMILIES)}")
        return family, path
    recorded = read_family_file(path)
    if recorded is not None:
        family = FAMILIES[recorded["model_family"]]
        heads = [n for n in HEAD_FILES if os.path.isfile(os.path.join(path, n))]
        if family.name == "trihead" and len(heads) != len(HEAD_FILES):
            raise InputError(f"{path}: records model family 'trihead' but has "
                             f"{', '.join(heads) or 'neither head file'} of {', '.join(HEAD_FILES)}")
        if family.name != "trihead" and heads:
            raise InputError(f"{path}: records model family {family.name!r} but holds BGE-M3 head files "
                             f"({', '.join(heads)}); a tri-head folder records 'trihead'")
    else:
        family = FAMILIES[recognise_family(path, role)]
    if role is not None and family.role != role:
        hint = " (an embedder or a plain backbone is not a trained reranker: trine finetune-reranker trains one)" \
            if role == "reranker" else ""
        raise InputError(f"{path}: {family.describe()}; this needs {'an' if role[0] in 'ae' else 'a'} {role}{hint}")
    return family, path


def reranker_family(path: str | os.PathLike) -> str:
    """The reranker family of a folder (:func:`resolve_family` with the reranker role):
    the one it records, else ``llm-reranker-layerwise`` for a FlagEmbedding / hub layer-wise MiniCPM checkpoint
    (bge-reranker-v2-minicpm-layerwise), ``llm-reranker`` for a causal LM (``...ForCausalLM``, e.g.
    bge-reranker-v2-gemma, or a ``CAUSAL_LM`` LoRA adapter), ``cross-encoder`` for a sequence classifier."""
    return resolve_family(path, "reranker")[0].name


def inference_loader(name: str, role: str = "embedder") -> Callable[..., Any]:
    """How ``Encoder`` (or another inference class of ``role``) loads a folder of family ``name``."""
    family = get_family(name, role)
    if family.load is None:
        raise OptionError(f"model_family: {name!r} has no inference loader")
    return family.load


def _load_trihead(path: str, **options: Any) -> Any:
    from trine.modeling.trihead import TriHeadModel

    return TriHeadModel.from_pretrained(path, **options)


def build_model(model_args: Any, args: Any, role: str, **context: Any) -> Any:
    """The model ``model_args.model_family`` builds for a command of ``role`` (``context``: see
    :attr:`ModelFamily.from_arguments`), with a new LoRA adapter when the arguments say ``use_lora``."""
    family = get_family(model_args.model_family, role)
    if hasattr(model_args, "resolve_model_reference"):  # a Hub id: its folder in the Hugging Face cache, from here on
        model_args.resolve_model_reference()
    model = family.from_arguments(model_args, args, **context)
    if getattr(model_args, "use_lora", False):
        from trine.modeling.lora import LoraOptions, add_lora

        if family.lora_attribute is None:
            raise OptionError(f"use_lora: model_family {family.name!r} takes no LoRA adapter")
        add_lora(getattr(model, family.lora_attribute), LoraOptions.from_arguments(model_args),
                 base_path=model_args.model_name_or_path, task_type=family.lora_task_type,
                 default_targets=family.lora_target_modules, extra_modules_to_save=family.lora_modules_to_save)
    return model


# ------------------------------------------------------------------------------------- built-ins
def _trihead(model_args: Any, args: Any, *, passages: Any = None, passage_max_len: int = 256) -> Any:
    from trine.modeling.trihead import TriHeadModel, has_head_files

    path = model_args.model_name_or_path
    has_heads = has_head_files(path)  # the tri-head family's own test: the BGE-M3 head files
    fitted = model_args.init_missing_heads == "bm25" and not has_heads
    if fitted and passages is None:
        raise OptionError("init_missing_heads: 'bm25' fits the lexical head on the training passages; this command "
                          "has none to give")
    return TriHeadModel.from_pretrained(
        path,
        head_init_texts=passages if fitted else None,
        head_init_max_length=passage_max_len,
        with_heads=has_heads or model_args.init_missing_heads is not None or args.training_mode != "dense",
        init_missing_heads=model_args.init_missing_heads,
        colbert_dim=model_args.colbert_dim,
        pooling_method=model_args.sentence_pooling_method,
        normalize_embeddings=model_args.normalize_embeddings,
        trust_remote_code=model_args.trust_remote_code,
        attn_implementation=model_args.attn_implementation,
    )


def _cross_encoder(model_args: Any, args: Any, **context: Any) -> Any:
    from trine.modeling.cross_encoder import CrossEncoder

    return CrossEncoder.from_pretrained(model_args.model_name_or_path, new_classifier=True,
                                        trust_remote_code=model_args.trust_remote_code,
                                        attn_implementation=model_args.attn_implementation)


def _load_cross_encoder(path: str, **options: Any) -> Any:
    from trine.modeling.cross_encoder import CrossEncoder

    return CrossEncoder.from_pretrained(path, **options)


def _llm_reranker(model_args: Any, args: Any, **context: Any) -> Any:
    from trine.modeling.llm_reranker import LLMReranker

    return LLMReranker.from_pretrained(model_args.model_name_or_path, trust_remote_code=model_args.trust_remote_code,
                                       attn_implementation=model_args.attn_implementation)


def _load_llm_reranker(path: str, **options: Any) -> Any:
    from trine.modeling.llm_reranker import LLMReranker

    return LLMReranker.from_pretrained(path, **options)


def _layerwise_reranker(model_args: Any, args: Any, **context: Any) -> Any:
    from trine.modeling.layerwise_reranker import LayerwiseReranker

    return LayerwiseReranker.from_pretrained(
        model_args.model_name_or_path, trust_remote_code=model_args.trust_remote_code,
        attn_implementation=model_args.attn_implementation, start_layer=getattr(model_args, "start_layer", None),
        head_multi=getattr(model_args, "head_multi", None), head_type=getattr(model_args, "head_type", None))


def _load_layerwise_reranker(path: str, **options: Any) -> Any:
    from trine.modeling.layerwise_reranker import LayerwiseReranker

    return LayerwiseReranker.from_pretrained(path, **options)


def _decoder(model_args: Any, args: Any, **context: Any) -> Any:
    from trine.modeling.decoder import DecoderEmbedder

    return DecoderEmbedder.from_pretrained(
        model_args.model_name_or_path,
        pooling_method=model_args.sentence_pooling_method,
        normalize_embeddings=model_args.normalize_embeddings,
        trust_remote_code=model_args.trust_remote_code,
        attn_implementation=model_args.attn_implementation,
    )


def _load_decoder(path: str, *, with_heads: bool = False, **options: Any) -> Any:
    from trine.modeling.decoder import DecoderEmbedder

    # the head set-up options (colbert_dim, init_missing_heads, ...) come only with with_heads, refused there
    return DecoderEmbedder.from_pretrained(path, with_heads=with_heads,
                                           **({} if with_heads else options))


def _retromae(model_args: Any, args: Any, **context: Any) -> Any:
    from trine.modeling.retromae import RetroMAEModel

    return RetroMAEModel.from_pretrained(
        model_args.model_name_or_path,
        extend_position_embeddings_to=model_args.extend_position_embeddings_to,
        position_extension=model_args.position_extension,
        allow_new_mlm_head=model_args.allow_new_mlm_head,
        trust_remote_code=model_args.trust_remote_code,
        attn_implementation=model_args.attn_implementation,
    )


_ALL_OUTPUTS = ("dense", "sparse", "colbert")
_EXPORTS = ("sentence-transformers", "onnx")
register_family(ModelFamily("trihead", "embedder", _trihead,
                            "any transformers encoder + lexical and ColBERT heads (BGE-M3 layout)", _load_trihead,
                            lora_attribute="backbone", outputs=_ALL_OUTPUTS, exports=_EXPORTS))
# the same model class without heads: what a plain or sentence-transformers encoder folder is, and what a dense
# fine-tune writes; init_missing_heads makes it tri-head
register_family(ModelFamily("encoder", "embedder", _trihead,
                            "any transformers encoder without BGE-M3 heads (a sentence-transformers or plain "
                            "encoder folder): dense only", _load_trihead, lora_attribute="backbone",
                            outputs=("dense",), new_heads=True, exports=_EXPORTS))
register_family(ModelFamily("decoder", "embedder", _decoder,
                            "any decoder-only (causal LM) backbone, last-token pooling of an appended EOS, dense "
                            "only (FlagEmbedding's FlagLLMModel)", _load_decoder, lora_attribute="backbone",
                            lora_target_modules=DECODER_TARGET_MODULES, outputs=("dense",)))
register_family(ModelFamily("cross-encoder", "reranker", _cross_encoder,
                            "a sequence-classification encoder with one label (FlagReranker's)",
                            _load_cross_encoder, lora_attribute="model", lora_task_type="SEQ_CLS",
                            lora_modules_to_save=("classifier", "score")))
register_family(ModelFamily("llm-reranker", "reranker", _llm_reranker,
                            "a decoder-only (causal LM) reranker: the logit of 'Yes' after FlagEmbedding's prompt "
                            "(FlagLLMReranker)", _load_llm_reranker, lora_attribute="model",
                            lora_task_type="CAUSAL_LM", lora_target_modules=DECODER_TARGET_MODULES,
                            settings=FAMILY_SETTINGS["llm-reranker"]))
# LoRA on the base decoder (AutoModel): the layer heads are trine's own modules beside it, always trained in full
register_family(ModelFamily("llm-reranker-layerwise", "reranker", _layerwise_reranker,
                            "a decoder-only reranker scoring at chosen layers with per-layer heads (FlagEmbedding's "
                            "LayerWiseFlagLLMReranker, bge-reranker-v2-minicpm-layerwise)", _load_layerwise_reranker,
                            lora_attribute="model", lora_task_type="FEATURE_EXTRACTION",
                            lora_target_modules=DECODER_TARGET_MODULES,
                            settings=FAMILY_SETTINGS["llm-reranker-layerwise"]))
register_family(ModelFamily("retromae", "pretraining", _retromae,
                            "a masked-LM encoder with RetroMAE's one-layer enhanced decoder"))
