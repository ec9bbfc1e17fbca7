"""What the training commands (`trine finetune`, `finetune-reranker`, `pretrain`) share: their
options (flags or one config file), the training data and its batch plan, the collator's text
options, the output policy around a run, and the command line's exit-code policy."""

from __future__ import annotations

import sys
from typing import Any

from transformers import TrainingArguments

from trine.cards import ModelCard, train_files_summary, training_card
from trine.config import parse_config  # re-exported: the training commands parse their options with it
from trine.data.records import TrainFile, apply_dataset_options, load_train_files
from trine.errors import options_checked, report_user_errors
from trine.modeling.families import resolve_family
from trine.training.arguments import TrainDataArguments
from trine.training.dataset import EpochPlanDataset
from trine.training.trainer import check_training_output, prepare_output_dir

__all__ = [
    "collator_options",
    "load_data",
    "parse_config",
    "plan_dataset",
    "run_cli",
    "train_and_save",
    "training_inputs",
    "training_passages",
]


def load_data(data_args: TrainDataArguments) -> list[TrainFile]:
    """Read and validate every training file (raises :class:`DataError` listing all problems)."""
    return load_train_files(
        data_args.train_data,
        train_group_size=data_args.train_group_size,
        knowledge_distillation=data_args.knowledge_distillation,
        fill_missing_negatives=data_args.fill_missing_negatives,
        file_options=data_args.parsed_file_options(),
    )


def training_passages(files: list[TrainFile]) -> list[str]:
    """Every distinct passage of the training files (positives, negatives, fill-in pools), in first-seen order."""
    seen: dict[str, None] = {}
    for file in files:
        for record in file.records:
            seen.update(dict.fromkeys(record.pos))
            seen.update(dict.fromkeys(record.neg))
        seen.update(dict.fromkeys(file.extra_passages))
    return list(seen)


def plan_dataset(files: list[TrainFile], data_args: TrainDataArguments, args: TrainingArguments) -> EpochPlanDataset:
    """This rank's view of the seeded batch plan shared by all ranks, after FlagEmbedding's per-file
    options (``max_example_num_per_dataset``, ``small_threshold`` / ``drop_threshold``: a seeded
    choice, so they are applied here, where the run's seed is known)."""
    seed = args.data_seed if args.data_seed is not None else args.seed
    files = apply_dataset_options(
        files,
        max_example_num_per_dataset=getattr(data_args, "max_example_num_per_dataset", None),
        small_threshold=getattr(data_args, "small_threshold", 0),
        drop_threshold=getattr(data_args, "drop_threshold", 0),
        seed=seed,
    )
    return EpochPlanDataset(
        files,
        train_group_size=data_args.train_group_size,
        default_batch_size=args.per_device_train_batch_size,
        world_size=args.world_size,
        rank=args.process_index,
        seed=seed,
        same_dataset_within_batch=data_args.same_dataset_within_batch,
        group_by_length=data_args.group_by_length,
        shuffle_ratio=getattr(data_args, "shuffle_ratio", 0.0),
    )


def collator_options(data_args: TrainDataArguments, query_instruction: str | None,
                     passage_instruction: str | None) -> dict[str, Any]:
    """The collator's text options (lengths, instructions, distillation) from the data arguments."""
    return dict(
        query_max_len=data_args.query_max_len,
        passage_max_len=data_args.passage_max_len,
        query_instruction_for_retrieval=query_instruction,
        query_instruction_format=data_args.query_instruction_format,
        passage_instruction_for_retrieval=passage_instruction,
        passage_instruction_format=data_args.passage_instruction_format,
        pad_to_multiple_of=data_args.pad_to_multiple_of,
        knowledge_distillation=data_args.knowledge_distillation,
    )


def training_inputs(model_args: Any, data_args: Any) -> list[str | None]:
    """What a training run reads: its output_dir may be none of these nor hold them."""
    return [model_args.model_name_or_path, *data_args.train_data, getattr(data_args, "eval_data", None)]


def train_and_save(model_args: Any, data_args: Any, args: Any, build, *, command: str = "finetune") -> str:  # noqa: ANN001
    """The output policy around a trainer: check ``output_dir`` first (nothing is loaded or written
    on a bad one), build, prepare the folder, train (resuming from a complete checkpoint), save the
    model atomically with its model card (``command``: what wrote it, ``finetune`` or
    ``finetune-reranker``)."""
    model_args.resolve_model_reference()  # a Hub id: its folder in the Hugging Face cache, before the checks
    checkpoint = check_training_output(args, training_inputs(model_args, data_args))
    with options_checked():  # e.g. retrieval_eval_steps without eval_data: exit 2, nothing written
        trainer = build(model_args, data_args, args)
    data = train_files_summary(trainer.train_dataset.files) if args.should_save else []

    def card(folder: str, history: list[dict[str, Any]]) -> ModelCard:
        # the folder just written records its family
        kind = "reranker" if command == "finetune-reranker" else \
            "m3" if "sparse" in resolve_family(folder, "embedder")[0].outputs else "dense"
        return training_card(command, kind, base_model=model_args.model_reference, history=history, data=data,
                             options={"model": model_args, "data": data_args, "training": args})

    trainer.model_card = card
    prepare_output_dir(args, resuming=checkpoint is not None)
    trainer.train(resume_from_checkpoint=checkpoint)
    return trainer.save_final(args.output_dir)


def run_cli(argv: list[str] | None, parse, run, *, debug: bool = False) -> int:  # noqa: ANN001
    """Parse, then run: the command line's exit-code policy (:func:`trine.errors.report_user_errors`):
    bad options, bad data or an unsafe output print ``error: ...`` and give 2, nothing trained or
    written (``debug``: raised with the traceback)."""
    argv = sys.argv[1:] if argv is None else list(argv)

    def work() -> int:
        run(*parse(argv))
        return 0

    def words(message: str) -> str:  # the library's keyword names as this command's flags
        from trine.config import _parser_class, command_line_words

        return command_line_words(message, _parser_class().known_flags)

    return report_user_errors(work, debug=debug, words=words)

