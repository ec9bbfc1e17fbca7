"""Relevance scores: dense, lexical, multi-vector (maxsim) and their hybrids. One place, used by all."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

# The score-mode vocabulary lives in trine.modes (importable without torch); re-exported here.
from trine.modes import HYBRID_KEYS, MODE_ALIASES, NORMALIZATIONS, canonical_mode, check_normalization  # noqa: F401

LexicalWeights = Mapping[str, float]

def normalize_scores(scores: np.ndarray, valid: np.ndarray | None = None, method: str = "minmax") -> np.ndarray:
    """Each query's (row's) scores over its ``valid`` cells on a common scale, float64 (queries x candidates).

    ``minmax``: ``(s - min) / (max - min)``; ``zscore``: ``(s - mean) / std`` (population std); both
    over the row's valid cells only, and a row whose valid scores are all equal gives 0 throughout.
    Invalid (padding) cells are 0. ``none`` returns the scores unchanged (as float64). ``valid``
    (a boolean array of the same shape) defaults to the finite cells; a valid cell must be finite.
    """
    check_normalization(method)
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 2:
        raise ValueError(f"scores must be a (queries x candidates) array, got shape {s.shape}")
    if method == "none":
        return s.copy()
    valid = np.isfinite(s) if valid is None else np.asarray(valid, dtype=bool)
    if valid.shape != s.shape:
        raise ValueError(f"valid has shape {valid.shape}, the scores {s.shape}")
    if not np.isfinite(s[valid]).all():
        raise ValueError("a valid score is not finite (NaN or infinite)")
    x = np.where(valid, s, 0.0)
    count = valid.sum(1, keepdims=True)
    lo = np.where(valid, s, np.inf).min(1, keepdims=True) if s.shape[1] else np.zeros((len(s), 1))
    hi = np.where(valid, s, -np.inf).max(1, keepdims=True) if s.shape[1] else np.zeros((len(s), 1))
    spread = (count > 0) & (hi > lo)  # a row of equal scores (or none) has no scale: 0 throughout
    with np.errstate(invalid="ignore", divide="ignore"):
        if method == "minmax":
            out = (x - lo) / (hi - lo)
        else:
            mean = x.sum(1, keepdims=True) / np.maximum(count, 1)
            std = np.sqrt((np.where(valid, x - mean, 0.0) ** 2).sum(1, keepdims=True) / np.maximum(count, 1))
            out = (x - mean) / std
    return np.where(valid & spread, out, 0.0)


def head_confidence(normed: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Each query's (row's) confidence of one head: its best valid score minus its second best (0 when
    the row has fewer than two valid cells), on the scale of ``normed`` (one head's normalised scores,
    queries x candidates). A head that puts one candidate far above the rest is sure of it; a head whose
    top scores are tied is not: the per-query signal calibrated fusion weights the heads by."""
    s = np.asarray(normed, dtype=np.float64)
    valid = np.asarray(valid, dtype=bool)
    if s.shape != valid.shape or s.ndim != 2:
        raise ValueError(f"scores of shape {s.shape} for candidates {valid.shape}")
    if s.shape[1] < 2:
        return np.zeros(len(s))
    top2 = -np.sort(-np.where(valid, s, -np.inf), axis=1)[:, :2]
    enough = valid.sum(1) >= 2
    return np.where(enough, top2[:, 0] - np.where(enough, top2[:, 1], 0.0), 0.0)


def fuse_scores(scores: Sequence[np.ndarray], weights: Sequence[float], valid: np.ndarray,
                normalization: str = "none", confidence: Sequence[float] | None = None) -> np.ndarray:
    """``sum_m weights[m] * normalize(scores[m])`` over one candidate matrix (queries x m), float64;
    invalid (padding) cells are 0. The one formula of weighted fusion (search, evaluation, tuning).

    ``confidence`` (one coefficient per head, any sign; calibrated fusion, fitted on a dev split by
    :func:`trine.evaluation.tuning.fit_confidence`): each query's weight of head ``m`` becomes
    ``weights[m] * exp(confidence[m] * g_m)``, ``g_m`` the head's :func:`head_confidence` on its
    normalised scores, so a head counts more (or less) on the queries it is sure about. ``None`` or all
    0 is plain weighted fusion, the same numbers.
    """
    if len(scores) != len(weights) or not scores:
        raise ValueError(f"{len(scores)} score matrices for {len(weights)} weights")
    if confidence is not None and len(confidence) != len(scores):
        raise ValueError(f"{len(confidence)} confidence coefficients for {len(scores)} score matrices")
    check_normalization(normalization)
    valid = np.asarray(valid, dtype=bool)
    total = np.zeros(valid.shape, dtype=np.float64)
    for m, (s, w) in enumerate(zip(scores, weights)):
        s = np.asarray(s, dtype=np.float64)
        if s.shape != valid.shape:
            raise ValueError(f"scores of shape {s.shape} for candidates {valid.shape}")
        if normalization != "none":
            s = normalize_scores(s, valid, normalization)
        s = np.where(valid, s, 0.0)
        if confidence is not None and float(confidence[m]) != 0.0:
            total += (float(w) * np.exp(float(confidence[m]) * head_confidence(s, valid)))[:, None] * s
        else:
            total += float(w) * s
    return total


def dense_scores(q: np.ndarray | torch.Tensor, p: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
    """Inner products, queries x passages."""
    return q @ p.T


def lexical_matching_score(q: LexicalWeights, p: LexicalWeights) -> float:
    """Sum over shared tokens of w_q * w_p (BGE-M3's s_lex)."""
    if len(p) < len(q):
        q, p = p, q
    return float(sum(w * p[t] for t, w in q.items() if t in p))


def lexical_scores(qs: Sequence[LexicalWeights], ps: Sequence[LexicalWeights]) -> np.ndarray:
    return np.array([[lexical_matching_score(q, p) for p in ps] for q in qs], dtype=np.float64)


def colbert_score(q_vecs: np.ndarray | torch.Tensor, p_vecs: np.ndarray | torch.Tensor) -> float:
    """Maxsim of one query's token vectors against one passage's: mean over query tokens of the best match."""
    q = torch.as_tensor(q_vecs, dtype=torch.float32)
    p = torch.as_tensor(p_vecs, dtype=torch.float32)
    if q.numel() == 0 or p.numel() == 0:
        return 0.0
    if q.dim() != 2 or p.dim() != 2 or q.size(1) != p.size(1):
        raise ValueError(f"q_vecs and p_vecs must be (tokens x dim) arrays of one dim, got {tuple(q.shape)} "
                         f"and {tuple(p.shape)}")
    return float((q @ p.T).max(1).values.sum() / q.size(0))


def pad_vectors(vecs: Sequence[np.ndarray | torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack ragged (n_i x dim) arrays into (count x max_n x dim) plus a (count x max_n) mask."""
    if len(vecs) == 0:
        raise ValueError("vecs is empty: pad_vectors needs at least one (tokens x dim) array")
    dims = {int(np.shape(v)[-1]) for v in vecs if np.ndim(v) == 2}
    if len(dims) != 1 or any(np.ndim(v) != 2 for v in vecs):
        raise ValueError("vecs must be (tokens x dim) arrays of one dim")
    dim = dims.pop()
    width = max(max(int(np.shape(v)[0]) for v in vecs), 1)
    out = torch.zeros(len(vecs), width, dim)
    mask = torch.zeros(len(vecs), width, dtype=torch.bool)
    for i, v in enumerate(vecs):
        n = int(np.shape(v)[0])
        out[i, :n] = torch.as_tensor(v, dtype=torch.float32)
        mask[i, :n] = True
    return out, mask


def colbert_scores_padded(
    q: torch.Tensor,
    q_mask: torch.Tensor,
    p: torch.Tensor,
    p_mask: torch.Tensor,
    *,
    pairwise: bool = False,
    max_elements: int = 1 << 26,
) -> torch.Tensor:
    """Maxsim over padded multi-vectors; padding never matches and never counts.

    ``pairwise=False``: every query against every passage (queries x passages), computed in
    chunks so that no more than ``max_elements`` token-pair scores exist at once.
    ``pairwise=True``: query i against passage i (a vector of length queries).
    """
    q_len = q_mask.sum(1).clamp(min=1).to(q.dtype)
    neg = torch.finfo(q.dtype).min
    if pairwise:
        if q.size(0) != p.size(0):
            raise ValueError("pairwise maxsim needs as many passages as queries")
        sims = torch.bmm(q, p.transpose(1, 2)).masked_fill(~p_mask[:, None, :], neg)
        best = sims.max(-1).values.masked_fill(~q_mask, 0)
        best = torch.where(p_mask.any(1, keepdim=True), best, torch.zeros_like(best))
        return best.sum(1) / q_len
    per_passage = q.size(0) * q.size(1) * p.size(1)
    step = max(1, max_elements // max(per_passage, 1))
    out = []
    for start in range(0, p.size(0), step):
        pc, pm = p[start : start + step], p_mask[start : start + step]
        sims = torch.einsum("qid,pjd->qpij", q, pc).masked_fill(~pm[None, :, None, :], neg)
        best = sims.max(-1).values.masked_fill(~q_mask[:, None, :], 0)
        best = torch.where(pm.any(1)[None, :, None], best, torch.zeros_like(best))
        out.append(best.sum(-1) / q_len[:, None])
    return torch.cat(out, 1)


def colbert_scores_flat(q: np.ndarray, tokens: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Maxsim of one query (query tokens x dim) with documents given as their tokens back to back (total tokens
    x dim, ``lengths`` per document): the numbers :func:`colbert_scores_padded` gives (mean over query tokens of
    the best document token; a document without tokens scores 0), without padding. In numpy: one query
    against a short list of candidates is a few small products, where torch's thread pool costs more than the
    work on a busy machine (a compressed index's last stage)."""
    q = np.asarray(q, dtype=np.float32)
    lengths = np.asarray(lengths, dtype=np.int64)
    out = np.zeros(len(lengths), dtype=np.float32)
    has = lengths > 0
    if q.shape[0] == 0 or not has.any():
        return out
    sims = np.asarray(tokens, dtype=np.float32) @ q.T  # (tokens x query tokens)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])[has]
    out[has] = np.maximum.reduceat(sims, starts, axis=0).sum(1) / q.shape[0]
    return out


def check_mode_weights(weights: Sequence[float] | None) -> tuple[float, float, float]:
    """``weights_for_different_modes`` as (dense, sparse, colbert) floats, default all 1.

    Each is a finite number >= 0, and the dense and sparse weights may not both be 0: the
    weighted means divide by their sums ("sparse+dense" by w_dense + w_sparse), and a 0/0 would
    be NaN.
    """
    if weights is None:
        return 1.0, 1.0, 1.0
    if isinstance(weights, (str, bytes)) or not hasattr(weights, "__len__") or len(weights) != 3:
        got = len(weights) if hasattr(weights, "__len__") else type(weights).__name__
        raise ValueError(f"weights_for_different_modes needs 3 values (dense, sparse, colbert), got {got}")
    try:
        values = tuple(float(w) for w in weights)
    except (TypeError, ValueError):
        raise ValueError(f"weights_for_different_modes must be 3 numbers, got {list(weights)!r}") from None
    if any(not np.isfinite(w) or w < 0 for w in values):
        raise ValueError(f"weights_for_different_modes must be finite numbers >= 0, got {list(values)}")
    if values[0] + values[1] == 0:
        raise ValueError("weights_for_different_modes: the dense and sparse weights are both 0, so 'sparse+dense' "
                         f"(their weighted mean) is undefined; got {list(values)}")
    return values  # type: ignore[return-value]


def hybrid_scores(
    dense: Sequence[float] | np.ndarray | None,
    sparse: Sequence[float] | np.ndarray | None,
    colbert: Sequence[float] | np.ndarray | None,
    weights: Sequence[float] | None = None,
) -> dict[str, np.ndarray]:
    """FlagEmbedding's ``compute_score`` keys: each mode and the weighted means of their sums.

    ``weights`` are (dense, sparse, colbert), by default all 1 (checked by :func:`check_mode_weights`).
    A mode given as ``None`` is left out, and so is every mean it is part of.
    """
    w_d, w_s, w_c = check_mode_weights(weights)
    d, s, c = (None if x is None else np.asarray(x, dtype=np.float64) for x in (dense, sparse, colbert))
    out = {mode: x for mode, x in zip(HYBRID_KEYS, (d, s, c)) if x is not None}
    if d is not None and s is not None:
        out["sparse+dense"] = (w_s * s + w_d * d) / (w_s + w_d)
        if c is not None:
            out["colbert+sparse+dense"] = (w_c * c + w_s * s + w_d * d) / (w_d + w_s + w_c)
    return out


def paired_scores(
    queries: Mapping[str, Any],
    passages: Mapping[str, Any],
    weights: Sequence[float] | None = None,
    *,
    block: int = 256,
) -> dict[str, np.ndarray]:
    """Scores of query i with passage i (two encodings of as many texts, such as ``EncodeResult`` objects), float64.

    Each mode whose representation both hold (``dense_vecs``, ``lexical_weights``,
    ``colbert_vecs``), and the weighted means of :func:`hybrid_scores` over them: the keys of
    ``M3Embedder.compute_score``. Multi-vectors are compared ``block`` pairs at a time.
    """
    def both(key: str) -> bool:
        return queries.get(key) is not None and passages.get(key) is not None

    dense = sparse = colbert = None
    if both("dense_vecs"):
        dense = np.einsum("nd,nd->n", np.asarray(queries["dense_vecs"], dtype=np.float64),
                          np.asarray(passages["dense_vecs"], dtype=np.float64))
    if both("lexical_weights"):
        sparse = np.array([lexical_matching_score(q, p) for q, p in
                           zip(queries["lexical_weights"], passages["lexical_weights"], strict=True)], dtype=np.float64)
    if both("colbert_vecs"):
        q_vecs, p_vecs = queries["colbert_vecs"], passages["colbert_vecs"]
        if len(q_vecs) != len(p_vecs):
            raise ValueError(f"{len(q_vecs)} queries' multi-vectors for {len(p_vecs)} passages'")
        out: list[float] = []
        for s in range(0, len(q_vecs), block):
            qv, qm = pad_vectors(q_vecs[s : s + block])
            pv, pm = pad_vectors(p_vecs[s : s + block])
            out.extend(colbert_scores_padded(qv, qm, pv, pm, pairwise=True).tolist())
        colbert = np.asarray(out, dtype=np.float64)
    return hybrid_scores(dense, sparse, colbert, weights)
