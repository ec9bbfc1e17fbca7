"""The score-mode and normalisation vocabulary and the one table of which outputs a mode needs, apart
from :mod:`trine.scoring` (which needs torch):
the command line's parsers offer these as choices without importing torch (``trine --help`` stays fast).
:mod:`trine.scoring` re-exports the vocabulary."""

from __future__ import annotations

from collections.abc import Sequence

# The one score-mode vocabulary: FlagEmbedding's compute_score keys. The names `trine eval` used
# before are accepted as aliases everywhere a mode is read.
HYBRID_KEYS = ("dense", "sparse", "colbert", "sparse+dense", "colbert+sparse+dense")
MODE_ALIASES = {"dense+sparse": "sparse+dense", "all": "colbert+sparse+dense"}


def canonical_mode(name: str, allowed: Sequence[str] = HYBRID_KEYS) -> str:
    """A score mode's FlagEmbedding name (``dense+sparse`` -> ``sparse+dense``, ``all`` ->
    ``colbert+sparse+dense``); a ``ValueError`` listing ``allowed`` for anything else."""
    mode = MODE_ALIASES.get(name.strip(), name.strip())
    if mode not in allowed:
        aliases = [a for a, m in MODE_ALIASES.items() if m in allowed]
        raise ValueError(f"unknown score mode {name!r}; choose from {list(allowed)}"
                         + (f" (aliases: {', '.join(aliases)})" if aliases else ""))
    return mode


#: how :func:`normalize_scores` puts one mode's scores on a common scale before weighted fusion
NORMALIZATIONS = ("none", "minmax", "zscore")


def check_normalization(method: str) -> str:
    """``method`` if it is one of :data:`NORMALIZATIONS`; a ``ValueError`` listing them otherwise."""
    if method not in NORMALIZATIONS:
        raise ValueError(f"unknown score normalization {method!r}; choose from {list(NORMALIZATIONS)}")
    return method


# ------------------------------------------------------------------ which outputs a mode needs
#: the model outputs a model can give (dense vectors, lexical weights, ColBERT multi-vectors)
MODEL_OUTPUTS = ("dense", "sparse", "colbert")
#: each fused mode and the modes its weights list names, in order (``bm25`` is scored from the texts)
FUSED_MODES: dict[str, tuple[str, ...]] = {
    "sparse+dense": ("dense", "sparse"),
    "colbert+sparse+dense": ("dense", "sparse", "colbert"),
    "dense+bm25": ("dense", "bm25"),
}
#: the one table of the model outputs each score mode needs (in :data:`MODEL_OUTPUTS` order). ``colbert``
#: re-ranks the dense top-k (FlagEmbedding's recipe) so it needs the dense vectors too, unless searched in
#: full (:func:`mode_outputs`); ``rrf`` fuses the ranked lists of all three; ``bm25`` needs the texts only.
MODE_NEEDS: dict[str, tuple[str, ...]] = {
    "dense": ("dense",),
    "sparse": ("sparse",),
    "colbert": ("dense", "colbert"),
    **{mode: tuple(o for o in MODEL_OUTPUTS if o in parts) for mode, parts in FUSED_MODES.items()},
    "rrf": MODEL_OUTPUTS,
    "bm25": (),
}


def mode_outputs(mode: str, colbert_search: str = "rerank") -> tuple[str, ...]:
    """The model outputs (and so the indexes) score ``mode`` needs: :data:`MODE_NEEDS`, with
    ``colbert_search="full"`` (exact maxsim over the whole corpus) the ColBERT vectors alone for ``colbert``."""
    if colbert_search not in ("rerank", "full"):
        raise ValueError(f"colbert_search must be 'rerank' or 'full', not {colbert_search!r}")
    if mode not in MODE_NEEDS:
        raise ValueError(f"unknown score mode {mode!r}; choose from {list(MODE_NEEDS)}")
    if mode == "colbert" and colbert_search == "full":
        return ("colbert",)
    return MODE_NEEDS[mode]


def needed_outputs(modes: Sequence[str], dims: Sequence[int] = (), colbert_search: str = "rerank") -> set[str]:
    """The model outputs ``modes`` need together (and the dense one for Matryoshka ``dims``)."""
    out: set[str] = {"dense"} if dims else set()
    for mode in modes:
        out.update(mode_outputs(mode, colbert_search))
    return out
