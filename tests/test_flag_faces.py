"""trine.flag: FlagEmbedding's usage calls, written once here, run with only the import changed (the classes from
FlagEmbedding 1.4.2, then from trine) on the same tiny checkpoints, give the same numbers; arguments trine does not
support are OptionErrors naming them."""

from __future__ import annotations

import ast
import os

import numpy as np
import pytest
import torch
from conftest import TEXTS, make_tiny_reranker, require
from test_decoder_embedder import make_tiny_decoder, smol_tokenizer_dir  # noqa: F401 (the session fixture)
from test_layerwise_reranker import flag_minicpm, minicpm_dir  # noqa: F401 (the module fixtures)
from test_llm_reranker import pairs as llm_pairs
from test_llm_reranker import tiny_llm_dir  # noqa: F401 (the module fixture)
from test_parity_flagembedding import assert_same_encoding

import trine
import trine.flag
from trine.errors import OptionError
from trine.modeling.decoder import DecoderEmbedder

FlagEmbedding = require("FlagEmbedding")

QUERIES = ["What is BGE M3?", "Definition of BM25", "how do I change file permissions"]
PASSAGES = [
    "BGE M3 is an embedding model supporting dense retrieval, lexical matching and multi-vector interaction.",
    "BM25 is a bag-of-words retrieval function that ranks a set of documents based on the query terms appearing "
    "in each document",
    TEXTS[1],
]
INSTRUCTION = "Represent this sentence for searching relevant passages: "


# ----------------------------------------------------------------- the usage calls (one copy, any module)
def m3_usage(lib, path: str, use_fp16: bool = False) -> dict:
    BGEM3FlagModel = lib.BGEM3FlagModel
    model = BGEM3FlagModel(path, use_fp16=use_fp16, devices="cpu")
    out_1 = model.encode(QUERIES, batch_size=12, max_length=64, return_dense=True, return_sparse=True,
                         return_colbert_vecs=True)
    out_2 = model.encode(PASSAGES, return_dense=True, return_sparse=True, return_colbert_vecs=True)
    return {
        "out_1": out_1, "out_2": out_2,
        "dense_similarity": out_1["dense_vecs"] @ out_2["dense_vecs"].T,
        "lexical_one": model.compute_lexical_matching_score(out_1["lexical_weights"][0], out_2["lexical_weights"][0]),
        "lexical_all": model.compute_lexical_matching_score(out_1["lexical_weights"], out_2["lexical_weights"]),
        "tokens": model.convert_id_to_token(out_1["lexical_weights"]),
        "colbert": [float(model.colbert_score(out_1["colbert_vecs"][i], out_2["colbert_vecs"][i])) for i in range(3)],
        "scores": model.compute_score([(q, p) for q in QUERIES for p in PASSAGES], max_passage_length=128,
                                      weights_for_different_modes=[0.4, 0.2, 0.4]),
        "one_pair": model.compute_score((QUERIES[0], PASSAGES[0])),
        "queries": model.encode_queries(QUERIES, return_sparse=True),
        "default_encode": model.encode(PASSAGES[0]),
    }


def flag_model_usage(lib, path: str, use_fp16: bool = False) -> dict:
    FlagModel = lib.FlagModel
    model = FlagModel(path, query_instruction_for_retrieval=INSTRUCTION, use_fp16=use_fp16, devices="cpu")
    q, p = model.encode_queries(QUERIES), model.encode_corpus(PASSAGES)
    return {"q": q, "p": p, "scores": q @ p.T, "plain": model.encode(QUERIES),
            "tensor": model.encode(QUERIES[:2], convert_to_numpy=False), "one": model.encode(QUERIES[0])}


def llm_model_usage(lib, path: str) -> dict:
    FlagLLMModel = lib.FlagLLMModel
    model = FlagLLMModel(path, query_instruction_for_retrieval="Given a question, retrieve passages that answer it",
                         use_fp16=False, devices="cpu", batch_size=2)
    q, p = model.encode_queries(QUERIES), model.encode_corpus(PASSAGES)
    return {"q": q, "p": p, "scores": q @ p.T}


def reranker_usage(lib, path: str, cls: str = "FlagReranker", rr_pairs: list | None = None) -> dict:
    Reranker = getattr(lib, cls)
    reranker = Reranker(path, use_fp16=True, devices="cpu")  # FlagEmbedding turns fp16 off on a CPU too
    rr_pairs = rr_pairs or [(q, p) for q in QUERIES for p in PASSAGES]
    return {"raw": reranker.compute_score(rr_pairs), "normalized": reranker.compute_score(rr_pairs, normalize=True),
            "one": reranker.compute_score(rr_pairs[0]), "short": reranker.compute_score(rr_pairs, max_length=24)}


def assert_same(a, b, atol: float = 1e-5) -> None:
    """Equal nested results: dicts key by key, sequences item by item, numbers within ``atol``."""
    if isinstance(a, dict) and "dense_vecs" in a and "colbert_vecs" in a and a["colbert_vecs"] is not None:
        assert_same_encoding(a, b, atol)
        return
    if isinstance(a, dict):
        assert set(a) == set(b)
        for k in a:
            assert_same(a[k], b[k], atol)
    elif isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor)
        np.testing.assert_allclose(b.numpy(), a.numpy(), atol=atol, rtol=0)
    elif isinstance(a, (list, tuple)) and a and isinstance(a[0], (dict, str, list, np.ndarray)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y, atol)
    elif a is None or isinstance(a, str):
        assert a == b
    else:
        np.testing.assert_allclose(np.asarray(b, dtype=np.float64), np.asarray(a, dtype=np.float64), atol=atol,
                                   rtol=0)


# ----------------------------------------------------------------- parity
def test_names_import_from_trine():
    for name in trine.flag.FLAG_NAMES:
        assert getattr(trine, name) is getattr(trine.flag, name)
        assert name in trine.__all__
    assert issubclass(trine.BGEM3FlagModel, trine.M3Embedder) and issubclass(trine.FlagModel, trine.Embedder)
    assert issubclass(trine.FlagReranker, trine.Reranker)
    with pytest.raises(AttributeError):
        trine.FlagPseudoMoEModel  # noqa: B018
    # trine.flag itself imports nothing heavy at module level: the faces load on first use of a name
    tree = ast.parse(open(trine.flag.__file__, encoding="utf-8").read())
    top = {(n.module if isinstance(n, ast.ImportFrom) else n.names[0].name) for n in tree.body
           if isinstance(n, (ast.Import, ast.ImportFrom))}
    assert top == {"__future__", "typing"}


def test_bge_m3_usage_equals_flagembedding(tiny_m3_dir):
    expected, got = m3_usage(FlagEmbedding, tiny_m3_dir), m3_usage(trine, tiny_m3_dir)
    assert_same(expected, got)
    # use_fp16=True (FlagEmbedding's default and its example's) on a CPU computes in float32: trine with the
    # full weights, FlagEmbedding with weights rounded to fp16 first (a difference of about 1e-4)
    half = m3_usage(trine, tiny_m3_dir, use_fp16=True)
    assert half["out_1"]["dense_vecs"].dtype == np.float32
    assert_same(got, half, atol=0)
    assert got["default_encode"]["lexical_weights"] is None  # the constructor's return_sparse=False default
    assert np.ptp(got["scores"]["sparse"]) > 1e-3  # the random model does tell pairs apart


def test_flag_model_usage_equals_flagembedding(minilm_dir):
    expected, got = flag_model_usage(FlagEmbedding, minilm_dir), flag_model_usage(trine, minilm_dir)
    assert_same(expected, got)
    assert isinstance(got["tensor"], torch.Tensor) and got["one"].ndim == 1
    assert not np.allclose(got["q"], got["plain"])  # the instruction reached the queries
    # FlagModel pools CLS (FlagEmbedding's default) where trine's Embedder reads the folder's mean pooling
    assert not np.allclose(trine.Embedder(minilm_dir, show_progress=False).encode(QUERIES), got["plain"], atol=1e-3)


def test_flag_llm_model_usage_equals_flagembedding(smol_tokenizer_dir, tmp_path):  # noqa: F811
    folder = str(tmp_path / "decoder")
    DecoderEmbedder.from_pretrained(make_tiny_decoder(str(tmp_path / "raw"), smol_tokenizer_dir, "qwen2")) \
        .save_pretrained(folder)  # trine's saved tokenizer appends the EOS both read
    expected, got = llm_model_usage(FlagEmbedding, folder), llm_model_usage(trine, folder)
    assert_same(expected, got)
    icl = dict(query_instruction_for_retrieval="Given a title, retrieve its page", devices="cpu", use_fp16=False,
               examples_for_task=[{"query": "copy files", "response": "cp copies files"}])
    a, b = FlagEmbedding.FlagICLModel(folder, **icl), trine.FlagICLModel(folder, **icl)
    assert_same(a.encode_queries(QUERIES), b.encode_queries(QUERIES))
    assert_same(a.encode_corpus(PASSAGES), b.encode_corpus(PASSAGES))
    del icl["examples_for_task"]  # no examples: the query template and the suffix alone
    a, b = FlagEmbedding.FlagICLModel(folder, **icl), trine.FlagICLModel(folder, **icl)
    assert_same(a.encode_queries(QUERIES), b.encode_queries(QUERIES))


@pytest.mark.parametrize("kind", ["xlmr", "bert"])
def test_flag_reranker_usage_equals_flagembedding(tmp_path, xlmr_tokenizer_dir, minilm_dir, kind):
    path = make_tiny_reranker(str(tmp_path / kind), xlmr_tokenizer_dir if kind == "xlmr" else minilm_dir, kind)
    expected, got = reranker_usage(FlagEmbedding, path), reranker_usage(trine, path)
    assert_same(expected, got)
    assert all(0 < s < 1 for s in got["normalized"]) and np.std(got["raw"]) > 1e-3


def test_flag_llm_reranker_usage_equals_flagembedding(tiny_llm_dir):  # noqa: F811
    expected = reranker_usage(FlagEmbedding, tiny_llm_dir, "FlagLLMReranker", llm_pairs())
    got = reranker_usage(trine, tiny_llm_dir, "FlagLLMReranker", llm_pairs())
    assert_same(expected, got)


def layerwise_usage(lib, path: str) -> dict:
    LayerWiseFlagLLMReranker = lib.LayerWiseFlagLLMReranker
    reranker = LayerWiseFlagLLMReranker(path, use_fp16=True, devices="cpu", batch_size=3)
    pairs = llm_pairs()
    return {"last": reranker.compute_score(pairs), "layers": reranker.compute_score(pairs, cutoff_layers=[2, 3]),
            "one_layer": reranker.compute_score(pairs, cutoff_layers=[3], normalize=True)}


def test_layerwise_reranker_usage_equals_flagembedding(minicpm_dir):  # noqa: F811
    expected, got = layerwise_usage(FlagEmbedding, minicpm_dir), layerwise_usage(trine, minicpm_dir)
    assert_same(expected, got)
    assert np.shape(got["layers"]) == (2, len(llm_pairs()))


def test_auto_classes_resolve_as_flagembedding(tmp_path, tiny_m3_dir, minilm_dir, xlmr_tokenizer_dir):
    m3 = tmp_path / "bge-m3"
    os.symlink(tiny_m3_dir, m3)
    small = tmp_path / "bge-small-en-v1.5"
    small.mkdir()
    os.symlink(minilm_dir, small / "checkpoint-500")  # a Trainer checkpoint: its parent's name counts
    # use_fp16=False: FlagEmbedding's fp16 default rounds the weights even on a CPU (see the M3 test)
    fe = FlagEmbedding.FlagAutoModel.from_finetuned(str(m3), devices="cpu", use_fp16=False)
    ours = trine.FlagAutoModel.from_finetuned(str(m3), devices="cpu", use_fp16=False)
    assert type(ours) is trine.BGEM3FlagModel
    assert_same(fe.encode(QUERIES), ours.encode(QUERIES))
    checkpoint = trine.FlagAutoModel.from_finetuned(str(small / "checkpoint-500"), devices="cpu")
    assert type(checkpoint) is trine.FlagModel and checkpoint.model.pooling_method == "cls"
    kw = dict(model_class="encoder-only-base", devices="cpu", use_fp16=False)
    unnamed = trine.FlagAutoModel.from_finetuned(minilm_dir, **kw)
    fe = FlagEmbedding.FlagAutoModel.from_finetuned(minilm_dir, **kw)
    assert type(unnamed) is trine.FlagModel
    assert_same(fe.encode(QUERIES), unnamed.encode(QUERIES))
    with pytest.raises(OptionError, match="model_class: .* not in FlagEmbedding's table"):
        trine.FlagAutoModel.from_finetuned(minilm_dir)
    with pytest.raises(OptionError, match="pseudo-MoE"):
        trine.FlagAutoModel.from_finetuned(minilm_dir, model_class="decoder-only-pseudo_moe")
    with pytest.raises(OptionError, match="model_class: 'encoder-only'; choose from"):
        trine.FlagAutoModel.from_finetuned(minilm_dir, model_class="encoder-only")
    with pytest.raises(OptionError, match="from_finetuned"):
        trine.FlagAutoModel()
    rr = tmp_path / "bge-reranker-v2-m3"
    make_tiny_reranker(str(rr), xlmr_tokenizer_dir, "xlmr")
    fe_rr = FlagEmbedding.FlagAutoReranker.from_finetuned(str(rr), devices="cpu")
    ours_rr = trine.FlagAutoReranker.from_finetuned(str(rr), devices="cpu")
    assert type(ours_rr) is trine.FlagReranker
    pairs = [(q, p) for q in QUERIES for p in PASSAGES]
    assert_same(fe_rr.compute_score(pairs), ours_rr.compute_score(pairs))
    with pytest.raises(OptionError, match="lightweight reranker"):
        trine.FlagAutoReranker.from_finetuned(str(tmp_path / "bge-reranker-v2.5-gemma2-lightweight"))


# ----------------------------------------------------------------- arguments: accepted or refused by name
def test_cache_dir_is_accepted(tiny_m3_dir, tmp_path):
    model = trine.BGEM3FlagModel(tiny_m3_dir, cache_dir=str(tmp_path / "hub"), devices="cpu")
    assert model.cache_dir == str(tmp_path / "hub")
    assert model.encode(QUERIES[0])["dense_vecs"].shape == (32,)


def test_unsupported_arguments_are_option_errors_naming_them(tiny_m3_dir, minilm_dir, tiny_llm_dir):  # noqa: F811
    cases = [
        (lambda: trine.BGEM3FlagModel(tiny_m3_dir, devices="cpu", frobnicate=1), "BGEM3FlagModel: frobnicate: not an"),
        (lambda: trine.BGEM3FlagModel(tiny_m3_dir, devices="cpu", convert_to_numpy=True), "convert_to_numpy: BGE-M3"),
        (lambda: trine.BGEM3FlagModel(tiny_m3_dir, devices="cpu").encode(QUERIES, device="cpu"),
         "BGEM3FlagModel.encode: device: pick the devices"),
        (lambda: trine.BGEM3FlagModel(tiny_m3_dir, devices="cpu").compute_score((QUERIES[0], PASSAGES[0]),
                                                                                 num_workers=2),
         "compute_score: num_workers"),
        (lambda: trine.FlagModel(minilm_dir, devices="cpu", colbert_dim=16),
         "FlagModel: colbert_dim: sets up the lexical"),
        (lambda: trine.FlagModel(minilm_dir, devices="cpu").encode_queries(QUERIES, instruction="x"),
         "encode_queries: instruction"),
        (lambda: trine.FlagLLMModel(minilm_dir, pooling_method="cls"), "FlagLLMModel: pooling_method: 'cls'"),
        (lambda: trine.FlagLLMReranker(tiny_llm_dir, peft_path="adapter"), "FlagLLMReranker: peft_path: trine"),
        (lambda: trine.LayerWiseFlagLLMReranker(tiny_llm_dir, peft_path="adapter"), "peft_path"),
        (lambda: trine.FlagLLMReranker(tiny_llm_dir, devices="cpu").compute_score(llm_pairs(), use_dataloader=True),
         "FlagLLMReranker.compute_score: use_dataloader: trine sorts"),
        (lambda: trine.FlagLLMReranker(tiny_llm_dir, devices="cpu").compute_score(llm_pairs(), cutoff_layers=[1]),
         "compute_score: cutoff_layers"),
        (lambda: trine.FlagLLMReranker(tiny_llm_dir, compress_ratio=2), "compress_ratio: the lightweight"),
    ]
    for make, message in cases:
        with pytest.raises(OptionError, match=message):
            make()
    # trine's own options pass through a face
    quiet = trine.FlagModel(minilm_dir, devices="cpu", show_progress=False, max_tokens_per_batch=4096)
    assert quiet.show_progress is False and quiet.max_tokens_per_batch == 4096


# ----------------------------------------------------------------- training flags: FlagEmbedding's, every one
FE_ARGUMENT_MODULES = {
    "embedder": ["FlagEmbedding.abc.finetune.embedder", "FlagEmbedding.finetune.embedder.encoder_only.m3",
                 "FlagEmbedding.finetune.embedder.decoder_only.base",
                 "FlagEmbedding.finetune.embedder.decoder_only.icl"],
    "reranker": ["FlagEmbedding.abc.finetune.reranker", "FlagEmbedding.finetune.reranker.decoder_only.base",
                 "FlagEmbedding.finetune.reranker.decoder_only.layerwise"],
}
# options that only make sense with another one (their checks would refuse them alone)
COMPANIONS = {"target_modules": ["--use_lora", "true"], "modules_to_save": ["--use_lora", "true"],
              "use_mrl": ["--mrl_dims", "8"], "head_multi": ["--model_family", "llm-reranker-layerwise"],
              "head_type": ["--model_family", "llm-reranker-layerwise"],
              "start_layer": ["--model_family", "llm-reranker-layerwise"]}
REQUIRED = ["--model_name_or_path", "/nonexistent/model", "--train_data", "train.jsonl", "--output_dir", "/tmp/out"]


def fe_training_fields(role: str) -> dict:
    """Every field of FlagEmbedding's argument dataclasses for ``role`` beyond the installed transformers'
    TrainingArguments (which trine's training arguments are a subclass of, so take as they are)."""
    import dataclasses
    import importlib
    import inspect

    from transformers import TrainingArguments

    inherited = {f.name for f in dataclasses.fields(TrainingArguments)}
    out = {}
    for module in FE_ARGUMENT_MODULES[role]:
        for name, cls in vars(importlib.import_module(module)).items():
            if inspect.isclass(cls) and dataclasses.is_dataclass(cls) and name.endswith("Arguments"):
                out.update({f.name: f for f in dataclasses.fields(cls)
                            if f.name not in inherited and f.name not in out})
    return out


def a_value(f) -> list[str]:
    """A value of the field's type for its flag (its default where it has one)."""
    import dataclasses

    default = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
    if isinstance(default, bool):
        return ["true"]
    if isinstance(default, (int, float, str)) and default != "":
        return [str(default)]
    if isinstance(default, list) and default:
        return [str(x) for x in default]
    kind = str(f.type).lower()
    return ["true"] if "bool" in kind else ["2"] if "int" in kind else ["0.5"] if "float" in kind else ["x"]


@pytest.mark.parametrize("role", ["embedder", "reranker"])
def test_every_flagembedding_training_flag_is_accepted_or_refused_by_name(role):
    from trine.training.arguments import EMBEDDER_REFUSED_OPTIONS, RERANKER_REFUSED_OPTIONS
    from trine.training.finetune import parse_args
    from trine.training.reranker import parse_reranker_args

    parse, refused = ((parse_args, EMBEDDER_REFUSED_OPTIONS) if role == "embedder"
                      else (parse_reranker_args, RERANKER_REFUSED_OPTIONS))
    fields = fe_training_fields(role)
    assert len(fields) > 25 and "train_group_size" in fields and "cache_dir" in fields  # FlagEmbedding was read
    accepted = []
    for name, f in sorted(fields.items()):
        argv = [*REQUIRED, *COMPANIONS.get(name, []), f"--{name}", *a_value(f)]
        if name in refused:
            with pytest.raises(OptionError) as err:
                parse(argv)
            assert str(err.value) == f"--{name}: {refused[name]}"
        elif name not in ("model_name_or_path", "train_data", "output_dir"):
            parse(argv)  # accepted (an OptionError here fails the test, "unknown option" or not)
            accepted.append(name)
    assert set(refused) <= set(fields)  # no refusal of an option FlagEmbedding lacks
    assert {"cache_dir", "token", "use_flash_attn"} <= set(accepted)


def test_flagembedding_training_flags_keep_their_meaning(tmp_path):
    from trine.training.finetune import parse_args
    from trine.training.reranker import parse_reranker_args

    model, _, args = parse_args([*REQUIRED, "--warmup_ratio", "0.1", "--max_steps", "50", "--cache_dir", "/c",
                                 "--token", "hf_secret", "--sub_batch_size", "4", "--use_flash_attn", "true"])
    # transformers 5 has no warmup_ratio: it is warmup_steps given as a fraction, 10% of 50 steps
    assert args.warmup_steps == 0.1 and args.get_warmup_steps(50) == 5
    assert args.gradcache_chunk_size == 4  # FlagEmbedding's chunked forward: the same gradients, by GradCache
    assert model.attn_implementation == "flash_attention_2" and model.cache_dir == "/c"
    from trine.cards import options_dict

    assert options_dict(model)["token"] == "<TOKEN>"  # a Hub token never reaches the model card
    _, reranker_data, _ = parse_reranker_args([*REQUIRED, "--sep_token", "|"])
    assert options_dict(reranker_data)["sep_token"] == "|"  # text, not a secret
    for argv, message in ((["--warmup_ratio", "1.5"], "warmup_ratio must be at least 0 and below 1"),
                          (["--warmup_ratio", "0.1", "--warmup_steps", "10"], "contradicts warmup_steps"),
                          (["--sub_batch_size", "4", "--gradcache_chunk_size", "8"], "contradicts gradcache"),
                          (["--use_flash_attn", "true", "--attn_implementation", "eager"], "contradicts attn")):
        with pytest.raises(OptionError, match=message):
            parse_args([*REQUIRED, *argv])
    _, _, reranker_args = parse_reranker_args([*REQUIRED, "--warmup_ratio", "0.05", "--max_steps", "100"])
    assert reranker_args.get_warmup_steps(100) == 5
    config = tmp_path / "train.yaml"
    config.write_text("model_name_or_path: /nonexistent\ntrain_data: t.jsonl\noutput_dir: /tmp/out\nmax_len: 512\n")
    with pytest.raises(OptionError, match=r"train.yaml:4: max_len: trine cuts a pair to query_max_len"):
        parse_reranker_args([str(config)])
