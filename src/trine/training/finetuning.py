"""Contrastive fine-tuning (and unsupervised pair training) of an embedder: what `trine finetune`
runs (:mod:`trine.training.finetune`), callable from Python as :func:`finetune`."""

from __future__ import annotations

import logging

from trine.errors import OptionError
from trine.modeling.families import build_model, family_of
from trine.training.arguments import DataArguments, EmbedderTrainingArguments, ModelArguments
from trine.training.collator import EmbedderCollator
from trine.training.common import (
    collator_options,
    load_data,
    parse_config,
    plan_dataset,
    train_and_save,
    training_passages,
)
from trine.training.model import EmbedderTrainingModel, M3LossWeights
from trine.training.trainer import EmbedderTrainer, EpochPlanCallback, RetrievalEvalCallback

logger = logging.getLogger(__name__)


class ExamplesCollator(EmbedderCollator):
    """The collator with FlagEmbedding's in-context examples before each query (ICL training of a decoder)."""

    def __init__(self, tokenizer, examples, **options):  # noqa: ANN001
        super().__init__(tokenizer, **options)
        self.examples = examples

    def texts(self, items):  # noqa: ANN001
        queries, passages, teacher = super().texts(items)
        group = len(passages) // len(queries)
        return self.examples(queries, passages[::group]), passages, teacher  # each group's first is its positive


def parse_args(argv: list[str]) -> tuple[ModelArguments, DataArguments, EmbedderTrainingArguments]:
    return parse_config(argv, (ModelArguments, DataArguments, EmbedderTrainingArguments), prog="trine finetune",
                        description="Contrastive fine-tuning of an embedder (dense, lexical, ColBERT or unified) on\n"
                                    "FlagEmbedding's JSONL records, on the Hugging Face Trainer. Flags, or one\n"
                                    "YAML/JSON config file as the only argument.")


def build_trainer(model_args: ModelArguments, data_args: DataArguments, args: EmbedderTrainingArguments):
    """Validate the data, load the model, and make the trainer (nothing is written yet)."""
    files = load_data(data_args)
    context = {}
    if model_args.init_missing_heads == "bm25":  # the lexical head is fitted on the training passages
        context = {"passages": training_passages(files), "passage_max_len": data_args.passage_max_len}
    encoder = build_model(model_args, args, "embedder", **context)
    bm25_teacher = None
    if args.sparse_bm25_distill_weight:  # corpus statistics once, over the training passages as the model reads them
        from trine.modeling.lexical_init import BM25Teacher

        bm25_teacher = BM25Teacher.from_texts(
            encoder.tokenizer, context.get("passages") or training_passages(files), data_args.passage_max_len,
            encoder.vocab_size, encoder.unused_token_ids.tolist())
    if data_args.query_instruction_format is None:  # the family's template (a decoder's: FlagEmbedding's)
        data_args.query_instruction_format = getattr(encoder, "default_query_instruction_format", "{}{}")
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
        sparse_temperature=args.sparse_temperature,
        sparse_flops_weight=args.sparse_flops_weight,
        matryoshka_dims=args.matryoshka_dims,
        matryoshka_weights=args.matryoshka_weights,
        sparse_bm25_distill_weight=args.sparse_bm25_distill_weight,
        sparse_bm25_distill_temperature=args.sparse_bm25_distill_temperature,
        bm25_teacher=bm25_teacher,
        weights=M3LossWeights(
            ensemble_dense=args.ensemble_dense_weight, ensemble_sparse=args.ensemble_sparse_weight,
            ensemble_colbert=args.ensemble_colbert_weight, dense=args.dense_loss_weight,
            sparse=args.sparse_loss_weight, colbert=args.colbert_loss_weight, ensemble=args.ensemble_loss_weight,
        ),
    )
    dataset = plan_dataset(files, data_args, args)
    options = collator_options(data_args, data_args.query_instruction_for_retrieval,
                               data_args.passage_instruction_for_retrieval)
    if data_args.retrieval_use_examples:
        from trine.modeling.decoder import InContextExamples

        if family_of(encoder).name != "decoder":  # the family whose prompts take in-context examples
            raise OptionError("retrieval_use_examples: in-context examples are for decoder models (model_family "
                              "'decoder')")
        examples = InContextExamples(
            encoder.tokenizer, query_max_len=data_args.query_max_len,
            example_query_max_len=data_args.example_query_max_len,
            example_passage_max_len=data_args.example_passage_max_len,
            suffix=data_args.icl_suffix_str.replace("\\n", "\n"), seed=args.seed)
        collator = ExamplesCollator(encoder.tokenizer, examples, **options)
    else:
        collator = EmbedderCollator(encoder.tokenizer, **options)
    eval_set = None
    if args.retrieval_eval_steps:
        if not data_args.eval_data:
            raise ValueError("retrieval_eval_steps needs eval_data (a held-out retrieval set)")
        from trine.evaluation.data import load_dataset

        eval_set = load_dataset(data_args.eval_data, data_args.eval_split)
    # before the trainer exists (it makes output_dir): a bad option leaves nothing behind
    dynamic = dynamic_negatives(encoder, dataset, data_args, args) \
        if args.dynamic_negatives_steps or args.dynamic_negatives_epochs else None
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
    if dynamic is not None:
        dynamic.trainer = trainer
        trainer.add_callback(dynamic)
    return trainer


def dynamic_negatives(encoder, dataset, data_args: DataArguments, args: EmbedderTrainingArguments):  # noqa: ANN001
    """The callback that re-mines negatives every ``dynamic_negatives_steps`` steps or
    ``dynamic_negatives_epochs`` epochs (:mod:`trine.training.dynamic_negatives`)."""
    from trine.curation.mining import parse_range
    from trine.data.corpus import read_pool
    from trine.training.dynamic_negatives import DynamicNegativesCallback

    if data_args.knowledge_distillation:
        raise OptionError("dynamic_negatives_steps: re-mined negatives have no teacher scores, which "
                          "knowledge_distillation needs; turn one of them off")
    mode = args.training_mode
    if mode == "colbert" or (mode == "sparse" and not args.dynamic_negatives_hybrid_weights):
        raise OptionError(f"dynamic_negatives_steps ranks by dense (or hybrid) scores; training_mode "
                          f"{args.training_mode!r} does not train the dense head (sparse: set "
                          "dynamic_negatives_hybrid_weights, e.g. 0 1)")
    pool = read_pool(args.dynamic_negatives_candidate_pool) if args.dynamic_negatives_candidate_pool else None
    return DynamicNegativesCallback(
        encoder, dataset, args.dynamic_negatives_steps, every_epochs=args.dynamic_negatives_epochs, device=args.device,
        range_for_sampling=parse_range(args.dynamic_negatives_range),
        negative_number=args.dynamic_negatives_number, relative_margin=args.dynamic_negatives_relative_margin,
        seed=args.seed, hybrid_weights=args.dynamic_negatives_hybrid_weights, candidate_pool=pool,
        query_max_len=data_args.query_max_len, passage_max_len=data_args.passage_max_len,
        query_instruction=data_args.query_instruction_for_retrieval,
        query_instruction_format=data_args.query_instruction_format,
        passage_instruction=data_args.passage_instruction_for_retrieval,
        passage_instruction_format=data_args.passage_instruction_format,
    )


def finetune(model_args: ModelArguments, data_args: DataArguments, args: EmbedderTrainingArguments) -> str:
    return train_and_save(model_args, data_args, args, build_trainer)


