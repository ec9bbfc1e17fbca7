"""Hostile input and broken models, the file and model side: a model folder that loads but cannot give right
vectors (no tokenizer.json, NaN / Inf weights), outputs that overflow, corpus lines no tokenizer can encode,
and edited ``trine encode`` manifests. Each is refused with one line naming the file (exit code 2 on the
command line), and nothing is left written: no output folder, no database file."""

from __future__ import annotations

import json
import os
import re
import shutil

import pytest
import torch
from conftest import TEXTS, make_tiny_reranker, require
from safetensors.torch import load_file, save_file

from trine.cli import main
from trine.data.corpus import DatasetFormatError, read_corpus, read_queries
from trine.data.reader import DataError
from trine.errors import InputError, NonFiniteOutputError
from trine.inference import M3Embedder, load_encoded
from trine.modeling.loading import check_tokenizer_fits, load_tokenizer
from trine.modeling.trihead import TriHeadModel


def make_fast_m3(src: str, out: str, *, sparse_scale: float = 0.5, colbert_scale: float | None = None) -> str:
    """splade-tiny's 2-layer BERT with BGE-M3 head files written by plain torch (as test_encode_shards does)."""
    shutil.copytree(src, out)
    torch.manual_seed(0)
    colbert, sparse = torch.nn.Linear(128, 16), torch.nn.Linear(128, 1)
    torch.nn.init.normal_(sparse.weight, std=sparse_scale)
    if colbert_scale is not None:
        torch.nn.init.constant_(colbert.weight, colbert_scale)
    torch.save(colbert.state_dict(), os.path.join(out, "colbert_linear.pt"))
    torch.save(sparse.state_dict(), os.path.join(out, "sparse_linear.pt"))
    return out


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, splade_tiny_dir) -> str:
    return make_fast_m3(splade_tiny_dir, str(tmp_path_factory.mktemp("m3") / "model"))


def write_corpus(path, texts=TEXTS) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for i, text in enumerate(texts):
            f.write(json.dumps({"_id": f"d{i}", "title": "", "text": text}) + "\n")
    return str(path)


def one_line_error(capsys) -> str:
    """The one ``error: ...`` line of a refused command (beside transformers' loading progress bars), no traceback."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err and err.endswith(lines[0] + "\n"), err
    return lines[0]


def poison(folder: str, value: float) -> str:
    """Put ``value`` (NaN or Inf) into one backbone weight of ``folder``'s model.safetensors; its name."""
    file = os.path.join(folder, "model.safetensors")
    tensors = load_file(file)
    name = next(k for k in sorted(tensors) if k.endswith("query.weight"))
    tensors[name][0, 0] = value
    save_file(tensors, file, metadata={"format": "pt"})
    return name


# ------------------------------------------------------------------ a tokenizer that is not the model's
def test_folder_without_tokenizer_json_is_refused(tmp_path, model_dir, capsys):
    broken = str(tmp_path / "no_tokenizer")
    shutil.copytree(model_dir, broken)
    os.remove(os.path.join(broken, "tokenizer.json"))  # tokenizer_config.json remains: 5 special tokens
    with pytest.raises(InputError, match=re.escape(broken) + r": the tokenizer knows 5 tokens but the model's "
                                         r"embedding table has 30522 rows"):
        TriHeadModel.from_pretrained(broken)
    out = tmp_path / "out"
    corpus = write_corpus(tmp_path / "corpus.jsonl")
    assert main(["encode", broken, corpus, "--output-dir", str(out), "--no-progress"]) == 2
    assert "the tokenizer does not belong to this model" in one_line_error(capsys)
    assert not out.exists()


def test_bge_m3_layout_without_tokenizer_json_is_refused(tmp_path, tiny_m3_dir):
    assert TriHeadModel.from_pretrained(tiny_m3_dir).has_heads  # the XLM-R (BGE-M3) vocabulary fits its table
    broken = str(tmp_path / "no_tokenizer")
    shutil.copytree(tiny_m3_dir, broken)
    os.remove(os.path.join(broken, "tokenizer.json"))  # the slow XLM-R tokenizer it falls back to has 5 tokens
    with pytest.raises(InputError, match=r"no_tokenizer: the tokenizer knows 5 tokens but the model's embedding "
                                         r"table has 250002 rows"):
        M3Embedder(broken, show_progress=False)


def test_a_tokenizer_read_again_is_a_fresh_copy_and_an_edited_folder_is_read_anew(tmp_path, minilm_dir,
                                                                                   monkeypatch):
    from transformers import AutoTokenizer

    folder = str(tmp_path / "tok")
    shutil.copytree(minilm_dir, folder, ignore=shutil.ignore_patterns("*.safetensors", "*.bin", "*.onnx", "onnx"))
    reads = []
    real = AutoTokenizer.from_pretrained
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", lambda *a, **k: reads.append(a) or real(*a, **k))
    texts = ["Hello world, ünïcödé 你好", "a second, longer text to pad the first one against"]
    first = load_tokenizer(folder)
    first.padding_side = "left"  # a caller's change stays its own
    again = load_tokenizer(folder)
    assert len(reads) == 1  # read once
    assert again is not first and again.padding_side == "right"
    reference = AutoTokenizer.from_pretrained(folder)
    assert type(again) is type(reference) and again.name_or_path == reference.name_or_path
    assert again(texts, padding=True, truncation=True, max_length=12) == reference(texts, padding=True,
                                                                                   truncation=True, max_length=12)
    config = os.path.join(folder, "tokenizer_config.json")
    with open(config, encoding="utf-8") as f:
        edited = dict(json.load(f), model_max_length=64)
    with open(config, "w", encoding="utf-8") as f:
        json.dump(edited, f)
    os.utime(config, ns=(os.stat(config).st_atime_ns, os.stat(config).st_mtime_ns + 10**9))
    assert load_tokenizer(folder).model_max_length == 64 and len(reads) == 3  # the reference, then the edit
    shutil.rmtree(folder)
    with pytest.raises(InputError, match=re.escape(folder)):
        load_tokenizer(folder)  # a folder gone is not served from memory


class _Table(torch.nn.Module):
    def __init__(self, rows: int):
        super().__init__()
        self.embed = torch.nn.Embedding(rows, 2)

    def get_input_embeddings(self) -> torch.nn.Embedding:
        return self.embed


def test_padded_tables_fit_and_ids_beyond_the_table_do_not(splade_tiny_dir, minilm_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(splade_tiny_dir)  # 30,522 tokens
    check_tokenizer_fits("m", tok, _Table(30522))
    check_tokenizer_fits("m", tok, _Table(30522 + 250))  # a table padded for speed, as decoder LLMs have
    check_tokenizer_fits("m", tok, _Table(40000))
    with pytest.raises(InputError, match=r"m: the tokenizer gives token ids up to 30521 but the model's embedding "
                                         r"table has 30000 rows"):
        check_tokenizer_fits("m", tok, _Table(30000))
    with pytest.raises(InputError, match=r"knows 30522 tokens but the model's embedding table has 250002 rows"):
        check_tokenizer_fits("m", tok, _Table(250002))
    TriHeadModel.from_pretrained(minilm_dir, with_heads=False)  # a real model keeps loading


# ------------------------------------------------------------------ non-finite weights
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_backbone_weights_are_refused_and_nothing_is_written(tmp_path, model_dir, capsys, value):
    broken = str(tmp_path / "broken")
    shutil.copytree(model_dir, broken)
    name = poison(broken, value)
    corpus = write_corpus(tmp_path / "corpus.jsonl")
    out = tmp_path / "out"
    assert main(["encode", broken, corpus, "--output-dir", str(out), "--no-progress"]) == 2
    err = one_line_error(capsys)
    assert f"{os.path.join(broken, 'model.safetensors')}: weight " in err and "1 of 16384 values are NaN or " \
        "infinite" in err, err
    assert name.removeprefix("bert.") in err
    assert not out.exists()
    require("pymilvus")
    db = tmp_path / "milvus.db"
    assert main(["index", "build", "--backend", "milvus", "--uri", str(db), "--model", broken, "--corpus", corpus,
                 "--quiet"]) == 2
    assert "NaN or infinite" in one_line_error(capsys)
    assert sorted(os.listdir(tmp_path)) == ["broken", "corpus.jsonl"]


def test_non_finite_head_file_is_refused(tmp_path, model_dir):
    broken = str(tmp_path / "broken")
    shutil.copytree(model_dir, broken)
    file = os.path.join(broken, "colbert_linear.pt")
    state = torch.load(file, weights_only=True)
    state["bias"][3] = float("-inf")
    torch.save(state, file)
    with pytest.raises(InputError, match=re.escape(file) + r": weight 'bias': 1 of 16 values are NaN or infinite"):
        M3Embedder(broken, show_progress=False)


def test_every_family_loader_refuses_non_finite_weights(tmp_path, splade_tiny_dir):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from trine.inference import Reranker
    from trine.modeling.cross_encoder import CrossEncoder
    from trine.modeling.decoder import DecoderEmbedder
    from trine.modeling.layerwise_reranker import LayerwiseReranker
    from trine.modeling.llm_reranker import LLMReranker

    cross = make_tiny_reranker(str(tmp_path / "cross"), splade_tiny_dir, "bert")
    poison(cross, float("nan"))
    with pytest.raises(InputError, match=r"cross/model.safetensors: weight 'bert\.encoder\.layer\.0\.attention\."
                                         r"self\.query\.weight': 1 of 1024 values are NaN"):
        CrossEncoder.from_pretrained(cross)
    with pytest.raises(InputError, match="NaN or infinite"):
        Reranker(cross)
    # a tiny causal LM (the decoder embedder, LLM and layer-wise rerankers load one)
    decoder = str(tmp_path / "decoder")
    tok = AutoTokenizer.from_pretrained(splade_tiny_dir)
    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=64, max_position_embeddings=128))
    with torch.no_grad():
        lm.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    lm.save_pretrained(decoder)
    tok.save_pretrained(decoder)
    for load in (DecoderEmbedder.from_pretrained, LLMReranker.from_pretrained, LayerwiseReranker.from_pretrained):
        with pytest.raises(InputError, match=r"decoder/model.safetensors: weight '(model\.)?layers\.1\.mlp\.down_proj"
                                             r"\.weight': 1 of 2048 values are NaN or infinite"):
            load(decoder)


# ------------------------------------------------------------------ finite weights, non-finite outputs
def refusal_crosses_the_device_pool(embedder: M3Embedder, output: str) -> None:
    """Over several devices a worker process encodes: its refusal must reach the caller as the same error (exit
    code 2), not as a worker's traceback in a RuntimeError. Both ends of the queue, without spawning processes."""
    import pickle
    import queue

    from trine.inference.pool import DevicePool, _worker

    tasks, results = queue.Queue(), queue.Queue()
    tasks.put((0, "_encode_chunk", list(TEXTS), {"max_length": 64, "batch_size": 4, "return_dense": True,
                                                   "return_sparse": output == "sparse", "return_colbert_vecs": False}))
    tasks.put(None)
    _worker(embedder, "cpu", tasks, results)
    chunk_id, ok, err = results.get_nowait()
    assert (chunk_id, ok, type(err)) == (0, False, NonFiniteOutputError)
    err = pickle.loads(pickle.dumps(err))  # what a multiprocessing queue does to it
    pool = object.__new__(DevicePool)
    pool.devices, pool.processes, pool.tasks, pool.results = ["cpu", "cpu"], [], queue.Queue(), queue.Queue()
    pool.results.put((0, False, err))
    with pytest.raises(NonFiniteOutputError, match="NaN or infinite lexical weights"):
        pool.map("_encode_chunk", ["a text"])


@pytest.mark.parametrize(("output", "what"), [("sparse", "lexical weights"), ("colbert", "colbert_vecs")])
def test_overflowing_outputs_are_never_written(tmp_path, splade_tiny_dir, capsys, output, what):
    # finite weights whose products overflow float32: what float16 does to a model with large activations
    big = make_fast_m3(splade_tiny_dir, str(tmp_path / "big"), sparse_scale=1e38 if output == "sparse" else 0.5,
                       colbert_scale=1e38 if output == "colbert" else None)
    embedder = M3Embedder(big, show_progress=False)
    with pytest.raises(NonFiniteOutputError, match=rf"big: the model gave NaN or infinite {what} \(float32\) for "
                                                   rf"\d+ of \d+ texts of a batch, the first '"):
        embedder.encode_result(TEXTS, ("dense", output))
    assert embedder.encode_result(TEXTS, ("dense",)).dense_vecs.shape == (len(TEXTS), 128)  # dense is finite
    if output == "sparse":
        refusal_crosses_the_device_pool(embedder, output)
    corpus = write_corpus(tmp_path / "corpus.jsonl")
    out = tmp_path / "out"
    assert main(["encode", big, corpus, "--output-dir", str(out), "--outputs", f"dense,{output}", "--num-shards",
                 "2", "--no-progress"]) == 2
    assert f"NaN or infinite {what}" in one_line_error(capsys)
    assert not out.exists()
    trine_dir = tmp_path / "index"
    assert main(["index", "build", "--model", big, "--corpus", corpus, "--uri", str(trine_dir), "--quiet"]) == 2
    one_line_error(capsys)
    require("pymilvus")
    db = tmp_path / "milvus.db"
    assert main(["index", "build", "--backend", "milvus", "--uri", str(db), "--model", big, "--corpus", corpus,
                 "--quiet", "--chunk-size", "2"]) == 2
    one_line_error(capsys)
    assert sorted(os.listdir(tmp_path)) == ["big", "corpus.jsonl"]


def test_overflowing_reranker_scores_are_refused(tmp_path, splade_tiny_dir):
    from trine.inference import Reranker

    folder = make_tiny_reranker(str(tmp_path / "cross"), splade_tiny_dir, "bert")
    file = os.path.join(folder, "model.safetensors")
    tensors = load_file(file)
    tensors["classifier.weight"].fill_(3e38)  # finite, but the score overflows float32
    save_file(tensors, file, metadata={"format": "pt"})
    reranker = Reranker(folder, show_progress=False)
    with pytest.raises(NonFiniteOutputError, match=r"cross: the reranker gave a NaN or infinite score \(float32\) "
                                                   r"for 2 of 2 pairs, the first pair 0"):
        reranker.compute_score([("q", TEXTS[0]), ("q", TEXTS[1])], normalize=True)


# ------------------------------------------------------------------ texts no tokenizer can encode
BAD_LINES = [('{"_id": "1", "text": "\\ud800"}', r"field 'text': lone surrogate U\+D800 at character 1"),
             ('{"_id": "1", "text": "ok", "title": "a\\udfffb"}',
              r"field 'title': lone surrogate U\+DFFF at character 2"),
             ('{"_id": "1", "text": ""}', r"field 'text': empty text"),
             ('{"_id": "1", "text": " \\t\\n"}', r"field 'text': only white space")]


@pytest.mark.parametrize(("line", "message"), BAD_LINES)
def test_bad_corpus_lines_are_refused_with_nothing_written(tmp_path, model_dir, capsys, line, message):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"_id": "0", "text": "a good passage"}\n' + line + "\n", encoding="utf-8")
    out = tmp_path / "out"
    assert main(["encode", model_dir, str(corpus), "--output-dir", str(out), "--no-progress"]) == 2
    assert re.search(re.escape(str(corpus)) + r":2: " + message, one_line_error(capsys))
    assert main(["index", "build", "--model", model_dir, "--corpus", str(corpus), "--uri", str(out)]) == 2
    assert re.search(r"corpus.jsonl:2: " + message, one_line_error(capsys))
    assert sorted(os.listdir(tmp_path)) == ["corpus.jsonl"]


def test_titles_carry_blank_texts_and_queries_follow_the_rule(tmp_path):
    from trine.curation.generate import read_passages

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"_id": "0", "title": "ls", "text": ""}\n{"_id": "1", "title": " ", "text": "x"}\n')
    assert read_corpus(str(corpus), "_id") == {"0": {"title": "ls", "text": ""}, "1": {"title": " ", "text": "x"}}
    queries = tmp_path / "queries.jsonl"
    queries.write_text('{"_id": "q0", "text": "fine"}\n{"_id": "q1", "text": "\\ud83d"}\n')
    with pytest.raises(DatasetFormatError, match=r"queries.jsonl:2: field 'text': lone surrogate U\+D83D"):
        read_queries(str(queries), "_id")
    passages = tmp_path / "passages.jsonl"
    passages.write_text('{"text": "fine", "title": "\\udc00"}\n')
    with pytest.raises(DataError, match=r"passages.jsonl:1: title: lone surrogate U\+DC00"):
        read_passages(str(passages))


# ------------------------------------------------------------------ edited manifests
def test_an_edited_manifest_is_refused_where_it_is_read(tmp_path, model_dir, capsys):
    corpus = write_corpus(tmp_path / "corpus.jsonl")
    out = tmp_path / "enc"
    assert main(["encode", model_dir, corpus, "--output-dir", str(out), "--num-shards", "2", "--no-progress"]) == 0
    capsys.readouterr()
    manifest_file = out / "manifest.json"
    original = manifest_file.read_text()
    manifest = json.loads(original)
    manifest["identity"]["settings"]["max_length"] = 16  # claims another encoding, key left as it was
    manifest_file.write_text(json.dumps(manifest))
    index = tmp_path / "index"
    assert main(["index", "build", "--model", model_dir, "--corpus", corpus, "--embeddings", str(out), "--uri",
                 str(index), "--quiet"]) == 2
    assert f"{manifest_file}: key: does not match the manifest's identity" in one_line_error(capsys)
    assert not index.exists()
    manifest = json.loads(original)
    manifest["key"] = "0" * 64  # a key no shard carries
    manifest_file.write_text(json.dumps(manifest))
    with pytest.raises(InputError, match=re.escape(str(manifest_file)) + ": key: does not match"):
        load_encoded(out)
    assert main(["encode", model_dir, corpus, "--output-dir", str(out), "--num-shards", "2", "--no-progress"]) == 2
    assert "key: does not match the manifest's identity" in one_line_error(capsys)
    manifest_file.write_text(original)
    assert len(load_encoded(out).ids) == len(TEXTS)
