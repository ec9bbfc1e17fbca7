"""The one corpus reader (``trine.data.corpus``): the id rule, the passage text, and errors naming the
file, line and field, the same through every command that reads a corpus or queries file."""

from __future__ import annotations

import json

import pytest

from trine.data import DatasetFormatError, corpus_passages, passage_text, read_corpus, read_queries
from trine.data.corpus import id_field_of


def write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return str(path)


@pytest.mark.parametrize(("first", "field"), [({"_id": "a", "text": "x"}, "_id"), ({"id": "a", "text": "x"}, "id"),
                                              ({"_id": "a", "id": "b", "text": "x"}, "_id"),
                                              ({"text": "x"}, "_id"), ("not json", "_id")])
def test_a_lone_file_takes_its_id_field_from_the_first_record(tmp_path, first, field):
    assert id_field_of(write(tmp_path / "c.jsonl", [first])) == field


def test_both_layouts_read_the_same_corpus(tmp_path):
    rows = [{"title": "ls", "text": "list directory contents"}, {"text": "grep prints matching lines"},
            {"title": "tar", "text": ""}]
    beir = write(tmp_path / "beir.jsonl", [{"_id": i, **r} for i, r in zip(["d1", 2, "d3"], rows)])
    custom = write(tmp_path / "custom.jsonl", [{"id": i, **r} for i, r in zip(["d1", 2, "d3"], rows)])
    expected = {"d1": {"title": "ls", "text": "list directory contents"},
                "2": {"title": "", "text": "grep prints matching lines"}, "d3": {"title": "tar", "text": ""}}
    assert read_corpus(beir) == read_corpus(custom) == expected
    assert read_corpus(beir, "_id") == read_corpus(custom, "id") == expected
    assert corpus_passages(expected) == (["d1", "2", "d3"], ["ls list directory contents",
                                                             "grep prints matching lines", "tar"])
    assert passage_text(" ", "x") == "x" and passage_text("", " x ") == " x "


@pytest.mark.parametrize(("rows", "id_field", "message"), [
    ([{"_id": "a", "text": "x"}, {"id": "b", "text": "y"}], None, r"c\.jsonl:2: field '_id' is missing"),
    ([{"id": "a", "text": "x"}], "_id", r"c\.jsonl:1: field '_id' is missing"),
    ([{"_id": "a", "text": "x"}, {"_id": "a", "text": "y"}], None, r"c\.jsonl:2: field '_id': duplicate id 'a'"),
    ([{"_id": True, "text": "x"}], None, r"c\.jsonl:1: field '_id' must be str, got bool True"),
    ([{"_id": "a"}], None, r"c\.jsonl:1: field 'text' is missing"),
    ([{"_id": "a", "text": ""}], None, r"c\.jsonl:1: field 'text': empty text"),
    ([{"_id": "a", "text": "x", "title": 3}], None, r"c\.jsonl:1: field 'title' must be str"),
    ([{"_id": "a", "text": "x"}, "{"], None, r"c\.jsonl:2: \(line\): not valid JSON"),
    ([], None, r"c\.jsonl: no documents"),
])
def test_a_bad_corpus_names_file_line_and_field(tmp_path, rows, id_field, message):
    path = write(tmp_path / "c.jsonl", rows)
    with pytest.raises(DatasetFormatError, match=message) as err:
        read_corpus(path, id_field)
    assert "\n" not in str(err.value)
    with pytest.raises(DatasetFormatError, match=r"nothing\.jsonl: file not found"):
        read_corpus(str(tmp_path / "nothing.jsonl"))
    with pytest.raises(ValueError, match="id_field must be one of"):
        read_corpus(path, "doc_id")


def test_queries_follow_the_same_rule(tmp_path):
    assert read_queries(write(tmp_path / "q.jsonl", [{"id": 1, "text": "how to list files"}])) == {
        "1": "how to list files"}
    with pytest.raises(DatasetFormatError, match=r"q\.jsonl:2: field 'id': duplicate id 'x'"):
        read_queries(write(tmp_path / "q.jsonl", [{"id": "x", "text": "a"}, {"id": "x", "text": "b"}]))


def test_every_reader_of_a_corpus_uses_the_one_rule(tmp_path):
    """``trine serve --documents`` reads the custom layout too (it read BEIR's ``_id`` only), and a missing
    id is a user error naming the field."""
    from trine.serving.common import load_documents

    corpus = write(tmp_path / "corpus.jsonl", [{"id": "b", "title": "ls", "text": "list directory contents"},
                                                {"id": "a", "text": "grep prints matching lines"}])
    assert load_documents(corpus, ["a", "b"]) == ["grep prints matching lines", "ls list directory contents"]
    with pytest.raises(DatasetFormatError, match=r"corpus\.jsonl: no document with id 'c'"):
        load_documents(corpus, ["a", "c"])
