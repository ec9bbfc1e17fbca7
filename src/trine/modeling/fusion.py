"""Fusion settings kept in a model folder: ``fusion.json``, the score normalization and weights of the fused modes.

Weighted fusion ranks the union of first-stage candidates by ``sum_m w_m * normalize(s_m)``
(:func:`trine.retrieval.weighted_fusion`). The weights that work depend on the model (the scale of
its lexical scores against its cosines), so tuned ones travel with it::

    {"normalization": "minmax",
     "weights": {"sparse+dense": [1.0, 0.5], "colbert+sparse+dense": [1.0, 0.3, 0.7], "dense+bm25": [1.0, 0.2]},
     "tuned_on": {"dataset": "manpages", "split": "dev", "queries": 480, "metric": "ndcg@10", ...}}

Each weights list is in the order of :data:`FUSED_MODES` (dense first). An optional ``confidence``
object (calibrated fusion, chosen by ``--tune-weights`` when it wins on the dev split) holds, per fused
mode, one coefficient per head in the same order: each query's weight of head ``m`` is then
``w_m * exp(c_m * g_m)``, ``g_m`` the gap between that head's first and second normalised score of
the query (:func:`trine.scoring.fuse_scores`). A mode without coefficients (every file written before
them) is plain weighted fusion, as before. ``tuned_on`` is a free
record of where they came from (``null`` when written by hand). The file is only ever written on
request (``trine eval --tune-weights``), into an existing folder.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from trine.errors import InputError, OutputPathError
from trine.io import atomic_file
from trine.modes import FUSED_MODES  # the one table of modes (re-exported: fusion.json names them)
from trine.scoring import NORMALIZATIONS

FUSION_FILE = "fusion.json"
#: FlagEmbedding's weights (its MLDR/MKQA recipes); dense+bm25 is trine's, an even sum
DEFAULT_WEIGHTS: dict[str, tuple[float, ...]] = {
    "sparse+dense": (1.0, 0.3),
    "colbert+sparse+dense": (1.0, 0.3, 1.0),
    "dense+bm25": (1.0, 1.0),
}
DEFAULT_NORMALIZATION = "none"
_FIELDS = ("normalization", "weights", "confidence", "tuned_on")


def check_weights(mode: str, weights: Any, where: str = "weights") -> list[float]:
    """``weights`` of fused ``mode`` as floats: as many as the mode fuses, finite, >= 0, not all 0
    (``ValueError`` naming ``where`` otherwise)."""
    if mode not in FUSED_MODES:
        raise ValueError(f"{where}: unknown fused mode {mode!r}; choose from {list(FUSED_MODES)}")
    names = FUSED_MODES[mode]
    if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence) or len(weights) != len(names):
        raise ValueError(f"{where}: {mode!r} needs {len(names)} weights ({', '.join(names)}), got {weights!r}")
    if any(isinstance(w, bool) or not isinstance(w, (int, float)) for w in weights):
        raise ValueError(f"{where}: {mode!r} weights must be numbers, got {list(weights)!r}")
    values = [float(w) for w in weights]
    if any(not math.isfinite(w) or w < 0 for w in values):
        raise ValueError(f"{where}: {mode!r} weights must be finite numbers >= 0, got {values}")
    if not any(values):
        raise ValueError(f"{where}: {mode!r} weights are all 0")
    return values


def check_confidence(mode: str, coefficients: Any, where: str = "confidence") -> list[float]:
    """Calibrated fusion's ``coefficients`` of fused ``mode`` as floats: one per head the mode fuses,
    finite, any sign (``ValueError`` naming ``where`` otherwise)."""
    if mode not in FUSED_MODES:
        raise ValueError(f"{where}: unknown fused mode {mode!r}; choose from {list(FUSED_MODES)}")
    names = FUSED_MODES[mode]
    if (isinstance(coefficients, (str, bytes)) or not isinstance(coefficients, Sequence)
            or len(coefficients) != len(names)):
        raise ValueError(f"{where}: {mode!r} needs {len(names)} coefficients ({', '.join(names)}), "
                         f"got {coefficients!r}")
    if any(isinstance(c, bool) or not isinstance(c, (int, float)) for c in coefficients):
        raise ValueError(f"{where}: {mode!r} coefficients must be numbers, got {list(coefficients)!r}")
    values = [float(c) for c in coefficients]
    if any(not math.isfinite(c) for c in values):
        raise ValueError(f"{where}: {mode!r} coefficients must be finite, got {values}")
    return values


@dataclass
class FusionSettings:
    """The score normalization (one of :data:`trine.scoring.NORMALIZATIONS`) and the weights of some
    fused modes (``{mode: [w_dense, ...]}`` in :data:`FUSED_MODES` order); ``tuned_on`` records how
    they were found (dataset, split, queries, metric and its dev values), ``None`` when not tuned.
    ``confidence``: calibrated fusion's coefficients of some of those modes (``{mode: [c_dense, ...]}``,
    the module doc); a mode without them fuses with its plain weights."""

    normalization: str = DEFAULT_NORMALIZATION
    weights: dict[str, list[float]] = field(default_factory=dict)
    tuned_on: dict[str, Any] | None = None
    confidence: dict[str, list[float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization: unknown {self.normalization!r}; choose from {list(NORMALIZATIONS)}")
        if not isinstance(self.weights, Mapping):
            raise ValueError(f"weights must be a mapping of fused mode to weights, got {type(self.weights).__name__}")
        self.weights = {mode: check_weights(mode, w, f"weights.{mode}") for mode, w in self.weights.items()}
        if not isinstance(self.confidence, Mapping):
            raise ValueError("confidence must be a mapping of fused mode to coefficients, got "
                             f"{type(self.confidence).__name__}")
        self.confidence = {mode: check_confidence(mode, c, f"confidence.{mode}") for mode, c in self.confidence.items()}
        unweighted = sorted(set(self.confidence) - set(self.weights))
        if unweighted:
            raise ValueError(f"confidence: coefficients for {unweighted}, which have no weights")
        if self.tuned_on is not None and not isinstance(self.tuned_on, Mapping):
            raise ValueError(f"tuned_on must be a mapping or None, got {type(self.tuned_on).__name__}")

    def to_dict(self) -> dict[str, Any]:
        """The ``fusion.json`` object; ``confidence`` only when some mode has coefficients (so plain
        weighted fusion writes the file it always wrote)."""
        out: dict[str, Any] = {"normalization": self.normalization,
                               "weights": {m: list(w) for m, w in self.weights.items()}}
        if self.confidence:
            out["confidence"] = {m: list(c) for m, c in self.confidence.items()}
        out["tuned_on"] = None if self.tuned_on is None else dict(self.tuned_on)
        return out

    def coefficients(self, mode: str) -> list[float] | None:
        """``mode``'s calibrated-fusion coefficients, ``None`` when it fuses with plain weights."""
        return list(self.confidence[mode]) if mode in self.confidence else None


def fusion_path(model_dir: str | os.PathLike) -> str:
    return os.path.join(os.fspath(model_dir), FUSION_FILE)


def read_fusion(model_dir: str | os.PathLike) -> FusionSettings | None:
    """The model folder's ``fusion.json``, or ``None`` when it has none (or ``model_dir`` is not a
    folder, e.g. a hub name). A file that does not follow the format is an :class:`InputError`
    naming the file and the field."""
    path = fusion_path(model_dir)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a JSON object, got {type(data).__name__}")
    unknown = sorted(set(data) - set(_FIELDS))
    if unknown:
        raise InputError(f"{path}: unknown field(s) {unknown}; the fields are {list(_FIELDS)}")
    if "normalization" not in data:
        raise InputError(f"{path}: field 'normalization' is missing")
    if not isinstance(data.get("weights", {}), dict):
        raise InputError(f"{path}: field 'weights' must be an object of fused mode -> weights")
    if not isinstance(data.get("confidence", {}), dict):
        raise InputError(f"{path}: field 'confidence' must be an object of fused mode -> coefficients")
    try:
        return FusionSettings(data["normalization"], data.get("weights", {}), data.get("tuned_on"),
                              data.get("confidence", {}))
    except ValueError as err:
        raise InputError(f"{path}: field {err}") from None


def write_fusion(model_dir: str | os.PathLike, settings: FusionSettings) -> str:
    """Write ``settings`` as ``fusion.json`` into the existing folder ``model_dir`` (atomically,
    replacing an earlier one whole); return the file's path. The folder is never created."""
    folder = os.fspath(model_dir)
    if not os.path.isdir(folder):
        raise OutputPathError(f"{folder}: not an existing model folder; fusion settings are written only into one")
    if not isinstance(settings, FusionSettings):
        raise TypeError(f"settings must be a FusionSettings, got {type(settings).__name__}")
    path = fusion_path(folder)
    with atomic_file(path, what="fusion settings file") as f:
        json.dump(settings.to_dict(), f, indent=1)
        f.write("\n")
    return path
