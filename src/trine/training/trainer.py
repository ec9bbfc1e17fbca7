"""The Hugging Face ``Trainer``, with trine's batch plan, loss logging and BGE-M3-layout checkpoints."""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import tempfile
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

import torch
from torch.utils.data import DataLoader
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from trine.cards import write_card
from trine.errors import OptionError
from trine.io import (
    atomic_folder,
    check_output_path,
    exchange,
    is_trine_folder,
    normal_mode,
    parent_lock,
    temp_prefix,
    write_marker,
)
from trine.training.dataset import EpochPlanDataset
from trine.training.gradcache import gradcache_step

# What a final save keeps from the run's folder beside the new model: checkpoints and logs.
CARRY_OVER = (f"{PREFIX_CHECKPOINT_DIR}-*", "runs", "diagnostics")
_STAGE_PREFIX = ".tmp-" + PREFIX_CHECKPOINT_DIR


def resume_checkpoint(args: Any) -> str | None:
    """The checkpoint ``resume_from_checkpoint`` names: ``true`` is the newest checkpoint in
    ``output_dir`` (every ``checkpoint-N`` there is complete: they are written aside and renamed
    into place); a path must be a checkpoint folder. None: start from scratch."""
    resume = args.resume_from_checkpoint
    if isinstance(resume, str) and resume.strip().lower() in ("true", "false"):
        resume = resume.strip().lower() == "true"
    if resume is None or resume is False or resume == "":
        return None
    if resume is True:
        found = get_last_checkpoint(args.output_dir) if os.path.isdir(args.output_dir) else None
        if found is None:
            raise OptionError(f"{args.output_dir}: resume_from_checkpoint is true but there is no complete "
                              f"{PREFIX_CHECKPOINT_DIR}-N folder in the output_dir")
        return found
    if not os.path.isfile(os.path.join(resume, "trainer_state.json")):
        raise OptionError(f"{resume}: resume_from_checkpoint: not a checkpoint folder (no trainer_state.json)")
    return resume


def check_training_output(args: Any, inputs: Iterable[str | None]) -> str | None:
    """Before anything is loaded or written: ``output_dir`` may be written (:mod:`trine.io`'s policy;
    an existing trine folder needs ``overwrite_output_dir`` or a resume). Returns the checkpoint
    to resume from."""
    checkpoint = resume_checkpoint(args)
    check_output_path(args.output_dir, inputs=inputs, what="output_dir",
                      overwrite=bool(getattr(args, "overwrite_output_dir", False)) or checkpoint is not None)
    return checkpoint


def prepare_output_dir(args: Any, resuming: bool) -> None:
    """Main process, once checks passed: an ``overwrite_output_dir`` run starts from an empty folder
    (the old one is removed whole, never mixed with the new files); the folder gets trine's marker;
    checkpoints a killed run left half-written are removed."""
    out = args.output_dir
    with args.main_process_first(desc="output_dir"):
        if not args.should_save:
            return
        os.makedirs(out, exist_ok=True)
        entries = os.listdir(out)
        if entries and not resuming and args.overwrite_output_dir:
            target = os.path.abspath(out)
            fresh = tempfile.mkdtemp(prefix=temp_prefix(target), dir=os.path.dirname(target))
            normal_mode(fresh, folder=True)
            with parent_lock(target):
                exchange(fresh, target)
            shutil.rmtree(fresh)
        if not is_trine_folder(out):
            write_marker(out)
        for entry in os.listdir(out):
            if entry.startswith(_STAGE_PREFIX):
                shutil.rmtree(os.path.join(out, entry), ignore_errors=True)


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
        self.diagnostics = None  # diagnostics_steps: trine.training.diagnostics, fed from the batch in memory
        if getattr(self.args, "diagnostics_steps", 0):
            from trine.training.diagnostics import TrainingDiagnostics

            self.diagnostics = TrainingDiagnostics.from_args(self.args)
            self.add_callback(self.diagnostics)

    def _diagnosed(self, inputs: dict[str, Any]) -> contextlib.AbstractContextManager:
        return self.diagnostics.capture(self, inputs) if self.diagnostics is not None else contextlib.nullcontext()

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
        # a model family with heads says which parameters they are (TriHeadModel.head_parameters)
        heads = [p for p in getattr(encoder, "head_parameters", list)() if p.requires_grad]
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
        with self._diagnosed(inputs):
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
        for name, value in out.get("stats", {}).items():  # e.g. the lexical head's non-zeros per text
            self._parts[name].append(float(value))

    def num_examples(self, dataloader: DataLoader) -> int:
        # Per rank: the Trainer multiplies by the number of processes itself.
        return self.train_dataset.num_examples // self.args.world_size

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # noqa: ANN001
        with self._diagnosed(inputs):
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

    # A checkpoint is written into ``.tmp-checkpoint-N-stage/`` and renamed into place once every
    # process has written its part, so a kill mid-save never leaves a ``checkpoint-N`` that a
    # resume would pick up half-written.
    _stage_dir: str | None = None

    def _get_output_dir(self, trial) -> str:  # noqa: ANN001
        return self._stage_dir or super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:  # noqa: ANN001
        run_dir = super()._get_output_dir(trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        stage = os.path.join(run_dir, f"{_STAGE_PREFIX}-{self.state.global_step}-stage")
        if self.args.should_save and os.path.exists(stage):
            shutil.rmtree(stage)
        self.accelerator.wait_for_everyone()
        self._stage_dir = stage
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._stage_dir = None
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            final = os.path.join(run_dir, name)
            with parent_lock(final):
                if os.path.exists(final):
                    exchange(os.path.join(stage, name), final)
                else:
                    os.rename(os.path.join(stage, name), final)
            shutil.rmtree(stage)
            best = self.state.best_model_checkpoint
            if best and best.startswith(stage):
                self.state.best_model_checkpoint = run_dir + best[len(stage):]
            self._rotate(run_dir)
        self.accelerator.wait_for_everyone()

    def _rotate(self, run_dir: str) -> None:
        if hasattr(self, "_rotate_checkpoints"):  # transformers 4.x
            self._rotate_checkpoints(use_mtime=False, output_dir=run_dir)
            return
        from transformers.trainer_utils import rotate_checkpoints

        rotate_checkpoints(output_dir=run_dir, save_total_limit=self.args.save_total_limit,
                           best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=False)

    #: ``(folder, log_history) -> trine.cards.ModelCard`` for the final model's card (set by the recipe)
    model_card: Any = None

    def save_final(self, output_dir: str | None = None) -> str:
        """The trained model, atomically: written beside ``output_dir``, the run's checkpoints and logs
        carried over (hard links), then swapped in whole; files of an earlier model never remain."""
        output_dir = output_dir or self.args.output_dir
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            with atomic_folder(output_dir, overwrite=True, carry_over=CARRY_OVER) as tmp:
                self._save(tmp)
                if self.model_card is not None:  # README.md: how this model was made (trine.cards)
                    write_card(tmp, self.model_card(tmp, self.state.log_history), name=os.path.basename(output_dir))
        self.accelerator.wait_for_everyone()
        return output_dir

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:  # noqa: ANN001
        target = self.accelerator.unwrap_model(model or self.model)
        target.encoder.load_weights(resume_from_checkpoint)


def log_keeping_step_log(trainer: Trainer, control: Any, logs: dict[str, float]) -> None:
    """``trainer.log(logs)`` from a callback on the main process only. ``Trainer.log`` clears
    ``control.should_log``; restored, or the main process would skip this step's loss log and its
    all-gather, which the other ranks still enter (a deadlock under DDP)."""
    should_log = control.should_log
    trainer.log(logs)
    control.should_log = trainer.control.should_log = should_log


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

    def _maybe(self, args, state, control) -> None:  # noqa: ANN001
        if args.process_index == 0:
            log_keeping_step_log(self.trainer, control, self.evaluate())

    def on_train_begin(self, args, state, control, **kwargs):  # noqa: ANN001
        if state.global_step == 0:
            self._maybe(args, state, control)

    def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
        if self.every and state.global_step % self.every == 0:
            self._maybe(args, state, control)
