"""Reading a user's model folder: every problem is an :class:`~trine.errors.InputError` naming the
file (a missing folder, a truncated ``model.safetensors``, a garbage head file), never a library's
traceback or its advice (``transformers`` talks about internet connections, ``torch`` suggests
``weights_only=False``)."""

from __future__ import annotations

import fnmatch
import glob
import json
import os
import pickle
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch

from trine.errors import InputError, MissingInputError, OptionError, UserError, first_line

# What a model reference fetches from the Hub: the config, the tokenizer (every format transformers reads), the
# weights in safetensors (.bin only where a repository has no safetensors, see _BIN_WEIGHTS), BGE-M3's head files,
# sentence-transformers' module files, trine's own files (fusion weights, reranker family, layer-wise heads,
# RetroMAE decoder), LoRA adapter files and custom code (run only with trust_remote_code). Left out: ONNX /
# OpenVINO / GGUF / TF / Flax copies, images, and training leftovers (optimizer states, checkpoints).
HUB_PATTERNS = (
    "*.json",  # config, tokenizer, generation, sentence-transformers, fusion.json, trine_family.json, adapter
    "*.safetensors",  # model(-0000i-of-n).safetensors, adapter_model, layerwise_heads, retromae_decoder
    "*.txt", "*.model", "*.tiktoken", "*.jinja",  # vocab.txt, merges.txt, SentencePiece / tiktoken, chat templates
    "colbert_linear.pt", "sparse_linear.pt",  # BGE-M3's heads
    "*.py",  # remote code (only run with trust_remote_code) and trine's exported lexical module
    "[0-9]_*/*",  # sentence-transformers modules: 1_Pooling/config.json, 2_Dense/..., 2_Normalize
    "README.md",  # the model card (trine eval --model-card reads and extends it)
)
# huggingface_hub's patterns are fnmatch patterns, whose * crosses "/": these keep other formats' folders and
# pushed training checkpoints out whatever they hold
HUB_IGNORE = ("onnx/*", "openvino/*", "coreml/*", "checkpoint-*/*", "runs/*", "*.onnx", "*.onnx_data", "*.gguf",
              "*.h5", "*.msgpack", "*.ot", "*.tflite")
_BIN_WEIGHTS = ("pytorch_model*.bin", "adapter_model.bin")
#: the command that fills the cache on a machine that reaches the Hub (huggingface_hub's own CLI, ``hf``)
DOWNLOAD_COMMAND = "hf download"


def is_hub_id(reference: str) -> bool:
    """Whether ``reference`` can be a Hugging Face Hub repository id (``name`` or ``org/name``, optionally with
    ``@revision``). A path (``./m``, ``../m``, ``/tmp/m``, ``~/m``, ``a/b/c``, ``C:\\m``) never is: a typo'd
    local path must fail as a path, not be looked up on the Hub."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    repo, at, revision = reference.partition("@")
    if not repo or (at and not revision) or "\\" in reference or reference.startswith(("~", ".", "/")):
        return False
    try:
        validate_repo_id(repo)
    except HFValidationError:
        return False
    return True


def resolve_model(reference: str | os.PathLike, *, revision: str | None = None, cache_dir: str | os.PathLike | None
                  = None, token: str | bool | None = None, what: str = "model",
                  extra_files: Sequence[str] = ()) -> str:
    """The local folder of a model ``reference``: a folder as it is; else a Hub repository id (``org/name``,
    ``name``; a revision as ``revision`` or as ``org/name@revision``, not both), through
    ``huggingface_hub.snapshot_download`` into the standard cache (``cache_dir``, else ``HF_HUB_CACHE`` /
    ``HF_HOME``; ``HF_HUB_OFFLINE``, ``HF_TOKEN`` and the saved login as huggingface_hub reads them), fetching
    :data:`HUB_PATTERNS`. A reference that is neither, an id the cache lacks offline, an unknown repository or
    revision: a :class:`~trine.errors.UserError` in one line naming it (and the download command). ``what``
    names the reference in messages (``reranker``, ``base model``); ``extra_files``: names or patterns a Hub id
    needs beyond :data:`HUB_PATTERNS` (a GGUF file), fetched even where :data:`HUB_IGNORE` leaves such files out."""
    if not isinstance(reference, (str, os.PathLike)):
        raise OptionError(f"{what}: expected a model folder or a Hub id, got {type(reference).__name__}")
    path = os.fspath(reference)
    if os.path.isdir(path):
        if revision is not None:
            raise OptionError(f"{path}: revision {revision!r} names a Hub revision, but this is a local folder")
        return path
    if os.path.exists(path):
        raise MissingInputError(f"{path}: a file, not a model folder ({what})")
    if not is_hub_id(path):
        raise MissingInputError(f"{path}: no such model folder ({what}; not a Hugging Face Hub id either: org/name)")
    repo, _, pinned = path.partition("@")
    if pinned and revision is not None and pinned != revision:
        raise OptionError(f"{path}: the revision is given twice: {pinned!r} in the id and {revision!r}")
    revision = pinned or revision
    return _snapshot(repo, revision, None if cache_dir is None else os.fspath(cache_dir), token, what,
                     tuple(extra_files))


def _snapshot(repo: str, revision: str | None, cache_dir: str | None, token: str | bool | None, what: str,
              extra_files: tuple[str, ...]) -> str:
    from huggingface_hub import constants as hub
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    at = f"@{revision}" if revision else ""
    download = f"{DOWNLOAD_COMMAND} {repo}" + (f" --revision {revision}" if revision else "") + \
        (f" --cache-dir {cache_dir}" if cache_dir else "")
    ignore = [p for p in HUB_IGNORE if not any(fnmatch.fnmatch(f, p) for f in extra_files)]
    options = {"revision": revision, "cache_dir": cache_dir, "token": token, "library_name": "trine",
               "ignore_patterns": ignore}
    try:
        folder = snapshot_download(repo, allow_patterns=[*HUB_PATTERNS, *extra_files], **options)
        if not _has_weights(folder) and not extra_files:  # a repository with .bin weights only (older uploads)
            folder = snapshot_download(repo, allow_patterns=[*HUB_PATTERNS, *_BIN_WEIGHTS], **options)
    except GatedRepoError as err:
        raise InputError(f"{repo}: {what}: a gated Hub repository: accept its terms on huggingface.co and log in "
                         f"(hf auth login, or HF_TOKEN) ({first_line(err)})") from err
    except RevisionNotFoundError as err:
        raise MissingInputError(f"{repo}{at}: {what}: no revision {revision!r} in this Hub repository") from err
    except RepositoryNotFoundError as err:
        raise MissingInputError(f"{repo}: {what}: no such folder, and no such Hub repository (or a private one: "
                                "log in with hf auth login, or set HF_TOKEN)") from err
    except LocalEntryNotFoundError as err:
        where = cache_dir or hub.HF_HUB_CACHE
        reason = "HF_HUB_OFFLINE is set" if hub.is_offline_mode() else "the Hub cannot be reached"
        raise MissingInputError(f"{repo}{at}: {what}: no such folder, nor in the Hugging Face cache {where} "
                                f"({reason}); download it where the Hub is reachable: {download}") from err
    except HfHubHTTPError as err:
        raise InputError(f"{repo}{at}: {what}: the Hub refused the download: {first_line(err)}") from err
    return folder


def hub_repo_of(path: str | os.PathLike) -> str | None:
    """The repository id (``org/name``) of a snapshot folder in a Hugging Face cache
    (``models--org--name/snapshots/<commit>``), else None: how reports name a model given as a Hub id."""
    parts = os.path.normpath(os.path.abspath(os.fspath(path))).split(os.sep)
    if len(parts) >= 3 and parts[-2] == "snapshots" and parts[-3].startswith("models--"):
        return parts[-3][len("models--"):].replace("--", "/")
    return None


def in_hub_cache(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a snapshot in a Hugging Face cache: its files are links into the cache's blobs, shared
    by every revision, so trine writes nothing there (tuned fusion weights, a model card)."""
    return hub_repo_of(path) is not None


def _has_weights(folder: str) -> bool:
    """Whether a snapshot holds model or adapter weights in safetensors (else its .bin files are fetched)."""
    names = os.listdir(folder)
    return any(n.endswith(".safetensors") or n == "model.safetensors.index.json" for n in names)


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


# ------------------------------------------------------------------ tokenizers, read once per process
#: how many tokenizers a process keeps (pickled) after reading them: XLM-R's, BGE-M3's, is a 17 MB tokenizer.json
#: that transformers takes 3 s or more to read; unpickling a copy of one already read takes a third of that
TOKENIZER_CACHE_SIZE = 4
_TOKENIZER_FILES = (".json", ".txt", ".model", ".tiktoken", ".jinja", ".py", ".gguf")
_tokenizers: OrderedDict[tuple, bytes] = OrderedDict()
_tokenizers_lock = threading.Lock()


def _tokenizer_fingerprint(folder: str) -> tuple | None:
    """What a tokenizer read from ``folder`` depends on: the name, size and modification time of each file that
    can configure it (None where the folder cannot be listed: then nothing is cached)."""
    try:
        with os.scandir(folder) as entries:
            return tuple(sorted((e.name, st.st_size, st.st_mtime_ns) for e in entries
                                if e.name.endswith(_TOKENIZER_FILES) and e.is_file()
                                for st in (e.stat(),)))
    except OSError:
        return None


def load_tokenizer(path: str, **kwargs: Any) -> Any:
    """``AutoTokenizer.from_pretrained(path, **kwargs)`` through :func:`load_from_folder`, read once per process
    for a local folder: later calls for the same folder, unchanged, with the same options get a copy of the first
    as it was read (each caller may change its own: padding side, added tokens)."""
    from transformers import AutoTokenizer

    def read() -> Any:
        return load_from_folder(AutoTokenizer.from_pretrained, path, "tokenizer", **kwargs)

    fingerprint = _tokenizer_fingerprint(path) if os.path.isdir(path) else None
    if fingerprint is None:
        return read()
    key = (os.path.realpath(path), fingerprint, tuple(sorted((k, repr(v)) for k, v in kwargs.items())))
    with _tokenizers_lock:
        blob = _tokenizers.get(key)
        if blob is not None:
            _tokenizers.move_to_end(key)
    if blob is not None:
        return pickle.loads(blob)
    tokenizer = read()
    try:
        blob = pickle.dumps(tokenizer, protocol=pickle.HIGHEST_PROTOCOL)
    except (pickle.PicklingError, TypeError, AttributeError):
        return tokenizer  # a tokenizer that cannot be copied (some remote code) is read again next time
    with _tokenizers_lock:
        _tokenizers[key] = blob
        while len(_tokenizers) > TOKENIZER_CACHE_SIZE:
            _tokenizers.popitem(last=False)
    return tokenizer


def drop_missing_pooler(model: Any, loading_info: Mapping[str, Any]) -> Any:
    """``model`` without its pooler when the checkpoint had none (``loading_info``: what ``from_pretrained(...,
    output_loading_info=True)`` returned): trine pools token states itself, and a pooler the checkpoint lacks
    is random weights that every folder saved from the model would carry."""
    if getattr(model, "pooler", None) is not None and any(k.startswith("pooler.")
                                                          for k in loading_info.get("missing_keys", ())):
        model.pooler = None
    return model


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
