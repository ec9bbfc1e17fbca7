"""FlagEmbedding's class names as thin faces over trine's classes: ``from trine.flag import BGEM3FlagModel``
(also ``from trine import BGEM3FlagModel``) runs FlagEmbedding 1.4.2's usage calls unchanged.

This module is cheap to import: the faces live in :mod:`trine.inference.flag_faces` (which loads torch and
transformers) and are imported on first use of a name (PEP 562). What each face accepts, maps and refuses is
in that module and in ``docs/migrating-from-flagembedding.md``.
"""

from __future__ import annotations

from typing import Any

#: the FlagEmbedding names trine answers to
FLAG_NAMES = (
    "BGEM3FlagModel",
    "FlagAutoModel",
    "FlagAutoReranker",
    "FlagICLModel",
    "FlagLLMModel",
    "FlagLLMReranker",
    "FlagModel",
    "FlagReranker",
    "LayerWiseFlagLLMReranker",
)

__all__ = list(FLAG_NAMES)


def __getattr__(name: str) -> Any:
    if name in FLAG_NAMES:
        from trine.inference import flag_faces

        return getattr(flag_faces, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *FLAG_NAMES])
