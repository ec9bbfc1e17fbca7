"""The one cross-device gather: every rank's tensor, with gradients flowing back to their owners."""

from __future__ import annotations

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) when torch.distributed is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


_GROUP: dict[str, object] = {}


def _gather_group():
    """A process group of its own for the gather.

    Its backward all-reduce runs in the middle of autograd while DDP may already be reducing
    gradient buckets asynchronously on the default group; a separate group keeps the two
    streams of collectives from pairing up out of order. All ranks create it at their first
    gather, in the same order.
    """
    if "group" not in _GROUP:
        _GROUP["group"] = dist.new_group(ranks=list(range(dist.get_world_size())))
    return _GROUP["group"]


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        rank, size = world()
        group = _gather_group()
        ctx.rank, ctx.rows, ctx.group = rank, tensor.size(0), group
        shapes = [torch.zeros(1, dtype=torch.long, device=tensor.device) for _ in range(size)]
        dist.all_gather(shapes, torch.tensor([tensor.size(0)], device=tensor.device), group=group)
        if len({int(s) for s in shapes}) != 1:
            sizes = [int(s) for s in shapes]
            raise RuntimeError(f"cross-device gather needs equal batch sizes on all ranks, got {sizes}")
        parts = [torch.empty_like(tensor) for _ in range(size)]
        dist.all_gather(parts, tensor.contiguous(), group=group)
        return torch.cat(parts, 0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        # Each rank's loss used every rank's rows: sum the gradients for my rows from all ranks.
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` from all ranks (rank order) along dim 0; identity on one process.

    With each rank's loss averaged over its own queries and DDP averaging gradients, the
    result is exactly the gradient of the loss over the whole global batch.
    """
    if world()[1] == 1:
        return tensor
    return _GatherWithGrad.apply(tensor)


def gather_padded(values: torch.Tensor, companion: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather per-token tensors whose length (dim 1) differs by rank, padding both to the longest.

    ``values`` (rows x length [x dim]) keeps its gradient; ``companion`` (rows x length: a mask
    or token ids) is padded with zeros/False and gathered as data.
    """
    if world()[1] == 1:
        return values, companion
    length = torch.tensor([values.size(1)], device=values.device)
    dist.all_reduce(length, op=dist.ReduceOp.MAX, group=_gather_group())
    extra = int(length) - values.size(1)
    if extra:
        values = torch.nn.functional.pad(values, (0, 0) * (values.dim() - 2) + (0, extra))
        companion = torch.nn.functional.pad(companion, (0, extra))
    dtype = companion.dtype
    gathered = gather_with_grad(companion.to(torch.long)).to(dtype)
    return gather_with_grad(values), gathered
