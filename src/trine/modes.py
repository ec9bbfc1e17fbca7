"""The score-mode and normalisation vocabulary, apart from :mod:`trine.scoring` (which needs torch):
the command line's parsers offer these as choices without importing torch (``trine --help`` stays fast).
:mod:`trine.scoring` re-exports every name."""

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
