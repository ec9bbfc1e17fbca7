"""Contrastive (InfoNCE) and distillation losses over score matrices.

Layout: ``q`` is (queries x ...); passages are (queries * group x ...) with each query's group
``[positive, negative_1, ...]`` contiguous. A score matrix is queries x candidate passages,
already divided by the temperature; ``targets`` give each query's positive column.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from trine.training.distributed import gather_with_grad, world

KD_LOSS_TYPES = ("kl_div", "m3_kd_loss")


@dataclass
class LossOutput:
    loss: torch.Tensor
    parts: dict[str, torch.Tensor]
    negatives_per_query: int


def kl_div_loss(teacher: torch.Tensor, student_scores: torch.Tensor) -> torch.Tensor:
    """-mean sum_c t_c log softmax(s)_c, ``teacher`` already a distribution over the same columns."""
    return -(teacher * torch.log_softmax(student_scores, dim=-1)).sum(-1).mean()


def m3_kd_loss(teacher: torch.Tensor, scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """BGE-M3's listwise distillation: for g = 0..G-1, weight t_g times cross-entropy towards
    column target+g, then mask that column out for the following g."""
    loss = scores.new_zeros(())
    mask = torch.zeros_like(scores)
    for g in range(teacher.size(1)):
        column = targets + g
        ce = F.cross_entropy(scores + mask, column, reduction="none")
        loss = loss + (teacher[:, g] * ce).mean()
        mask = mask.scatter(1, column.unsqueeze(1), torch.finfo(scores.dtype).min)
    return loss


def group_scores(scores: torch.Tensor, targets: torch.Tensor, group_size: int) -> torch.Tensor:
    """Each query's scores for its own group (queries x group) out of a wider score matrix."""
    cols = targets.unsqueeze(1) + torch.arange(group_size, device=scores.device)
    return scores.gather(1, cols)


def score_loss(
    scores: torch.Tensor,
    targets: torch.Tensor,
    group_size: int,
    teacher: torch.Tensor | None = None,
    kd_loss_type: str = "kl_div",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Cross-entropy towards ``targets``; with a ``teacher`` (queries x group distribution):
    ``kl_div`` adds KL on each query's own group to the cross-entropy, ``m3_kd_loss`` replaces it."""
    if teacher is None:
        ce = F.cross_entropy(scores, targets)
        return ce, {"ce": ce.detach()}
    if kd_loss_type == "kl_div":
        kd = kl_div_loss(teacher, group_scores(scores, targets, group_size))
        ce = F.cross_entropy(scores, targets)
        return kd + ce, {"kd": kd.detach(), "ce": ce.detach()}
    if kd_loss_type == "m3_kd_loss":
        kd = m3_kd_loss(teacher, scores, targets)
        return kd, {"kd": kd.detach()}
    raise ValueError(f"kd_loss_type must be one of {KD_LOSS_TYPES}, got {kd_loss_type!r}")


def teacher_distribution(teacher_scores: torch.Tensor | None) -> torch.Tensor | None:
    """Teacher scores (queries x group, raw) -> softmax targets (no temperature, as FlagEmbedding)."""
    return None if teacher_scores is None else torch.softmax(teacher_scores.detach().float(), dim=-1)


def positive_columns(n_queries: int, group_size: int, in_batch: bool, cross_device: bool, device) -> torch.Tensor:
    """Column of each local query's positive: in its own group row (0), or in the (gathered) batch."""
    if not in_batch:
        return torch.zeros(n_queries, dtype=torch.long, device=device)
    rank = world()[0] if cross_device else 0
    return (torch.arange(n_queries, device=device) + rank * n_queries) * group_size


def contrastive_loss(
    q: torch.Tensor,
    p: torch.Tensor,
    *,
    temperature: float,
    in_batch_negatives: bool = True,
    cross_device: bool = False,
    teacher_scores: torch.Tensor | None = None,
    kd_loss_type: str = "kl_div",
) -> LossOutput:
    """Dense InfoNCE over the positive, the hard negatives, in-batch and (optionally) other ranks' passages.

    With ``cross_device`` the passages of every rank are gathered (gradients reach their
    owners); the loss is the mean over this rank's queries, so averaging over ranks (as DDP does
    with gradients) gives the loss of the whole global batch.
    """
    if kd_loss_type not in KD_LOSS_TYPES:
        raise ValueError(f"kd_loss_type must be one of {KD_LOSS_TYPES}, got {kd_loss_type!r}")
    n_q = q.size(0)
    if p.size(0) % n_q:
        raise ValueError(f"{p.size(0)} passages for {n_q} queries: not a whole group per query")
    group = p.size(0) // n_q
    cross = cross_device and in_batch_negatives
    if in_batch_negatives:
        scores = q @ (gather_with_grad(p) if cross else p).T / temperature
    else:
        scores = torch.einsum("qd,qgd->qg", q, p.view(n_q, group, -1)) / temperature
    targets = positive_columns(n_q, group, in_batch_negatives, cross, q.device)
    loss, parts = score_loss(scores, targets, group, teacher_distribution(teacher_scores), kd_loss_type)
    return LossOutput(loss, parts, scores.size(1) - 1)
