"""Turns a planned local batch into padded tensors for queries and passages."""

from __future__ import annotations

from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from trine.data.records import SYMMETRIC_PASSAGE_TYPES
from trine.data.text import check_template


class EmbedderCollator:
    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        *,
        query_max_len: int,
        passage_max_len: int,
        query_instruction_for_retrieval: str | None = None,
        query_instruction_format: str = "{}{}",
        passage_instruction_for_retrieval: str | None = None,
        passage_instruction_format: str = "{}{}",
        pad_to_multiple_of: int | None = None,
        knowledge_distillation: bool = False,
    ):
        self.tokenizer = tokenizer
        self.query_max_len = query_max_len
        self.passage_max_len = passage_max_len
        self.query_instruction = query_instruction_for_retrieval
        self.query_format = check_template(query_instruction_format.replace("\\n", "\n"), "query_instruction_format")
        self.passage_instruction = passage_instruction_for_retrieval
        self.passage_format = check_template(passage_instruction_format.replace("\\n", "\n"),
                                             "passage_instruction_format")
        self.pad_to_multiple_of = pad_to_multiple_of
        self.knowledge_distillation = knowledge_distillation

    def _tokenize(self, texts: list[str], max_len: int) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=max_len, return_tensors="pt",
                             pad_to_multiple_of=self.pad_to_multiple_of, return_token_type_ids=False)
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def texts(self, items: list[dict[str, Any]]) -> tuple[list[str], list[str], torch.Tensor | None]:
        """Queries and passages with their instructions (a record's ``prompt`` wins over the
        query instruction; ``symmetric_sts`` / ``symmetric_clustering`` passages take the query's
        instruction, not the passage instruction), and the teacher scores (queries x group) when distilling."""
        if len(items) != 1:
            raise ValueError("the training dataloader hands over one planned batch at a time")
        examples = items[0]["examples"]
        queries = []
        passages = []
        for ex in examples:
            instruction = ex.prompt if ex.prompt is not None else self.query_instruction
            queries.append(ex.query if instruction is None else self.query_format.format(instruction, ex.query))
            if ex.kind in SYMMETRIC_PASSAGE_TYPES:  # FlagEmbedding: both sides of a symmetric pair read as queries
                passages += [t if instruction is None else self.query_format.format(instruction, t)
                             for t in ex.passages]
            elif self.passage_instruction is not None:
                passages += [self.passage_format.format(self.passage_instruction, t) for t in ex.passages]
            else:
                passages += ex.passages
        teacher = None
        if self.knowledge_distillation:
            if any(ex.teacher_scores is None for ex in examples):
                raise ValueError("knowledge_distillation is on but a sampled group has no teacher scores")
            teacher = torch.tensor([ex.teacher_scores for ex in examples], dtype=torch.float32)
        return queries, passages, teacher

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        queries, passages, teacher = self.texts(items)
        return {
            "queries": self._tokenize(queries, self.query_max_len),
            "passages": self._tokenize(passages, self.passage_max_len),
            "teacher_scores": teacher,
            "in_batch_negatives": items[0]["in_batch_negatives"],
        }
