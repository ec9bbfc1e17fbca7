"""The training wrapper: a tri-head model plus the loss of the chosen training mode.

Modes: ``dense``, ``sparse``, ``colbert`` (one head's InfoNCE) and ``unified`` (BGE-M3: the
three heads and their ensemble, optionally with self-knowledge distillation). Every head gets
in-batch and, with ``negatives_cross_device``, other ranks' negatives. The loss terms are
objects from :mod:`trine.training.losses` (InfoNCE plus the ``kd_loss_type`` distillation, and
``self_distill``); this module makes the score matrices and weighs the heads.

Matryoshka (``matryoshka_dims``): the dense head's loss becomes the weighted sum, over the listed
dimensions, of the loss of the dense vectors cut to their first ``dim`` values and re-normalised
(when the model normalises); the full size counts only when listed. It is computed from the
representations, so gradient caching and cross-device negatives work unchanged; in ``unified`` mode
the ensemble and self-distillation use the full-size dense scores.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn

from trine.modeling.heads import lexical_matrix
from trine.modeling.lexical_init import BM25Teacher
from trine.modeling.trihead import TriHeadModel
from trine.scoring import colbert_scores_padded
from trine.training.distributed import gather_padded, gather_with_grad
from trine.training.losses import (
    ScoreBatch,
    build_loss,
    group_scores,
    objective,
    positive_columns,
    teacher_distribution,
)

TRAINING_MODES = ("dense", "sparse", "colbert", "unified")


def check_matryoshka(dims: Sequence[int] | None, weights: Sequence[float] | None = None,
                     hidden_size: int | None = None) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """Matryoshka dimensions and their loss weights (default: all 1), checked: dimensions positive,
    unique, at most ``hidden_size``; one positive weight per dimension. ``()`` when ``dims`` is empty."""
    if not dims:
        if weights:
            raise ValueError("matryoshka_weights needs matryoshka_dims")
        return (), ()
    if isinstance(dims, (int, str)) or not all(isinstance(d, int) and not isinstance(d, bool) for d in dims):
        raise ValueError(f"matryoshka_dims must be a list of integers, got {dims!r}")
    bad = [d for d in dims if d <= 0 or (hidden_size is not None and d > hidden_size)]
    if bad:
        limit = f" and at most the hidden size {hidden_size}" if hidden_size is not None else ""
        raise ValueError(f"matryoshka_dims must be positive{limit}, got {bad}")
    if len(set(dims)) != len(dims):
        raise ValueError(f"matryoshka_dims must be unique, got {list(dims)}")
    if weights is None or len(weights) == 0:
        weights = [1.0] * len(dims)
    if len(weights) != len(dims):
        raise ValueError(f"matryoshka_weights needs one weight per dimension of matryoshka_dims ({len(dims)}), "
                         f"got {len(weights)}")
    if not all(isinstance(w, (int, float)) and w > 0 and math.isfinite(w) for w in weights):
        raise ValueError(f"matryoshka_weights must be positive numbers, got {list(weights)}")
    return tuple(int(d) for d in dims), tuple(float(w) for w in weights)


def truncate_normalize(vecs: torch.Tensor, dim: int, normalize: bool) -> torch.Tensor:
    """The first ``dim`` values of each row, L2-normalised again when ``normalize``; the rows unchanged
    when ``dim`` is their full size."""
    if dim >= vecs.size(-1):
        return vecs
    cut = vecs[..., :dim]
    return torch.nn.functional.normalize(cut, dim=-1) if normalize else cut


def enable_checkpointing(model: nn.Module, checkpointing_kwargs: dict[str, Any] | None = None, **kwargs: Any) -> None:
    """Gradient (activation) checkpointing on a transformers model, under either version's name."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=checkpointing_kwargs, **kwargs)
    else:  # transformers 4
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing_kwargs)


@dataclass
class M3LossWeights:
    """BGE-M3's defaults: ensemble score = 1*dense + 0.3*lexical + 1*multi-vector;
    loss weights 1 (dense), 0.1 (lexical), 1 (multi-vector), 1 (ensemble)."""

    ensemble_dense: float = 1.0
    ensemble_sparse: float = 0.3
    ensemble_colbert: float = 1.0
    dense: float = 1.0
    sparse: float = 0.1
    colbert: float = 1.0
    ensemble: float = 1.0


class EmbedderTrainingModel(nn.Module):
    """Encodes queries and passages once and returns the mode's loss with its parts.

    Parameters the mode does not train are frozen and saved back unchanged: in ``dense`` mode
    the heads; in ``sparse``/``colbert`` mode the other head; with ``fix_encoder`` the backbone.
    The backbone's pooler is always frozen (trine pools token states itself).
    """

    def __init__(
        self,
        encoder: TriHeadModel,
        *,
        temperature: float = 0.02,
        negatives_cross_device: bool = False,
        kd_loss_type: str = "kl_div",
        training_mode: str = "dense",
        fix_encoder: bool = False,
        weights: M3LossWeights | None = None,
        use_self_distill: bool = False,
        self_distill_start_step: int = -1,
        colbert_chunk_elements: int = 1 << 24,
        sparse_temperature: float | None = None,
        sparse_flops_weight: float = 0.0,
        matryoshka_dims: Sequence[int] | None = None,
        matryoshka_weights: Sequence[float] | None = None,
        sparse_bm25_distill_weight: float = 0.0,
        sparse_bm25_distill_temperature: float | None = None,
        bm25_teacher: BM25Teacher | None = None,
    ):
        super().__init__()
        if training_mode not in TRAINING_MODES:
            raise ValueError(f"training_mode must be one of {TRAINING_MODES}, got {training_mode!r}")
        self.objective = objective("infonce", kd_loss_type)
        self.self_distill = build_loss("self_distill")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if sparse_temperature is not None and sparse_temperature <= 0:
            raise ValueError(f"sparse_temperature must be > 0, got {sparse_temperature}")
        if sparse_flops_weight < 0:
            raise ValueError(f"sparse_flops_weight must be >= 0, got {sparse_flops_weight}")
        self.sparse_bm25_distill_weight = check_bm25_distill(
            sparse_bm25_distill_weight, sparse_bm25_distill_temperature, training_mode)
        if self.sparse_bm25_distill_weight and bm25_teacher is None:
            raise ValueError("sparse_bm25_distill_weight needs a bm25_teacher (BM25 statistics of the training "
                             "passages: trine.modeling.lexical_init.BM25Teacher)")
        if bm25_teacher is not None and not self.sparse_bm25_distill_weight:
            raise ValueError("a bm25_teacher is given but sparse_bm25_distill_weight is 0: nothing would use it")
        if training_mode != "dense" and not encoder.has_heads:
            raise ValueError(f"training_mode {training_mode!r} needs lexical and ColBERT heads; load the model with "
                             "init_missing_heads='random', 'neutral' or 'bm25' if its folder has none")
        if use_self_distill and training_mode != "unified":
            raise ValueError("use_self_distill needs training_mode 'unified' (the ensemble is the teacher)")
        if fix_encoder and training_mode == "dense":
            raise ValueError("fix_encoder leaves nothing to train in dense mode")
        self.matryoshka_dims, self.matryoshka_weights = check_matryoshka(
            matryoshka_dims, matryoshka_weights, getattr(encoder, "hidden_size", None))
        if self.matryoshka_dims and training_mode not in ("dense", "unified"):
            raise ValueError(f"matryoshka_dims trains the dense vectors: it needs training_mode 'dense' or 'unified', "
                             f"not {training_mode!r}")
        self.encoder = encoder
        self.temperature = temperature
        self.sparse_temperature = temperature if sparse_temperature is None else sparse_temperature
        self.sparse_flops_weight = sparse_flops_weight
        self.bm25_teacher = bm25_teacher
        # the teacher's temperature defaults to the student's: the bm25 head start puts both on one scale
        self.bm25_distill = build_loss("bm25_distill", temperature=self.sparse_temperature
                                       if sparse_bm25_distill_temperature is None
                                       else float(sparse_bm25_distill_temperature))
        self.negatives_cross_device = negatives_cross_device
        self.kd_loss_type = kd_loss_type
        self.training_mode = training_mode
        self.weights = weights or M3LossWeights()
        self.use_self_distill = use_self_distill
        self.self_distill_start_step = self_distill_start_step
        self.colbert_chunk_elements = colbert_chunk_elements
        self.step = 0
        frozen = [getattr(encoder.backbone, "pooler", None)]
        if training_mode in ("dense", "colbert"):
            frozen.append(encoder.sparse_linear)
        if training_mode in ("dense", "sparse"):
            frozen.append(encoder.colbert_linear)
        if fix_encoder:
            frozen.append(encoder.backbone)
        for module in frozen:
            if module is not None:
                module.requires_grad_(False)

    def activation_checkpointing_enable(
        self, activation_checkpointing_kwargs: dict[str, Any] | None = None, **kwargs: Any
    ) -> None:
        """Called by the Trainer for ``--gradient_checkpointing`` (transformers 5 name)."""
        enable_checkpointing(self.encoder.backbone, activation_checkpointing_kwargs, **kwargs)

    gradient_checkpointing_enable = activation_checkpointing_enable

    @property
    def heads(self) -> tuple[str, ...]:
        return ("dense", "sparse", "colbert") if self.training_mode == "unified" else (self.training_mode,)

    def encode(self, features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The representations the loss needs (what gradient caching caches): dense vectors,
        per-token lexical weights with their ids (batch x length, not x vocabulary), ColBERT
        vectors with their mask."""
        heads = self.heads
        out = self.encoder(
            features["input_ids"], features["attention_mask"], return_dense="dense" in heads,
            return_sparse="sparse" in heads, return_colbert_vecs="colbert" in heads,
        )
        if "sparse" in heads:
            out["input_ids"] = features["input_ids"]
        return out

    def _scores(self, head: str, q: dict[str, torch.Tensor], p: dict[str, torch.Tensor], cross: bool,
                stats: dict[str, torch.Tensor]) -> torch.Tensor:
        """Queries x (gathered) passages for one head, divided by its temperature (``sparse_temperature``
        for the lexical head). The lexical head adds its FLOPS regulariser (when weighted), its BM25
        teacher's scores of the same (gathered) columns (``bm25``, when distilling) and its non-zero
        weights per text to ``stats``."""
        if head == "colbert":
            pv, pm = (gather_padded(p["colbert_vecs"], p["colbert_mask"]) if cross
                      else (p["colbert_vecs"], p["colbert_mask"]))
            s = colbert_scores_padded(q["colbert_vecs"], q["colbert_mask"], pv, pm,
                                      max_elements=self.colbert_chunk_elements)
        elif head == "sparse":
            vocab = self.encoder.vocab_size
            pw, pid = (gather_padded(p["token_weights"], p["input_ids"]) if cross
                        else (p["token_weights"], p["input_ids"]))
            q_mat = lexical_matrix(q["token_weights"], q["input_ids"], vocab)
            p_mat = lexical_matrix(pw, pid, vocab)
            s = q_mat @ p_mat.T
            local = p_mat if not cross else lexical_matrix(p["token_weights"], p["input_ids"], vocab)
            with torch.no_grad():
                stats["sparse_nonzeros_query"] = (q_mat > 0).sum(1).float().mean()
                stats["sparse_nonzeros_passage"] = (local > 0).sum(1).float().mean()
            if self.sparse_flops_weight:
                stats["flops"] = flops(q_mat) + flops(local)
            if self.bm25_teacher is not None:  # the gathered ids: the teacher covers the same columns
                stats["bm25"] = self.bm25_teacher(q["input_ids"], pid)
            return s / self.sparse_temperature
        else:
            s = q["dense_vecs"] @ (gather_with_grad(p["dense_vecs"]) if cross else p["dense_vecs"]).T
        return s / self.temperature

    def _matryoshka_scores(self, q: dict[str, torch.Tensor], p: dict[str, torch.Tensor], cross: bool
                           ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """The full-size dense scores and, per Matryoshka dimension, the scores of the truncated,
        re-normalised vectors (the passages gathered once); all divided by the temperature."""
        qv = q["dense_vecs"]
        pv = gather_with_grad(p["dense_vecs"]) if cross else p["dense_vecs"]
        full = qv @ pv.T / self.temperature
        normalize = bool(getattr(self.encoder, "normalize_embeddings", True))
        per_dim = {}
        for dim in self.matryoshka_dims:
            if dim >= qv.size(-1):
                per_dim[dim] = full
            else:
                per_dim[dim] = (truncate_normalize(qv, dim, normalize) @ truncate_normalize(pv, dim, normalize).T
                                / self.temperature)
        return full, per_dim

    def forward(
        self,
        queries: dict[str, torch.Tensor] | None = None,
        passages: dict[str, torch.Tensor] | None = None,
        teacher_scores: torch.Tensor | None = None,
        in_batch_negatives: bool = True,
        encode_only: dict[str, torch.Tensor] | None = None,
    ) -> dict[str, Any]:
        """The loss for a batch; or, with ``encode_only``, just the representations of those
        inputs (gradient caching re-runs sub-batches through here, so DDP sees a forward)."""
        if encode_only is not None:
            return self.encode(encode_only)
        return self.loss_from_reps(self.encode(queries), self.encode(passages), teacher_scores, in_batch_negatives)

    def loss_from_reps(
        self,
        q: dict[str, torch.Tensor],
        p: dict[str, torch.Tensor],
        teacher_scores: torch.Tensor | None = None,
        in_batch_negatives: bool = True,
    ) -> dict[str, Any]:
        n_q = _rows(q)
        n_p = _rows(p)
        if n_p % n_q:
            raise ValueError(f"{n_p} passages for {n_q} queries: not a whole group per query")
        group = n_p // n_q
        cross = self.negatives_cross_device and in_batch_negatives
        device = next(iter(q.values())).device
        targets = positive_columns(n_q, group, True, cross, device)
        teacher = teacher_distribution(teacher_scores)
        scores = {}
        matryoshka: dict[int, torch.Tensor] = {}
        stats: dict[str, torch.Tensor] = {}
        for head in self.heads:
            if head == "dense" and self.matryoshka_dims:
                s, matryoshka = self._matryoshka_scores(q, p, cross)
            else:
                s = self._scores(head, q, p, cross, stats)
            # Without in-batch negatives each query sees its own group only.
            scores[head] = s if in_batch_negatives else group_scores(s, targets, group)
            if head == "dense" and not in_batch_negatives:
                matryoshka = {d: group_scores(m, targets, group) for d, m in matryoshka.items()}
        bm25 = stats.pop("bm25", None)
        if bm25 is not None and not in_batch_negatives:
            bm25 = group_scores(bm25, targets, group)
        if not in_batch_negatives:
            targets = positive_columns(n_q, group, False, False, targets.device)
        loss, parts = self._loss(scores, partial(ScoreBatch, targets=targets, group_size=group, teacher=teacher),
                                 matryoshka)
        if "flops" in stats:  # SPLADE's sparsity regulariser on the lexical weights
            flops_loss = stats.pop("flops")
            parts["sparse_flops"] = flops_loss.detach()
            loss = loss + self.sparse_flops_weight * flops_loss
        if bm25 is not None:  # BM25's ranking of the same columns distilled into the lexical scores
            distill = self.bm25_distill(ScoreBatch(scores["sparse"], targets, group, bm25=bm25))
            parts[self.bm25_distill.part] = distill.detach()
            loss = loss + self.sparse_bm25_distill_weight * distill
        self.step += 1  # forward passes, as FlagEmbedding counts them for self_distill_start_step
        negatives = next(iter(scores.values())).size(1) - 1
        return {"loss": loss, "parts": parts, "negatives_per_query": negatives,
                "stats": {k: float(v) for k, v in stats.items()}}

    def _dense_loss(self, full: torch.Tensor, matryoshka: dict[int, torch.Tensor],
                    batch: Callable[..., ScoreBatch]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The dense head's loss: the objective on the full-size scores, or (Matryoshka) the weighted
        sum of the objective on each dimension's scores, with parts ``<part>@<dim>``."""
        if not matryoshka:
            return self.objective(batch(full))
        total, parts = None, {}
        for dim, weight in zip(self.matryoshka_dims, self.matryoshka_weights):
            loss, dim_parts = self.objective(batch(matryoshka[dim]))
            parts.update((f"{name}@{dim}", value) for name, value in dim_parts.items())
            term = loss if weight == 1.0 else weight * loss
            total = term if total is None else total + term
        return total, parts

    def _loss(self, scores: dict[str, torch.Tensor], batch: Callable[..., ScoreBatch],
              matryoshka: dict[int, torch.Tensor] | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The mode's loss and its parts; ``batch(scores, ...)`` makes one head's loss inputs;
        ``matryoshka``: the dense scores per Matryoshka dimension (the dense loss is over those)."""
        matryoshka = matryoshka or {}
        if self.training_mode != "unified":
            if self.training_mode == "dense":
                return self._dense_loss(scores["dense"], matryoshka, batch)
            return self.objective(batch(scores[self.training_mode]))
        w = self.weights
        parts: dict[str, torch.Tensor] = {}
        ensemble = w.ensemble_dense * scores["dense"] + w.ensemble_sparse * scores["sparse"] + \
            w.ensemble_colbert * scores["colbert"]
        total = 0
        for head, weight, s in (("dense", w.dense, scores["dense"]), ("sparse", w.sparse, scores["sparse"]),
                                ("colbert", w.colbert, scores["colbert"]), ("ensemble", w.ensemble, ensemble)):
            if head == "dense":
                loss, dense_parts = self._dense_loss(s, matryoshka, batch)
                if matryoshka:
                    parts.update((f"dense_{name}", value) for name, value in dense_parts.items())
            else:
                loss, _ = self.objective(batch(s))
            parts[head] = loss.detach()
            total = total + weight * loss
        # BGE-M3's normalisation: the mean of the four weighted terms.
        total = total / 4
        if self.use_self_distill and self.step > self.self_distill_start_step:
            distill = 0
            for head, weight in (("dense", w.dense), ("sparse", w.sparse), ("colbert", w.colbert)):
                d = self.self_distill(batch(scores[head], ensemble=ensemble))
                parts[f"{self.self_distill.part}_{head}"] = d.detach()
                distill = distill + weight * d
            total = (total + distill / 3) / 2
        return total, parts


def check_bm25_distill(weight: float, temperature: float | None, training_mode: str) -> float:
    """``sparse_bm25_distill_weight`` checked: a finite number >= 0, above 0 only in a mode that trains the
    lexical head; its temperature positive, and given only with a weight."""
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
        raise ValueError(f"sparse_bm25_distill_weight must be a number >= 0, got {weight!r}")
    if temperature is not None:
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
                or not math.isfinite(temperature) or temperature <= 0:
            raise ValueError(f"sparse_bm25_distill_temperature must be a number > 0, got {temperature!r}")
        if not weight:
            raise ValueError("sparse_bm25_distill_temperature needs sparse_bm25_distill_weight > 0")
    if weight and training_mode not in ("sparse", "unified"):
        raise ValueError(f"sparse_bm25_distill_weight trains the lexical head: it needs training_mode 'sparse' or "
                         f"'unified', not {training_mode!r}")
    return float(weight)


def flops(weights: torch.Tensor) -> torch.Tensor:
    """SPLADE's FLOPS regulariser of a (texts x vocabulary) weight matrix: ``sum_j (mean_i |w_ij|)^2``,
    a smooth proxy for the expected number of multiplications of a sparse dot product."""
    return (weights.abs().mean(0) ** 2).sum()


def _rows(reps: dict[str, torch.Tensor]) -> int:
    return next(iter(reps.values())).size(0)
