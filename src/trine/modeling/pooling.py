"""Sentence pooling: the one place that turns token states into a dense vector."""

from __future__ import annotations

import torch

POOLING_METHODS = ("cls", "mean", "last_token")


def check_pooling_method(method: str) -> str:
    if method not in POOLING_METHODS:
        raise ValueError(f"unknown pooling method {method!r}; choose one of {', '.join(POOLING_METHODS)}")
    return method


def pool(
    hidden: torch.Tensor,
    attention_mask: torch.Tensor,
    method: str,
    cls_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pool ``hidden`` (batch x length x hidden) into one vector per text.

    ``cls_mask`` (batch x length, bool) marks the CLS tokens inserted by MCLS; when given, the
    vector is the mean of the final states at those positions (BGE-M3's multiple-CLS trick).
    """
    if cls_mask is not None:
        if method != "cls":
            raise ValueError(f"MCLS averages CLS states and needs pooling 'cls', not {method!r}")
        weights = cls_mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden * weights).sum(1) / weights.sum(1)
    if method == "cls":
        return hidden[:, 0]
    if method == "mean":
        mask = attention_mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden * mask).sum(1) / mask.sum(1)
    if method == "last_token":
        if bool((attention_mask[:, -1] == 1).all()):  # left padding (or no padding): last column is real
            return hidden[:, -1]
        last = attention_mask.sum(1) - 1
        return hidden[torch.arange(hidden.size(0), device=hidden.device), last]
    check_pooling_method(method)
    raise AssertionError("unreachable")
