"""`trine pretrain`: RetroMAE pre-training (stage 1 of BGE and BGE-M3) on the Hugging Face ``Trainer``.

Corpora are JSONL files of ``{"text": str}``, checked whole in one streaming pass before anything
trains (every bad line is reported as ``file:line: field: message``), then streamed: no file is
held in memory. Each rank reads every ``world_size``-th record, shuffles through a bounded buffer
and cuts the same number of batches, so DDP ranks never wait on one another. Masks are drawn from
a random state fixed by (seed, epoch, rank, batch number): a resumed run sees the same batches.

    trine pretrain --model_name_or_path MODEL --train_data corpus.jsonl --output_dir out \\
        --max_seq_length 512 --per_device_train_batch_size 32 --learning_rate 2e-5 --num_train_epochs 2

The encoder is written to ``<output_dir>/encoder_model`` (or ``encoder_output_dir``), a plain
backbone folder for ``trine finetune --model_name_or_path``.

The command only: what it runs is :mod:`trine.training.pretraining` (options, corpus stream, masks,
trainer), re-exported here for older imports.
"""

from __future__ import annotations

import sys

from trine.training.common import run_cli
from trine.training.pretraining import (  # noqa: F401  (re-exported)
    TEXT_FIELDS,
    PretrainDataArguments,
    PretrainModelArguments,
    PretrainTrainer,
    PretrainTrainingArguments,
    RetroMAECollator,
    TextStream,
    build_trainer,
    encoder_dir,
    iter_texts,
    parse_args,
    pretrain,
    scan_corpus,
    whole_word_sample,
)


def main(argv: list[str] | None = None, *, debug: bool = False) -> int:
    """Bad options or data exit 2 with the message (the command line's policy: ``run_cli``)."""

    def run(model_args: PretrainModelArguments, data_args: PretrainDataArguments,
            args: PretrainTrainingArguments) -> None:
        out = pretrain(model_args, data_args, args)
        if args.should_save:
            print(f"encoder: {out}")

    return run_cli(argv, parse_args, run, debug=debug)


if __name__ == "__main__":
    sys.exit(main())
