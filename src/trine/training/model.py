"""The training wrapper: a tri-head model plus the loss for the chosen training mode."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from trine.modeling.trihead import TriHeadModel
from trine.training.losses import contrastive_loss

TRAINING_MODES = ("dense",)


class EmbedderTrainingModel(nn.Module):
    """Encodes queries and passages and returns the contrastive loss (dense mode).

    Parameters not trained in the mode (the lexical and ColBERT heads in dense mode) are frozen
    and saved back unchanged.
    """

    def __init__(
        self,
        encoder: TriHeadModel,
        *,
        temperature: float = 0.02,
        negatives_cross_device: bool = False,
        kd_loss_type: str = "kl_div",
        training_mode: str = "dense",
    ):
        super().__init__()
        if training_mode not in TRAINING_MODES:
            raise ValueError(f"training_mode must be one of {TRAINING_MODES}, got {training_mode!r}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.encoder = encoder
        self.temperature = temperature
        self.negatives_cross_device = negatives_cross_device
        self.kd_loss_type = kd_loss_type
        self.training_mode = training_mode
        # Frozen: the heads this mode does not train, and the backbone's pooler (trine pools the
        # token states itself). DDP needs every trainable parameter to get a gradient each step;
        # an unused one leaves its gradient bucket un-averaged.
        unused = [encoder.colbert_linear, encoder.sparse_linear, getattr(encoder.backbone, "pooler", None)]
        for module in unused:
            if module is not None:
                module.requires_grad_(False)

    def activation_checkpointing_enable(
        self, activation_checkpointing_kwargs: dict[str, Any] | None = None, **kwargs: Any
    ) -> None:
        """Called by the Trainer for ``--gradient_checkpointing`` (transformers 5 name)."""
        backbone = self.encoder.backbone
        if hasattr(backbone, "activation_checkpointing_enable"):
            backbone.activation_checkpointing_enable(activation_checkpointing_kwargs=activation_checkpointing_kwargs,
                                                     **kwargs)
        else:  # transformers 4
            backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs=activation_checkpointing_kwargs)

    gradient_checkpointing_enable = activation_checkpointing_enable

    def encode(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.encoder(features["input_ids"], features["attention_mask"], return_dense=True)["dense_vecs"]

    def forward(
        self,
        queries: dict[str, torch.Tensor],
        passages: dict[str, torch.Tensor],
        teacher_scores: torch.Tensor | None = None,
        in_batch_negatives: bool = True,
    ) -> dict[str, Any]:
        q = self.encode(queries)
        p = self.encode(passages)
        out = contrastive_loss(
            q,
            p,
            temperature=self.temperature,
            in_batch_negatives=in_batch_negatives,
            cross_device=self.negatives_cross_device and in_batch_negatives,
            teacher_scores=teacher_scores,
            kd_loss_type=self.kd_loss_type,
        )
        return {"loss": out.loss, "parts": out.parts, "negatives_per_query": out.negatives_per_query}
