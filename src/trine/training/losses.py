"""Losses as objects: a name registry, each loss with its options, composed by the training models.

Every loss reads a :class:`ScoreBatch`: a score matrix of queries x candidates whose values are
logits (an embedder's similarities already divided by the temperature, once per head and before
any ensemble, as FlagEmbedding; a reranker's raw logits), the column of each query's positive,
the group size, and, where the batch has them, the teacher's distribution over each query's
group and the ensemble's scores. Layout: each query's group ``[positive, negative_1, ...]`` is
contiguous, starting at its positive column.

A loss declares what it ``needs`` (``scores``, ``targets``, ``groups``, ``teacher``,
``ensemble``); an :class:`Objective` sums the terms whose inputs the batch has, so distillation
terms apply only to batches with teacher scores. ``build_loss(name, **options)`` makes one by
name (FlagEmbedding's: ``kd_loss_type`` ``kl_div``/``m3_kd_loss``, ``reranker_loss``
``group_ce``/``bce``); a new loss is a subclass registered with :func:`register`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from trine.training.distributed import world

KD_LOSS_TYPES = ("kl_div", "m3_kd_loss")

LOSSES: dict[str, type[Loss]] = {}


@dataclass(frozen=True)
class ScoreBatch:
    """What a loss may read. ``teacher``: a distribution over each query's group (queries x
    group); ``ensemble``: the ensemble's logits, same shape as ``scores``; ``bm25``: BM25's scores
    of the same (query, passage) pairs as ``scores`` (the lexical head's teacher)."""

    scores: torch.Tensor
    targets: torch.Tensor
    group_size: int
    teacher: torch.Tensor | None = None
    ensemble: torch.Tensor | None = None
    bm25: torch.Tensor | None = None


class Loss:
    """A loss term. Subclasses are dataclasses whose fields are their options; ``part`` names
    the term in the logged loss parts; ``replaces`` names terms it stands in for when active."""

    name: ClassVar[str]
    part: ClassVar[str]
    needs: ClassVar[frozenset[str]]
    replaces: ClassVar[tuple[str, ...]] = ()

    def applies(self, batch: ScoreBatch) -> bool:
        """Whether the batch has every optional input this loss needs."""
        return all(getattr(batch, need) is not None for need in self.needs & {"teacher", "ensemble", "bm25"})

    def __call__(self, batch: ScoreBatch) -> torch.Tensor:
        raise NotImplementedError


def register(*names: str) -> Callable[[type[Loss]], type[Loss]]:
    """Class decorator: make a loss buildable by each of ``names`` (the first is its own name)."""

    def add(cls: type[Loss]) -> type[Loss]:
        cls.name = names[0]
        for name in names:
            if name in LOSSES:
                raise ValueError(f"loss name {name!r} is already registered to {LOSSES[name].__name__}")
            LOSSES[name] = cls
        return cls

    return add


def build_loss(name: str, **options: Any) -> Loss:
    """The loss registered as ``name`` with ``options``; unknown names and options raise."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; known losses: {', '.join(sorted(LOSSES))}")
    cls = LOSSES[name]
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(f"loss {name!r} has no option(s) {', '.join(unknown)}; "
                         f"its options: {', '.join(known) or 'none'}")
    return cls(**options)


def kl_div(teacher: torch.Tensor, student_scores: torch.Tensor) -> torch.Tensor:
    """-mean sum_c t_c log softmax(s)_c, ``teacher`` already a distribution over the same columns
    (FlagEmbedding's ``kl_div``: KL up to the teacher's entropy, a constant)."""
    return -(teacher.to(student_scores.device) * torch.log_softmax(student_scores, dim=-1)).sum(-1).mean()


def group_scores(scores: torch.Tensor, targets: torch.Tensor, group_size: int) -> torch.Tensor:
    """Each query's scores for its own group (queries x group) out of a wider score matrix."""
    cols = targets.unsqueeze(1) + torch.arange(group_size, device=scores.device)
    return scores.gather(1, cols)


@register("infonce", "group_ce")
@dataclass(frozen=True)
class InfoNCE(Loss):
    """Cross-entropy towards each query's positive over every column of the score matrix: the
    hard negatives, in-batch and cross-device passages for embedders; the query's group for
    rerankers (FlagEmbedding's ``group_ce``)."""

    part: ClassVar[str] = "ce"
    needs: ClassVar[frozenset[str]] = frozenset({"scores", "targets"})

    def __call__(self, batch: ScoreBatch) -> torch.Tensor:
        return F.cross_entropy(batch.scores, batch.targets)


@register("kl_div")
@dataclass(frozen=True)
class KLDistill(Loss):
    """Distillation from the teacher's distribution over each query's own group, added to the
    other terms (FlagEmbedding's ``kd_loss_type: kl_div``)."""

    part: ClassVar[str] = "kd"
    needs: ClassVar[frozenset[str]] = frozenset({"scores", "targets", "groups", "teacher"})

    def __call__(self, batch: ScoreBatch) -> torch.Tensor:
        return kl_div(batch.teacher, group_scores(batch.scores, batch.targets, batch.group_size))


@register("m3_kd_loss")
@dataclass(frozen=True)
class M3KD(Loss):
    """BGE-M3's listwise distillation, in place of the cross-entropy: for g = 0..G-1, weight
    t_g times cross-entropy towards column target+g, then mask that column out for the following g."""

    part: ClassVar[str] = "kd"
    needs: ClassVar[frozenset[str]] = frozenset({"scores", "targets", "groups", "teacher"})
    replaces: ClassVar[tuple[str, ...]] = ("infonce",)

    def __call__(self, batch: ScoreBatch) -> torch.Tensor:
        scores, targets, teacher = batch.scores, batch.targets, batch.teacher
        loss = scores.new_zeros(())
        mask = torch.zeros_like(scores)
        for g in range(teacher.size(1)):
            column = targets + g
            ce = F.cross_entropy(scores + mask, column, reduction="none")
            loss = loss + (teacher[:, g] * ce).mean()
            mask = mask.scatter(1, column.unsqueeze(1), torch.finfo(scores.dtype).min)
        return loss


@register("bce")
@dataclass(frozen=True)
class PointwiseBCE(Loss):
    """Binary cross-entropy on every score: label 1 for the positive's column, 0 for the others."""

    part: ClassVar[str] = "bce"
    needs: ClassVar[frozenset[str]] = frozenset({"scores", "targets"})

    def __call__(self, batch: ScoreBatch) -> torch.Tensor:
        labels = torch.zeros_like(batch.scores).scatter(1, batch.targets.unsqueeze(1), 1.0)
        return F.binary_cross_entropy_with_logits(batch.scores, labels)


@register("self_distill")
@dataclass(frozen=True)
class SelfDistill(Loss):
    """BGE-M3's self-knowledge distillation: the ensemble's softmax over every column (no
    gradient) teaches the scores, with the same KL as :class:`KLDistill`."""

    part: ClassVar[str] = "self_distill"
    needs: ClassVar[frozenset[str]] = frozenset({"scores", "ensemble"})

    def __call__(self, batch: ScoreBatch) -> torch.Tensor:
        return kl_div(torch.softmax(batch.ensemble.detach(), dim=-1), batch.scores)


@register("bm25_distill")
@dataclass(frozen=True)
class BM25Distill(Loss):
    """BM25 score distillation into the lexical head (``sparse_bm25_distill_weight``): the softmax of
    BM25's scores over every column, divided by ``temperature``, teaches the lexical scores with the
    same KL as :class:`KLDistill`. On a small training budget the head then keeps BM25's ranking of
    the in-batch passages (term statistics) while the contrastive terms teach it the rest."""

    part: ClassVar[str] = "sparse_bm25_kd"
    needs: ClassVar[frozenset[str]] = frozenset({"scores", "bm25"})
    temperature: float = 1.0

    def __post_init__(self) -> None:
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)
                and self.temperature > 0):
            raise ValueError(f"bm25_distill's temperature must be a positive number, got {self.temperature!r}")

    def __call__(self, batch: ScoreBatch) -> torch.Tensor:
        return kl_div(torch.softmax(batch.bm25.detach().float() / self.temperature, dim=-1), batch.scores)


class Objective:
    """The sum of loss terms; a term runs when the batch has what it needs, and drops the terms
    it ``replaces`` (``m3_kd_loss`` stands in for the cross-entropy on batches with teacher scores)."""

    def __init__(self, terms: Sequence[Loss]):
        names = [t.name for t in terms]
        if not terms or len(set(names)) != len(names):
            raise ValueError(f"an objective needs distinct loss terms, got {names}")
        for term in terms:
            if term.replaces and not set(term.replaces) & set(names):
                raise ValueError(f"{term.name} replaces {' or '.join(term.replaces)}, which this objective "
                                 f"does not have ({', '.join(names)})")
        self.terms = tuple(terms)

    def active(self, batch: ScoreBatch) -> list[Loss]:
        terms = [t for t in self.terms if t.applies(batch)]
        replaced = {name for t in terms for name in t.replaces}
        return [t for t in terms if t.name not in replaced]

    def __call__(self, batch: ScoreBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The summed loss and each term's value (detached) under its ``part`` name."""
        total, parts = None, {}
        for term in self.active(batch):
            value = term(batch)
            parts[term.part] = value.detach()
            total = value if total is None else total + value
        if total is None:
            raise ValueError(f"no loss term applies to this batch ({', '.join(t.name for t in self.terms)})")
        return total, parts


def objective(primary: str, kd_loss_type: str = "kl_div") -> Objective:
    """FlagEmbedding's composition: the ``primary`` loss, plus (on batches with teacher scores)
    ``kd_loss_type``'s distillation: ``kl_div`` adds to it, ``m3_kd_loss`` replaces the cross-entropy.
    The distillation term is computed first, as before, so gradients accumulate in the same order."""
    if kd_loss_type not in KD_LOSS_TYPES:
        raise ValueError(f"kd_loss_type must be one of {KD_LOSS_TYPES}, got {kd_loss_type!r}")
    return Objective([build_loss(kd_loss_type), build_loss(primary)])


def teacher_distribution(teacher_scores: torch.Tensor | None) -> torch.Tensor | None:
    """Teacher scores (queries x group, raw) -> softmax targets (no temperature, as FlagEmbedding)."""
    return None if teacher_scores is None else torch.softmax(teacher_scores.detach().float(), dim=-1)


def positive_columns(n_queries: int, group_size: int, in_batch: bool, cross_device: bool, device) -> torch.Tensor:
    """Column of each local query's positive: in its own group row (0), or in the (gathered) batch."""
    if not in_batch:
        return torch.zeros(n_queries, dtype=torch.long, device=device)
    rank = world()[0] if cross_device else 0
    return (torch.arange(n_queries, device=device) + rank * n_queries) * group_size
