"""Every model family x every command that loads a model: each supported pair runs end to end on a tiny model,
each unsupported pair is a one-line error (exit code 2) naming the family and what it can do. Beside it: the
resolver recognises each foreign layout, and every folder trine writes records its family."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
from conftest import make_tiny_reranker
from test_decoder_embedder import make_tiny_decoder, smol_tokenizer_dir  # noqa: F401 (the session fixture)
from test_finetune import PAGES

from trine.cli import main
from trine.errors import InputError, UserError
from trine.modeling.families import FAMILY_FILE, read_family_file, recognise_family, resolve_family

DOCS = [d for _, d in PAGES[:8]]
QUERIES = [q for q, _ in PAGES[:8]]
EMBEDDERS = ("dense-only", "tri-head", "decoder", "decoder-lora", "decoder-merged")
RERANKERS = ("cross-encoder", "llm-reranker", "layerwise")
FAMILY = {"dense-only": "encoder", "tri-head": "trihead", "decoder": "decoder", "decoder-lora": "decoder",
          "decoder-merged": "decoder", "cross-encoder": "cross-encoder", "llm-reranker": "llm-reranker",
          "layerwise": "llm-reranker-layerwise"}


def make_st_bert(out: str, tokenizer_dir: str) -> str:
    """A sentence-transformers-shaped tiny BERT (modules.json, mean pooling), written without trine."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(1)
    config = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=128)
    BertModel(config, add_pooling_layer=False).save_pretrained(out)
    tok.save_pretrained(out)
    with open(os.path.join(out, "modules.json"), "w") as f:
        json.dump([{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                   {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}], f)
    os.makedirs(os.path.join(out, "1_Pooling"))
    with open(os.path.join(out, "1_Pooling", "config.json"), "w") as f:
        json.dump({"word_embedding_dimension": 32, "pooling_mode_mean_tokens": True}, f)
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_m3_dir, splade_tiny_dir, xlmr_tokenizer_dir, smol_tokenizer_dir) -> dict[str, str]:  # noqa: F811
    """One tiny folder per family: foreign layouts written with plain transformers (dense-only, tri-head,
    decoder, cross-encoder, LLM reranker), and trine's own (a decoder LoRA adapter, its merge, a layer-wise
    reranker)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, Qwen2Config

    from trine.modeling.decoder import DecoderEmbedder
    from trine.modeling.layerwise_reranker import LayerwiseReranker
    from trine.modeling.llm_reranker import LLMReranker
    from trine.modeling.lora import DECODER_TARGET_MODULES, LoraOptions, add_lora, merge_lora_folder

    root = tmp_path_factory.mktemp("families")
    out = {"dense-only": make_st_bert(str(root / "st"), splade_tiny_dir), "tri-head": tiny_m3_dir,
           "decoder": make_tiny_decoder(str(root / "dec"), smol_tokenizer_dir, "qwen2", seed=2)}
    dec = DecoderEmbedder.from_pretrained(out["decoder"])
    add_lora(dec.backbone, LoraOptions(lora_rank=4, lora_alpha=8), base_path=out["decoder"],
             task_type="FEATURE_EXTRACTION", default_targets=DECODER_TARGET_MODULES)
    with torch.no_grad():  # a non-zero adapter, so the merge changes the weights
        for name, p in dec.backbone.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.2)
    dec.save_pretrained(root / "dec-lora")
    out["decoder-lora"] = str(root / "dec-lora")
    out["decoder-merged"] = merge_lora_folder(out["decoder-lora"], root / "dec-merged")
    out["cross-encoder"] = make_tiny_reranker(str(root / "ce"), xlmr_tokenizer_dir, "xlmr", seed=4)
    tok = AutoTokenizer.from_pretrained(smol_tokenizer_dir)
    common = dict(vocab_size=len(tok), hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=64, max_position_embeddings=256, initializer_range=0.2)
    torch.manual_seed(5)
    for name, config in (("llm-foreign", LlamaConfig(**common)), ("qwen-lm", Qwen2Config(**common))):
        AutoModelForCausalLM.from_config(config).save_pretrained(root / name)
        tok.save_pretrained(root / name)
    out["llm-foreign"] = str(root / "llm-foreign")  # a bare causal LM: a reranker or an embedder, by the role
    LLMReranker.from_pretrained(root / "llm-foreign").save_pretrained(root / "llm-reranker")  # records its family
    out["llm-reranker"] = str(root / "llm-reranker")
    LayerwiseReranker.from_pretrained(root / "qwen-lm", start_layer=1).save_pretrained(root / "layerwise")
    out["layerwise"] = str(root / "layerwise")
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, str]:
    """A corpus, a BEIR folder over it and training pairs, of real man-page text."""
    root = tmp_path_factory.mktemp("family_data")
    corpus = root / "beir" / "corpus.jsonl"
    os.makedirs(root / "beir" / "qrels")
    corpus.write_text("".join(json.dumps({"_id": f"d{i}", "text": d}) + "\n" for i, d in enumerate(DOCS)))
    (root / "beir" / "queries.jsonl").write_text(
        "".join(json.dumps({"_id": f"q{i}", "text": q}) + "\n" for i, q in enumerate(QUERIES)))
    (root / "beir" / "qrels" / "test.tsv").write_text(
        "query-id\tcorpus-id\tscore\n" + "".join(f"q{i}\td{i}\t1\n" for i in range(len(QUERIES))))
    (root / "train.jsonl").write_text("".join(json.dumps({"query": q, "pos": [d], "neg": [DOCS[(i + 1) % 8]]}) + "\n"
                                              for i, (q, d) in enumerate(zip(QUERIES, DOCS))))
    return {"corpus": str(corpus), "beir": str(root / "beir"), "train": str(root / "train.jsonl")}


def err_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err, err
    return err.splitlines()[-1]


def dense(encoder, texts: list[str], kind: str = "passage") -> np.ndarray:
    """The reference the commands are checked against: the dense vectors of trine's Python face."""
    return encoder.encode_result(texts, ("dense",), kind=kind).dense_vecs


# ----------------------------------------------------------------------------------------- supported pairs
@pytest.mark.parametrize("name", EMBEDDERS)
def test_embedder_families_run_every_embedder_command(name, models, data, tmp_path, capsys, monkeypatch):
    from trine.inference.shards import load_embedder

    model = models[name]
    enc = load_embedder(model, show_progress=False, passage_max_length=64)
    outputs = "dense,sparse,colbert" if name == "tri-head" else "dense"
    # encode
    assert main(["encode", model, data["corpus"], "--output-dir", str(tmp_path / "enc"), "--outputs", outputs,
                 "--passage_max_len", "64"]) == 0
    from trine.inference.shards import open_encoded

    assert set(open_encoded(tmp_path / "enc").outputs) == set(outputs.split(","))
    # index build + search: the top hit is the document the dense vectors rank first
    assert main(["index", "build", "--model", model, "--corpus", data["corpus"], "--uri", str(tmp_path / "idx"),
                 "--outputs", "dense", "--passage_max_len", "64", "--quiet"]) == 0
    capsys.readouterr()
    assert main(["index", "search", "--model", model, "--uri", str(tmp_path / "idx"), "--query", QUERIES[2],
                 "--k", "3", "--passage_max_len", "64", "--quiet"]) == 0
    hits = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["hits"]
    q = dense(enc, [QUERIES[2]], "query")
    assert [h["id"] for h in hits] == [f"d{i}" for i in np.argsort(-(q @ dense(enc, DOCS).T)[0])[:3]]
    # eval (dense; the tri-head model also sparse and colbert)
    modes = "dense,sparse,colbert" if name == "tri-head" else "dense"
    assert main(["eval", "--data", data["beir"], "--model", model, "--modes", modes, "--k", "1,3", "--top-k", "3",
                 "--passage_max_len", "64", "--quiet"]) == 0
    assert "dense" in capsys.readouterr().out
    # serve: /embed gives what the Python face gives
    import trine.serving

    apps = []
    monkeypatch.setattr(trine.serving, "run_server", lambda app, *a, **k: apps.append(app))
    assert main(["serve", model]) == 0
    from fastapi.testclient import TestClient

    with TestClient(apps[0], base_url="http://localhost") as client:
        got = client.post("/embed", json={"inputs": DOCS[:2]})
    assert got.status_code == 200, got.text
    np.testing.assert_allclose(np.array(got.json()), dense(enc, DOCS[:2]), atol=1e-5)
    # mine: negatives from the corpus of the pairs, never the positive
    mined = tmp_path / "mined.jsonl"
    assert main(["mine", "--input_file", data["train"], "--output_file", str(mined), "--model_name_or_path", model,
                 "--range_for_sampling", "0-6", "--negative_number", "2", "--passage_max_len", "64", "--quiet"]) == 0
    for line in mined.read_text().splitlines():
        record = json.loads(line)
        assert len(record["neg"]) == 2 and not set(record["neg"]) & set(record["pos"])
    # score (an embedder teacher): the dense inner products
    scored = tmp_path / "scored.jsonl"
    assert main(["score", "--input_file", data["train"], "--output_file", str(scored), "--model_name_or_path", model,
                 "--passage_max_len", "64", "--quiet"]) == 0
    first = json.loads(scored.read_text().splitlines()[0])
    qv = dense(enc, [QUERIES[0]], "query")
    assert first["pos_scores"][0] == pytest.approx(float(qv[0] @ dense(enc, [DOCS[0]])[0]), abs=1e-4)
    # export: the encoder families only
    capsys.readouterr()
    rc = main(["export", model, str(tmp_path / "st"), "--to", "sentence-transformers"])
    if FAMILY[name] == "decoder":
        assert rc == 2
        line = err_line(capsys)
        assert "model family 'decoder' (an embedder: dense)" in line and "no sentence-transformers export" in line
    else:
        assert rc == 0 and read_family_file(tmp_path / "st")["model_family"] == FAMILY[name]


@pytest.mark.parametrize("name", RERANKERS)
def test_reranker_families_run_every_reranker_command(name, models, data, tmp_path, capsys, monkeypatch):
    from trine.inference import Reranker

    reranker = models[name]
    expected = Reranker(reranker, show_progress=False, max_length=64).compute_score([(QUERIES[0], DOCS[0]),
                                                                                     (QUERIES[0], DOCS[1])])
    # score
    scored = tmp_path / "scored.jsonl"
    assert main(["score", "--input_file", data["train"], "--output_file", str(scored), "--reranker", reranker,
                 "--reranker_max_len", "64", "--quiet"]) == 0
    first = json.loads(scored.read_text().splitlines()[0])
    assert [first["pos_scores"][0], first["neg_scores"][0]] == pytest.approx(list(expected), abs=1e-4)
    # serve /rerank beside an embedder (the smallest: dense-only)
    import trine.serving

    apps = []
    monkeypatch.setattr(trine.serving, "run_server", lambda app, *a, **k: apps.append(app))
    assert main(["serve", models["dense-only"], "--reranker", reranker, "--reranker-max-length", "64"]) == 0
    from fastapi.testclient import TestClient

    with TestClient(apps[0], base_url="http://localhost") as client:
        got = client.post("/rerank", json={"query": QUERIES[0], "texts": DOCS[:2], "raw_scores": True})
    assert got.status_code == 200, got.text
    by_index = {r["index"]: r["score"] for r in got.json()}
    assert [by_index[0], by_index[1]] == pytest.approx(list(expected), abs=1e-4)
    # eval --reranker
    assert main(["eval", "--data", data["beir"], "--model", models["dense-only"], "--reranker", reranker,
                 "--reranker-max-length", "64", "--passage_max_len", "64", "--modes", "dense", "--k", "1,3",
                 "--top-k", "3", "--quiet"]) == 0
    assert "rerank(dense)" in capsys.readouterr().out


# --------------------------------------------------------------------------------------- unsupported pairs
def embedder_commands(model: str, data: dict[str, str], out: str) -> dict[str, list[str]]:
    return {
        "encode": ["encode", model, data["corpus"], "--output-dir", f"{out}/enc"],
        "index build": ["index", "build", "--model", model, "--corpus", data["corpus"], "--uri", f"{out}/idx",
                        "--quiet"],
        "eval": ["eval", "--data", data["beir"], "--model", model, "--modes", "dense", "--quiet"],
        "mine": ["mine", "--input_file", data["train"], "--output_file", f"{out}/m.jsonl", "--model_name_or_path",
                 model, "--quiet"],
        "score": ["score", "--input_file", data["train"], "--output_file", f"{out}/s.jsonl", "--model_name_or_path",
                  model, "--quiet"],
        "export": ["export", model, f"{out}/x", "--to", "onnx"],
        "serve": ["serve", model],
    }


@pytest.mark.parametrize("name", RERANKERS)
def test_a_reranker_is_refused_by_every_embedder_command(name, models, data, tmp_path, capsys):
    for command, argv in embedder_commands(models[name], data, str(tmp_path)).items():
        assert main(argv) == 2, command
        line = err_line(capsys)
        assert f"model family {FAMILY[name]!r} (a reranker: scores query-passage pairs); this needs an embedder" \
            in line, (command, line)
    assert os.listdir(tmp_path) == []  # nothing written


def test_unsupported_embedder_pairs_are_one_line_errors(models, data, tmp_path, capsys):
    short = ["--passage_max_len", "64"]
    dec, no_sparse = "model family 'decoder' (an embedder: dense)", "does not give sparse"
    cases = [  # (argv, what the error says)
        (["encode", models["dense-only"], data["corpus"], "--output-dir", str(tmp_path / "a"), "--outputs", "colbert"],
         "model family 'encoder' (an embedder: dense) does not give colbert"),
        (["encode", models["decoder"], data["corpus"], "--output-dir", str(tmp_path / "b"), "--outputs",
          "dense,sparse", *short], f"{dec} {no_sparse}"),
        (["index", "build", "--model", models["decoder-lora"], "--corpus", data["corpus"], "--uri", str(tmp_path / "c"),
          "--outputs", "dense,colbert", *short, "--quiet"], f"{dec} does not give colbert"),
        (["index", "build", "--model", models["decoder"], "--corpus", data["corpus"], "--uri", str(tmp_path / "d"),
          "--heads", "neutral", *short, "--quiet"], f"{dec}: init_missing_heads (--heads)"),
        (["eval", "--data", data["beir"], "--model", models["decoder-merged"], "--modes", "dense,sparse", *short,
          "--quiet"], f"{dec} {no_sparse}"),
        (["export", models["decoder-merged"], str(tmp_path / "e"), "--to", "onnx"], f"{dec}: no onnx export"),
        (["score", "--input_file", data["train"], "--output_file", str(tmp_path / "f.jsonl"), "--reranker",
          models["tri-head"], "--quiet"],
         "model family 'trihead' (an embedder: dense, sparse, colbert); this needs a reranker"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        line = err_line(capsys)
        assert message in line, (argv, line)


# ------------------------------------------------------------------------------- recognition and recording
def test_recognition_of_each_foreign_layout(models, tmp_path, tiny_m3_dir):
    assert recognise_family(models["dense-only"]) == "encoder"  # sentence-transformers BertModel
    assert recognise_family(tiny_m3_dir) == "trihead"  # BGE-M3 layout
    assert recognise_family(models["decoder"], "embedder") == "decoder"  # a causal LM's base model (Qwen2Model)
    assert recognise_family(models["decoder"], "reranker") == "llm-reranker"
    assert recognise_family(models["llm-foreign"], "reranker") == "llm-reranker"  # LlamaForCausalLM
    assert recognise_family(models["llm-foreign"], "embedder") == "decoder"
    assert recognise_family(models["cross-encoder"]) == "cross-encoder"  # XLMRobertaForSequenceClassification
    with pytest.raises(InputError, match="a causal LM .*name the family"):
        recognise_family(models["llm-foreign"])
    # a LoRA adapter written by peft alone (no family file): its base model's family
    adapter = shutil.copytree(models["decoder-lora"], tmp_path / "adapter")
    os.remove(adapter / FAMILY_FILE)
    assert recognise_family(adapter, "embedder") == "decoder"
    from trine.modeling.lora import merge_lora_folder

    merged = merge_lora_folder(adapter, tmp_path / "merged")  # trine merge-lora records what it wrote
    assert read_family_file(merged)["model_family"] == "decoder"
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "task_type": "CAUSAL_LM"}))
    assert recognise_family(adapter) == "llm-reranker"
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "task_type": "SEQ_CLS"}))
    assert recognise_family(adapter) == "cross-encoder"
    # FlagEmbedding's layer-wise MiniCPM layout is told by its architecture
    lw = tmp_path / "lw"
    lw.mkdir()
    (lw / "config.json").write_text(json.dumps({"architectures": ["LayerWiseMiniCPMForCausalLM"],
                                                "model_type": "minicpm"}))
    assert recognise_family(lw) == "llm-reranker-layerwise"
    # unknown and contradictory folders: one line naming the folder and what was found
    half = shutil.copytree(tiny_m3_dir, tmp_path / "half")
    os.remove(half / "sparse_linear.pt")
    with pytest.raises(InputError, match="half: has colbert_linear.pt but not sparse_linear.pt"):
        recognise_family(half)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("x")
    with pytest.raises(InputError, match="empty: not a model folder .*found: notes.txt"):
        resolve_family(empty)
    recorded = shutil.copytree(models["dense-only"], tmp_path / "recorded")
    (recorded / FAMILY_FILE).write_text(json.dumps({"model_family": "trihead"}))
    with pytest.raises(InputError, match="records model family 'trihead' but has neither head file"):
        resolve_family(recorded)
    (recorded / FAMILY_FILE).write_text(json.dumps({"model_family": "no-such"}))
    with pytest.raises(InputError, match="'no-such' is not a model family trine knows"):
        resolve_family(recorded)
    for err in (InputError,):
        assert issubclass(err, UserError)


def test_every_folder_trine_writes_records_its_family(models, tiny_m3_dir, splade_tiny_dir, tmp_path):
    from trine.modeling.cross_encoder import CrossEncoder
    from trine.modeling.llm_reranker import LLMReranker
    from trine.modeling.retromae import RetroMAEModel
    from trine.modeling.trihead import TriHeadModel

    TriHeadModel.from_pretrained(tiny_m3_dir).save_pretrained(tmp_path / "m3")  # finetune / demo / lexical init
    TriHeadModel.from_pretrained(tiny_m3_dir, with_heads=False).save_pretrained(tmp_path / "dense")  # dense finetune
    CrossEncoder.from_pretrained(models["cross-encoder"]).save_pretrained(tmp_path / "ce")  # finetune-reranker
    LLMReranker.from_pretrained(models["llm-foreign"]).save_pretrained(tmp_path / "llm")
    RetroMAEModel.from_pretrained(splade_tiny_dir).save_encoder(tmp_path / "pretrained")  # pretrain
    written = {"m3": "trihead", "dense": "encoder", "ce": "cross-encoder", "llm": "llm-reranker",
               "pretrained": "encoder"}
    for folder, family in written.items():
        assert read_family_file(tmp_path / folder)["model_family"] == family, folder
        assert resolve_family(tmp_path / folder)[0].name == family
    # the fixture's own trine folders: a LoRA adapter, its merge (merge-lora), a layer-wise reranker
    for name in ("decoder-lora", "decoder-merged", "llm-reranker", "layerwise"):
        assert read_family_file(models[name])["model_family"] == FAMILY[name], name
