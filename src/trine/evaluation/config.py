"""What an evaluation runs: the modes, their needs and :class:`EvalConfig`.

The bottom of :mod:`trine.evaluation`'s own layers: :mod:`~trine.evaluation.candidates` (the corpus
encoded once, the candidates scored once), :mod:`~trine.evaluation.tuning` and
:mod:`~trine.evaluation.runner` all import it, and it imports none of them (so tuning and the
runner need not import each other).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from trine.evaluation.metrics import DEFAULT_K, DEFAULT_METRICS
from trine.modeling.fusion import FUSED_MODES, check_weights
from trine.modes import needed_outputs  # the one table of mode needs (re-exported: evaluation's name for it)
from trine.retrieval.hybrid import COLBERT_KINDS
from trine.retrieval.plaid import check_options as check_plaid_options
from trine.scoring import HYBRID_KEYS, MODE_ALIASES, NORMALIZATIONS, canonical_mode

# FlagEmbedding's score-mode names (trine.scoring.HYBRID_KEYS; the old eval names are aliases), and rrf
MODES = (*HYBRID_KEYS, "rrf", "bm25", "dense+bm25")
DEFAULT_MODES = HYBRID_KEYS
#: the EvalConfig field that gives each fused mode's weights
WEIGHT_FIELDS = {"sparse+dense": "weights_dense_sparse", "colbert+sparse+dense": "weights_all",
                 "dense+bm25": "weights_dense_bm25"}
#: where a fusion setting came from, in the order they are looked up
FUSION_SOURCES = ("given", "model folder", "default")


@dataclass
class EvalConfig:
    modes: Sequence[str] = DEFAULT_MODES
    k_values: Sequence[int] = DEFAULT_K
    metrics: Sequence[str] = DEFAULT_METRICS
    top_k: int = 100
    rerank_k: int = 100
    colbert_search: str = "rerank"
    #: the multi-vector index (trine backend): "exact" (MultiVectorIndex) or "plaid" (ColbertPlaidIndex, compressed,
    #: built with ``colbert_index_options``); with ``colbert_search="full"`` the colbert mode is its own search
    colbert_index: str = "exact"
    colbert_index_options: dict[str, Any] = field(default_factory=dict)
    weights_dense_sparse: Sequence[float] | None = None
    weights_all: Sequence[float] | None = None
    weights_dense_bm25: Sequence[float] | None = None
    normalization: str | None = None
    rrf_k: float = 60.0
    dense_index: str = "flat"
    ignore_identical_ids: bool = False
    batch_size: int | None = None
    query_max_length: int = 64
    passage_max_length: int = 512
    rerank_modes: Sequence[str] = ()
    reranker_top_k: int = 100
    #: query + passage tokens per re-ranked pair; None: 512, or the reranker's positions when it has fewer
    reranker_max_length: int | None = None
    reranker_query_max_length: int | None = None
    dims: Sequence[int] = ()
    #: where the corpus is indexed: "trine" (trine's in-memory indexes), "milvus" or "qdrant" (a collection
    #: at ``backend_uri``, named ``collection``: default ``trine_eval_<hash of the model and corpus ids>``)
    backend: str = "trine"
    backend_uri: str | None = None
    collection: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        bad = [m for m in self.modes if MODE_ALIASES.get(m, m) not in MODES]
        if bad or not self.modes:
            raise ValueError(f"unknown modes {bad}; choose from {MODES} (aliases: {', '.join(MODE_ALIASES)})")
        self.modes = tuple(canonical_mode(m, MODES) for m in self.modes)
        self.rerank_modes = tuple(canonical_mode(m, MODES) for m in self.rerank_modes)
        dims = list(self.dims or ())
        if not all(isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d > 0 for d in dims) \
                or len(set(dims)) != len(dims):
            raise ValueError(f"dims must be distinct positive integers (Matryoshka dimensions), got {dims}")
        self.dims = tuple(int(d) for d in dims)
        if self.colbert_search not in ("rerank", "full"):
            raise ValueError(f"colbert_search must be 'rerank' or 'full', not {self.colbert_search!r}")
        if self.colbert_index not in COLBERT_KINDS:
            raise ValueError(f"colbert_index must be one of {COLBERT_KINDS}, not {self.colbert_index!r}")
        if self.colbert_index_options:
            if self.colbert_index != "plaid":
                raise ValueError(f"colbert_index_options {sorted(self.colbert_index_options)} are the plaid index's; "
                                 f"colbert_index is {self.colbert_index!r}")
            try:
                check_plaid_options(dict(self.colbert_index_options))
            except TypeError as err:
                raise ValueError(str(err)) from None
        if self.colbert_index != "exact" and self.backend != "trine":
            raise ValueError(f"colbert_index {self.colbert_index!r} is trine's; the {self.backend} backend keeps "
                             "its own multi-vectors")
        for mode, name in WEIGHT_FIELDS.items():
            value = getattr(self, name)
            if value is not None:
                try:
                    setattr(self, name, tuple(check_weights(mode, list(value), name)))
                except TypeError:
                    raise ValueError(f"{name} must be a list of numbers, got {value!r}") from None
        if self.normalization is not None and self.normalization not in NORMALIZATIONS:
            raise ValueError(f"unknown normalization {self.normalization!r}; choose from {list(NORMALIZATIONS)}")
        if self.top_k < max(self.k_values):
            raise ValueError(f"top_k ({self.top_k}) must be at least the largest k ({max(self.k_values)})")
        if self.rerank_k < 1:
            raise ValueError(f"rerank_k must be positive, got {self.rerank_k}")
        for name in ("top_k", "query_max_length", "passage_max_length", "reranker_top_k", "reranker_max_length"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.backend not in ("trine", "milvus", "qdrant"):
            raise ValueError(f"backend must be 'trine', 'milvus' or 'qdrant', not {self.backend!r}")
        if self.backend != "trine" and self.dense_index not in ("flat", "hnsw"):
            raise ValueError(f"dense_index {self.dense_index!r}: the {self.backend} backend has 'flat' and 'hnsw'")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer (or None for the model's), got {self.batch_size}")
        outside = [m for m in self.rerank_modes if m not in self.modes]
        if outside:
            raise ValueError(f"rerank_modes {outside} are not among the evaluated modes {list(self.modes)}")
        if self.rerank_modes and self.reranker_top_k < max(self.k_values):
            raise ValueError(f"reranker_top_k ({self.reranker_top_k}) must be at least the largest k "
                             f"({max(self.k_values)})")


def config_outputs(config: EvalConfig) -> set[str]:
    return needed_outputs(config.modes, config.dims)


def matryoshka_modes(dims: Sequence[int]) -> list[str]:
    """The mode names the Matryoshka ``dims`` are reported under: ``dense@<dim>``."""
    return [f"dense@{d}" for d in dims]


def fused_modes(modes: Sequence[str]) -> list[str]:
    """The weighted-fusion modes among ``modes`` (those with weights: :data:`trine.modeling.fusion.FUSED_MODES`)."""
    return [m for m in modes if m in FUSED_MODES]


def uses_bm25(modes: Sequence[str]) -> bool:
    return any(m in ("bm25", "dense+bm25") for m in modes)
