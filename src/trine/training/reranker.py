"""`trine finetune-reranker`: cross-encoder training on the same data, plan and engine as embedders.

Each query's group is ``[positive, negative_1, ..., negative_{G-1}]``, every pair scored by the
cross-encoder. Losses (``reranker_loss``):

- ``group_ce`` (FlagEmbedding's): cross-entropy of the group's logits towards the positive;
- ``bce``: pointwise binary cross-entropy, label 1 for the positive and 0 for each negative.

With ``knowledge_distillation`` the teacher's ``pos_scores``/``neg_scores`` (softmax over the
group, no temperature) add a KL term on the group's logits (``kd_loss_type`` ``kl_div``), or
replace the cross-entropy with BGE-M3's listwise ``m3_kd_loss``.

``model_family llm-reranker`` trains a decoder-only reranker (FlagEmbedding's decoder-only reranker): each
pair's score is the "Yes" logit after the prompt, the pair built with FlagEmbedding's training lengths
(:meth:`trine.modeling.llm_reranker.LLMReranker.tokenize_training_pairs`), and a record's ``prompt`` is the LLM
prompt of its pairs (FlagEmbedding's meaning for this reranker), not a query instruction.

``model_family llm-reranker-layerwise`` (FlagEmbedding's ``decoder_only.layerwise``) scores every pair at each layer
from ``start_layer`` up with that layer's head: the loss above at every layer, plus, on batches without teacher
scores, the last layer's detached group distribution distilled into each earlier layer
(:meth:`RerankerTrainingModel.layerwise_loss`). ``start_layer``/``head_multi``/``head_type`` set up new heads.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn
from transformers import set_seed

from trine.errors import OptionError
from trine.inference.batching import pad_batch
from trine.modeling.cross_encoder import CrossEncoder
from trine.modeling.families import FAMILY_FILE, build_model, get_family, read_family_file
from trine.modeling.llm_reranker import LAYERWISE_FAMILY, LLMReranker
from trine.training.arguments import (
    RERANKER_REFUSED_OPTIONS,
    FlagEmbeddingModelOptions,
    LoraArguments,
    SafeTrainingArguments,
    TrainDataArguments,
)
from trine.training.collator import EmbedderCollator
from trine.training.common import collator_options, load_data, parse_config, plan_dataset, run_cli, train_and_save
from trine.training.losses import KD_LOSS_TYPES, ScoreBatch, kl_div, objective, teacher_distribution
from trine.training.model import enable_checkpointing
from trine.training.trainer import EmbedderTrainer, EpochPlanCallback

logger = logging.getLogger(__name__)

RERANKER_LOSSES = ("group_ce", "bce")


@dataclass
class RerankerModelArguments(LoraArguments, FlagEmbeddingModelOptions):
    model_name_or_path: str = field(metadata={"help": "a reranker folder, or a backbone (a new classifier "
                                                                    "starts); or a Hub id (org/name[@revision])"})
    trust_remote_code: bool = field(default=False)
    attn_implementation: str | None = field(default=None, metadata={"help": "sdpa, eager, ... (transformers)"})
    model_family: str = field(default="cross-encoder", metadata={"help": "a registered reranker model family "
                                                                         "(trine.modeling.families)"})
    start_layer: int | None = field(default=None, metadata={"help": "llm-reranker-layerwise, new heads: the first "
                                                                    "layer scored (FlagEmbedding's default 8)"})
    head_multi: bool | None = field(default=None, metadata={"help": "llm-reranker-layerwise, new heads: one head "
                                                                    "per layer (default: one, as FlagEmbedding)"})
    head_type: str | None = field(default=None, metadata={"help": "llm-reranker-layerwise: 'simple' (the one "
                                                                  "FlagEmbedding scores pairs with)"})
    REFUSED_OPTIONS: ClassVar[dict[str, str]] = RERANKER_REFUSED_OPTIONS

    def __post_init__(self) -> None:
        self.check_lora()
        self.resolve_flash_attn()
        given = [n for n in ("start_layer", "head_multi", "head_type") if getattr(self, n) is not None]
        if given and self.model_family != LAYERWISE_FAMILY:
            raise OptionError(f"{', '.join(given)}: options of model_family {LAYERWISE_FAMILY!r} (the layer-wise "
                              f"reranker), not {self.model_family!r}")
        if self.head_type is not None and self.head_type != "simple":
            raise OptionError(f"head_type: {self.head_type!r}; trine trains 'simple' heads (FlagEmbedding's 'raw' and "
                              "'complex' heads give vocabulary-wide logits its own scoring reads at the wrong index)")
        # a Hub id is checked by the loader, once fetched (LLMReranker.from_pretrained reads the same file)
        recorded = read_family_file(self.model_name_or_path) if os.path.isdir(self.model_name_or_path) else None
        if recorded is not None and recorded["model_family"] != self.model_family:
            raise OptionError(f"model_family: {self.model_name_or_path} is a {recorded['model_family']!r} reranker "
                              f"({FAMILY_FILE}); pass --model_family {recorded['model_family']}, not "
                              f"{self.model_family!r}")


@dataclass
class RerankerDataArguments(TrainDataArguments):
    """Pairs are at most ``query_max_len + passage_max_len`` tokens: the query is cut to
    ``query_max_len``, the passage takes the rest (FlagReranker's inference rule, so training and
    inference see the same inputs)."""

    query_instruction_for_rerank: str | None = field(default=None)
    query_instruction_format: str = field(default="{}{}")
    passage_instruction_for_rerank: str | None = field(default=None)
    passage_instruction_format: str = field(default="{}{}")
    sep_token: str | None = field(default=None, metadata={"help": "llm-reranker: the separator between query, "
                                                                  "passage and prompt (unset: the one the model folder "
                                                                  "records, else a newline)"})


@dataclass
class RerankerTrainingArguments(SafeTrainingArguments):
    reranker_loss: str = field(default="group_ce", metadata={"help": f"one of {', '.join(RERANKER_LOSSES)}"})
    kd_loss_type: str = field(default="kl_div", metadata={"help": "kl_div or m3_kd_loss (with knowledge_distillation)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.reranker_loss not in RERANKER_LOSSES:
            raise ValueError(f"reranker_loss must be one of {RERANKER_LOSSES}, got {self.reranker_loss!r}")
        if self.kd_loss_type not in KD_LOSS_TYPES:
            raise ValueError(f"kd_loss_type must be one of {KD_LOSS_TYPES}, got {self.kd_loss_type!r}")
        if self.reranker_loss == "bce" and self.kd_loss_type == "m3_kd_loss":
            raise ValueError("m3_kd_loss replaces the group cross-entropy; it does not combine with reranker_loss bce")


class RerankerCollator(EmbedderCollator):
    """A planned batch -> padded (query, passage) pairs, each query's group contiguous."""

    def __init__(self, model: CrossEncoder | LLMReranker, **kwargs: Any):
        super().__init__(model.tokenizer, **kwargs)
        self.model = model
        self.max_len = self.query_max_len + self.passage_max_len

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        if isinstance(self.model, LLMReranker):
            return self._llm_pairs(items)
        queries, passages, teacher = self.texts(items)
        group = len(passages) // len(queries)
        ids, types = self.model.tokenize_pairs([q for q in queries for _ in range(group)], passages,
                                               query_max_length=self.query_max_len, max_length=self.max_len)
        pairs = pad_batch(ids, self.tokenizer.pad_token_id, "cpu", token_types=types,
                          pad_to_multiple_of=self.pad_to_multiple_of)
        return {"pairs": pairs, "teacher_scores": teacher, "group_size": group}

    def _llm_pairs(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        """An LLM reranker's pairs: a record's ``prompt`` is the prompt after its pairs, not a query instruction."""
        prompts = [ex.prompt for item in items for ex in item["examples"]]
        queries, passages, teacher = self.texts(
            [{**item, "examples": [dataclasses.replace(ex, prompt=None) for ex in item["examples"]]} for item in items])
        group = len(passages) // len(queries)
        ids = self.model.tokenize_training_pairs([q for q in queries for _ in range(group)], passages,
                                                 query_max_len=self.query_max_len, passage_max_len=self.passage_max_len,
                                                 prompts=[p for p in prompts for _ in range(group)])
        pairs = pad_batch(ids, self.tokenizer.pad_token_id, "cpu", pad_to_multiple_of=self.pad_to_multiple_of)
        return {"pairs": pairs, "teacher_scores": teacher, "group_size": group}


class RerankerTrainingModel(nn.Module):
    """A cross-encoder plus its loss; ``encoder`` is the model the trainer saves and resumes."""

    def __init__(self, encoder: CrossEncoder | LLMReranker, *, reranker_loss: str = "group_ce",
                 kd_loss_type: str = "kl_div"):
        super().__init__()
        if reranker_loss not in RERANKER_LOSSES:
            raise ValueError(f"reranker_loss must be one of {RERANKER_LOSSES}, got {reranker_loss!r}")
        self.objective = objective(reranker_loss, kd_loss_type)
        self.encoder = encoder
        self.reranker_loss = reranker_loss
        self.kd_loss_type = kd_loss_type

    def activation_checkpointing_enable(
        self, activation_checkpointing_kwargs: dict[str, Any] | None = None, **kwargs: Any
    ) -> None:
        enable_checkpointing(self.encoder.model, activation_checkpointing_kwargs, **kwargs)

    gradient_checkpointing_enable = activation_checkpointing_enable

    def forward(self, pairs: dict[str, torch.Tensor], group_size: int,
                teacher_scores: torch.Tensor | None = None) -> dict[str, Any]:
        if hasattr(self.encoder, "training_layers"):  # a layer-wise reranker: a score per pair at every layer
            layers = self.encoder.training_layers()
            scores = self.encoder(pairs["input_ids"], pairs["attention_mask"], cutoff_layers=layers)
            return self.layerwise_loss(scores, group_size, teacher_scores)
        logits = self.encoder(pairs["input_ids"], pairs["attention_mask"], pairs.get("token_type_ids"))
        return self.loss(logits, group_size, teacher_scores)

    def layerwise_loss(self, scores: torch.Tensor, group_size: int,
                       teacher_scores: torch.Tensor | None = None) -> dict[str, Any]:
        """FlagEmbedding's layer-wise loss of (layers, pairs) scores, the last layer last: the reranker loss at every
        layer (with the teacher's term at each when the batch has teacher scores), and without teacher scores a
        distillation from the last layer's group distribution (detached) to each earlier layer."""
        total = scores.new_zeros(())
        parts: dict[str, torch.Tensor] = {}
        for layer_scores in scores:
            out = self.loss(layer_scores, group_size, teacher_scores)
            total = total + out["loss"]
            for name, value in out["parts"].items():
                parts[name] = parts.get(name, 0) + value.detach()
        if teacher_scores is None and scores.size(0) > 1:
            grouped = scores.float().view(scores.size(0), -1, group_size)
            target = torch.softmax(grouped[-1].detach(), dim=-1)
            distill = sum(kl_div(target, layer) for layer in grouped[:-1])
            total = total + distill
            parts["layer_distill"] = distill.detach()
        return {"loss": total, "parts": parts, "negatives_per_query": group_size - 1, "scores": scores[-1]}

    def loss(self, logits: torch.Tensor, group_size: int, teacher_scores: torch.Tensor | None = None) -> dict[str, Any]:
        """Loss of the pair logits (queries * group,), each query's group contiguous, positive first."""
        if logits.numel() % group_size:
            raise ValueError(f"{logits.numel()} pair scores do not split into groups of {group_size}")
        grouped = logits.float().view(-1, group_size)
        targets = torch.zeros(grouped.size(0), dtype=torch.long, device=grouped.device)
        loss, parts = self.objective(ScoreBatch(grouped, targets, group_size, teacher_distribution(teacher_scores)))
        return {"loss": loss, "parts": parts, "negatives_per_query": group_size - 1, "scores": logits}


def build_reranker_trainer(model_args: RerankerModelArguments, data_args: RerankerDataArguments,
                           args: RerankerTrainingArguments) -> EmbedderTrainer:
    """Validate the data, load the model, make the trainer (nothing is written yet)."""
    files = load_data(data_args)
    set_seed(args.seed)  # a new classifier starts the same on every rank and in every run
    encoder = build_model(model_args, args, "reranker")
    if data_args.sep_token is not None:
        if "sep_token" not in dict(get_family(model_args.model_family, "reranker").settings):
            raise OptionError(f"sep_token: model_family {model_args.model_family!r} takes no separator (an "
                              "llm-reranker's option)")
        encoder.set_sep_token(data_args.sep_token)
    model = RerankerTrainingModel(encoder, reranker_loss=args.reranker_loss, kd_loss_type=args.kd_loss_type)
    dataset = plan_dataset(files, data_args, args)
    collator = RerankerCollator(encoder, **collator_options(
        data_args, data_args.query_instruction_for_rerank, data_args.passage_instruction_for_rerank))
    return EmbedderTrainer(model=model, args=args, train_dataset=dataset, data_collator=collator,
                           callbacks=[EpochPlanCallback(dataset)])


def parse_reranker_args(argv: list[str]) -> tuple[RerankerModelArguments, RerankerDataArguments,
                                                  RerankerTrainingArguments]:
    return parse_config(argv, (RerankerModelArguments, RerankerDataArguments, RerankerTrainingArguments),
                        prog="trine finetune-reranker",
                        description="Cross-encoder (or LLM reranker) fine-tuning on the embedders' data, plan and\n"
                                    "engine. Flags, or one YAML/JSON config file as the only argument.")


def finetune_reranker(model_args: RerankerModelArguments, data_args: RerankerDataArguments,
                      args: RerankerTrainingArguments) -> str:
    return train_and_save(model_args, data_args, args, build_reranker_trainer, command="finetune-reranker")


def main(argv: list[str] | None = None, *, debug: bool = False) -> int:
    return run_cli(argv, parse_reranker_args, finetune_reranker, debug=debug)


if __name__ == "__main__":
    sys.exit(main())
