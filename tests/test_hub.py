"""Hugging Face Hub ids as model references, offline: a Hub cache laid out as huggingface_hub lays it out
(``models--org--name/{blobs,snapshots/<commit>,refs}``, checked with huggingface_hub's own ``scan_cache_dir``)
holding tiny models; every Python face and every command given ``org/name`` gives what it gives for the local
folder; revisions; a missing id and a bad path fail in one line, the path never reaching the Hub."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TEXTS, make_tiny_m3, make_tiny_reranker
from safetensors.torch import load_file
from test_decoder_embedder import make_tiny_decoder, smol_tokenizer_dir  # noqa: F401 (the session fixture)
from test_evaluation import make_beir
from test_finetune import PAGES, write_data

from trine import Embedder, M3Embedder, Reranker
from trine.cli import main
from trine.errors import MissingInputError, OptionError
from trine.modeling.loading import HUB_IGNORE, HUB_PATTERNS, is_hub_id, resolve_model

M3, DENSE, DECODER, RERANKER, LLM = ("BAAI/tiny-m3", "sentence-transformers/tiny-dense", "org/tiny-decoder",
                                    "org/tiny-reranker", "org/tiny-llm")


# ------------------------------------------------------------------------------ the offline Hub cache
def publish(cache: Path, repo_id: str, folder: str, *, ref: str = "main") -> str:
    """``folder`` as one commit of ``repo_id`` in the cache: each file a blob named by its hash, the snapshot
    relative links to the blobs, ``refs/<ref>`` the commit; returns the commit."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    files = sorted(p for p in Path(folder).rglob("*") if p.is_file())
    digest = hashlib.sha1()
    for f in files:
        digest.update(str(f.relative_to(folder)).encode() + hashlib.sha256(f.read_bytes()).digest())
    commit = digest.hexdigest()
    for f in files:
        data = f.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        if not blob.exists():
            blob.write_bytes(data)
        link = repo / "snapshots" / commit / f.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(blob, link.parent), link)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / ref).write_text(commit)
    return commit


def make_dense_st(out: str, tokenizer_dir: str) -> str:
    """A tiny BERT with sentence-transformers' files (mean pooling in 1_Pooling), written without trine."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(4)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    BertModel(BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64), add_pooling_layer=False).save_pretrained(out)
    tok.save_pretrained(out)
    os.makedirs(os.path.join(out, "1_Pooling"))
    with open(os.path.join(out, "1_Pooling", "config.json"), "w") as f:
        json.dump({"word_embedding_dimension": 32, "pooling_mode_cls_token": False,
                   "pooling_mode_mean_tokens": True}, f)
    with open(os.path.join(out, "modules.json"), "w") as f:
        json.dump([{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                   {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}], f)
    return out


def make_tiny_llm(out: str, tokenizer_dir: str) -> str:
    """A random causal LM of 8 tiny layers (the layer-wise reranker scores from layer 8 by default)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(5)
    AutoModelForCausalLM.from_config(LlamaConfig(
        vocab_size=len(tok), hidden_size=16, num_hidden_layers=8, num_attention_heads=2, num_key_value_heads=1,
        intermediate_size=32, max_position_embeddings=256, initializer_range=0.2)).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def hub(tmp_path_factory, xlmr_tokenizer_dir, splade_tiny_dir, smol_tokenizer_dir):  # noqa: F811
    """Local folders and the cache holding them: ``home/hub`` (HF_HOME=home's default cache)."""
    root = tmp_path_factory.mktemp("hub")
    cache = root / "home" / "hub"

    def local(name: str) -> str:
        os.makedirs(root / name)
        return str(root / name)

    m3 = make_tiny_m3(local("m3"), xlmr_tokenizer_dir)
    with open(os.path.join(m3, "fusion.json"), "w") as f:  # trine's own file: eval reads its weights
        json.dump({"normalization": "minmax", "weights": {"sparse+dense": [1.0, 0.7]}}, f)
    m3_v1 = make_tiny_m3(local("m3_v1"), xlmr_tokenizer_dir, seed=1)
    folders = {M3: m3, DENSE: make_dense_st(local("dense"), splade_tiny_dir),
               DECODER: make_tiny_decoder(local("decoder"), smol_tokenizer_dir, "qwen2"),
               RERANKER: make_tiny_reranker(local("reranker"), xlmr_tokenizer_dir, "xlmr", seed=3),
               LLM: make_tiny_llm(local("llm"), smol_tokenizer_dir)}
    v1 = publish(cache, M3, m3_v1, ref="v1")  # an older commit, tagged v1
    commits = {repo: publish(cache, repo, folder) for repo, folder in folders.items()}
    return {"root": root, "cache": cache, "local": folders, "m3_v1": m3_v1, "v1": v1, "commits": commits}


@pytest.fixture(autouse=True)
def offline(hub, monkeypatch):
    """HF_HUB_OFFLINE=1 and HF_HUB_CACHE at the test cache, for this process (huggingface_hub reads the
    variables once, at import, into its constants: those are set too)."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(hub["cache"]))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub["cache"]))


def test_the_cache_is_laid_out_as_huggingface_hub_reads_it(hub):
    from huggingface_hub import scan_cache_dir, try_to_load_from_cache

    info = scan_cache_dir(hub["cache"])
    assert not info.warnings
    repos = {r.repo_id: r for r in info.repos}
    assert set(repos) == {M3, DENSE, DECODER, RERANKER, LLM}
    assert {rev.commit_hash: set(rev.refs) for rev in repos[M3].revisions} == \
        {hub["v1"]: {"v1"}, hub["commits"][M3]: {"main"}}
    cached = try_to_load_from_cache(M3, "colbert_linear.pt", cache_dir=hub["cache"])
    assert open(cached, "rb").read() == open(os.path.join(hub["local"][M3], "colbert_linear.pt"), "rb").read()


# ------------------------------------------------------------------------------ the resolver
def test_references_resolve_to_the_snapshot(hub):
    snapshot = str(hub["cache"] / f"models--{M3.replace('/', '--')}" / "snapshots" / hub["commits"][M3])
    assert resolve_model(M3) == snapshot
    assert resolve_model(hub["local"][M3]) == hub["local"][M3]  # a folder as it is
    old = resolve_model(M3, revision="v1")
    assert old.endswith(hub["v1"]) and resolve_model(f"{M3}@v1") == old == resolve_model(M3, revision=hub["v1"])
    assert resolve_model(f"{M3}@v1", revision="v1") == old
    with pytest.raises(OptionError, match="the revision is given twice"):
        resolve_model(f"{M3}@v1", revision="main")
    with pytest.raises(OptionError, match="is a local folder"):
        resolve_model(hub["local"][M3], revision="v1")
    with pytest.raises(MissingInputError, match=f"{M3}@v9: model: no such folder, nor in the Hugging Face cache"):
        resolve_model(M3, revision="v9")


def test_cache_dir_argument_and_hf_home(hub, tmp_path):
    other = tmp_path / "other"
    publish(other, "org/elsewhere", hub["local"][DENSE])
    with pytest.raises(MissingInputError, match="org/elsewhere: model: no such folder, nor in the Hugging Face cache"):
        resolve_model("org/elsewhere")
    assert resolve_model("org/elsewhere", cache_dir=other).startswith(str(other))
    # the variables as huggingface_hub reads them, in a fresh process: HF_HOME alone finds HF_HOME/hub
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HOME=str(hub["root"] / "home"), HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, "-c", f"from trine.modeling.loading import resolve_model; "
                          f"print(resolve_model({M3!r}))"], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == resolve_model(M3)


@pytest.mark.parametrize("reference", ["./mdl", "../mdl", "/tmp/trine-no-such-model", "~/mdl", "a/b/c",
                                       "C:\\models\\m", "bad name", "org/"])
def test_a_bad_path_names_it_and_never_reaches_the_hub(reference, monkeypatch):
    import huggingface_hub

    def no_hub(*args, **kwargs):
        raise AssertionError(f"sent to the Hub: {args}")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_hub)
    assert not is_hub_id(reference)
    with pytest.raises(MissingInputError) as err:
        resolve_model(reference)
    assert str(err.value) == f"{reference}: no such model folder (model; not a Hugging Face Hub id either: org/name)"
    with pytest.raises(MissingInputError, match="no such model folder"):
        M3Embedder(reference)


def test_a_missing_id_is_one_line_with_the_download_command(capsys, tmp_path):
    with pytest.raises(MissingInputError) as err:
        Reranker("org/not-cached")
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("org/not-cached: reranker: no such folder, nor in the Hugging Face cache")
    assert "(HF_HUB_OFFLINE is set)" in message and message.endswith("hf download org/not-cached")
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(json.dumps({"_id": "d", "text": "a passage"}) + "\n")
    assert main(["encode", "org/not-cached@v2", str(corpus), "--output-dir", str(tmp_path / "enc")]) == 2
    err_text = capsys.readouterr().err
    assert err_text.count("\n") == 1 and "hf download org/not-cached --revision v2" in err_text
    assert not (tmp_path / "enc").exists()


def test_the_installed_hub_cli_is_the_one_named():
    """The download command the errors name is huggingface_hub's own (``hf``, installed with it)."""
    from trine.modeling.loading import DOWNLOAD_COMMAND

    hf = Path(sys.executable).parent / DOWNLOAD_COMMAND.split()[0]
    out = subprocess.run([str(hf), "download", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--revision" in out.stdout and "--cache-dir" in out.stdout


# ------------------------------------------------------------------------------ what a download fetches
BGE_M3_FILES = [  # BAAI/bge-m3's repository (weights as .bin only, an ONNX copy, images)
    ".gitattributes", "1_Pooling/config.json", "README.md", "colbert_linear.pt", "config.json",
    "config_sentence_transformers.json", "imgs/bm25.jpg", "imgs/others.webp", "long.jpg", "modules.json",
    "onnx/Constant_7_attr__value", "onnx/config.json", "onnx/model.onnx", "onnx/model.onnx_data",
    "onnx/sentencepiece.bpe.model", "onnx/special_tokens_map.json", "onnx/tokenizer.json",
    "onnx/tokenizer_config.json", "pytorch_model.bin", "sentence_bert_config.json", "sentencepiece.bpe.model",
    "sparse_linear.pt", "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json",
]
MINILM_FILES = [  # sentence-transformers/all-MiniLM-L6-v2's (safetensors beside .bin, TF, Rust, ONNX, OpenVINO)
    ".gitattributes", "1_Pooling/config.json", "README.md", "config.json", "config_sentence_transformers.json",
    "data_config.json", "model.safetensors", "modules.json", "onnx/model.onnx", "onnx/model_qint8_avx512.onnx",
    "openvino/openvino_model.bin", "openvino/openvino_model.xml", "pytorch_model.bin", "rust_model.ot",
    "sentence_bert_config.json", "special_tokens_map.json", "tf_model.h5", "tokenizer.json", "tokenizer_config.json",
    "train_script.py", "vocab.txt",
]
TRINE_FILES = [  # what trine writes: a LoRA reranker run's adapter folder, a layer-wise reranker, fusion weights
    "adapter_config.json", "adapter_model.safetensors", "trine_reranker.json", "fusion.json", "tokenizer.json",
    "tokenizer_config.json", "chat_template.jinja", "layerwise_heads.safetensors", "retromae_decoder.safetensors",
    "training_args.bin", "checkpoint-500/model.safetensors", "checkpoint-500/optimizer.pt", "runs/events.out",
    "2_Dense/config.json", "2_Dense/model.safetensors", "tokenizer.model", "merges.txt", "vocab.json",
]


@pytest.mark.parametrize(("listing", "expected"), [
    (BGE_M3_FILES, {"1_Pooling/config.json", "README.md", "colbert_linear.pt", "config.json",
                    "config_sentence_transformers.json", "modules.json", "pytorch_model.bin",
                    "sentence_bert_config.json", "sentencepiece.bpe.model", "sparse_linear.pt",
                    "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"}),
    (MINILM_FILES, {"1_Pooling/config.json", "README.md", "config.json", "config_sentence_transformers.json",
                    "data_config.json", "model.safetensors", "modules.json", "sentence_bert_config.json",
                    "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json", "train_script.py",
                    "vocab.txt"}),
    (TRINE_FILES, set(TRINE_FILES) - {"training_args.bin", "checkpoint-500/model.safetensors",
                                      "checkpoint-500/optimizer.pt", "runs/events.out"}),
], ids=["bge-m3", "all-MiniLM-L6-v2", "trine-outputs"])
def test_a_download_fetches_what_trine_reads_and_no_duplicates(listing, expected, tmp_path, monkeypatch):
    """snapshot_download stood in for by huggingface_hub's own pattern filter over a repository's listing:
    safetensors weights when there are some, else the .bin; never ONNX / OpenVINO / TF / Rust copies."""
    import huggingface_hub
    from huggingface_hub.utils import filter_repo_objects

    calls = []

    def fake(repo_id, *, allow_patterns, ignore_patterns, **kwargs):
        calls.append(kwargs["revision"])
        folder = tmp_path / "snap"
        for name in filter_repo_objects(listing, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns):
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_text("x")
        return str(folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    folder = resolve_model("org/some-model", revision="r1")
    got = {str(p.relative_to(folder)) for p in Path(folder).rglob("*") if p.is_file()}
    assert got == expected
    assert calls == (["r1", "r1"] if "pytorch_model.bin" in expected else ["r1"])
    assert all(isinstance(p, str) for p in (*HUB_PATTERNS, *HUB_IGNORE))


def test_a_gguf_file_is_fetched_when_named(tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub.utils import filter_repo_objects

    listing = ["config.json", "tokenizer.json", "model.Q4_1.gguf", "model.Q8_0.gguf"]
    seen = []

    def fake(repo_id, *, allow_patterns, ignore_patterns, **kwargs):
        seen.extend(filter_repo_objects(listing, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns))
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    resolve_model("org/gguf", extra_files=["model.Q4_1.gguf"])
    assert seen == ["config.json", "tokenizer.json", "model.Q4_1.gguf"]


# ------------------------------------------------------------------------------ the Python faces
def _same_encodings(a, b):
    assert set(a) == set(b)
    for key in a:
        if key == "dense_vecs":
            np.testing.assert_array_equal(a[key], b[key])
        elif key == "lexical_weights" or a[key] is None:
            assert a[key] == b[key]
        else:
            for x, y in zip(a[key], b[key]):
                np.testing.assert_array_equal(x, y)


FACES = {
    "M3Embedder": lambda ref, **kw: M3Embedder(ref, devices="cpu", show_progress=False, **kw).encode(
        TEXTS[:4], return_sparse=True, return_colbert_vecs=True),
    "Embedder": lambda ref, **kw: {"dense_vecs": Embedder(ref, devices="cpu", show_progress=False, **kw)
                                   .encode(TEXTS[:4])},
    "Embedder-decoder": lambda ref, **kw: {"dense_vecs": Embedder(ref, model_family="decoder", devices="cpu",
                                                                  show_progress=False, **kw).encode(TEXTS[:4])},
    "Reranker": lambda ref, **kw: {"dense_vecs": np.array(Reranker(ref, devices="cpu", show_progress=False, **kw)
                                                          .compute_score([(p[0], p[1]) for p in PAGES[:4]]))},
    "Reranker-llm": lambda ref, **kw: {"dense_vecs": np.array(Reranker(ref, devices="cpu", show_progress=False, **kw)
                                                              .compute_score([(p[0], p[1]) for p in PAGES[:3]]))},
    "Reranker-layerwise": lambda ref, **kw: {"dense_vecs": np.array(Reranker(
        ref, model_family="llm-reranker-layerwise", devices="cpu", show_progress=False, **kw)
        .compute_score([(p[0], p[1]) for p in PAGES[:3]]))},
}
FACE_MODELS = {"M3Embedder": M3, "Embedder": DENSE, "Embedder-decoder": DECODER, "Reranker": RERANKER,
               "Reranker-llm": LLM, "Reranker-layerwise": LLM}


@pytest.mark.parametrize("face", list(FACES))
def test_every_face_gives_the_local_folders_outputs(face, hub):
    repo = FACE_MODELS[face]
    _same_encodings(FACES[face](repo), FACES[face](hub["local"][repo]))


def test_a_revision_loads_that_commit(hub):
    old = FACES["M3Embedder"](hub["m3_v1"])
    _same_encodings(FACES["M3Embedder"](f"{M3}@v1"), old)
    _same_encodings(FACES["M3Embedder"](M3, revision="v1"), old)
    _same_encodings(FACES["M3Embedder"](M3, revision=hub["v1"], cache_dir=hub["cache"]), old)
    assert not np.array_equal(FACES["M3Embedder"](M3)["dense_vecs"], old["dense_vecs"])


def test_from_pretrained_of_every_family_takes_an_id(hub):
    from trine.modeling.cross_encoder import CrossEncoder
    from trine.modeling.decoder import DecoderEmbedder
    from trine.modeling.layerwise_reranker import LayerwiseReranker
    from trine.modeling.llm_reranker import LLMReranker
    from trine.modeling.trihead import TriHeadModel

    for cls, repo in ((TriHeadModel, M3), (CrossEncoder, RERANKER), (DecoderEmbedder, DECODER), (LLMReranker, LLM),
                      (LayerwiseReranker, LLM)):
        got, want = cls.from_pretrained(repo).state_dict(), cls.from_pretrained(hub["local"][repo]).state_dict()
        assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want), cls.__name__
    old = TriHeadModel.from_pretrained(M3, revision="v1", cache_dir=hub["cache"]).colbert_linear.weight
    assert torch.equal(old, TriHeadModel.from_pretrained(hub["m3_v1"]).colbert_linear.weight)


def test_query_generator_takes_an_id(hub):
    from trine.curation.generate import QueryGenerator

    a, b = QueryGenerator(LLM, devices="cpu"), QueryGenerator(hub["local"][LLM], devices="cpu")
    assert all(torch.equal(x, y) for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values()))


def test_training_arguments_resolve_an_id(hub, tmp_path):
    """finetune, finetune-reranker and pretrain: --model_name_or_path org/name with FlagEmbedding's --cache_dir,
    and --revision, fetched when a run starts (parsing reads no model); the reference is kept for the card."""
    from trine.training.finetune import parse_args
    from trine.training.pretrain import parse_args as pretrain_args
    from trine.training.reranker import parse_reranker_args as reranker_args

    data = write_data(tmp_path / "train.jsonl")
    common = ["--train_data", data, "--output_dir", str(tmp_path / "out"), "--use_cpu", "true"]
    runs = [(parse_args(["--model_name_or_path", M3, "--cache_dir", str(hub["cache"]), "--revision", "v1",
                         *common])[0], M3, resolve_model(M3, revision="v1")),
            (reranker_args(["--model_name_or_path", RERANKER, *common])[0], RERANKER, resolve_model(RERANKER)),
            (pretrain_args(["--model_name_or_path", f"{M3}@v1", *common])[0], f"{M3}@v1", resolve_model(f"{M3}@v1"))]
    for model_args, reference, folder in runs:
        assert model_args.model_name_or_path == reference  # parsed, not yet fetched
        model_args.resolve_model_reference()
        model_args.resolve_model_reference()  # once only
        assert (model_args.model_name_or_path, model_args.model_reference) == (folder, reference)
    assert main(["finetune", "--model_name_or_path", "org/absent", *common]) == 2
    assert not (tmp_path / "out").exists()


def test_finetune_from_an_id_trains_as_from_the_folder(hub, tmp_path):
    from test_finetune import common_args

    data = write_data(tmp_path / "train.jsonl")
    outs = []
    for name, ref in (("local", hub["local"][DENSE]), ("hub", DENSE)):
        argv = common_args(ref, data, tmp_path / name, max_steps=2, save_steps=10)
        assert main(["finetune", *argv]) == 0
        outs.append(load_file(str(tmp_path / name / "model.safetensors")))
    assert set(outs[0]) == set(outs[1]) and all(torch.equal(outs[0][k], outs[1][k]) for k in outs[0])
    card = (tmp_path / "hub" / "README.md").read_text()
    assert DENSE in card and hub["commits"][DENSE] not in card


# ------------------------------------------------------------------------------ every command
def _files(folder: Path, skip: tuple[str, ...] = ()) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and not any(s in str(p.relative_to(folder)) for s in skip)}


def _tensors(folder: Path) -> dict[str, bytes]:
    """The weights of every safetensors file under ``folder`` (none a pooler's: the tiny checkpoints have none,
    and a random one started at load must not be written)."""
    tensors = {f"{p.relative_to(folder)}:{k}": v.numpy().tobytes() for p in sorted(folder.rglob("*.safetensors"))
               for k, v in load_file(str(p)).items()}
    assert not [k for k in tensors if ":pooler." in k]
    return tensors


def _jsonl(path: Path) -> list:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    data = make_beir(root / "beir")
    (data / "qrels" / "dev.tsv").write_text((data / "qrels" / "test.tsv").read_text())
    pairs = root / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"query": q, "pos": [d], "neg": [PAGES[(i + 1) % 8][1], PAGES[(i + 2) % 8][1]]})
                             + "\n" for i, (q, d) in enumerate(PAGES[:8])))
    passages = root / "passages.jsonl"
    passages.write_text("".join(json.dumps({"_id": str(i), "text": d}) + "\n" for i, (_, d) in enumerate(PAGES[:4])))
    return {"beir": str(data), "corpus": str(data / "corpus.jsonl"), "pairs": str(pairs), "passages": str(passages)}


def _model(hub, repo, as_id):
    return repo if as_id else hub["local"][repo]


# each: (argv for model references m(repo) and an output folder, what to compare from that folder and stdout)
COMMANDS = {
    "encode": (lambda m, out, i: ["encode", m(M3), i["corpus"], "--output-dir", str(out / "enc"),
                                  "--outputs", "dense,sparse,colbert", "--no-progress"],
               lambda out, stdout: _files(out / "enc", skip=("manifest", ".trine-output"))),
    "export": (lambda m, out, i: ["export", m(M3), str(out / "st"), "--to", "sentence-transformers"],
               lambda out, stdout: _tensors(out / "st")),
    "eval": (lambda m, out, i: ["eval", "--data", i["beir"], "--model", m(M3), "--modes", "dense,sparse+dense",
                                "--k", "1,3", "--top-k", "3", "--quiet", "--reranker", m(RERANKER),
                                "--out", str(out / "report")],
             lambda out, stdout: [(json.dumps(e["metrics"], sort_keys=True), e.get("fusion")) for e in json.loads(
                 next((out / "report").glob("*.json")).read_text())["models"].values()]),
    "index": (lambda m, out, i: ["index", "build", "--model", m(M3), "--corpus", i["corpus"], "--uri",
                                 str(out / "idx"), "--quiet"],
              lambda out, stdout: sorted(_files(out / "idx", skip=(".json",)))),
    "index-search": (lambda m, out, i: ["index", "search", "--model", m(M3), "--uri", i["index"], "--query",
                                        "first text", "--mode", "sparse+dense", "--k", "3", "--quiet"],
                     lambda out, stdout: stdout),
    "mine": (lambda m, out, i: ["mine", "--input_file", i["pairs"], "--output_file", str(out / "mined.jsonl"),
                                "--model_name_or_path", m(M3), "--range_for_sampling", "1-6", "--negative_number",
                                "2", "--quiet"],
             lambda out, stdout: _jsonl(out / "mined.jsonl")),
    "score": (lambda m, out, i: ["score", "--input_file", i["pairs"], "--output_file", str(out / "scored.jsonl"),
                                 "--reranker", m(RERANKER), "--quiet"],
              lambda out, stdout: _jsonl(out / "scored.jsonl")),
    "filter": (lambda m, out, i: ["filter", "--input_file", i["pairs"], "--output_file", str(out / "kept.jsonl"),
                                  "--model_name_or_path", m(DENSE), "--min_score", "0.2", "--quiet"],
               lambda out, stdout: _jsonl(out / "kept.jsonl")),
    "generate-queries": (lambda m, out, i: ["generate-queries", "--model", m(LLM), "--input_file", i["passages"],
                                            "--output_file", str(out / "gen.jsonl"), "--num_queries", "1",
                                            "--temperature", "0", "--max_new_tokens", "6", "--copy_threshold", "2",
                                            "--quiet"],
                         lambda out, stdout: [dict(r, generator=dict(r["generator"], model=None))
                                              for r in _jsonl(out / "gen.jsonl")]),
    "split-by-length": (lambda m, out, i: ["split-by-length", "--input_path", i["pairs"], "--output_dir",
                                           str(out / "split"), "--model_name_or_path", m(DENSE), "--length_list",
                                           "0", "20"],
                        lambda out, stdout: _files(out / "split", skip=(".trine-output",))),
}


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_command_gives_for_an_id_what_it_gives_for_the_folder(command, hub, inputs, tmp_path, capsys):
    argv, outcome = COMMANDS[command]
    if command == "index-search":
        inputs = dict(inputs, index=str(tmp_path / "built"))
        assert main(["index", "build", "--model", hub["local"][M3], "--corpus", inputs["corpus"], "--uri",
                     inputs["index"], "--quiet"]) == 0
    results = []
    for as_id in (False, True):
        out = tmp_path / ("hub" if as_id else "local")
        out.mkdir()
        capsys.readouterr()
        code = main(argv(lambda repo, as_id=as_id: _model(hub, repo, as_id), out, inputs))
        captured = capsys.readouterr()
        assert code == 0, captured.err
        results.append(outcome(out, captured.out))
    assert results[0] and results[0] == results[1]


def test_serve_loads_ids_and_names_the_model_by_its_id(hub, monkeypatch):
    import trine.serving

    made = []
    monkeypatch.setattr(trine.serving, "create_app", lambda *args, **kwargs: made.append(args) or "app")
    monkeypatch.setattr(trine.serving, "run_server", lambda *args, **kwargs: None)
    for model, reranker in ((hub["local"][M3], hub["local"][RERANKER]), (M3, f"{RERANKER}@main")):
        assert main(["serve", model, "--reranker", reranker, "--devices", "cpu"]) == 0
    (local_m3, local_rr, _, local_settings), (hub_m3, hub_rr, _, hub_settings) = [a[:4] for a in made]
    _same_encodings(hub_m3.encode(TEXTS[:3], return_sparse=True), local_m3.encode(TEXTS[:3], return_sparse=True))
    pairs = [(p[0], p[1]) for p in PAGES[:3]]
    assert hub_rr.compute_score(pairs) == local_rr.compute_score(pairs)
    assert hub_settings.model_name == M3 and local_settings.model_name == "m3"
    assert hub_settings.fusion == local_settings.fusion  # fusion.json travels with the snapshot
    assert main(["serve", M3, "--revision", "v1", "--devices", "cpu"]) == 0
    np.testing.assert_array_equal(made[-1][0].encode(TEXTS[:2])["dense_vecs"],
                                  M3Embedder(hub["m3_v1"], devices="cpu", show_progress=False)
                                  .encode(TEXTS[:2])["dense_vecs"])


def test_merge_lora_with_an_adapter_and_its_base_as_ids(hub, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel

    torch.manual_seed(0)
    model = get_peft_model(AutoModel.from_pretrained(hub["local"][M3]),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], init_lora_weights=False))
    adapters = {}
    for name, base in (("local", hub["local"][M3]), ("hub", M3)):
        model.peft_config["default"].base_model_name_or_path = base
        model.save_pretrained(str(tmp_path / f"adapter_{name}"))
        adapters[name] = str(tmp_path / f"adapter_{name}")
    publish(hub["cache"], "org/tiny-m3-lora", adapters["hub"])
    assert main(["merge-lora", adapters["local"], str(tmp_path / "merged_local")]) == 0
    assert main(["merge-lora", "org/tiny-m3-lora", str(tmp_path / "merged_hub")]) == 0
    a, b = (_tensors(tmp_path / f"merged_{n}") for n in ("local", "hub"))
    assert len(a) > 10 and a == b


def test_a_lora_adapter_on_an_id_records_the_id_and_its_commit(hub, tmp_path):
    """An adapter trained on a Hub model names it as peft does (id + commit), not as this machine's cache path:
    merged on the recorded commit even after the id's main moved on."""
    from transformers import AutoModel

    from trine.modeling.loading import resolve_model
    from trine.modeling.lora import LoraOptions, add_lora, base_model_path

    snapshot = resolve_model(M3, revision="v1")
    model = add_lora(AutoModel.from_pretrained(snapshot), LoraOptions(lora_rank=4, target_modules=("query",)),
                     base_path=snapshot, task_type="FEATURE_EXTRACTION")
    config = model.peft_config["default"]
    assert (config.base_model_name_or_path, config.revision) == (M3, hub["v1"])
    model.save_pretrained(str(tmp_path / "adapter"))
    recorded = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert recorded["base_model_name_or_path"] == M3 and str(hub["cache"]) not in json.dumps(recorded)
    assert base_model_path(tmp_path / "adapter") == snapshot != resolve_model(M3)
    local = add_lora(AutoModel.from_pretrained(hub["local"][M3]), LoraOptions(lora_rank=4, target_modules=("query",)),
                     base_path=hub["local"][M3], task_type="FEATURE_EXTRACTION").peft_config["default"]
    assert (local.base_model_name_or_path, local.revision) == (os.path.abspath(hub["local"][M3]), None)


def test_commands_refuse_to_write_into_the_cache(hub, inputs, capsys):
    assert main(["eval", "--data", inputs["beir"], "--model", M3, "--model-card", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "--model-card writes into the model folder" in err and f"hf download {M3} --local-dir" in err
    assert main(["eval", "--data", inputs["beir"], "--model", M3, "--modes", "dense,sparse+dense", "--tune-weights",
                 "--dev-split", "dev", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "a Hub model in the Hugging Face cache; tuning writes fusion.json" in err and err.count("\n") == 1


def test_mine_keeps_its_cache_dir_and_takes_hub_cache_dir(hub, inputs, tmp_path):
    out = tmp_path / "mined.jsonl"
    assert main(["mine", "--input_file", inputs["pairs"], "--output_file", str(out), "--model_name_or_path",
                 "org/elsewhere-m3", "--hub-cache-dir", str(hub["cache"]), "--quiet"]) == 2
    other = tmp_path / "other"
    publish(other, "org/elsewhere-m3", hub["local"][M3])
    assert main(["mine", "--input_file", inputs["pairs"], "--output_file", str(out), "--model_name_or_path",
                 "org/elsewhere-m3", "--hub-cache-dir", str(other), "--cache_dir", str(tmp_path / "enc"),
                 "--range_for_sampling", "1-6", "--negative_number", "2", "--quiet"]) == 0
    assert os.listdir(tmp_path / "enc")  # the encodings cache is still --cache_dir's
