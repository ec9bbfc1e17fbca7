"""Gradient caching (GradCache, Gao et al. 2021): contrastive batches far larger than memory.

1. Encode the whole batch in sub-batches without a graph (recording each one's random state).
2. Compute the loss on those representations and back-propagate to them only; keep those
   gradients.
3. Re-encode each sub-batch with a graph, replaying its random state (same dropout), and
   back-propagate its cached gradient into the parameters.

The gradients equal those of one pass over the whole batch with the same dropout masks; memory
holds one sub-batch's activations plus the representations. Under DDP only the last re-encoded
sub-batch synchronises gradients (one all-reduce per step).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn


class RandomState:
    """The CPU and CUDA generator states at one moment, to replay dropout exactly."""

    def __init__(self) -> None:
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None

    @contextlib.contextmanager
    def replay(self) -> Iterator[None]:
        devices = list(range(torch.cuda.device_count())) if self.cuda is not None else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(self.cpu)
            if self.cuda is not None:
                torch.cuda.set_rng_state_all(self.cuda)
            yield


def split_features(
    features: dict[str, torch.Tensor], chunk_size: int | None = None, max_tokens: int | None = None
) -> list[dict[str, torch.Tensor]]:
    """Cut a padded batch into sub-batches of at most ``chunk_size`` rows and/or ``max_tokens``
    padded tokens, each trimmed to its own longest row (right padding)."""
    if chunk_size is None and max_tokens is None:
        raise ValueError("gradient caching needs a sub-batch size or a token budget")
    lengths = features["attention_mask"].sum(1).tolist()
    rows = len(lengths)
    chunks, start = [], 0
    while start < rows:
        end = start + 1
        while end < rows:
            size = end + 1 - start
            width = max(lengths[start : end + 1])
            if (chunk_size is not None and size > chunk_size) or (max_tokens is not None and size * width > max_tokens):
                break
            end += 1
        width = max(lengths[start:end])
        chunks.append({k: v[start:end, :width] for k, v in features.items()})
        start = end
    return chunks


def concat_reps(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Concatenate sub-batch representations along rows; per-token ones are padded to one length."""
    out = {}
    for key in parts[0]:
        tensors = [p[key] for p in parts]
        if tensors[0].dim() >= 2 and key != "dense_vecs":
            width = max(t.size(1) for t in tensors)
            tensors = [nn.functional.pad(t, (0, 0) * (t.dim() - 2) + (0, width - t.size(1))) for t in tensors]
        out[key] = torch.cat(tensors, 0)
    return out


def _split_reps(reps: dict[str, torch.Tensor], parts: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
    """Cut concatenated (padded) representations back into the sub-batches' own shapes."""
    out, start = [], 0
    for part in parts:
        n = next(iter(part.values())).size(0)
        piece = {}
        for key, full_value in reps.items():
            value = part[key]
            full = full_value[start : start + n]
            piece[key] = full[:, : value.size(1)] if value.dim() >= 2 and key != "dense_vecs" else full
        out.append(piece)
        start += n
    return out


def gradcache_step(
    model: nn.Module,
    inner: Any,
    queries: dict[str, torch.Tensor],
    passages: dict[str, torch.Tensor],
    *,
    teacher_scores: torch.Tensor | None = None,
    in_batch_negatives: bool = True,
    chunk_size: int | None = None,
    max_tokens: int | None = None,
    backward: Callable[[torch.Tensor], None] = torch.Tensor.backward,
    loss_scale: float = 1.0,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> dict[str, Any]:
    """One training step's forward and backward with cached gradients; returns the loss output.

    ``model`` is what the Trainer trains (maybe DDP-wrapped), ``inner`` the
    :class:`~trine.training.model.EmbedderTrainingModel` inside. ``backward`` runs the
    representation-level backward (the accelerator's, for loss scaling); ``loss_scale`` divides
    the loss (gradient accumulation).
    """
    sub_batches = {name: split_features(f, chunk_size, max_tokens) for name, f in
                   (("q", queries), ("p", passages))}
    states: dict[str, list[RandomState]] = {"q": [], "p": []}
    reps: dict[str, list[dict[str, torch.Tensor]]] = {"q": [], "p": []}
    with torch.no_grad():
        for name, chunks in sub_batches.items():
            for chunk in chunks:
                states[name].append(RandomState())
                with autocast():
                    reps[name].append(inner.encode(chunk))
    leaves = {}
    for name in ("q", "p"):
        full = concat_reps(reps[name])
        leaves[name] = {k: (v.detach().requires_grad_(True) if v.is_floating_point() else v) for k, v in full.items()}
    with autocast():
        out = inner.loss_from_reps(leaves["q"], leaves["p"], teacher_scores, in_batch_negatives)
    backward(out["loss"] / loss_scale)
    grads = {name: _split_reps({k: (v.grad if v.grad is not None else torch.zeros_like(v))
                                for k, v in leaves[name].items() if v.is_floating_point()}, reps[name])
             for name in ("q", "p")}
    order = [(name, i) for name in ("q", "p") for i in range(len(sub_batches[name]))]
    no_sync = getattr(model, "no_sync", None)
    for n, (name, i) in enumerate(order):
        sync = n == len(order) - 1 or no_sync is None
        with (contextlib.nullcontext() if sync else no_sync()), states[name][i].replay(), autocast():
            fresh = model(encode_only=sub_batches[name][i])
            surrogate = sum((fresh[k] * g).sum() for k, g in grads[name][i].items() if fresh[k].requires_grad)
        surrogate.backward()
    return out
