"""The Hugging Face ``Trainer``, with trine's batch plan, loss logging and BGE-M3-layout checkpoints."""

from __future__ import annotations

import math
import os
from collections import defaultdict
from typing import Any

import torch
from torch.utils.data import DataLoader
from transformers import Trainer, TrainerCallback

from trine.training.dataset import EpochPlanDataset
from trine.training.gradcache import gradcache_step


class EpochPlanCallback(TrainerCallback):
    """Tells the dataset which epoch starts, so every rank re-plans identically."""

    def __init__(self, dataset: EpochPlanDataset):
        self.dataset = dataset

    def on_epoch_begin(self, args, state, control, **kwargs):  # noqa: ANN001
        self.dataset.set_epoch(math.floor((state.epoch or 0) + 1e-6))


class EmbedderTrainer(Trainer):
    """Each rank reads its own slice of the shared plan (no distributed sampler re-sharding);
    checkpoints are tri-head folders that ``M3Embedder``/FlagEmbedding load directly."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._parts: dict[str, list[float]] = defaultdict(list)

    def get_train_dataloader(self) -> DataLoader:
        return DataLoader(
            self.train_dataset,
            batch_size=1,
            shuffle=False,
            collate_fn=self.data_collator,
            num_workers=self.args.dataloader_num_workers,
            pin_memory=self.args.dataloader_pin_memory and torch.cuda.is_available(),
        )

    def create_optimizer(self, model=None):  # noqa: ANN001
        optimizer = super().create_optimizer(model)
        head_lr = getattr(self.args, "head_learning_rate", None)
        if head_lr is None:
            return optimizer
        encoder = self.accelerator.unwrap_model(self.model).encoder
        heads = [p for m in (encoder.colbert_linear, encoder.sparse_linear) if m is not None
                 for p in m.parameters() if p.requires_grad]
        if not heads:
            raise ValueError("head_learning_rate is set but no head is trained in this mode")
        ids = {id(p) for p in heads}
        for group in optimizer.param_groups:
            group["params"] = [p for p in group["params"] if id(p) not in ids]
        optimizer.add_param_group({"params": heads, "lr": head_lr, "weight_decay": 0.0})
        return optimizer

    def training_step(self, model, inputs, num_items_in_batch=None):  # noqa: ANN001
        chunk = getattr(self.args, "gradcache_chunk_size", None)
        budget = getattr(self.args, "gradcache_max_tokens", None)
        if chunk is None and budget is None:
            return super().training_step(model, inputs, num_items_in_batch)
        model.train()
        inputs = self._prepare_inputs(inputs)
        out = gradcache_step(
            model, self.accelerator.unwrap_model(model), inputs["queries"], inputs["passages"],
            teacher_scores=inputs["teacher_scores"], in_batch_negatives=inputs["in_batch_negatives"],
            chunk_size=chunk, max_tokens=budget, backward=self.accelerator.backward,
            loss_scale=self.current_gradient_accumulation_steps, autocast=self.compute_loss_context_manager,
        )
        self._record(out)
        return out["loss"].detach() / self.current_gradient_accumulation_steps

    def _record(self, out: dict[str, Any]) -> None:
        for name, value in out["parts"].items():
            self._parts[f"loss_{name}"].append(float(value))
        self._parts["negatives_per_query"].append(float(out["negatives_per_query"]))

    def num_examples(self, dataloader: DataLoader) -> int:
        # Per rank: the Trainer multiplies by the number of processes itself.
        return self.train_dataset.num_examples // self.args.world_size

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # noqa: ANN001
        out = model(**inputs)
        self._record(out)
        return (out["loss"], out) if return_outputs else out["loss"]

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._parts:
            for name, values in self._parts.items():
                logs[name] = round(sum(values) / len(values), 6)
            self._parts.clear()
        super().log(logs, start_time)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir or self.args.output_dir
        model = self.accelerator.unwrap_model(self.model)
        model.encoder.save_pretrained(output_dir, atomic=False)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:  # noqa: ANN001
        target = self.accelerator.unwrap_model(model or self.model)
        target.encoder.load_weights(resume_from_checkpoint)


class RetrievalEvalCallback(TrainerCallback):
    """Before training and every N steps: dense nDCG@10 and MRR@10 on a held-out set, logged with the loss."""

    def __init__(self, trainer: EmbedderTrainer, dataset: Any, every: int, *, query_max_len: int,
                 passage_max_len: int, query_instruction: str | None, query_instruction_format: str):
        self.trainer = trainer
        self.dataset = dataset
        self.every = every
        self.query_max_len = query_max_len
        self.passage_max_len = passage_max_len
        self.query_instruction = query_instruction
        self.query_instruction_format = query_instruction_format

    def evaluate(self) -> dict[str, float]:
        from trine.evaluation.runner import EvalConfig, evaluate_model
        from trine.inference.embedder import M3Embedder

        model = self.trainer.accelerator.unwrap_model(self.trainer.model)
        encoder = model.encoder
        was_training = encoder.training
        embedder = M3Embedder(
            encoder, devices=str(self.trainer.args.device), normalize_embeddings=encoder.normalize_embeddings,
            show_progress=False, query_instruction_for_retrieval=self.query_instruction,
            query_instruction_format=self.query_instruction_format,
        )
        config = EvalConfig(modes=["dense"], k_values=[10], metrics=["ndcg", "mrr"], top_k=10,
                            query_max_length=self.query_max_len, passage_max_length=self.passage_max_len)
        try:
            result = evaluate_model(embedder, self.dataset, config)["metrics"]["dense"]
        finally:
            encoder.train(was_training)
        return {f"eval_{k.replace('@', '_at_')}": round(float(v), 6) for k, v in result.items()}

    def _maybe(self, args, state) -> None:  # noqa: ANN001
        if args.process_index == 0:
            self.trainer.log(self.evaluate())

    def on_train_begin(self, args, state, control, **kwargs):  # noqa: ANN001
        if state.global_step == 0:
            self._maybe(args, state)

    def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
        if self.every and state.global_step % self.every == 0:
            self._maybe(args, state)
