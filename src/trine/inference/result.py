"""What an encoder returns: :class:`EncodeResult`, dense vectors, lexical weights and multi-vectors, each optional."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

# output name (as in ``outputs=``) -> result key (FlagEmbedding's)
OUTPUT_KEYS = {"dense": "dense_vecs", "sparse": "lexical_weights", "colbert": "colbert_vecs"}
OUTPUTS = tuple(OUTPUT_KEYS)


def check_outputs(outputs: Iterable[str]) -> tuple[str, ...]:
    """``outputs`` as a tuple in the order dense, sparse, colbert; an unknown name is a ValueError."""
    asked = {outputs} if isinstance(outputs, str) else set(outputs)
    unknown = asked - set(OUTPUTS)
    if unknown:
        raise ValueError(f"unknown outputs {sorted(unknown)}; choose from {OUTPUTS}")
    return tuple(o for o in OUTPUTS if o in asked)


class EncodeResult(dict):
    """Encodings of one text or a list of texts: ``dense_vecs``, ``lexical_weights``, ``colbert_vecs``,
    ``None`` for an output not asked for.

    It is the dictionary FlagEmbedding's ``BGEM3FlagModel.encode`` returns (the three keys always
    present; a ``dict``, since FlagEmbedding's own evaluation tells results apart with
    ``isinstance(x, dict)``), with typed attributes for trine's code. For a list of texts:
    ``dense_vecs`` a (texts x dim) float32 array, ``lexical_weights`` a list of ``{token id
    string: weight}``, ``colbert_vecs`` a list of (tokens-1 x dim) arrays; for one text (a string
    given to ``encode``): one vector, one dict, one array.
    """

    __slots__ = ()

    def __init__(self, dense_vecs: Any = None, lexical_weights: Any = None, colbert_vecs: Any = None):
        super().__init__(dense_vecs=dense_vecs, lexical_weights=lexical_weights, colbert_vecs=colbert_vecs)

    @property
    def dense_vecs(self) -> np.ndarray | None:
        return self.get("dense_vecs")

    @property
    def lexical_weights(self) -> list[dict[str, float]] | dict[str, float] | None:
        return self.get("lexical_weights")

    @property
    def colbert_vecs(self) -> list[np.ndarray] | np.ndarray | None:
        return self.get("colbert_vecs")

    @property
    def outputs(self) -> tuple[str, ...]:
        """The outputs this result holds (of ``dense``, ``sparse``, ``colbert``)."""
        return tuple(o for o, key in OUTPUT_KEYS.items() if self.get(key) is not None)

    def rows(self) -> list[tuple[Any, Any, Any]]:
        """Per text of a list result: (dense row, lexical weights, multi-vectors), ``None`` where not held."""
        held = [self.get(key) for key in OUTPUT_KEYS.values()]
        counts = {len(x) for x in held if x is not None}
        if len(counts) > 1:
            raise ValueError(f"the outputs hold different numbers of texts: {sorted(counts)}")
        n = counts.pop() if counts else 0
        return list(zip(*(x if x is not None else [None] * n for x in held)))

    @classmethod
    def from_rows(cls, rows: Sequence[tuple[Any, Any, Any]], outputs: Iterable[str], dense_dim: int = 0
                  ) -> EncodeResult:
        """A list result holding ``outputs`` from per-text (dense row, lexical weights, multi-vectors);
        ``dense_dim`` shapes the (0 x dim) dense array of no rows."""
        outputs = check_outputs(outputs)
        dense = sparse = colbert = None
        if "dense" in outputs:
            dense = np.stack([r[0] for r in rows]) if rows else np.zeros((0, dense_dim), np.float32)
        if "sparse" in outputs:
            sparse = [r[1] for r in rows]
        if "colbert" in outputs:
            colbert = [r[2] for r in rows]
        return cls(dense, sparse, colbert)

    def first(self) -> EncodeResult:
        """The first text's encodings, as ``encode`` returns them for one string."""
        return EncodeResult(*(None if self.get(key) is None else self.get(key)[0] for key in OUTPUT_KEYS.values()))
