"""Compatibility: FlagEmbedding's training-data format lives in :mod:`trine.data` (records,
validation, corpora, the reader); sampling a record's group in :mod:`trine.training.dataset`.
Names importable from here before keep working; new code imports from those modules."""

from trine.data.corpus import list_data_files, parse_text_line
from trine.data.reader import DataError
from trine.data.records import KNOWN_FIELDS, SUPPORTED_TYPES, Record, TrainFile, load_train_files, read_file
from trine.training.dataset import Example, sample_group

__all__ = [
    "KNOWN_FIELDS",
    "SUPPORTED_TYPES",
    "DataError",
    "Example",
    "Record",
    "TrainFile",
    "list_data_files",
    "load_train_files",
    "parse_text_line",
    "read_file",
    "sample_group",
]
