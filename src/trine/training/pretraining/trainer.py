"""The pre-training run: the trainer over the text stream, and :func:`pretrain` (check the outputs,
train, write the encoder)."""

from __future__ import annotations

import os
from typing import Any

import torch
from torch.utils.data import DataLoader

from trine.cards import data_summary, training_card
from trine.errors import options_checked
from trine.io import check_output_path
from trine.modeling.families import build_model
from trine.training.pretraining.arguments import (
    PretrainDataArguments,
    PretrainModelArguments,
    PretrainTrainingArguments,
)
from trine.training.pretraining.collator import RetroMAECollator
from trine.training.pretraining.stream import TextStream, scan_corpus
from trine.training.trainer import EmbedderTrainer, EpochPlanCallback, check_training_output, prepare_output_dir


class PretrainTrainer(EmbedderTrainer):
    """The fine-tuning trainer's logging of loss parts, with the text stream and RetroMAE checkpoints
    (encoder folder + ``retromae_decoder.safetensors``)."""

    def get_train_dataloader(self) -> DataLoader:
        return DataLoader(
            self.train_dataset,
            batch_size=None,
            collate_fn=self.data_collator,
            num_workers=self.args.dataloader_num_workers,
            pin_memory=self.args.dataloader_pin_memory and torch.cuda.is_available(),
        )

    def _record(self, out: dict[str, Any]) -> None:
        for name, value in out["parts"].items():
            self._parts[f"loss_{name}"].append(float(value))

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir or self.args.output_dir
        self.accelerator.unwrap_model(self.model).save_checkpoint(output_dir)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:  # noqa: ANN001
        self.accelerator.unwrap_model(model or self.model).load_checkpoint(resume_from_checkpoint)


def build_trainer(model_args: PretrainModelArguments, data_args: PretrainDataArguments,
                  args: PretrainTrainingArguments) -> PretrainTrainer:
    """Check the corpus, load the model, and make the trainer (nothing is written yet)."""
    files, count = scan_corpus(data_args.train_data)
    model = build_model(model_args, args, "pretraining")
    positions = int(model.lm.config.max_position_embeddings) - model.position_offset
    if data_args.max_seq_length > positions:
        raise ValueError(f"max_seq_length {data_args.max_seq_length} is longer than the model's {positions} positions "
                         "(extend_position_embeddings_to grows the table)")
    seed = args.data_seed if args.data_seed is not None else args.seed
    dataset = TextStream(files, count, batch_size=args.per_device_train_batch_size, world_size=args.world_size,
                         rank=args.process_index, seed=seed, shuffle_buffer_size=data_args.shuffle_buffer_size)
    collator = RetroMAECollator(
        model.tokenizer, max_seq_length=data_args.max_seq_length,
        encoder_mlm_probability=data_args.encoder_mlm_probability,
        decoder_mlm_probability=data_args.decoder_mlm_probability, seed=seed,
        pad_to_multiple_of=data_args.pad_to_multiple_of,
    )
    return PretrainTrainer(model=model, args=args, train_dataset=dataset, data_collator=collator,
                           callbacks=[EpochPlanCallback(dataset)])


def encoder_dir(args: PretrainTrainingArguments) -> str:
    return args.encoder_output_dir or os.path.join(args.output_dir, "encoder_model")


def pretrain(model_args: PretrainModelArguments, data_args: PretrainDataArguments,
             args: PretrainTrainingArguments) -> str:
    """Train, then write the encoder (main process); return its folder. Both folders are checked
    against the output policy before anything is loaded (:mod:`trine.io`)."""
    model_args.resolve_model_reference()  # a Hub id: its folder in the Hugging Face cache, before the checks
    inputs = [model_args.model_name_or_path, *data_args.train_data]
    checkpoint = check_training_output(args, inputs)
    out = encoder_dir(args)
    inside = os.path.realpath(os.path.abspath(out)).startswith(os.path.realpath(os.path.abspath(args.output_dir)))
    if not inside:  # inside output_dir, it is covered by output_dir's check
        check_output_path(out, inputs=inputs, overwrite=args.overwrite_output_dir, what="encoder_output_dir")
    with options_checked():  # e.g. max_seq_length beyond the model's positions: exit 2, nothing written
        trainer = build_trainer(model_args, data_args, args)
    prepare_output_dir(args, resuming=checkpoint is not None)
    trainer.train(resume_from_checkpoint=checkpoint)
    if args.should_save:
        card = training_card("pretrain", "masked-lm", base_model=model_args.model_reference,
                             options={"model": model_args, "data": data_args, "training": args},
                             history=trainer.state.log_history, data=data_summary(
                                 (path, count_lines(path)) for path in trainer.train_dataset.files))
        trainer.accelerator.unwrap_model(trainer.model).save_encoder(out, overwrite=inside or args.overwrite_output_dir,
                                                                     card=card)
    return out


def count_lines(path: str) -> int:
    """Non-blank lines of a JSONL file (the corpus was checked whole before training: one text per line)."""
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())
