"""The data every command reads: FlagEmbedding's JSONL training records (:mod:`.records`), text
corpora, candidate pools, and retrieval corpora and queries with ids (:mod:`.corpus`), all read by
one reader with one error policy (:mod:`.reader`): every problem is ``file:line: field: message``,
and nothing trains on bad data."""

from trine.data.corpus import (
    ID_FIELDS,
    DatasetFormatError,
    corpus_passages,
    iter_texts,
    list_data_files,
    passage_text,
    read_corpus,
    read_pool,
    read_queries,
    scan_texts,
)
from trine.data.reader import DataError, json_lines, text_lines
from trine.data.records import (
    Record,
    TrainFile,
    apply_dataset_options,
    iter_raw_rows,
    load_train_files,
    read_file,
    read_records,
)
from trine.data.text import text_problem

__all__ = [
    "ID_FIELDS",
    "DataError",
    "DatasetFormatError",
    "corpus_passages",
    "passage_text",
    "read_corpus",
    "read_queries",
    "Record",
    "TrainFile",
    "apply_dataset_options",
    "iter_raw_rows",
    "iter_texts",
    "json_lines",
    "list_data_files",
    "load_train_files",
    "read_file",
    "read_pool",
    "read_records",
    "scan_texts",
    "text_lines",
    "text_problem",
]
