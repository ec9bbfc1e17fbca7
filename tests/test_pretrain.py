"""`trine pretrain` (RetroMAE): masks, loss, streaming, position extension, checkpoints, resume, CLI."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from conftest import TEXTS
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from trine.cli import main as cli_main
from trine.io import MARKER
from trine.modeling.retromae import DECODER_FILE, RetroMAEModel, extend_position_embeddings
from trine.training.data import DataError
from trine.training.pretrain import (
    RetroMAECollator,
    TextStream,
    build_trainer,
    parse_args,
    scan_corpus,
    whole_word_sample,
)

# Real English text (man-page DESCRIPTION sentences and the shared test texts).
MORE = [
    "The chmod utility modifies the file mode bits of the listed files as specified by the mode operand.",
    "The malloc() function allocates size bytes and returns a pointer to the allocated memory. The memory is "
    "not initialized. If size is 0, then malloc() returns a unique pointer value that can later be "
    "successfully passed to free().",
    "The waitpid() system call suspends execution of the calling thread until a child specified by pid "
    "argument has changed state. By default, waitpid() waits only for terminated children.",
    "pipe() creates a pipe, a unidirectional data channel that can be used for interprocess communication. "
    "The array pipefd is used to return two file descriptors referring to the ends of the pipe.",
    "getaddrinfo() returns one or more addrinfo structures, each of which contains an Internet address "
    "that can be specified in a call to bind(2) or connect(2).",
    "strncpy copies at most n bytes of the string pointed to by src, including the terminating null byte, "
    "to the buffer pointed to by dest; unreasonably long arguments are silently truncated.",
]
CORPUS = TEXTS + MORE


def write_corpus(path, texts=CORPUS, repeat=1):
    with open(path, "w") as f:
        for _ in range(repeat):
            for t in texts:
                f.write(json.dumps({"text": t}) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def tokenizer(splade_tiny_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(splade_tiny_dir)


def argv(model_dir, data, out, **extra):
    options = {
        "model_name_or_path": model_dir, "train_data": [data], "output_dir": str(out), "max_seq_length": 64,
        "per_device_train_batch_size": 4, "learning_rate": 5e-4, "max_steps": 6, "save_steps": 3,
        "logging_steps": 1, "report_to": "none", "seed": 5, "use_cpu": True, "disable_tqdm": True,
        "shuffle_buffer_size": 8,
    }
    options.update(extra)
    out_args = []
    for k, v in options.items():
        out_args += [f"--{k}", *(v if isinstance(v, list) else [str(v)])]
    return out_args


# ---------------------------------------------------------------------------------------------- masks
def test_whole_word_sample_keeps_words_whole_and_skips_specials():
    words = np.array([-1, 0, 1, 1, 1, 2, 3, 3, 4, -1, -1])
    rng = np.random.default_rng(0)
    chosen = whole_word_sample(words, 0.5, 500, rng)
    assert not chosen[:, words < 0].any()
    for w in range(5):
        cols = chosen[:, words == w]
        assert (cols.all(1) | ~cols.any(1)).all()  # every piece of a word, or none
    assert chosen.any(1).all()  # at least one word per row
    # target 4 of 8 word tokens; a word joins while the count before it plus half its length fits
    assert abs(chosen.sum(1).mean() / 8 - 0.5) < 0.08


def test_masks_on_real_text(tokenizer):
    collator = RetroMAECollator(tokenizer, max_seq_length=128, encoder_mlm_probability=0.3,
                                decoder_mlm_probability=0.5, seed=1)
    enc_masked = enc_total = dec_hidden = dec_total = mask_tokens = 0
    specials = {tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id}
    for batch_number in range(20):
        batch = collator({"epoch": 0, "rank": 0, "batch": batch_number, "texts": CORPUS})
        ids = batch["decoder_input_ids"]
        reference = tokenizer(CORPUS, truncation=True, max_length=128, padding=True, return_tensors="pt")
        assert torch.equal(ids, reference["input_ids"])  # the decoder reads the original text
        assert torch.equal(batch["attention_mask"], reference["attention_mask"])
        special = torch.tensor([[int(t) in specials for t in row] for row in ids])
        masked = batch["encoder_labels"] != -100
        # labels: the original id where predicted, -100 elsewhere; special tokens never masked or changed
        assert torch.equal(batch["encoder_labels"][masked], ids[masked])
        assert not (masked & special).any()
        assert torch.equal(batch["encoder_input_ids"][special], ids[special])
        assert torch.equal(batch["encoder_input_ids"][~masked], ids[~masked])
        mask_tokens += int((batch["encoder_input_ids"][masked] == tokenizer.mask_token_id).sum())
        enc_masked += int(masked.sum())
        enc_total += int((~special).sum())
        # the decoder reconstructs every ordinary token
        assert torch.equal(batch["decoder_labels"] != -100, ~special)
        assert torch.equal(batch["decoder_labels"][~special], ids[~special])
        visible = batch["decoder_visible"]
        for i in range(ids.shape[0]):
            n = int(batch["attention_mask"][i].sum())
            tokens = tokenizer.convert_ids_to_tokens(ids[i, :n])
            see = visible[i, :n, :n]
            rows = ~special[i, :n]
            assert not see.diagonal()[rows].any()  # a row never sees its own target
            assert see[:, 0].all() and visible[i, :, 0].all()  # the sentence vector is always visible
            assert not visible[i, :, n:].any()  # padding is never visible
            assert see[rows][:, n - 1].all()  # [SEP] is never hidden from a token's row
            cols = ~special[i, :n]
            hidden_rows = ~see[rows][:, cols]
            own = torch.eye(n, dtype=torch.bool)[rows][:, cols]
            dec_hidden += int((hidden_rows & ~own).sum())
            dec_total += int((~own).sum())
            # whole words: a ## piece shares the state of the piece before it, in the encoder and in every
            # decoder row other than the two pieces' own rows (a row's own position is hidden on its own)
            for j in range(1, n):
                if tokens[j].startswith("##"):
                    assert bool(masked[i, j]) == bool(masked[i, j - 1]), tokens[j]
                    others = rows.clone()
                    others[[j - 1, j]] = False
                    assert torch.equal(see[others, j], see[others, j - 1]), tokens[j]
    assert abs(enc_masked / enc_total - 0.3) < 0.03, enc_masked / enc_total
    assert abs(dec_hidden / dec_total - 0.5) < 0.03, dec_hidden / dec_total
    assert 0.72 < mask_tokens / enc_masked < 0.88  # 80% [MASK], the rest random or unchanged


def test_masks_are_fixed_by_seed_epoch_rank_and_batch(tokenizer):
    collator = RetroMAECollator(tokenizer, max_seq_length=64, seed=3)
    item = {"epoch": 1, "rank": 0, "batch": 7, "texts": CORPUS[:4]}
    a, b = collator(item), collator(dict(item))
    c = collator({**item, "batch": 8})
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["decoder_visible"], c["decoder_visible"])


# ---------------------------------------------------------------------------------------------- model and loss
def test_tiny_bert_has_mlm_head_weights_and_loss_falls_on_real_text(splade_tiny_dir, tokenizer):
    model = RetroMAEModel.from_pretrained(splade_tiny_dir)  # raises if the checkpoint lacks MLM head weights
    head_weights = load_file(os.path.join(splade_tiny_dir, "model.safetensors"))
    assert any(k.startswith("cls.predictions.transform") for k in head_weights)
    torch.manual_seed(0)
    collator = RetroMAECollator(model.tokenizer, max_seq_length=48, seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    history = []
    for step in range(12):
        batch = collator({"epoch": 0, "rank": 0, "batch": step, "texts": CORPUS})
        out = model(**batch)
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        history.append([float(out["parts"]["encoder_mlm"]), float(out["parts"]["decoder"])])
    h = np.array(history)
    first, last = h[:3].mean(0), h[-3:].mean(0)
    assert last[0] < first[0] - 1.0, (first, last)  # encoder MLM
    assert last[1] < first[1] - 1.0, (first, last)  # decoder reconstruction from the sentence vector


def test_decoder_needs_the_sentence_vector(splade_tiny_dir, tokenizer):
    """With every token hidden, the decoder's output depends on the encoder's CLS state only."""
    model = RetroMAEModel.from_pretrained(splade_tiny_dir).eval()
    batch = RetroMAECollator(tokenizer, max_seq_length=32, seed=0).build(CORPUS[:2], np.random.default_rng(0))
    only_cls = torch.zeros_like(batch["decoder_visible"])
    only_cls[:, :, 0] = True
    a = model(**{**batch, "decoder_visible": only_cls})["parts"]["decoder"]
    other = batch["decoder_input_ids"].clone()
    other[:, 1:-1] = tokenizer.mask_token_id  # change the decoder's tokens: hidden ones cannot matter
    other = torch.where(batch["attention_mask"].bool(), other, batch["decoder_input_ids"])
    b = model(**{**batch, "decoder_visible": only_cls, "decoder_input_ids": other})["parts"]["decoder"]
    torch.testing.assert_close(a, b)
    # with the collator's masks the visible tokens do matter (the mask is not inverted)
    c = model(**batch)["parts"]["decoder"]
    d = model(**{**batch, "decoder_input_ids": other})["parts"]["decoder"]
    assert abs(float(c) - float(d)) > 1e-3


def test_missing_mlm_head_is_an_error(splade_tiny_dir, tmp_path):
    from transformers import AutoModel, AutoTokenizer

    AutoModel.from_pretrained(splade_tiny_dir).save_pretrained(tmp_path / "plain")  # a backbone without MLM head
    AutoTokenizer.from_pretrained(splade_tiny_dir).save_pretrained(tmp_path / "plain")
    with pytest.raises(ValueError, match="no MLM head weights"):
        RetroMAEModel.from_pretrained(tmp_path / "plain")
    model = RetroMAEModel.from_pretrained(tmp_path / "plain", allow_new_mlm_head=True)
    assert model.position_offset == 0
    embeddings = model.lm.bert.embeddings.word_embeddings.weight
    assert model.lm.get_output_embeddings().weight is embeddings  # the new head's output is tied


# ---------------------------------------------------------------------------------------------- positions
def test_extend_positions_copy_and_interpolate(splade_tiny_dir, tiny_m3_dir, tmp_path):
    from transformers import AutoModel, AutoModelForMaskedLM, AutoTokenizer

    lm = AutoModelForMaskedLM.from_pretrained(splade_tiny_dir)
    tok = AutoTokenizer.from_pretrained(splade_tiny_dir)
    old = lm.bert.embeddings.position_embeddings.weight.detach().clone()
    extend_position_embeddings(lm, 1024, "copy", tok)
    new = lm.bert.embeddings.position_embeddings.weight
    assert new.shape == (1024, old.shape[1]) and lm.config.max_position_embeddings == 1024
    assert torch.equal(new[:512], old)  # the first N rows are untouched
    assert torch.equal(new[512:], old)  # and repeated
    assert lm.bert.embeddings.position_ids.shape == (1, 1024) and tok.model_max_length == 1024
    long_ids = tok(" ".join(["the file mode bits of each given file"] * 130), truncation=True, max_length=900,
                   return_tensors="pt")
    assert long_ids["input_ids"].shape[1] == 900 > 512
    with torch.no_grad():
        logits = lm(**long_ids).logits
    assert logits.shape[1] == 900 and torch.isfinite(logits).all()
    lm.save_pretrained(tmp_path / "ext")
    tok.save_pretrained(tmp_path / "ext")
    from trine import TriHeadModel

    reloaded = TriHeadModel.from_pretrained(tmp_path / "ext", with_heads=False)
    with torch.no_grad():
        dense = reloaded(long_ids["input_ids"], long_ids["attention_mask"])["dense_vecs"]
    assert torch.isfinite(dense).all()

    lm2 = AutoModelForMaskedLM.from_pretrained(splade_tiny_dir)
    extend_position_embeddings(lm2, 1023, "interpolate")
    w = lm2.bert.embeddings.position_embeddings.weight
    torch.testing.assert_close(w[0], old[0])
    torch.testing.assert_close(w[-1], old[-1])
    torch.testing.assert_close(w[2], old[1])  # 511 steps over 1022 rows: every second row is an old one
    torch.testing.assert_close(w[1], (old[0] + old[1]) / 2)

    xlmr = AutoModel.from_pretrained(tiny_m3_dir)
    old = xlmr.embeddings.position_embeddings.weight.detach().clone()
    extend_position_embeddings(xlmr, 1026, "copy")
    new = xlmr.embeddings.position_embeddings.weight
    assert torch.equal(new[:514], old)
    assert torch.equal(new[514:], old[2:])  # real positions start after the padding row
    ids = torch.randint(5, 1000, (1, 1000))
    with torch.no_grad():
        assert torch.isfinite(xlmr(input_ids=ids).last_hidden_state).all()
    with pytest.raises(ValueError, match="not more than"):
        extend_position_embeddings(xlmr, 600)


# ---------------------------------------------------------------------------------------------- corpus
def test_bad_corpus_lines_name_file_line_and_field(tmp_path, splade_tiny_dir, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": 3}\nnot json\n{"txt": "x"}\n\n{"text": "  "}\n[1]\n')
    with pytest.raises(DataError) as err:
        scan_corpus([str(bad)])
    problems = err.value.problems
    assert problems == [
        f"{bad}:2: text: must be a string, got int",
        f"{bad}:3: (line): not valid JSON: Expecting value at column 1",
        f"{bad}:4: txt: unknown field (a pre-training record is {{\"text\": ...}})",
        f"{bad}:6: text: only white space",
        f"{bad}:7: (line): a record must be a JSON object",
    ]
    out = tmp_path / "out"
    assert cli_main(["pretrain", *argv(splade_tiny_dir, str(bad), out)]) == 2
    assert "bad.jsonl:2: text" in capsys.readouterr().err
    assert not out.exists()


def test_stream_shards_ranks_and_workers(tmp_path):
    texts = [f"text number {i}" for i in range(50)]
    data = write_corpus(tmp_path / "c.jsonl", texts)
    files, count = scan_corpus([data])
    assert count == 50
    ranks = [TextStream(files, count, batch_size=4, world_size=2, rank=r, seed=0, shuffle_buffer_size=10)
             for r in range(2)]
    seen = [[t for item in ds for t in item["texts"]] for ds in ranks]
    assert len(ranks[0]) == len(ranks[1]) == 6  # 50 // (4 x 2) batches on every rank
    assert len(seen[0]) == len(seen[1]) == 24
    assert not set(seen[0]) & set(seen[1])
    assert all(int(t.split()[-1]) % 2 == r for r in range(2) for t in seen[r])
    assert seen[0] != sorted(seen[0], key=lambda t: int(t.split()[-1]))  # shuffled
    ranks[0].set_epoch(1)
    assert [t for item in ranks[0] for t in item["texts"]] != seen[0]  # a new order each epoch
    ranks[0].set_epoch(0)
    plain = [item for item in DataLoader(ranks[0], batch_size=None, num_workers=0)]
    workers = [item for item in DataLoader(ranks[0], batch_size=None, num_workers=2)]
    assert [b["texts"] for b in plain] == [b["texts"] for b in workers]
    assert [b["batch"] for b in workers] == list(range(6))
    with pytest.raises(DataError, match="fewer than one global batch"):
        TextStream(files, count, batch_size=32, world_size=2)


# ---------------------------------------------------------------------------------------------- training
def weights(folder):
    return load_file(os.path.join(folder, "model.safetensors"))


def test_cli_writes_an_encoder_that_finetune_takes(tmp_path, splade_tiny_dir):
    data = write_corpus(tmp_path / "corpus.jsonl", repeat=2)
    out = tmp_path / "pre"
    assert cli_main(["pretrain", *argv(splade_tiny_dir, data, out, max_steps=3, save_steps=100)]) == 0
    encoder = out / "encoder_model"
    assert sorted(set(os.listdir(encoder)) - {MARKER}) == ["README.md", "config.json", "model.safetensors",
                                                           "tokenizer.json", "tokenizer_config.json", "trine_card.json",
                                                           "trine_family.json"]
    saved, start = weights(encoder), weights(splade_tiny_dir)
    assert any(not torch.equal(saved[k], start[k]) for k in saved if k in start)

    from trine import TriHeadModel
    from trine.training.finetune import build_trainer as finetune_trainer
    from trine.training.finetune import parse_args as finetune_args

    model = TriHeadModel.from_pretrained(encoder, with_heads=False)
    emb = model.backbone.embeddings.word_embeddings.weight
    torch.testing.assert_close(emb, saved["bert.embeddings.word_embeddings.weight"])
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"query": t[:20], "pos": [t]}) + "\n" for t in CORPUS))
    trainer = finetune_trainer(*finetune_args([
        "--model_name_or_path", str(encoder), "--train_data", str(pairs), "--output_dir", str(tmp_path / "ft"),
        "--train_group_size", "1", "--per_device_train_batch_size", "4", "--max_steps", "2", "--report_to", "none",
        "--use_cpu", "True", "--save_strategy", "no", "--disable_tqdm", "True",
    ]))
    trainer.train()


def test_resume_ends_with_the_same_weights(tmp_path, splade_tiny_dir):
    data = write_corpus(tmp_path / "corpus.jsonl", repeat=2)
    full = build_trainer(*parse_args(argv(splade_tiny_dir, data, tmp_path / "full")))
    full.train()
    full.save_model(str(tmp_path / "full"))
    checkpoint = tmp_path / "full" / "checkpoint-3"
    assert (checkpoint / DECODER_FILE).exists()
    # checkpoint round trip: the folder loads back into a model with the same encoder and decoder
    again = RetroMAEModel.from_pretrained(checkpoint)
    state = full.model.decoder.state_dict()
    saved_decoder = load_file(checkpoint / DECODER_FILE)
    assert any(not torch.equal(saved_decoder[k], state[k]) for k in state)  # steps 4-6 moved it on
    torch.testing.assert_close(again.decoder.state_dict(), saved_decoder)

    resumed = build_trainer(*parse_args(argv(splade_tiny_dir, data, tmp_path / "resumed")))
    resumed.train(resume_from_checkpoint=str(checkpoint))
    resumed.save_model(str(tmp_path / "resumed"))
    a, b, start = weights(tmp_path / "full"), weights(tmp_path / "resumed"), weights(checkpoint)
    assert any(not torch.equal(a[k], start[k]) for k in a)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0, msg=k)
    da, db = load_file(tmp_path / "full" / DECODER_FILE), load_file(tmp_path / "resumed" / DECODER_FILE)
    for k in da:
        torch.testing.assert_close(da[k], db[k], atol=1e-6, rtol=0, msg=k)


def test_config_file_unknown_options_and_position_limit(tmp_path, splade_tiny_dir):
    data = write_corpus(tmp_path / "corpus.jsonl")
    cfg = tmp_path / "pre.yaml"
    cfg.write_text(f"model_name_or_path: {splade_tiny_dir}\ntrain_data: [{data}]\noutput_dir: {tmp_path / 'o'}\n"
                   "encoder_mlm_probability: 0.2\nextend_position_embeddings_to: 1024\nmax_seq_length: 800\n")
    model_args, data_args, args = parse_args([str(cfg)])
    assert data_args.encoder_mlm_probability == 0.2 and model_args.extend_position_embeddings_to == 1024
    cfg.write_text(cfg.read_text() + "no_such_option: 1\n")
    with pytest.raises(ValueError, match="no_such_option"):
        parse_args([str(cfg)])
    with pytest.raises(ValueError, match="decoder_mlm_probability"):
        parse_args(argv(splade_tiny_dir, data, tmp_path / "o", decoder_mlm_probability=1.5))
    with pytest.raises(ValueError, match="longer than the model's 512 positions"):
        build_trainer(*parse_args(argv(splade_tiny_dir, data, tmp_path / "o", max_seq_length=800)))
    # with the table extended, 800-token texts train
    long_corpus = write_corpus(tmp_path / "long.jsonl", [" ".join(CORPUS * 3)] * 8)
    trainer = build_trainer(*parse_args(argv(splade_tiny_dir, long_corpus, tmp_path / "o", max_seq_length=800,
                                             extend_position_embeddings_to=1024, max_steps=1,
                                             save_strategy="no", gradient_checkpointing=True, bf16=True)))
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["encoder_input_ids"].shape[1] == 800
    trainer.train()
    assert trainer.model.lm.is_activation_checkpointing
    assert np.isfinite(trainer.state.log_history[-1]["train_loss"])
