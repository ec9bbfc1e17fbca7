"""``trine export --to sentence-transformers``: a trine model as sentence-transformers v6 folders.

``OUT`` itself is the trine folder (backbone, tokenizer, BGE-M3 head files, the dense
pooling/normalisation files): ``SentenceTransformer(OUT)`` gives the dense vector, and trine and
FlagEmbedding still load it. For a model with heads:

- ``OUT/sparse``: ``SparseEncoder(OUT/sparse, trust_remote_code=True)``: M3's lexical weights as a
  vocabulary-size sparse vector (a small module, ``trine_m3_lexical.py``, ships in the folder: no
  sentence-transformers module computes relu(W h + b) max per token id);
- ``OUT/multivector``: ``MultiVectorEncoder(OUT/multivector)``: the ColBERT vectors, with
  sentence-transformers' own modules only (Transformer, Dense, MultiVectorMask dropping the CLS
  token, Normalize).
"""

from __future__ import annotations

import json
import os
import shutil

import torch

from trine.cards import inherited_card, write_card
from trine.errors import InputError, OptionError
from trine.io import atomic_folder, check_output_path
from trine.modeling.families import resolve_family
from trine.modeling.trihead import TriHeadModel, special_token_ids

LEXICAL_MODULE_FILE = "trine_m3_lexical.py"
LEXICAL_CLASS_REF = "trine_m3_lexical.M3LexicalWeights"
PARTS = ("dense", "sparse", "multivector")


def _max_seq_length(folder: str) -> int | None:
    try:
        with open(os.path.join(folder, "sentence_bert_config.json"), encoding="utf-8") as f:
            return int(json.load(f)["max_seq_length"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _transformer(folder: str, model: TriHeadModel):
    """sentence-transformers' Transformer module over ``folder`` (written from ``model``), without the pooler
    ``model`` dropped (a checkpoint without one: the module would start and save random pooler weights)."""
    from sentence_transformers.base.modules import Transformer

    module = Transformer(folder, max_seq_length=_max_seq_length(folder))
    if getattr(model.backbone, "pooler", None) is None and getattr(module.model, "pooler", None) is not None:
        module.model.pooler = None
    return module


def _write_sparse(model: TriHeadModel, root: str, out: str) -> None:
    """``out``: Transformer + :class:`M3LexicalWeights` as a SparseEncoder folder."""
    import importlib.util

    from sentence_transformers import SparseEncoder

    source = os.path.join(os.path.dirname(__file__), LEXICAL_MODULE_FILE)
    spec = importlib.util.spec_from_file_location("trine_m3_lexical", source)
    lexical_module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lexical_module)
    head = lexical_module.M3LexicalWeights(model.hidden_size, model.vocab_size, special_token_ids(model.tokenizer))
    with torch.no_grad():
        head.linear.weight.copy_(model.sparse_linear.weight.float())
        head.linear.bias.copy_(model.sparse_linear.bias.float())
    encoder = SparseEncoder(modules=[_transformer(root, model), head], device="cpu")
    encoder.save(out, create_model_card=False)
    # the module is referred to by its file in the folder (loaded with trust_remote_code)
    modules_file = os.path.join(out, "modules.json")
    with open(modules_file, encoding="utf-8") as f:
        modules = json.load(f)
    for entry in modules:
        if entry["type"].endswith(".M3LexicalWeights"):
            entry["type"] = LEXICAL_CLASS_REF
    with open(modules_file, "w", encoding="utf-8") as f:
        json.dump(modules, f, indent=2)
    shutil.copyfile(source, os.path.join(out, LEXICAL_MODULE_FILE))


def _write_multivector(model: TriHeadModel, root: str, out: str) -> None:
    """``out``: Transformer, the ColBERT Dense, MultiVectorMask (drop the CLS token), Normalize."""
    from sentence_transformers import MultiVectorEncoder
    from sentence_transformers.base.modules import Dense, Normalize
    from sentence_transformers.multi_vector_encoder.modules import MultiVectorMask

    linear = model.colbert_linear
    dense = Dense(linear.in_features, linear.out_features, bias=True, activation_function=torch.nn.Identity(),
                  init_weight=linear.weight.detach().float().clone(), init_bias=linear.bias.detach().float().clone(),
                  module_input_name="token_embeddings")
    tokenizer = model.tokenizer
    first = tokenizer.cls_token or tokenizer.bos_token
    if first is None:
        raise InputError("the tokenizer has no CLS/BOS token: M3's multi-vectors drop the first token, and "
                         "sentence-transformers' MultiVectorMask drops tokens by name")
    modules = [_transformer(root, model), dense,
               MultiVectorMask(skiplist_words=[first], skiplist_tasks=["query", "document"])]
    if model.normalize_embeddings:
        modules.append(Normalize(module_input_name="token_embeddings"))
    encoder = MultiVectorEncoder(modules=modules, device="cpu", similarity_fn_name="maxsim")
    encoder.save(out, create_model_card=False)


def export_sentence_transformers(model_path: str | os.PathLike, out: str | os.PathLike, *,
                                 parts: tuple[str, ...] | None = None, overwrite: bool = False) -> dict[str, str]:
    """Write ``out`` (see the module docstring); return {part: folder}. ``parts`` (of dense, sparse,
    multivector; default: every part the model has) asking for a head the folder lacks is an error."""
    model_path = os.fspath(model_path)
    check_output_path(out, inputs=[model_path], overwrite=overwrite, what="export folder")
    family, _ = resolve_family(model_path, "embedder")
    family.check_export("sentence-transformers", model_path)
    heads = "sparse" in family.outputs  # the tri-head family; a plain encoder exports its dense output
    if parts is None:
        parts = PARTS if heads else ("dense",)
    unknown = set(parts) - set(PARTS)
    if unknown:
        raise OptionError(f"parts: unknown {sorted(unknown)}; choose from {', '.join(PARTS)}")
    if "dense" not in parts:
        raise OptionError("parts: the dense part is the export's root folder and is always written")
    if not heads and set(parts) - {"dense"}:
        raise InputError(f"{model_path}: no BGE-M3 head files (colbert_linear.pt, sparse_linear.pt): there is no "
                         f"lexical or ColBERT output to export ({', '.join(sorted(set(parts) - {'dense'}))} asked); "
                         "export --parts dense, or train the heads first (trine finetune)")
    model = TriHeadModel.from_pretrained(model_path, with_heads=heads).eval()
    written = {}
    with atomic_folder(out, inputs=[model_path], overwrite=overwrite) as tmp:
        model.save_pretrained(tmp, atomic=False)
        written["dense"] = os.fspath(out)
        if "sparse" in parts:
            _write_sparse(model, tmp, os.path.join(tmp, "sparse"))
            written["sparse"] = os.path.join(os.fspath(out), "sparse")
        if "multivector" in parts:
            _write_multivector(model, tmp, os.path.join(tmp, "multivector"))
            written["multivector"] = os.path.join(os.fspath(out), "multivector")
        write_card(tmp, inherited_card(model_path, "export --to sentence-transformers", "m3" if heads else "dense"),
                   name=os.path.basename(os.path.abspath(os.fspath(out))))
    return written
