"""Model cards: every model folder trine writes (``trine finetune``, ``finetune-reranker``, ``pretrain``,
``export``) carries a ``README.md`` in the Hugging Face model-card format (YAML front matter, then
markdown), so a folder says how it was made when it is shared or uploaded: the base model, the
training files with record counts and SHA-256, the whole configuration, the final losses, the
evaluation results recorded during training or added later by ``trine eval --model-card``, how to load
it (trine, FlagEmbedding, sentence-transformers) and the library versions.

The card's facts are kept beside it as ``trine_card.json`` (the README is rendered from them), so a
later command adds to the facts and re-renders instead of parsing markdown. A card that an export or an
evaluation inherits keeps the source's training facts.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import os
import platform
import time
from collections.abc import Iterable, Sequence
from typing import Any

import yaml

from trine.errors import InputError
from trine.io import atomic_file, file_sha256, is_trine_folder

CARD_FILE = "README.md"
CARD_DATA_FILE = "trine_card.json"
#: what a folder holds, by the command that wrote it
MODEL_TYPES = ("m3", "dense", "reranker", "masked-lm", "onnx")
PIPELINE_TAGS = {"m3": "sentence-similarity", "dense": "sentence-similarity", "reranker": "text-ranking",
                 "masked-lm": "fill-mask", "onnx": "sentence-similarity"}
VERSIONED = ("trine", "torch", "transformers", "sentence-transformers", "FlagEmbedding", "peft", "onnxruntime")


@dataclasses.dataclass
class ModelCard:
    """The facts a card shows. ``data``: ``{"path", "records", "sha256"}`` per training file;
    ``config``: the full options by group (``model``, ``data``, ``training``); ``losses``: the last
    logged value of each loss part; ``training``: steps, epochs, run time; ``evaluations``:
    ``{"source", "dataset", "split", "metrics": {mode: {metric: value}}, "step"?}``."""

    written_by: str
    model_type: str
    base_model: str | None = None
    data: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    config: dict[str, Any] = dataclasses.field(default_factory=dict)
    losses: dict[str, float] = dataclasses.field(default_factory=dict)
    training: dict[str, Any] = dataclasses.field(default_factory=dict)
    evaluations: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    source: str | None = None  # the folder an export was made from
    versions: dict[str, str] = dataclasses.field(default_factory=dict)
    created: str = ""

    def __post_init__(self) -> None:
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"model_type must be one of {MODEL_TYPES}, got {self.model_type!r}")


def data_summary(files: Iterable[tuple[str, int]]) -> list[dict[str, Any]]:
    """``{"path", "records", "sha256"}`` for each (file, records used) pair, in order."""
    return [{"path": os.path.abspath(path), "records": int(n), "sha256": file_sha256(path)} for path, n in files]


def train_files_summary(files: Sequence[Any]) -> list[dict[str, Any]]:
    """The training files of a run (:class:`trine.data.records.TrainFile`, small files merged into one
    listed one by one) with the records each contributed."""
    flat: list[tuple[str, int]] = []
    for file in files:
        for part in file.parts or [file]:
            flat.append((part.path, len(part.records)))
    return data_summary(flat)


def _plain(value: Any) -> Any:
    """A JSON-safe copy of an option value (enums and paths as strings)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def options_dict(options: Any) -> dict[str, Any]:
    """Every field of an options dataclass (Hugging Face's ``TrainingArguments.to_dict`` for those)."""
    if hasattr(options, "to_dict"):
        return _plain(options.to_dict())
    fields = dataclasses.asdict(options)
    if fields.get("token") is not None:  # a Hugging Face token (trine.training.arguments.HubArguments): a secret
        fields["token"] = "<TOKEN>"
    if getattr(options, "model_reference", None) is not None:  # a Hub id as named, not its folder in one cache
        fields["model_name_or_path"] = options.model_reference
    return _plain(fields)


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in VERSIONED:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def from_log_history(history: Sequence[dict[str, Any]], eval_data: str | None = None
                     ) -> tuple[dict[str, float], dict[str, Any], list[dict[str, Any]]]:
    """(final losses, training summary, evaluations during training) from a Trainer's ``log_history``:
    the last logged value of ``loss`` and each ``loss_*`` part; steps, epochs and run time of the run;
    each ``eval_*`` entry (trine's held-out retrieval metric on ``eval_data``) with its step."""
    losses: dict[str, float] = {}
    training: dict[str, Any] = {}
    evaluations = []
    for entry in history:
        for key, value in entry.items():
            if key == "loss" or key.startswith("loss_"):
                losses[key] = float(value)
        if "train_runtime" in entry:
            training.update({k: round(float(entry[k]), 6) for k in ("train_runtime", "train_samples_per_second",
                                                                     "train_loss") if k in entry})
        metrics = {k[len("eval_"):]: float(v) for k, v in entry.items() if k.startswith("eval_")}
        if metrics:
            evaluations.append({"source": "training", "dataset": os.path.basename(os.path.normpath(eval_data or
                                                                                                   "eval_data")),
                                "split": None,
                                "step": entry.get("step"), "metrics": {"dense": metrics}})
    if history:
        training["global_step"] = max(int(e.get("step", 0)) for e in history)
        training["epochs"] = max(float(e.get("epoch", 0) or 0) for e in history)
    return losses, training, evaluations


def training_card(written_by: str, model_type: str, *, base_model: str | None, options: dict[str, Any],
                  history: Sequence[dict[str, Any]], data: list[dict[str, Any]]) -> ModelCard:
    """The card of a training run's final model (``options``: the option groups by name, ``model``,
    ``data``, ``training``)."""
    losses, training, evaluations = from_log_history(history, getattr(options.get("data"), "eval_data", None))
    return ModelCard(written_by=written_by, model_type=model_type, base_model=base_model, data=data,
                     config={group: options_dict(value) for group, value in options.items()}, losses=losses,
                     training=training, evaluations=evaluations)


# ------------------------------------------------------------------------------------------ rendering
def _metric_key(name: str) -> str:
    return name.replace("@", "_at_").lower()


def front_matter(card: ModelCard, name: str) -> dict[str, Any]:
    tags = ["trine", "feature-extraction" if card.model_type != "reranker" else "reranker"]
    if card.model_type == "m3":
        tags += ["bge-m3", "sparse", "colbert", "sentence-transformers"]
    elif card.model_type == "dense":
        tags += ["sentence-transformers"]
    elif card.model_type == "onnx":
        tags += ["onnx"]
    meta: dict[str, Any] = {"library_name": "trine", "pipeline_tag": PIPELINE_TAGS[card.model_type], "tags": tags}
    if card.base_model:
        meta["base_model"] = card.base_model
    results = []
    for ev in card.evaluations:
        if ev["source"] == "training":
            continue  # the curve during training is in the body; the index lists final evaluations
        for mode, metrics in ev["metrics"].items():
            results.append({
                "task": {"type": "retrieval", "name": f"Retrieval ({mode})"},
                "dataset": {"name": ev["dataset"], "type": ev["dataset"], "split": ev.get("split") or "test"},
                "metrics": [{"type": _metric_key(k), "value": round(float(v), 6), "name": f"{mode} {k}"}
                            for k, v in metrics.items()],
            })
    if results:
        meta["model-index"] = [{"name": name, "results": results}]
    return meta


def _usage(card: ModelCard, path: str) -> list[str]:
    p = json.dumps(path)
    if card.model_type == "m3":
        return ["```python", "from trine import M3Embedder", f"model = M3Embedder({p})",
                'out = model.encode(["a query"], return_dense=True, return_sparse=True, return_colbert_vecs=True)',
                "", "from FlagEmbedding import BGEM3FlagModel", f"model = BGEM3FlagModel({p})", "",
                "from sentence_transformers import SentenceTransformer  # the dense vector",
                f"model = SentenceTransformer({p})", "```",
                "For sentence-transformers' `SparseEncoder` and `MultiVectorEncoder`: "
                "`trine export MODEL --to sentence-transformers OUT`."]
    if card.model_type == "dense":
        return ["```python", "from trine import Embedder", f"model = Embedder({p})", "",
                "from FlagEmbedding import FlagModel", f"model = FlagModel({p})", "",
                "from sentence_transformers import SentenceTransformer", f"model = SentenceTransformer({p})", "```"]
    if card.model_type == "reranker":
        return ["```python", "from trine import Reranker", f"model = Reranker({p})",
                'scores = model.compute_score([["a query", "a passage"]])', "",
                "from FlagEmbedding import FlagReranker", f"model = FlagReranker({p})", "",
                "from sentence_transformers import CrossEncoder", f"model = CrossEncoder({p})", "```"]
    if card.model_type == "onnx":
        return ["```python", "from trine import M3Embedder", f'model = M3Embedder({p}, backend="onnx")', "```",
                "The graph (`model.onnx`) takes `input_ids` and `attention_mask` and runs with ONNX Runtime alone."]
    return ["A RetroMAE-pre-trained encoder: the backbone for fine-tuning.", "```bash",
            f"trine finetune --model_name_or_path {path} --train_data pairs.jsonl --output_dir out", "```"]


def _table(rows: list[list[Any]], head: list[str]) -> list[str]:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def render(card: ModelCard, name: str, path: str = ".") -> str:
    """The card as markdown with YAML front matter."""
    meta = yaml.safe_dump(front_matter(card, name), sort_keys=False, allow_unicode=True)
    what = {"m3": "a multi-function embedding model: one pass gives a dense vector, lexical weights and ColBERT "
                  "vectors (BGE-M3 layout)",
            "dense": "a dense embedding model", "reranker": "a cross-encoder reranker",
            "masked-lm": "an encoder pre-trained with RetroMAE",
            "onnx": "an ONNX graph of an embedding model (every output the model has)"}[card.model_type]
    out = ["---", meta.rstrip(), "---", "", f"# {name}", "", f"{what[0].upper()}{what[1:]}, written by "
           f"`trine {card.written_by}`" + (f" on {card.created}" if card.created else "") + "."]
    if card.base_model:
        out += ["", f"Base model: `{card.base_model}`."]
    if card.source:
        out += ["", f"Exported from `{card.source}`."]
    out += ["", "## How to use", "", "From this folder:", "", *_usage(card, path)]
    if card.data:
        out += ["", "## Training data", "", *_table([[f"`{d['path']}`", d["records"], f"`{d['sha256']}`"]
                                                      for d in card.data], ["file", "records", "sha256"])]
    if card.losses or card.training:
        out += ["", "## Training", ""]
        rows = [[k, v] for k, v in card.training.items()] + [[f"final {k}", round(v, 6)] for k, v in
                                                                 card.losses.items()]
        out += _table(rows, ["", "value"])
    if card.evaluations:
        out += ["", "## Evaluation", ""]
        rows = []
        for ev in card.evaluations:
            where = ev["dataset"] + (f" ({ev['split']})" if ev.get("split") else "")
            when = f"step {ev['step']}" if ev.get("step") is not None else ev["source"]
            for mode, metrics in ev["metrics"].items():
                for metric, value in metrics.items():
                    rows.append([where, when, mode, metric, f"{float(value):.4f}"])
        out += _table(rows, ["data", "when", "mode", "metric", "value"])
    if card.config:
        out += ["", "## Configuration", "", "<details><summary>every option of the run</summary>", "", "```yaml",
                yaml.safe_dump(card.config, sort_keys=True, allow_unicode=True).rstrip(), "```", "", "</details>"]
    if card.versions:
        out += ["", "## Library versions", "", *_table([[k, v] for k, v in card.versions.items()], ["library",
                                                                                                  "version"])]
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------------------------ reading, writing
def write_card(folder: str, card: ModelCard, *, name: str | None = None, atomic: bool = False) -> None:
    """``README.md`` and ``trine_card.json`` into ``folder`` (a folder being written: plain writes, and
    ``name`` the folder's final name rather than the temporary one; ``atomic``: each file replaced whole,
    for a folder already in place)."""
    card.versions = card.versions or library_versions()
    card.created = card.created or time.strftime("%Y-%m-%d")
    name = name or os.path.basename(os.path.abspath(folder))
    texts = {CARD_DATA_FILE: json.dumps(dataclasses.asdict(card), indent=2) + "\n",
             CARD_FILE: render(card, name)}
    for file, text in texts.items():
        target = os.path.join(folder, file)
        if atomic:
            with atomic_file(target, what="model card") as f:
                f.write(text)
        else:
            with open(target, "w", encoding="utf-8") as f:
                f.write(text)


def read_card(folder: str) -> ModelCard | None:
    """The card facts of a folder trine wrote, None when it has none."""
    path = os.path.join(folder, CARD_DATA_FILE)
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            facts = json.load(f)
        return ModelCard(**facts)
    except (ValueError, TypeError) as err:
        raise InputError(f"{path}: not a trine model card ({err})") from err


def inherited_card(source: str, written_by: str, model_type: str) -> ModelCard:
    """The card of a folder made from ``source`` (an export): the source's training facts kept."""
    base = read_card(source)
    if base is None:
        return ModelCard(written_by=written_by, model_type=model_type, source=os.path.abspath(source))
    return dataclasses.replace(base, written_by=written_by, model_type=model_type, source=os.path.abspath(source),
                               versions={}, created="")


def check_card_target(folder: str) -> None:
    """Whether ``trine eval --model-card`` may write ``folder``'s card: a folder trine wrote, whose README.md,
    if any, is trine's card (checked before anything is evaluated)."""
    if os.path.exists(os.path.join(folder, CARD_DATA_FILE)):
        return
    if not is_trine_folder(folder):
        raise InputError(f"{folder}: --model-card writes the card of model folders trine wrote; this one it did not")
    if os.path.exists(os.path.join(folder, CARD_FILE)):
        raise InputError(f"{os.path.join(folder, CARD_FILE)}: a README that is not trine's model card; not replaced")


def add_evaluation(folder: str, evaluation: dict[str, Any], *, model_type: str) -> ModelCard:
    """Add an evaluation (``trine eval --model-card``) to ``folder``'s card, re-rendered in place; a folder
    without a card gets one that holds only what is known."""
    check_card_target(folder)
    card = read_card(folder) or ModelCard(written_by="eval --model-card", model_type=model_type)
    card.evaluations = [*card.evaluations, evaluation]
    card.versions = {}
    write_card(folder, card, atomic=True)
    return card
