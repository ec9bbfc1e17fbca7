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
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from transformers import PreTrainedTokenizerBase

from trine.io import check_output_path
from trine.modeling.retromae import RetroMAEModel
from trine.training.arguments import SafeTrainingArguments
from trine.training.data import DataError, list_data_files, parse_text_line
from trine.training.finetune import parse_config, run_cli
from trine.training.trainer import EmbedderTrainer, EpochPlanCallback, check_training_output, prepare_output_dir

logger = logging.getLogger(__name__)

TEXT_FIELDS = {"text"}


# ---------------------------------------------------------------------------------------------- arguments
@dataclass
class PretrainModelArguments:
    model_name_or_path: str = field(metadata={"help": "masked-LM model folder (BERT or RoBERTa/XLM-R family)"})
    extend_position_embeddings_to: int | None = field(
        default=None, metadata={"help": "grow the position table to this many rows before training "
                                        "(config.max_position_embeddings; BGE-M3: 8194 for 8192 tokens)"}
    )
    position_extension: str = field(default="copy", metadata={"help": "copy or interpolate (new position rows)"})
    allow_new_mlm_head: bool = field(
        default=False, metadata={"help": "start a new MLM head when the folder has none (else an error)"}
    )
    trust_remote_code: bool = field(default=False)
    attn_implementation: str | None = field(
        default=None, metadata={"help": "transformers attention implementation of the encoder: sdpa, eager, ..."}
    )

    def __post_init__(self) -> None:
        if self.position_extension not in ("copy", "interpolate"):
            raise ValueError(f"position_extension must be copy or interpolate, got {self.position_extension!r}")


@dataclass
class PretrainDataArguments:
    train_data: list[str] = field(metadata={"help": 'JSONL files of {"text": ...} and/or folders of them'})
    max_seq_length: int = field(default=512, metadata={"help": "tokens per text, special tokens included"})
    encoder_mlm_probability: float = field(default=0.3, metadata={"help": "share of tokens the encoder predicts"})
    decoder_mlm_probability: float = field(
        default=0.5, metadata={"help": "share of tokens hidden from each decoder row (besides its own position)"}
    )
    shuffle_buffer_size: int = field(
        default=10000, metadata={"help": "texts held for streaming shuffle (0: file order)"}
    )
    pad_to_multiple_of: int | None = field(default=None)

    def __post_init__(self) -> None:
        if isinstance(self.train_data, str):
            self.train_data = [self.train_data]
        for name in ("encoder_mlm_probability", "decoder_mlm_probability"):
            value = getattr(self, name)
            if not 0 < value < 1:
                raise ValueError(f"{name} must be between 0 and 1, got {value}")
        if self.max_seq_length < 4:
            raise ValueError(f"max_seq_length must be at least 4, got {self.max_seq_length}")
        if self.shuffle_buffer_size < 0:
            raise ValueError(f"shuffle_buffer_size must be >= 0, got {self.shuffle_buffer_size}")


@dataclass
class PretrainTrainingArguments(SafeTrainingArguments):
    encoder_output_dir: str | None = field(
        default=None, metadata={"help": "where the final encoder goes (default: <output_dir>/encoder_model)"}
    )


def parse_args(argv: list[str]) -> tuple[PretrainModelArguments, PretrainDataArguments, PretrainTrainingArguments]:
    """Command-line flags, or one YAML/JSON config file; unknown names are errors."""
    return parse_config(argv, (PretrainModelArguments, PretrainDataArguments, PretrainTrainingArguments))


# ---------------------------------------------------------------------------------------------- corpus
def iter_texts(path: str) -> Iterator[str]:
    """The texts of one corpus file, read line by line; a bad line raises :class:`DataError`."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            text, problem = parse_text_line(raw, TEXT_FIELDS, "pre-training record")
            if problem:
                raise DataError([f"{path}:{number}: {problem}"])
            if text is not None:
                yield text


def scan_corpus(paths: list[str]) -> tuple[list[str], int]:
    """Check every line of every file in one streaming pass; return the files and the number of texts.
    Raises :class:`DataError` listing every problem."""
    problems: list[str] = []
    files = list_data_files(paths)
    total = 0
    for path in files:
        count = 0
        try:
            handle = open(path, "rb")
        except OSError as err:
            problems.append(f"{path}: cannot open: {err}")
            continue
        with handle:
            for number, raw in enumerate(handle, start=1):
                text, problem = parse_text_line(raw, TEXT_FIELDS, "pre-training record")
                if problem:
                    problems.append(f"{path}:{number}: {problem}")
                elif text is not None:
                    count += 1
        if count == 0 and not any(p.startswith(path + ":") for p in problems):
            problems.append(f"{path}: no records")
        total += count
    if problems:
        raise DataError(problems)
    return files, total


class TextStream(IterableDataset):
    """Batches of texts streamed from JSONL files; one item is one batch of this rank.

    Rank ``r`` of ``W`` takes records ``r, r + W, ...`` (in file order), shuffles them through a
    buffer of ``shuffle_buffer_size`` texts (seeded by seed, epoch and rank) and yields
    ``num_records // (batch_size * W)`` batches per epoch, the same number on every rank. With
    DataLoader workers, worker ``k`` of ``K`` yields batches ``k, k + K, ...`` (the DataLoader
    interleaves them back into order).
    """

    def __init__(self, files: list[str], num_records: int, *, batch_size: int, world_size: int = 1, rank: int = 0,
                 seed: int = 0, shuffle_buffer_size: int = 10000):
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.files = list(files)
        self.num_records = num_records
        self.batch_size = batch_size
        self.world_size = world_size
        self.rank = rank
        self.seed = seed
        self.shuffle_buffer_size = shuffle_buffer_size
        self.batches_per_epoch = num_records // (batch_size * world_size)
        if self.batches_per_epoch == 0:
            raise DataError([f"{len(self.files)} file(s) hold {num_records} texts: fewer than one global batch "
                             f"({batch_size} x {world_size} processes)"])
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.batches_per_epoch

    @property
    def num_examples(self) -> int:
        """Texts per epoch over all ranks."""
        return self.batches_per_epoch * self.batch_size * self.world_size

    def _rank_texts(self) -> Iterator[str]:
        index = 0
        for path in self.files:
            for text in iter_texts(path):
                if index % self.world_size == self.rank:
                    yield text
                index += 1

    def _shuffled(self, texts: Iterator[str], rng: np.random.Generator) -> Iterator[str]:
        size = self.shuffle_buffer_size
        if size <= 1:
            yield from texts
            return
        buffer: list[str] = []
        for text in texts:
            if len(buffer) < size:
                buffer.append(text)
                continue
            i = int(rng.integers(size))
            yield buffer[i]
            buffer[i] = text
        for i in rng.permutation(len(buffer)):
            yield buffer[i]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        rng = np.random.default_rng([self.seed, self.epoch, self.rank])
        batch: list[str] = []
        number = 0
        for text in self._shuffled(self._rank_texts(), rng):
            batch.append(text)
            if len(batch) < self.batch_size:
                continue
            if number % workers == worker:
                yield {"epoch": self.epoch, "rank": self.rank, "batch": number, "texts": batch}
            number += 1
            batch = []
            if number == self.batches_per_epoch:
                return


# ---------------------------------------------------------------------------------------------- masks
def whole_word_sample(word_index: np.ndarray, probability: float, rows: int, rng: np.random.Generator) -> np.ndarray:
    """``rows`` independent whole-word samples over one text: bool (rows x length), True = chosen.

    ``word_index`` gives each token's word (-1: a special or padding token, never chosen). Words
    are taken in a random order until about ``probability`` of the word tokens are covered (a
    word is taken if the count before it plus half its length stays within the target), at
    least one word per row; the pieces of a word are always chosen together.
    """
    valid = word_index >= 0
    out = np.zeros((rows, word_index.shape[0]), dtype=bool)
    if not valid.any():
        return out
    _, slot = np.unique(word_index[valid], return_inverse=True)
    lengths = np.bincount(slot)
    target = max(1, round(int(valid.sum()) * probability))
    order = np.argsort(rng.random((rows, lengths.shape[0])), axis=1)
    taken_lengths = lengths[order]
    before = np.cumsum(taken_lengths, axis=1) - taken_lengths
    take = before + taken_lengths / 2 <= target
    take[:, 0] = True
    chosen = np.zeros_like(take)
    np.put_along_axis(chosen, order, take, axis=1)
    out[:, valid] = chosen[:, slot]
    return out


class RetroMAECollator:
    """Tokenises a batch of texts and draws the masks (see :class:`trine.modeling.retromae.RetroMAEModel`).

    Returns ``encoder_input_ids`` (whole words masked at ``encoder_mlm_probability``: 80%
    ``[MASK]``, 10% a random token, 10% unchanged), ``attention_mask``, ``encoder_labels``
    (original ids at the masked positions, -100 elsewhere), ``decoder_input_ids`` (the original
    ids), ``decoder_visible`` (batch x length x length, bool: row i may attend to slot j; each row
    hides a fresh whole-word sample at ``decoder_mlm_probability`` and its own position, slot 0
    (the sentence vector) is always visible, padding never) and ``decoder_labels`` (every
    non-special token; -100 at special tokens and padding).
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, *, max_seq_length: int = 512,
                 encoder_mlm_probability: float = 0.3, decoder_mlm_probability: float = 0.5, seed: int = 0,
                 pad_to_multiple_of: int | None = None):
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError("RetroMAE needs a fast tokenizer (tokenizer.json) to find whole words")
        self.tokenizer = tokenizer
        self.max_seq_length = max_seq_length
        self.encoder_mlm_probability = encoder_mlm_probability
        self.decoder_mlm_probability = decoder_mlm_probability
        self.seed = seed
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, item: dict[str, Any]) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed, item["epoch"], item["rank"], item["batch"]])
        return self.build(item["texts"], rng)

    def build(self, texts: list[str], rng: np.random.Generator) -> dict[str, torch.Tensor]:
        tok = self.tokenizer
        enc = tok(texts, truncation=True, max_length=self.max_seq_length, return_special_tokens_mask=True)
        lengths = [len(ids) for ids in enc["input_ids"]]
        length = max(lengths)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        b = len(texts)
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
        ids = np.full((b, length), pad_id, dtype=np.int64)
        attention = np.zeros((b, length), dtype=np.int64)
        encoder_ids = ids.copy()
        encoder_labels = np.full((b, length), -100, dtype=np.int64)
        decoder_labels = np.full((b, length), -100, dtype=np.int64)
        visible = np.zeros((b, length, length), dtype=bool)
        for i in range(b):
            n = lengths[i]
            row = np.asarray(enc["input_ids"][i], dtype=np.int64)
            special = np.asarray(enc["special_tokens_mask"][i], dtype=bool)
            words = np.array([-1 if w is None else w for w in enc.word_ids(i)], dtype=np.int64)
            words[special] = -1
            if not special[0]:
                raise ValueError("RetroMAE needs a tokenizer that starts every text with a special (CLS) token")
            ids[i, :n] = row
            attention[i, :n] = 1

            masked = whole_word_sample(words, self.encoder_mlm_probability, 1, rng)[0]
            encoder_labels[i, :n][masked] = row[masked]
            replaced = row.copy()
            draw = rng.random(n)
            replaced[masked & (draw < 0.8)] = tok.mask_token_id
            swap = masked & (draw >= 0.8) & (draw < 0.9)
            replaced[swap] = rng.integers(len(tok), size=int(swap.sum()))
            encoder_ids[i, :n] = replaced

            decoder_labels[i, :n][~special] = row[~special]
            hidden = whole_word_sample(words, self.decoder_mlm_probability, n, rng)
            see = ~hidden
            see[np.arange(n), np.arange(n)] = False  # a row never sees the token it reconstructs
            see[:, 0] = True  # the sentence vector
            visible[i, :n, :n] = see
            visible[i, n:, 0] = True  # padding rows (no label) attend to the sentence vector only
        return {
            "encoder_input_ids": torch.from_numpy(encoder_ids),
            "attention_mask": torch.from_numpy(attention),
            "encoder_labels": torch.from_numpy(encoder_labels),
            "decoder_input_ids": torch.from_numpy(ids),
            "decoder_visible": torch.from_numpy(visible),
            "decoder_labels": torch.from_numpy(decoder_labels),
        }


# ---------------------------------------------------------------------------------------------- trainer
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
    model = RetroMAEModel.from_pretrained(
        model_args.model_name_or_path,
        extend_position_embeddings_to=model_args.extend_position_embeddings_to,
        position_extension=model_args.position_extension,
        allow_new_mlm_head=model_args.allow_new_mlm_head,
        trust_remote_code=model_args.trust_remote_code,
        attn_implementation=model_args.attn_implementation,
    )
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
    inputs = [model_args.model_name_or_path, *data_args.train_data]
    checkpoint = check_training_output(args, inputs)
    out = encoder_dir(args)
    inside = os.path.realpath(os.path.abspath(out)).startswith(os.path.realpath(os.path.abspath(args.output_dir)))
    if not inside:  # inside output_dir, it is covered by output_dir's check
        check_output_path(out, inputs=inputs, overwrite=args.overwrite_output_dir, what="encoder_output_dir")
    trainer = build_trainer(model_args, data_args, args)
    prepare_output_dir(args, resuming=checkpoint is not None)
    trainer.train(resume_from_checkpoint=checkpoint)
    if args.should_save:
        trainer.accelerator.unwrap_model(trainer.model).save_encoder(out, overwrite=inside or args.overwrite_output_dir)
    return out


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
