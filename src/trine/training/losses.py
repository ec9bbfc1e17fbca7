"""Contrastive (InfoNCE) and distillation losses over embeddings.

Layout: ``q`` is (queries x dim); ``p`` is (queries * group x dim) with each query's group
``[positive, negative_1, ...]`` contiguous. Scores are divided by ``temperature``.
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


def kl_div_loss(teacher: torch.Tensor, student_group_scores: torch.Tensor) -> torch.Tensor:
    """-mean sum_g t_g log softmax(s)_g, teacher already a distribution (queries x group)."""
    return -(teacher * torch.log_softmax(student_group_scores, dim=-1)).sum(-1).mean()


def m3_kd_loss(teacher: torch.Tensor, scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """BGE-M3's listwise distillation over the full score matrix.

    For g = 0..G-1: weight t_g times cross-entropy towards column target+g, then that column is
    masked out for the following g.
    """
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
    """InfoNCE over the positive, the hard negatives, in-batch and (optionally) other ranks' passages.

    With ``cross_device`` the passages of every rank are gathered (gradients reach their
    owners); the loss is the mean over this rank's queries, so averaging over ranks (as DDP does
    with gradients) gives the loss of the whole global batch.
    ``teacher_scores`` (queries x group, raw scores) become softmax targets for distillation.
    """
    if kd_loss_type not in KD_LOSS_TYPES:
        raise ValueError(f"kd_loss_type must be one of {KD_LOSS_TYPES}, got {kd_loss_type!r}")
    n_q = q.size(0)
    if p.size(0) % n_q:
        raise ValueError(f"{p.size(0)} passages for {n_q} queries: not a whole group per query")
    group = p.size(0) // n_q
    teacher = None if teacher_scores is None else torch.softmax(teacher_scores.detach().float(), dim=-1)
    if not in_batch_negatives:
        scores = torch.einsum("qd,qgd->qg", q, p.view(n_q, group, -1)) / temperature
        targets = torch.zeros(n_q, dtype=torch.long, device=q.device)
        ce = F.cross_entropy(scores, targets)
        if teacher is None:
            return LossOutput(ce, {"ce": ce.detach()}, group - 1)
        if kd_loss_type == "kl_div":
            kd = kl_div_loss(teacher, scores)
            return LossOutput(kd + ce, {"kd": kd.detach(), "ce": ce.detach()}, group - 1)
        kd = m3_kd_loss(teacher, scores, targets)
        return LossOutput(kd, {"kd": kd.detach()}, group - 1)
    rank = world()[0] if cross_device else 0
    all_p = gather_with_grad(p) if cross_device else p
    scores = q @ all_p.T / temperature
    targets = (torch.arange(n_q, device=q.device) + rank * n_q) * group
    negatives = scores.size(1) - 1
    if teacher is None:
        ce = F.cross_entropy(scores, targets)
        return LossOutput(ce, {"ce": ce.detach()}, negatives)
    if kd_loss_type == "kl_div":
        kd = kl_div_loss(teacher, group_scores(scores, targets, group))
        ce = F.cross_entropy(scores, targets)
        return LossOutput(kd + ce, {"kd": kd.detach(), "ce": ce.detach()}, negatives)
    kd = m3_kd_loss(teacher, scores, targets)
    return LossOutput(kd, {"kd": kd.detach()}, negatives)
