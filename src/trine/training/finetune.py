"""`trine finetune`: contrastive fine-tuning (and unsupervised pair training) of an embedder."""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

from transformers import TrainingArguments

from trine.config import parse_config  # re-exported: the training commands import it from here
from trine.errors import report_user_errors
from trine.modeling.trihead import COLBERT_FILE, SPARSE_FILE, TriHeadModel
from trine.training.arguments import DataArguments, EmbedderTrainingArguments, ModelArguments, TrainDataArguments
from trine.training.collator import EmbedderCollator
from trine.training.data import TrainFile, load_train_files
from trine.training.dataset import EpochPlanDataset
from trine.training.model import EmbedderTrainingModel, M3LossWeights
from trine.training.trainer import (
    EmbedderTrainer,
    EpochPlanCallback,
    RetrievalEvalCallback,
    check_training_output,
    prepare_output_dir,
)

logger = logging.getLogger(__name__)


def parse_args(argv: list[str]) -> tuple[ModelArguments, DataArguments, EmbedderTrainingArguments]:
    return parse_config(argv, (ModelArguments, DataArguments, EmbedderTrainingArguments))


def load_data(data_args: TrainDataArguments) -> list[TrainFile]:
    """Read and validate every training file (raises :class:`DataError` listing all problems)."""
    return load_train_files(
        data_args.train_data,
        train_group_size=data_args.train_group_size,
        knowledge_distillation=data_args.knowledge_distillation,
        fill_missing_negatives=data_args.fill_missing_negatives,
        file_options=data_args.parsed_file_options(),
    )


def plan_dataset(files: list[TrainFile], data_args: TrainDataArguments, args: TrainingArguments) -> EpochPlanDataset:
    """This rank's view of the seeded batch plan shared by all ranks."""
    return EpochPlanDataset(
        files,
        train_group_size=data_args.train_group_size,
        default_batch_size=args.per_device_train_batch_size,
        world_size=args.world_size,
        rank=args.process_index,
        seed=args.data_seed if args.data_seed is not None else args.seed,
        same_dataset_within_batch=data_args.same_dataset_within_batch,
        group_by_length=data_args.group_by_length,
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


def build_trainer(model_args: ModelArguments, data_args: DataArguments, args: EmbedderTrainingArguments):
    """Validate the data, load the model, and make the trainer (nothing is written yet)."""
    files = load_data(data_args)
    path = model_args.model_name_or_path
    has_heads = all(os.path.exists(os.path.join(path, f)) for f in (COLBERT_FILE, SPARSE_FILE))
    encoder = TriHeadModel.from_pretrained(
        path,
        with_heads=has_heads or model_args.init_missing_heads is not None or args.training_mode != "dense",
        init_missing_heads=model_args.init_missing_heads,
        colbert_dim=model_args.colbert_dim,
        pooling_method=model_args.sentence_pooling_method,
        normalize_embeddings=model_args.normalize_embeddings,
        trust_remote_code=model_args.trust_remote_code,
        attn_implementation=model_args.attn_implementation,
    )
    if args.negatives_cross_device and args.world_size == 1:
        logger.warning("negatives_cross_device is on but only one process runs: no extra negatives")
    model = EmbedderTrainingModel(
        encoder,
        temperature=args.temperature,
        negatives_cross_device=args.negatives_cross_device,
        kd_loss_type=args.kd_loss_type,
        training_mode=args.training_mode,
        fix_encoder=args.fix_encoder,
        use_self_distill=args.use_self_distill,
        self_distill_start_step=args.self_distill_start_step,
        weights=M3LossWeights(
            ensemble_dense=args.ensemble_dense_weight, ensemble_sparse=args.ensemble_sparse_weight,
            ensemble_colbert=args.ensemble_colbert_weight, dense=args.dense_loss_weight,
            sparse=args.sparse_loss_weight, colbert=args.colbert_loss_weight, ensemble=args.ensemble_loss_weight,
        ),
    )
    dataset = plan_dataset(files, data_args, args)
    collator = EmbedderCollator(encoder.tokenizer, **collator_options(
        data_args, data_args.query_instruction_for_retrieval, data_args.passage_instruction_for_retrieval))
    eval_set = None
    if args.retrieval_eval_steps:
        if not data_args.eval_data:
            raise ValueError("retrieval_eval_steps needs eval_data (a held-out retrieval set)")
        from trine.evaluation.data import load_dataset

        eval_set = load_dataset(data_args.eval_data, data_args.eval_split)
    trainer = EmbedderTrainer(
        model=model, args=args, train_dataset=dataset, data_collator=collator,
        callbacks=[EpochPlanCallback(dataset)],
    )
    if eval_set is not None:
        trainer.add_callback(RetrievalEvalCallback(
            trainer, eval_set, args.retrieval_eval_steps, query_max_len=data_args.query_max_len,
            passage_max_len=data_args.passage_max_len,
            query_instruction=data_args.query_instruction_for_retrieval,
            query_instruction_format=data_args.query_instruction_format,
        ))
    return trainer


def training_inputs(model_args: Any, data_args: Any) -> list[str | None]:
    """What a training run reads: its output_dir may be none of these nor hold them."""
    return [model_args.model_name_or_path, *data_args.train_data, getattr(data_args, "eval_data", None)]


def train_and_save(model_args: Any, data_args: Any, args: Any, build) -> str:  # noqa: ANN001
    """The output policy around a trainer: check ``output_dir`` first (nothing is loaded or written
    on a bad one), build, prepare the folder, train (resuming from a complete checkpoint), save the
    model atomically."""
    checkpoint = check_training_output(args, training_inputs(model_args, data_args))
    trainer = build(model_args, data_args, args)
    prepare_output_dir(args, resuming=checkpoint is not None)
    trainer.train(resume_from_checkpoint=checkpoint)
    return trainer.save_final(args.output_dir)


def finetune(model_args: ModelArguments, data_args: DataArguments, args: EmbedderTrainingArguments) -> str:
    return train_and_save(model_args, data_args, args, build_trainer)


def run_cli(argv: list[str] | None, parse, run, *, debug: bool = False) -> int:  # noqa: ANN001
    """Parse, then run: the command line's exit-code policy (:func:`trine.errors.report_user_errors`):
    bad options, bad data or an unsafe output print ``error: ...`` and give 2, nothing trained or
    written (``debug``: raised with the traceback)."""
    argv = sys.argv[1:] if argv is None else list(argv)

    def work() -> int:
        run(*parse(argv))
        return 0

    return report_user_errors(work, debug=debug)


def main(argv: list[str] | None = None, *, debug: bool = False) -> int:
    return run_cli(argv, parse_args, finetune, debug=debug)


if __name__ == "__main__":
    sys.exit(main())
