"""RetroMAE pre-training (stage 1 of BGE and BGE-M3), what `trine pretrain` runs: its options
(:mod:`.arguments`), the streamed corpus (:mod:`.stream`), the masks (:mod:`.collator`) and the
trainer (:mod:`.trainer`)."""

from trine.training.pretraining.arguments import (
    PretrainDataArguments,
    PretrainModelArguments,
    PretrainTrainingArguments,
    parse_args,
)
from trine.training.pretraining.collator import RetroMAECollator, whole_word_sample
from trine.training.pretraining.stream import TEXT_FIELDS, TextStream, iter_texts, scan_corpus
from trine.training.pretraining.trainer import PretrainTrainer, build_trainer, encoder_dir, pretrain

__all__ = [
    "TEXT_FIELDS",
    "PretrainDataArguments",
    "PretrainModelArguments",
    "PretrainTrainer",
    "PretrainTrainingArguments",
    "RetroMAECollator",
    "TextStream",
    "build_trainer",
    "encoder_dir",
    "iter_texts",
    "parse_args",
    "pretrain",
    "scan_corpus",
    "whole_word_sample",
]
