"""`trine generate-queries`: mechanics with tiny random LMs (causal with and without a chat template,
sequence-to-sequence) and a real tokenizer; cleaning and de-duplication; the consistency filter reused
from `trine filter`; the command line's errors. (SmolLM2, a real generator, is exercised by
benchmarks/generate_queries_smollm2.py: loading its GGUF alone takes most of a minute on 2 cores.)"""

from __future__ import annotations

import json
import os
from collections import Counter

import numpy as np
import pytest
import torch

from trine.cli import main
from trine.curation.filtering import normalise
from trine.curation.generate import (
    GenerateSummary,
    Passage,
    QueryGenerator,
    _rows,
    clean_query,
    copied_share,
    generate_queries,
    load_prompt,
    read_passages,
)
from trine.data.records import load_train_files
from trine.errors import OptionError, UserError

PASSAGES = [
    {"_id": "chmod", "title": "chmod", "text": "chmod changes the file mode bits of each file according to mode."},
    {"_id": 7, "text": "malloc allocates size bytes and returns a pointer to the allocated memory."},
    {"text": "The socket function creates an endpoint for communication and returns a file descriptor."},
    {"text": "kill sends a signal to a process or a group of processes."},
]
CHAT_TEMPLATE = ("{% for m in messages %}<user> {{ m['content'] }} {% endfor %}"
                 "{% if add_generation_prompt %}<assistant> {% endif %}")


def _tiny_lm(folder, tokenizer_dir, kind, chat=False):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, T5Config, T5ForConditionalGeneration

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    if kind == "causal":
        model = LlamaForCausalLM(LlamaConfig(
            vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=2, max_position_embeddings=512, pad_token_id=tok.pad_token_id,
            bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id, initializer_range=0.5))
    else:
        model = T5ForConditionalGeneration(T5Config(
            vocab_size=len(tok), d_model=16, d_ff=32, d_kv=8, num_layers=1, num_heads=2, pad_token_id=tok.pad_token_id,
            eos_token_id=tok.sep_token_id, decoder_start_token_id=tok.pad_token_id, initializer_factor=5.0))
    if chat:
        tok.chat_template = CHAT_TEMPLATE
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def causal_dir(tmp_path_factory, splade_tiny_dir):
    return _tiny_lm(tmp_path_factory.mktemp("tiny_llama"), splade_tiny_dir, "causal")


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory, splade_tiny_dir):
    return _tiny_lm(tmp_path_factory.mktemp("tiny_llama_chat"), splade_tiny_dir, "causal", chat=True)


@pytest.fixture(scope="module")
def seq2seq_dir(tmp_path_factory, splade_tiny_dir):
    return _tiny_lm(tmp_path_factory.mktemp("tiny_t5"), splade_tiny_dir, "seq2seq")


def _write(path, rows):
    with open(path, "w") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return str(path)


def _read(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_clean_dedup_and_copies():
    assert clean_query('Query: "How do I change file permissions?"\nmore text') == "How do I change file permissions?"
    assert clean_query("\n  1. search query: list files  ") == "list files"
    assert clean_query("#2: 'malloc()'") == "malloc()" and clean_query("- Question 3: what is kill?") == "what is kill?"
    assert clean_query("2024 tax rules") == "2024 tax rules"  # a number is not a list marker
    assert clean_query("3.5 inch drives") == "3.5 inch drives"
    # a lead-in line ending with a colon is not the query: the next line is, or nothing when the reply stops there
    assert clean_query("Here is a query for the passage:\n\n  \"how to kill a process\"") == "how to kill a process"
    assert clean_query("The query is:") == ""
    assert clean_query("Sure! Query:\nSearch terms:\n- grep files") == "grep files"
    assert clean_query("Query: chmod: change file mode") == "chmod: change file mode"
    assert clean_query("The query is:\n`\n```python\nls -l") == "ls -l" and clean_query("Query:\n`") == ""
    passage = Passage("chmod changes the file mode bits of each given file.", line=3, id="c")
    summary = GenerateSummary()
    rows = _rows(passage, ["Query: change file mode", "change  FILE mode", "the file mode bits", "", "  ",
                           "what does chmod do", "CHMOD changes the file mode bits of each given file.",
                           "chmod changes the file mode bits, of each file",  # 6 of its 7 trigrams are copied
                           "chmod changes the file mode of a directory"],  # 3 of 6
                 {"model": "m"}, summary)
    assert [r["query"] for r in rows] == ["change file mode", "what does chmod do",
                                          "chmod changes the file mode of a directory"]
    assert summary.generated == 9 and summary.written == 3
    assert summary.dropped == {"empty": 2, "duplicate": 1, "copies_passage": 3}
    assert copied_share("chmod changes the file mode bits, of each file", passage.text) == pytest.approx(6 / 7)
    assert rows[0]["pos"] == [passage.text] and rows[0]["generator"] == {"model": "m", "passage_line": 3,
                                                                        "passage_id": "c"}


def test_passages_and_prompt_errors(tmp_path):
    bad = _write(tmp_path / "bad.jsonl", [PASSAGES[0], {"text": 3}, "not json", {"title": "t"},
                                          {"text": "x", "_id": [1]}])
    with pytest.raises(UserError) as err:
        read_passages(bad)
    message = str(err.value)
    for where in (f"{bad}:2: text: must be a string", f"{bad}:3: (line): not valid JSON", f"{bad}:4: text: missing",
                  f"{bad}:5: _id: must be a string or an integer"):
        assert where in message
    assert [p.id for p in read_passages(_write(tmp_path / "ok.jsonl", PASSAGES))] == ["chmod", "7", None, None]
    with pytest.raises(OptionError, match="no {passage} placeholder"):
        load_prompt("Write a query.")
    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text('Title: {title}\n{passage}\nReply as JSON {"query": ...}')
    assert load_prompt(prompt_file=str(prompt_file)).startswith("Title: {title}")
    with pytest.raises(OptionError, match="not both"):
        load_prompt("{passage}", str(prompt_file))


def test_causal_generation_counts_dedup_and_training_format(tmp_path, causal_dir):
    gen = QueryGenerator(causal_dir, batch_size=3)
    assert not gen.chat and gen.tokenizer.padding_side == "left"
    passages = _write(tmp_path / "passages.jsonl", PASSAGES)
    out = str(tmp_path / "pairs.jsonl")
    fast = dict(max_new_tokens=4, top_p=1.0, show_progress=False)  # top_p 1: no sort of the vocabulary per token
    summary = generate_queries(passages, out, gen, num_queries=3, temperature=1.0, seed=1, chunk_size=3, **fast)
    rows = _read(out)
    assert summary.passages == 4 and summary.generated == 12
    assert summary.written == len(rows) == 12 - sum(summary.dropped.values()) > 0
    per_passage = Counter(r["pos"][0] for r in rows)
    assert set(per_passage) <= {p["text"] for p in PASSAGES} and max(per_passage.values()) <= 3
    for passage in per_passage:
        keys = [normalise(r["query"]) for r in rows if r["pos"][0] == passage]
        assert len(keys) == len(set(keys)) and all(k and k not in normalise(passage) for k in keys)
    g = rows[0]["generator"]
    assert g["model"] == causal_dir and g["kind"] == "causal" and g["chat_template"] is False
    assert g["num_queries"] == 3 and g["temperature"] == 1.0 and g["seed"] == 1 and len(g["prompt_sha256"]) == 16
    files = load_train_files([out], train_group_size=1)  # trine's own training-data validation
    assert len(files[0].records) == len(rows)
    # the same options, the same pairs; another seed, others
    again, other = str(tmp_path / "again.jsonl"), str(tmp_path / "other.jsonl")
    for path, seed in ((again, 1), (other, 2)):
        generate_queries(passages, path, gen, num_queries=3, temperature=1.0, seed=seed, chunk_size=3, **fast)
    assert [r["query"] for r in _read(again)] == [r["query"] for r in rows] != [r["query"] for r in _read(other)]
    # near-greedy sampling repeats itself: the repeats are dropped, one query per passage stays
    cold = str(tmp_path / "cold.jsonl")
    cold_summary = generate_queries(passages, cold, gen, num_queries=3, temperature=1e-4, **fast)
    assert max(Counter(r["pos"][0] for r in _read(cold)).values()) == 1
    assert cold_summary.dropped["duplicate"] == 2 * cold_summary.written


def test_left_padded_batches_equal_one_by_one(causal_dir, chat_dir):
    for folder in (causal_dir, chat_dir):
        prompts = [p["text"] * (i + 1) for i, p in enumerate(PASSAGES)]  # lengths differ: padding matters
        batched = QueryGenerator(folder, batch_size=4).generate(prompts, num_queries=1, temperature=0,
                                                                 max_new_tokens=5)
        single = QueryGenerator(folder, batch_size=1).generate(prompts, num_queries=1, temperature=0,
                                                                max_new_tokens=5)
        assert batched == single and all(len(r) == 1 for r in batched)
        assert len({r[0] for r in batched}) > 1  # the prompts, not the padding, decide


def test_chat_template_and_seq2seq(tmp_path, chat_dir, seq2seq_dir):
    chat = QueryGenerator(chat_dir)
    text = chat.prompt_text("Q for: {passage} ({title})", Passage("some passage", 1, title="T"))
    assert text == "<user> Q for: some passage (T) <assistant> "
    plain = QueryGenerator(chat_dir, use_chat_template=False)
    assert plain.prompt_text("Q for: {passage}", Passage("some passage", 1)) == "Q for: some passage"
    s2s = QueryGenerator(seq2seq_dir, passage_max_len=4)
    assert s2s.seq2seq and not s2s.chat
    assert s2s.prompt_text("{passage}", Passage("one two three four five six seven", 1)) == "one two three four"
    with pytest.raises(OptionError, match="no chat template"):
        QueryGenerator(seq2seq_dir, use_chat_template=True)
    out = str(tmp_path / "s2s.jsonl")
    summary = generate_queries(_write(tmp_path / "p.jsonl", PASSAGES), out, s2s, num_queries=2, temperature=1.0,
                               max_new_tokens=5, show_progress=False)
    assert summary.generated == 8 and summary.written == len(_read(out)) > 0
    assert _read(out)[0]["generator"]["kind"] == "seq2seq"
    with pytest.raises(ValueError, match="temperature 0 is greedy"):
        s2s.generate(["x"], num_queries=2, temperature=0)


def test_consistency_filter_is_trine_filters(tmp_path, causal_dir, splade_tiny_dir):
    from trine import Embedder
    from trine.curation.teacher import EmbedderScorer

    scorer = EmbedderScorer(Embedder(splade_tiny_dir, show_progress=False))
    passages = _write(tmp_path / "passages.jsonl", PASSAGES)
    out, dropped = str(tmp_path / "pairs.jsonl"), str(tmp_path / "dropped.jsonl")
    summary = generate_queries(passages, out, QueryGenerator(causal_dir), num_queries=3, temperature=1.0,
                               max_new_tokens=4, top_p=1.0, filter_scorer=scorer, top_k=1, dropped_file=dropped,
                               show_progress=False)
    kept, gone = _read(out), _read(dropped)
    assert summary.filtered.kept == len(kept) and len(kept) + len(gone) == summary.written
    assert {d["reason"] for d in gone} <= {"rank"} and gone  # random queries: some fail
    texts = [p["text"] for p in PASSAGES]
    for row in kept:  # every other passage was compared (4 passages < rank_sample_size): the positive is first
        scores = np.asarray(scorer([row["query"]] * len(texts), texts))
        assert scores[texts.index(row["pos"][0])] >= scores.max()
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp-")]  # the unfiltered pairs are gone


def test_command_line(tmp_path, causal_dir, capsys):
    passages = _write(tmp_path / "passages.jsonl", PASSAGES)
    out = tmp_path / "pairs.jsonl"
    common = ["generate-queries", "--model", causal_dir, "--input_file", passages, "--quiet"]
    assert main([*common, "--output_file", str(out), "--num_queries", "2", "--max_new_tokens", "4",
                 "--prompt", "Query for {passage}"]) == 0
    assert len(_read(out)) > 0 and "pairs kept" in capsys.readouterr().out
    config = tmp_path / "generate.yaml"  # one config file instead of the flags, as every command takes
    config.write_text(f"model: {causal_dir}\ninput_file: {passages}\noutput_file: {tmp_path / 'c.jsonl'}\n"
                      "num_queries: 1\ntemperature: 0\nmax_new_tokens: 3\nquiet: true\n")
    assert main(["generate-queries", str(config)]) == 0
    assert {r["generator"]["temperature"] for r in _read(tmp_path / "c.jsonl")} == {0.0}
    assert main([*common, "--output_file", str(tmp_path / "x.jsonl"), "--prompt", "no placeholder"]) == 2
    assert "no {passage} placeholder" in capsys.readouterr().err
    assert main([*common, "--output_file", passages]) == 2  # never over the input
    assert "would replace the input" in capsys.readouterr().err
    assert main([*common, "--output_file", str(tmp_path / "y.jsonl"), "--top_k", "1"]) == 2
    assert "--filter_model" in capsys.readouterr().err
    bad = _write(tmp_path / "bad.jsonl", [PASSAGES[0], {"text": ""}])
    assert main(["generate-queries", "--model", causal_dir, "--input_file", bad, "--output_file",
                 str(tmp_path / "z.jsonl"), "--quiet"]) == 2
    assert f"{bad}:2: text: empty" in capsys.readouterr().err
    assert not (tmp_path / "x.jsonl").exists() and not (tmp_path / "z.jsonl").exists()
