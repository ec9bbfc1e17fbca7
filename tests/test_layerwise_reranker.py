"""Layer-wise LLM rerankers (model_family 'llm-reranker-layerwise', FlagEmbedding's LayerWiseFlagLLMReranker).

The reference is FlagEmbedding's own vendored MiniCPM layer-wise model: a tiny random config built here and saved
as a checkpoint folder with SmolLM2's real tokenizer. trine loads that folder with its own MiniCPM implementation;
scores per cutoff layer are compared with LayerWiseFlagLLMReranker's and the training loss with FlagEmbedding's
decoder-only layerwise CrossDecoderModel. FlagEmbedding 1.4.2's vendored MiniCPM code does not run on transformers 5
as shipped (it reads the old rope_scaling format, lists its tied weights in the old format, needs use_cache off, and
its rotary tables come out of transformers 5's from_pretrained unset, hence NaN scores); :func:`flag_minicpm` patches
those points only, never the model's arithmetic.
trine saving such a model writes FlagEmbedding's layout, which LayerWiseFlagLLMReranker loads with the same scores.
A tiny random Qwen2 checks the generic decoder path: early exit, padding, LoRA training through
`trine finetune-reranker`, save/load, merge-lora, and `trine score --reranker --cutoff_layers`.
"""

from __future__ import annotations

import functools
import json
import os
import pickle

import numpy as np
import pytest
import torch
from conftest import require, to_argv
from safetensors.torch import load_file
from test_decoder_embedder import smol_tokenizer_dir  # noqa: F401 (the session fixture)
from test_finetune import PAGES, write_data
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config

from trine.errors import OptionError
from trine.inference.reranker import Reranker
from trine.modeling.families import reranker_family
from trine.modeling.layerwise_reranker import HEADS_FILE, LayerwiseReranker
from trine.modeling.llm_reranker import FAMILY_FILE, LLMReranker
from trine.modeling.lora import merge_lora_folder
from trine.training.data import Example
from trine.training.reranker import RerankerCollator, RerankerTrainingModel, main

FlagEmbedding = require("FlagEmbedding")

LONG = " ".join(d for _, d in PAGES[:6])
LAYERS, START = 4, 2


def pairs() -> list[tuple[str, str]]:
    return [(q, d) for q, d in PAGES[:5]] + [(PAGES[0][0], LONG), (PAGES[1][0] * 6, PAGES[2][1])]


@pytest.fixture(scope="module")
def flag_minicpm():
    """FlagEmbedding's vendored layer-wise MiniCPM modules (inference and fine-tuning copies), patched for
    transformers 5: the default rope read from ``rope_parameters``, no tied-weight list, and the rotary tables
    (non-persistent buffers, left unset by transformers 5's loading) rebuilt after ``from_pretrained``."""
    from FlagEmbedding.finetune.reranker.decoder_only.layerwise import modeling_minicpm_reranker as train_mod
    from FlagEmbedding.inference.reranker.decoder_only.models import modeling_minicpm_reranker as infer_mod

    saved = []
    for mod in (infer_mod, train_mod):
        original = mod.MiniCPMAttention._init_rope

        def init_rope(self, mod=mod, original=original):
            scaling = self.config.rope_scaling
            if scaling is not None and "type" not in scaling and scaling.get("rope_type", "default") == "default":
                self.rotary_emb = mod.MiniCPMRotaryEmbedding(
                    self.head_dim, max_position_embeddings=self.max_position_embeddings, base=self.rope_theta)
            else:
                original(self)

        cls = mod.LayerWiseMiniCPMForCausalLM
        loader = cls.__dict__["from_pretrained"] if "from_pretrained" in cls.__dict__ else None

        def from_pretrained(klass, *args, mod=mod, loader=cls.from_pretrained.__func__, **kwargs):
            model = loader(klass, *args, **kwargs)
            for module in model.modules():  # loading leaves these non-persistent tables unset on transformers 5
                if isinstance(module, mod.MiniCPMRotaryEmbedding):
                    module.inv_freq = 1.0 / (module.base ** (torch.arange(0, module.dim, 2).float() / module.dim))
                    module._set_cos_sin_cache(module.max_position_embeddings, module.inv_freq.device, torch.float32)
            return model

        saved.append((mod, original, cls._tied_weights_keys, loader))
        mod.MiniCPMAttention._init_rope = init_rope
        cls._tied_weights_keys = {}
        cls.from_pretrained = classmethod(from_pretrained)
    yield infer_mod
    for mod, original, tied, loader in saved:
        mod.MiniCPMAttention._init_rope = original
        mod.LayerWiseMiniCPMForCausalLM._tied_weights_keys = tied
        if loader is None:
            del mod.LayerWiseMiniCPMForCausalLM.from_pretrained
        else:
            mod.LayerWiseMiniCPMForCausalLM.from_pretrained = loader


@pytest.fixture(scope="module")
def minicpm_dir(tmp_path_factory, smol_tokenizer_dir, flag_minicpm) -> str:  # noqa: F811
    """A random 4-layer layer-wise MiniCPM (heads for layers 2-4, MiniCPM's scalings), saved by FlagEmbedding."""
    from FlagEmbedding.inference.reranker.decoder_only.models.configuration_minicpm_reranker import (
        LayerWiseMiniCPMConfig,
    )

    out = str(tmp_path_factory.mktemp("tiny_minicpm_lw"))
    tok = AutoTokenizer.from_pretrained(smol_tokenizer_dir)
    config = LayerWiseMiniCPMConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                    num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
                                    max_position_embeddings=256, initializer_range=0.2, scale_emb=12,
                                    dim_model_base=16, scale_depth=1.4, start_layer=START, head_multi=True,
                                    head_type="simple", tie_word_embeddings=False, use_cache=False,
                                    bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(3)
    flag_minicpm.LayerWiseMiniCPMForCausalLM(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory, smol_tokenizer_dir) -> str:  # noqa: F811
    """A random 3-layer Qwen2 causal LM written with plain transformers."""
    out = str(tmp_path_factory.mktemp("tiny_qwen_lw"))
    tok = AutoTokenizer.from_pretrained(smol_tokenizer_dir)
    torch.manual_seed(7)
    config = Qwen2Config(vocab_size=len(tok), hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=64, max_position_embeddings=256,
                         initializer_range=0.2, tie_word_embeddings=False, use_cache=False)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_scores_per_cutoff_layer_match_flagembedding(minicpm_dir):
    assert reranker_family(minicpm_dir) == "llm-reranker-layerwise"  # detected from config.json's architecture
    flag = FlagEmbedding.LayerWiseFlagLLMReranker(minicpm_dir, use_fp16=False, devices="cpu", batch_size=3)
    ours = Reranker(minicpm_dir, devices="cpu", show_progress=False, batch_size=3)
    for options in ({}, {"cutoff_layers": [2, 3, 4]}, {"cutoff_layers": [3]}, {"cutoff_layers": [2, 4],
                    "max_length": 24}, {"cutoff_layers": [2, 3], "max_length": 40, "query_max_length": 6,
                    "normalize": True}):
        expected = flag.compute_score(pairs(), **options)
        got = ours.compute_score(pairs(), **options)
        assert np.shape(got) == np.shape(expected), options
        np.testing.assert_allclose(got, expected, atol=1e-5, err_msg=str(options))
    by_layer = ours.compute_score(pairs(), cutoff_layers=[2, 3, 4])
    assert min(np.max(np.abs(np.subtract(a, b))) for a in by_layer for b in by_layer if a is not b) > 1e-3
    assert ours.compute_score(pairs(), cutoff_layers=[4, 2]) == [by_layer[2], by_layer[0]]  # the order asked for
    assert ours.compute_score(pairs(), cutoff_layers=3) == by_layer[1]
    # the model pickles (the device pool's spawned processes): MiniCPM's scalings travel with it
    copy = Reranker(pickle.loads(pickle.dumps(ours.model)), devices="cpu", show_progress=False)
    np.testing.assert_allclose(copy.compute_score(pairs(), cutoff_layers=[2, 3, 4]), by_layer, atol=1e-6)
    early = Reranker(minicpm_dir, devices="cpu", show_progress=False, cutoff_layers=[2])  # runs 2 of the 4 layers
    np.testing.assert_allclose(early.compute_score(pairs()), by_layer[0], atol=1e-6)


def test_training_loss_matches_flagembedding(tmp_path, minicpm_dir, flag_minicpm):
    """CE at every layer 2..4 plus the last layer distilled into the earlier ones, with and without teacher scores."""
    from FlagEmbedding.finetune.reranker.decoder_only.layerwise import modeling_minicpm_reranker as train_mod
    from FlagEmbedding.finetune.reranker.decoder_only.layerwise.modeling import CrossDecoderModel

    ours = LayerwiseReranker.from_pretrained(minicpm_dir)
    collator = RerankerCollator(ours, query_max_len=16, passage_max_len=48, query_instruction_for_retrieval="A: ",
                                passage_instruction_for_retrieval="B: ")
    examples = [Example(q, [d, PAGES[(i + 1) % 8][1], PAGES[(i + 2) % 8][1]], None, None)
                for i, (q, d) in enumerate(PAGES[:4])]
    batch = collator([{"examples": examples, "in_batch_negatives": False}])
    mask = batch["pairs"]["attention_mask"]
    rows = [r[: int(m.sum())] for r, m in zip(batch["pairs"]["input_ids"], mask)]
    assert len({len(r) for r in rows}) > 1  # a padded batch

    fe_base = train_mod.LayerWiseMiniCPMForCausalLM.from_pretrained(minicpm_dir)
    # FlagEmbedding's encode() calls the model without cutoff_layers, which scores the last layer only; its loss
    # is written for every layer from start_layer, which is what this asks the model for
    fe_base.forward = functools.partial(fe_base.forward, cutoff_layers=list(range(START, LAYERS + 1)))
    fe = CrossDecoderModel(fe_base, tokenizer=ours.tokenizer, train_batch_size=4, start_layer=START).train()
    per_pair = [fe.encode({"input_ids": r[None], "attention_mask": torch.ones(1, len(r), dtype=torch.long)})
                for r in rows]
    fe_scores = [torch.cat([p[k] for p in per_pair]) for k in range(LAYERS - START + 1)]
    fe.encode = lambda features: fe_scores  # each pair scored alone (FlagEmbedding pads left; trine right)

    model = RerankerTrainingModel(ours).train()
    teacher = torch.tensor([[3.0, 1.0, 0.0], [0.5, 2.0, 1.0], [1.0, 1.0, 1.0], [2.0, 0.0, -1.0]])
    for teacher_scores in (None, teacher):
        out = model(batch["pairs"], batch["group_size"], teacher_scores=teacher_scores)
        expected = fe(pair=None, teacher_scores=None if teacher_scores is None else teacher_scores.view(-1).tolist())
        np.testing.assert_allclose(out["scores"].detach().numpy(), fe_scores[-1].detach().numpy(), atol=1e-5)
        assert abs(out["loss"].item() - expected.loss.item()) < 1e-5, teacher_scores
    assert "layer_distill" in model(batch["pairs"], batch["group_size"])["parts"]


def test_generic_decoder_early_exit_and_padding(qwen_dir):
    model = LayerwiseReranker.from_pretrained(qwen_dir, start_layer=1, head_multi=True).eval()
    assert len(model.heads) == 3
    yes = model.tokenizer("Yes", add_special_tokens=False)["input_ids"][0]
    lm_head = AutoModelForCausalLM.from_pretrained(qwen_dir).lm_head.weight[yes]
    assert all(torch.equal(h.weight[0], lm_head) for h in model.heads)  # new heads start from the Yes row
    ids, _ = model.tokenize_pairs([q for q, _ in pairs()], [d for _, d in pairs()], query_max_length=16,
                                  max_length=48)
    width, pad = max(map(len, ids)), model.tokenizer.pad_token_id
    with torch.no_grad():
        alone = torch.stack([model(torch.tensor([x]), torch.ones(1, len(x), dtype=torch.long),
                                   cutoff_layers=[1, 2, 3]) for x in ids], dim=-1).squeeze(1)
        right = model(torch.tensor([x + [pad] * (width - len(x)) for x in ids]),
                      torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids]), cutoff_layers=[1, 2, 3])
        early = [model(torch.tensor([ids[0]]), torch.ones(1, len(ids[0]), dtype=torch.long), cutoff_layers=k)
                 for k in (1, 2)]
        # an independent computation: transformers' full forward, final norm of each layer's output, the head
        full = AutoModelForCausalLM.from_pretrained(qwen_dir).model
        out = full(torch.tensor([ids[0]]), output_hidden_states=True)
        # hidden_states[k]: the output of layer k (embeddings first); the last layer's normed state is last_hidden_state
        direct = [model.heads[0](full.norm(out.hidden_states[1][0, -1])),
                  model.heads[1](full.norm(out.hidden_states[2][0, -1])), model.heads[2](out.last_hidden_state[0, -1])]
    np.testing.assert_allclose(right.numpy(), alone.numpy(), atol=1e-5)
    np.testing.assert_allclose([float(e) for e in early], alone[:2, 0].numpy(), atol=1e-5)
    np.testing.assert_allclose([float(d) for d in direct], alone[:, 0].numpy(), atol=1e-5)
    assert len({round(float(d), 4) for d in direct}) == 3  # three different layers, three different scores


def write_records(path) -> str:
    with open(path, "w") as f:
        for i, (q, d) in enumerate(PAGES[:8]):
            f.write(json.dumps({"query": q, "pos": [d], "neg": [PAGES[(i + k + 1) % 8][1] for k in range(2)]}) + "\n")
    return str(path)


def test_training_lowers_the_loss(qwen_dir):
    torch.manual_seed(0)
    model = RerankerTrainingModel(LayerwiseReranker.from_pretrained(qwen_dir, start_layer=2, head_multi=True))
    collator = RerankerCollator(model.encoder, query_max_len=16, passage_max_len=48)
    examples = [Example(q, [d, PAGES[(i + 3) % 8][1], PAGES[(i + 5) % 8][1]], None, None)
                for i, (q, d) in enumerate(PAGES[:4])]
    batch = collator([{"examples": examples, "in_batch_negatives": False}])
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(4):
        out = model(batch["pairs"], batch["group_size"])
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        losses.append(out["loss"].item())
    assert losses[-1] < 0.5 * losses[0], losses
    assert all(h.weight.grad is not None for h in model.encoder.heads)


def test_lora_training_save_load_and_merge(tmp_path, qwen_dir):
    data = write_data(tmp_path / "train.jsonl", n_neg=2)
    out = tmp_path / "out"
    options = {"model_name_or_path": qwen_dir, "model_family": "llm-reranker-layerwise", "start_layer": 2,
               "head_multi": "true", "use_lora": "true", "lora_rank": 8, "lora_alpha": 16, "lora_dropout": 0.0,
               "train_data": [data], "output_dir": str(out), "train_group_size": 3,
               "per_device_train_batch_size": 4, "query_max_len": 16, "passage_max_len": 48, "learning_rate": 1e-2,
               "max_steps": 3, "save_steps": 2, "logging_steps": 1, "report_to": "none", "seed": 11, "use_cpu": True}
    assert main(to_argv(options)) == 0
    assert os.path.isfile(out / "adapter_config.json") and os.path.isfile(out / HEADS_FILE)
    info = json.loads((out / FAMILY_FILE).read_text())
    assert (info["model_family"], info["start_layer"], info["head_multi"]) == ("llm-reranker-layerwise", 2, True)
    assert reranker_family(out) == "llm-reranker-layerwise"
    # resuming from the step-2 checkpoint ends with the same adapter and heads
    resumed = tmp_path / "resumed"
    assert main(to_argv({**options, "output_dir": str(resumed),
                         "resume_from_checkpoint": str(out / "checkpoint-2")})) == 0
    for name in ("adapter_model.safetensors", HEADS_FILE):
        a, b, start = (load_file(os.path.join(f, name)) for f in (out, resumed, out / "checkpoint-2"))
        assert any(not torch.equal(a[k], start[k]) for k in a), name  # the last step changed them
        for k in a:
            torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0, msg=k)
    test_pairs = pairs()[:5]
    trained = Reranker(str(out), devices="cpu", show_progress=False)
    scores = trained.compute_score(test_pairs, cutoff_layers=[2, 3])
    fresh = LayerwiseReranker.from_pretrained(qwen_dir, start_layer=2, head_multi=True)
    base = Reranker(fresh, devices="cpu", show_progress=False).compute_score(test_pairs, cutoff_layers=[2, 3])
    assert np.max(np.abs(np.subtract(scores, base))) > 1e-3  # adapter and heads changed the scores
    saved = tmp_path / "saved"
    trained.model.save_pretrained(saved)  # a loaded adapter folder saves again as one
    np.testing.assert_allclose(Reranker(str(saved), devices="cpu", show_progress=False).compute_score(
        test_pairs, cutoff_layers=[2, 3]), scores, atol=1e-6)
    merged = merge_lora_folder(out, tmp_path / "merged")
    assert not os.path.exists(os.path.join(merged, "adapter_config.json"))
    assert reranker_family(merged) == "llm-reranker-layerwise"
    np.testing.assert_allclose(Reranker(merged, devices="cpu", show_progress=False).compute_score(
        test_pairs, cutoff_layers=[2, 3]), scores, atol=1e-5)


def test_minicpm_folder_trine_saves_loads_in_flagembedding(tmp_path, minicpm_dir):
    """A (fine-tuned) MiniCPM layer-wise model is saved in FlagEmbedding's layout: its reranker loads it as it is."""
    model = LayerwiseReranker.from_pretrained(minicpm_dir)
    with torch.no_grad():  # as if trained: a changed head and decoder weight
        model.heads[1].weight.mul_(-2.0)
        model.model.layers[0].mlp.down_proj.weight.mul_(1.5)
    model.save_pretrained(tmp_path / "saved")
    saved = str(tmp_path / "saved")
    assert not os.path.exists(os.path.join(saved, HEADS_FILE)) and reranker_family(saved) == "llm-reranker-layerwise"
    layers = [2, 3, 4]
    ours = Reranker(model.eval(), devices="cpu", show_progress=False).compute_score(pairs(), cutoff_layers=layers)
    flag = FlagEmbedding.LayerWiseFlagLLMReranker(saved, use_fp16=False, devices="cpu")
    np.testing.assert_allclose(flag.compute_score(pairs(), cutoff_layers=layers), ours, atol=1e-5)
    again = Reranker(saved, devices="cpu", show_progress=False).compute_score(pairs(), cutoff_layers=layers)
    np.testing.assert_allclose(again, ours, atol=1e-6)
    before = Reranker(minicpm_dir, devices="cpu", show_progress=False).compute_score(pairs(), cutoff_layers=layers)
    assert np.max(np.abs(np.subtract(before, ours))) > 1e-3
    resumed = LayerwiseReranker.from_pretrained(minicpm_dir)
    resumed.load_weights(saved)  # what resuming training from such a checkpoint does
    np.testing.assert_allclose(Reranker(resumed, devices="cpu", show_progress=False).compute_score(
        pairs(), cutoff_layers=layers), ours, atol=1e-6)


def test_minicpm_lora_adapter_saves_and_merges(tmp_path, minicpm_dir):
    """An adapter on trine's MiniCPM (its scalings as hooks, Llama's module names) saves, reloads and merges."""
    from trine.modeling.lora import LoraOptions, add_lora

    model = LayerwiseReranker.from_pretrained(minicpm_dir)
    add_lora(model.model, LoraOptions(lora_rank=4, lora_dropout=0.0), base_path=minicpm_dir,
             task_type="FEATURE_EXTRACTION", default_targets=("q_proj", "v_proj", "down_proj"))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # a non-zero adapter
        model.heads[0].weight.mul_(-1.5)
    model.save_pretrained(tmp_path / "adapter")
    before = Reranker(LayerwiseReranker.from_pretrained(minicpm_dir), devices="cpu", show_progress=False)
    adapted = Reranker(str(tmp_path / "adapter"), devices="cpu", show_progress=False)
    scores = adapted.compute_score(pairs(), cutoff_layers=[2, 4])
    direct = Reranker(model.eval(), devices="cpu", show_progress=False).compute_score(pairs(), cutoff_layers=[2, 4])
    np.testing.assert_allclose(scores, direct, atol=1e-5)
    assert np.max(np.abs(np.subtract(scores[1], before.compute_score(pairs())))) > 1e-3
    merged = merge_lora_folder(tmp_path / "adapter", tmp_path / "merged")
    assert json.loads(open(os.path.join(merged, "config.json")).read())["model_type"] == "minicpm"
    np.testing.assert_allclose(Reranker(merged, devices="cpu", show_progress=False).compute_score(
        pairs(), cutoff_layers=[2, 4]), scores, atol=1e-5)


def test_score_cli_cutoff_layers(tmp_path, minicpm_dir, qwen_dir, capsys):
    from trine.cli import main as cli

    records = write_records(tmp_path / "in.jsonl")
    out = tmp_path / "scored.jsonl"
    prompt = "Is B about A?"
    assert cli(["score", "--input_file", records, "--output_file", str(out), "--reranker", minicpm_dir,
                "--cutoff_layers", "3", "--reranker_max_len", "128", "--prompt", prompt,
                "--reranker_model_class", "decoder-only-layerwise", "--quiet"]) == 0
    got = [json.loads(line) for line in open(out)]
    texts = [(r["query"], p) for r in got for p in r["pos"] + r["neg"]]
    reranker = Reranker(minicpm_dir, devices="cpu", show_progress=False)
    expected = reranker.compute_score(texts, cutoff_layers=3, max_length=128, prompt=prompt)
    assert np.max(np.abs(np.subtract(expected, reranker.compute_score(texts, cutoff_layers=3, max_length=128)))) > 1e-4
    np.testing.assert_allclose([s for r in got for s in r["pos_scores"] + r["neg_scores"]], expected, atol=1e-4)
    # several layers give several scores per pair: not a teacher score
    assert cli(["score", "--input_file", records, "--output_file", str(tmp_path / "x.jsonl"), "--reranker",
                minicpm_dir, "--cutoff_layers", "2", "3", "--quiet"]) == 2
    assert "cutoff_layers" in capsys.readouterr().err
    plain = tmp_path / "plain"
    LLMReranker.from_pretrained(qwen_dir).save_pretrained(plain)
    assert cli(["score", "--input_file", records, "--output_file", str(tmp_path / "y.jsonl"), "--reranker",
                str(plain), "--cutoff_layers", "2", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "cutoff_layers" in err and "layer-wise" in err and not os.path.exists(tmp_path / "y.jsonl")
    # FlagEmbedding's decoder-only-base class and --prompt on a plain LLM reranker
    assert cli(["score", "--input_file", records, "--output_file", str(tmp_path / "z.jsonl"), "--reranker",
                str(plain), "--reranker_model_class", "decoder-only-base", "--prompt", prompt,
                "--reranker_max_len", "128", "--quiet"]) == 0
    got = [json.loads(line) for line in open(tmp_path / "z.jsonl")]
    expected = Reranker(str(plain), devices="cpu", show_progress=False, prompt=prompt).compute_score(
        texts, max_length=128)
    np.testing.assert_allclose([s for r in got for s in r["pos_scores"] + r["neg_scores"]], expected, atol=1e-4)


def test_bad_options(minicpm_dir, qwen_dir, tmp_path):
    ours = Reranker(minicpm_dir, devices="cpu", show_progress=False)
    for bad in ([1], [5], [2, 2], [], ["3"]):
        with pytest.raises(OptionError, match="cutoff_layers"):
            ours.compute_score(pairs()[:2], cutoff_layers=bad)
    with pytest.raises(OptionError, match="one layer"):
        ours.rerank(PAGES[0][0], [d for _, d in PAGES[:3]], cutoff_layers=[2, 3])
    ranked = ours.rerank(PAGES[0][0], [d for _, d in PAGES[:3]], cutoff_layers=3)
    assert sorted(i for i, _ in ranked) == [0, 1, 2] and ranked[0][1] >= ranked[-1][1]
    with pytest.raises(OptionError, match="start_layer"):  # the folder has its heads
        LayerwiseReranker.from_pretrained(minicpm_dir, start_layer=3)
    with pytest.raises(OptionError, match="head_type"):
        LayerwiseReranker.from_pretrained(qwen_dir, head_type="complex")
    with pytest.raises(OptionError, match="start_layer"):  # FlagEmbedding's default 8 is beyond 3 layers
        LayerwiseReranker.from_pretrained(qwen_dir)
    with pytest.raises(OptionError, match="cutoff_layers"):
        Reranker(qwen_dir, devices="cpu", cutoff_layers=[2])  # a plain causal LM is an llm-reranker
    data = write_data(tmp_path / "train.jsonl")
    argv = {"model_name_or_path": qwen_dir, "model_family": "llm-reranker", "start_layer": 2, "train_data": [data],
            "output_dir": str(tmp_path / "out"), "max_steps": 1, "report_to": "none", "use_cpu": True}
    assert main(to_argv(argv)) == 2 and not os.path.exists(tmp_path / "out")  # start_layer: not an llm-reranker's
    argv.update(model_family="llm-reranker-layerwise", head_type="complex")
    assert main(to_argv(argv)) == 2 and not os.path.exists(tmp_path / "out")


def test_eval_reranker_cutoff_layer(tmp_path, minicpm_dir, splade_tiny_dir, capsys):
    """`trine eval --reranker LAYERWISE --reranker-cutoff-layer K`: rerank(dense) orders the dense top-5 by the
    scores after layer K (checked against Reranker.compute_score at that layer, metrics by pytrec_eval)."""
    import pytrec_eval
    from test_evaluation import fake_pages

    from trine.cli import main as cli
    from trine.evaluation import EvalConfig, load_dataset, run_evaluation
    from trine.evaluation.manpages import build_manpages_beir
    from trine.inference.embedder import M3Embedder

    data = tmp_path / "data"
    build_manpages_beir(data, pages=fake_pages(30), seed=0)
    dataset = load_dataset(str(data), "test")
    model = M3Embedder(splade_tiny_dir, init_missing_heads="neutral", show_progress=False, devices="cpu")
    first = run_evaluation([model], dataset, EvalConfig(modes=("dense",), k_values=(5,), top_k=10),
                           return_runs=True)["models"]["M3Embedder#1"]["runs"]["dense"]
    text_of = dict(zip(*dataset.passages()))
    reranker = Reranker(minicpm_dir, devices="cpu", show_progress=False)
    base = ["eval", "--data", str(data), "--model", splade_tiny_dir, "--heads", "neutral", "--quiet", "--modes",
            "dense", "--top-k", "10"]
    rerank = ["--reranker", minicpm_dir, "--reranker-top-k", "5", "--reranker-max-length", "96", "--k", "5"]
    seen = []
    for layer in (2, 3):
        out = tmp_path / f"out{layer}"
        assert cli([*base, *rerank, "--reranker-cutoff-layer", str(layer), "--out", str(out)]) == 0
        run = {}
        for qid, ranked in first.items():
            top = list(ranked)[:5]
            scores = reranker.compute_score([(dataset.queries[qid], text_of[d]) for d in top], max_length=96,
                                            cutoff_layers=layer)
            run[qid] = {d: float(s) for d, s in zip(top, scores)}
        ref = pytrec_eval.RelevanceEvaluator(dataset.qrels, {"ndcg_cut.5"}).evaluate(run)
        got = json.loads((out / "results.json").read_text())["models"]["model"]["metrics"]["rerank(dense)"]["ndcg@5"]
        assert got == pytest.approx(np.mean([r["ndcg_cut_5"] for r in ref.values()]), abs=1e-6)
        seen.append(got)
    assert seen[0] != seen[1]  # the two layers rank differently here: the cut-off reached the reranker
    assert cli([*base, "--k", "5", "--reranker-cutoff-layer", "2"]) == 2  # no reranker to cut
    assert "--reranker" in capsys.readouterr().err

