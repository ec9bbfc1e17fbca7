"""Tune the fused modes' weights and score normalization on a dev split (``trine eval --tune-weights``).

For each fused mode (``sparse+dense``, ``colbert+sparse+dense``, ``dense+bm25``) the candidates
are found and scored exactly once: the union of the first-stage top ``top_k`` lists, each mode it
fuses scored on every candidate (as evaluation does). A grid search then picks the weights that
maximise the dev split's nDCG@10, the dense weight fixed at 1 and each other weight from
:data:`TUNE_GRID` (the product grid for three modes; ties go to the smaller weights). The
normalization is the given one, or the better of ``minmax`` and ``zscore`` (one normalization for
all the fused modes: the best mean of their nDCG@10). Then, for each fused mode, calibrated fusion
(:func:`fit_confidence`: one confidence coefficient per head on top of the grid's weights, each query's
weight of a head ``w * exp(c * gap)``, ``gap`` the head's first minus second normalised score, fitted by
a listwise softmax loss on the dev candidates) is kept when it raises the dev nDCG@10 by at least
:data:`CALIBRATION_MIN_GAIN`. The search ranks
with a numpy nDCG@10; the chosen setting's dev nDCG@10 (and the default setting's, for comparison) is then measured by
pytrec_eval (:func:`trine.evaluation.metrics.evaluate_run`) on the fused ranking.

Python use (the corpus encodings of a test evaluation can be shared through ``corpus``)::

    from trine.evaluation import EvalConfig, load_dataset
    from trine.evaluation.tuning import tune_fusion
    from trine.modeling.fusion import write_fusion

    settings = tune_fusion(M3Embedder(model_dir), load_dataset(data, "dev"), EvalConfig(modes=[...]))
    write_fusion(model_dir, settings)  # later evaluations of model_dir use them
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from trine.errors import InputError, OptionError
from trine.evaluation.candidates import FIRST_STAGES, CorpusIndex, ScoredCandidates, encode_queries, index_corpus
from trine.evaluation.config import WEIGHT_FIELDS, EvalConfig, fused_modes, needed_outputs, uses_bm25
from trine.evaluation.data import RetrievalDataset
from trine.evaluation.metrics import evaluate_run
from trine.inference.encoder import Encoder
from trine.modeling.fusion import DEFAULT_NORMALIZATION, DEFAULT_WEIGHTS, FUSED_MODES, FusionSettings
from trine.modeling.loading import in_hub_cache
from trine.progress import bar as progress_bar
from trine.retrieval import union_rows
from trine.scoring import check_normalization, fuse_scores, head_confidence, normalize_scores

logger = logging.getLogger(__name__)

#: the values tried for each weight beside the dense one (fixed at 1)
TUNE_GRID = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)
#: normalizations tried when none is given
TUNE_NORMALIZATIONS = ("minmax", "zscore")
TUNE_METRIC = "ndcg@10"
_CUT = 10
#: weightings ranked at once by the grid search (bounds its memory: chunk x queries x candidates)
_CHUNK = 32


def check_dev_split(test: RetrievalDataset, dev: RetrievalDataset) -> None:
    """Refuse a dev split that is the evaluated split, shares a query with it, or has another corpus."""
    if dev.split == test.split:
        raise InputError(f"the dev split {dev.split!r} is the evaluated split: tune on another split "
                         "(e.g. --dev-split dev) so the test numbers stay unbiased")
    shared = sorted(set(dev.queries) & set(test.queries))
    if shared:
        raise InputError(f"the dev split {dev.split!r} shares {len(shared)} query id(s) with the evaluated split "
                         f"{test.split!r} (e.g. {shared[:3]}): tune on queries the test does not use")
    if list(dev.corpus) != list(test.corpus):
        raise InputError(f"the dev split {dev.split!r} ({dev.name}) and the evaluated split {test.split!r} "
                         f"({test.name}) have different corpora: both must come from one data folder")


def check_tuning(models: Sequence[Any], test: RetrievalDataset, dev: RetrievalDataset, config: EvalConfig) -> None:
    """Everything :func:`trine.evaluation.run_evaluation` needs to tune (before any model is loaded):
    a fused mode to tune, no weights given for it, model folders to write into, a proper dev split."""
    modes = fused_modes(config.modes)
    if not modes:
        raise OptionError(f"tuning needs a fused mode among the evaluated modes ({', '.join(FUSED_MODES)}); "
                          f"got {list(config.modes)}")
    given = [WEIGHT_FIELDS[m] for m in modes if getattr(config, WEIGHT_FIELDS[m]) is not None]
    if given:
        raise OptionError(f"the weights are tuned: do not also give {', '.join(given)}")
    for model in models:
        if isinstance(model, Encoder):
            raise OptionError("tuning writes fusion.json into each model's folder: give model folders, not "
                              f"an in-memory {type(model).__name__} (or call tune_fusion yourself)")
        if not os.path.isdir(os.fspath(model)):
            raise OptionError(f"{os.fspath(model)}: not a model folder; tuning writes fusion.json into one")
        if in_hub_cache(model):
            raise OptionError(f"{os.fspath(model)}: a Hub model in the Hugging Face cache; tuning writes fusion.json "
                              "into the model folder: download it into a folder of your own first "
                              "(hf download ORG/NAME --local-dir DIR) and tune that")
    check_dev_split(test, dev)


class _FastNdcg:
    """nDCG@10 of many rankings of one candidate union, in numpy: linear gains (trec_eval's), ties
    by document id descending (trec_eval's order), averaged over every judged dev query."""

    def __init__(self, rows: np.ndarray, dev: RetrievalDataset, query_ids: list[str], doc_ids: list[str],
                 top_k: int, ignore_identical_ids: bool):
        self.valid = rows >= 0
        self.gains = np.zeros(rows.shape, dtype=np.float64)
        name_order = np.argsort(np.array(doc_ids, dtype=object), kind="stable")
        name_rank = np.empty(len(doc_ids), dtype=np.int64)
        name_rank[name_order] = np.arange(len(doc_ids))
        self.tiebreak = np.where(self.valid, name_rank[np.maximum(rows, 0)], -1)
        for i, qid in enumerate(query_ids):
            judged = dev.qrels.get(qid, {})
            for j, r in enumerate(rows[i].tolist()):
                if r >= 0:
                    self.gains[i, j] = max(judged.get(doc_ids[r], 0), 0)
                    if ignore_identical_ids and doc_ids[r] == qid:
                        self.valid[i, j] = False
        self.cut = min(_CUT, top_k, rows.shape[1])
        discount = 1.0 / np.log2(np.arange(2, _CUT + 2))
        ideal = np.zeros(len(query_ids))
        for i, qid in enumerate(query_ids):
            rels = sorted((max(v, 0) for v in dev.qrels.get(qid, {}).values()), reverse=True)[:_CUT]
            ideal[i] = float(np.dot(rels, discount[: len(rels)]))
        self.ideal = ideal
        self.discount = discount[: self.cut]
        self.total_queries = len(dev.qrels)

    def __call__(self, scores: np.ndarray) -> np.ndarray:
        """The mean nDCG@10 of each ranking in ``scores`` (weightings x queries x candidates), one value each."""
        return self.per_query(scores).sum(-1) / self.total_queries

    def per_query(self, scores: np.ndarray) -> np.ndarray:
        """Each query's nDCG@10 under each ranking in ``scores``: (weightings x queries)."""
        if self.cut == 0:
            return np.zeros(scores.shape[:2])
        key = np.where(self.valid, scores, -np.inf).astype(np.float32)  # the run's scores are float32
        tiebreak = np.broadcast_to(-self.tiebreak, key.shape)
        order = np.lexsort((tiebreak, -key), axis=-1)[..., : self.cut]
        gains = np.take_along_axis(np.broadcast_to(np.where(self.valid, self.gains, 0.0), key.shape), order, -1)
        dcg = gains @ self.discount
        return np.divide(dcg, self.ideal, out=np.zeros_like(dcg), where=self.ideal > 0)


def _fused_grid(parts: Sequence[np.ndarray], combos: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """:func:`trine.scoring.fuse_scores` of ``parts`` (normalised already) for every weighting (rows of
    ``combos``) at once: (weightings x queries x candidates), the same float operations in the same order."""
    total = np.zeros((len(combos), *valid.shape), dtype=np.float64)
    for j, part in enumerate(parts):
        total += combos[:, j, None, None] * np.where(valid, np.asarray(part, dtype=np.float64), 0.0)[None]
    return total


def _grid(parts: int, grid: Sequence[float]) -> list[tuple[float, ...]]:
    """(1, w_2, ...) for every w in ``grid``; smaller weights first (by sum, then in order)."""
    combos = itertools.product(sorted({float(w) for w in grid}), repeat=parts - 1)
    return [(1.0, *c) for c in sorted(combos, key=lambda c: (sum(c), c))]


#: calibrated fusion's fit: L2 strength on the confidence coefficients, L-BFGS iterations
CALIBRATION_L2 = 1e-3
CALIBRATION_ITERATIONS = 200
#: the dev nDCG@10 gain over the grid's weights calibrated fusion must bring to be kept: smaller gains are
#: within the noise of a few hundred dev queries (on the demo and the Debian set the fitted coefficients
#: gained at most 0.0002 on dev and moved test by -0.0006..+0.0004: docs/benchmarks.md)
CALIBRATION_MIN_GAIN = 0.002


def fit_confidence(parts: Sequence[np.ndarray], valid: np.ndarray, gains: np.ndarray, weights: Sequence[float], *,
                   l2: float = CALIBRATION_L2, iterations: int = CALIBRATION_ITERATIONS) -> list[float]:
    """Calibrated fusion's confidence coefficients (one per head) on top of the tuned ``weights``, for
    heads whose normalised scores are ``parts`` (each queries x candidates, ``valid`` marks the real
    cells), fitted to ``gains`` (the judged relevance of each cell).

    The fused score of :func:`trine.scoring.fuse_scores` with ``confidence``,
    ``sum_m w_m * exp(c_m * g_m(q)) * n_m(q, d)``, times a free temperature ``t``, is trained as the
    logits of a softmax over each query's candidates against the query's gains (normalised to sum 1;
    queries without a judged candidate are left out), plus ``l2 * sum c^2``: full-batch L-BFGS in
    float64 from ``c = 0``, ``t = 1``, so the same inputs give the same numbers. The weights stay the
    grid's (they maximise the dev nDCG@10 directly, which a softmax fit of them does not: measured);
    ``t`` rescales every score of a query alike, so it does not change a ranking and is not kept.
    ``ValueError`` when no query has a judged candidate or the fit is not finite."""
    import torch

    heads = len(parts)
    if heads == 0 or len(weights) != heads:
        raise ValueError(f"{heads} heads for {len(weights)} weights")
    valid = np.asarray(valid, dtype=bool)
    gains = np.where(valid, np.maximum(np.asarray(gains, dtype=np.float64), 0.0), 0.0)
    keep = gains.sum(1) > 0
    if not keep.any():
        raise ValueError("no query has a judged candidate to fit calibrated fusion on")
    normed = torch.as_tensor(np.stack([np.where(valid, p, 0.0)[keep] for p in parts]), dtype=torch.float64)
    gaps = torch.as_tensor(np.stack([head_confidence(p, valid)[keep] for p in parts]), dtype=torch.float64)
    mask = torch.as_tensor(valid[keep])
    target = torch.as_tensor(gains[keep] / gains[keep].sum(1, keepdims=True), dtype=torch.float64)
    w = torch.as_tensor(np.asarray(weights, dtype=np.float64))
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    c = torch.zeros(heads, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t, c], lr=1.0, max_iter=iterations, tolerance_grad=1e-9,
                                  tolerance_change=1e-12, history_size=20, line_search_fn="strong_wolfe")

    def loss() -> torch.Tensor:
        optimizer.zero_grad()
        per_head = w[:, None] * torch.exp(c[:, None] * gaps)  # heads x queries
        logits = torch.exp(log_t) * (per_head[:, :, None] * normed).sum(0)
        log_p = torch.log_softmax(logits.masked_fill(~mask, float("-inf")), 1).masked_fill(~mask, 0.0)
        value = -(target * log_p).sum(1).mean() + l2 * (c ** 2).sum()
        value.backward()
        return value

    optimizer.step(loss)
    fitted = c.detach().numpy()
    if not np.isfinite(fitted).all():
        raise ValueError(f"calibrated fusion did not converge (confidence {fitted.tolist()})")
    return [float(x) for x in fitted]


def tune_fusion(model: Encoder, dev: RetrievalDataset, config: EvalConfig, *, corpus: CorpusIndex | None = None,
                grid: Sequence[float] = TUNE_GRID, normalizations: Sequence[str] | None = None,
                calibrate: bool = True) -> FusionSettings:
    """The normalization and weights of every fused mode among ``config.modes`` that maximise ``dev``'s nDCG@10.

    ``model``: the encoder; ``corpus``: the dev split's corpus already encoded by it
    (:func:`trine.evaluation.runner.index_corpus`; encoded here when not given). ``normalizations``:
    the ones to try (default: ``config.normalization`` if set, else ``minmax`` and ``zscore``).
    Returns the settings (their ``tuned_on`` records the dev split, the grid, and the dev nDCG@10 of
    the tuned and of the default setting per mode, measured with pytrec_eval); write them into a
    model folder with :func:`trine.modeling.fusion.write_fusion`. ``calibrate``: also fit calibrated
    fusion per mode (:func:`fit_confidence`) and keep it where its dev nDCG@10 beats the grid's by
    :data:`CALIBRATION_MIN_GAIN` (``tuned_on["calibration"]`` records both values per mode).
    """
    modes = fused_modes(config.modes)
    if not modes:
        raise ValueError(f"nothing to tune: no fused mode ({', '.join(FUSED_MODES)}) among {list(config.modes)}")
    if not grid or any(not np.isfinite(float(w)) or float(w) < 0 for w in grid):
        raise ValueError(f"the grid must be finite numbers >= 0, got {list(grid)}")
    if normalizations is None:
        normalizations = (config.normalization,) if config.normalization is not None else TUNE_NORMALIZATIONS
    normalizations = [check_normalization(n) for n in normalizations]
    if not normalizations:
        raise ValueError("no normalization to try")
    tune_config = dataclasses.replace(config, modes=tuple(modes), rerank_modes=())
    needs = needed_outputs(modes)
    if corpus is None:
        corpus = index_corpus(model, dev, tune_config)
    else:
        corpus.check(dev, needs, uses_bm25(modes))
    query_ids = list(dev.queries)
    query_texts = [dev.queries[q] for q in query_ids]
    reps = encode_queries(model, query_texts, needs, config)
    # every first stage searched once and every head's candidates scored once; each grid point only re-weights
    scored = ScoredCandidates.build(corpus, reps, query_texts, modes, tune_config)
    k = config.top_k
    groups: dict[tuple[str, ...], np.ndarray] = {}  # one candidate union per pair of first-stage lists
    for m in modes:
        if FIRST_STAGES[m] not in groups:
            groups[FIRST_STAGES[m]] = union_rows([scored.first_stage(x, k) for x in FIRST_STAGES[m]])
    fast = {key: _FastNdcg(rows, dev, query_ids, corpus.doc_ids, k, config.ignore_identical_ids)
            for key, rows in groups.items()}

    best: dict[str, dict[str, tuple[float, tuple[float, ...]]]] = {}
    normed_of: dict[tuple[str, tuple[str, ...]], dict[str, np.ndarray]] = {}
    bar = progress_bar(total=len(normalizations) * sum(len(_grid(len(FUSED_MODES[m]), grid)) for m in modes),
                       desc="tune fusion", unit="weighting", leave=False)
    for norm in normalizations:
        best[norm] = {}
        for key, rows in groups.items():
            valid = rows >= 0
            group = [m for m in modes if FIRST_STAGES[m] == key]
            normed = {p: normalize_scores(np.asarray(scored.scorer(p)(rows), dtype=np.float64), valid, norm)
                      for p in dict.fromkeys(p for m in group for p in FUSED_MODES[m])}
            normed_of[(norm, key)] = normed
            for mode in group:
                combos = _grid(len(FUSED_MODES[mode]), grid)
                weights_matrix = np.asarray(combos, dtype=np.float64)
                values = np.concatenate([
                    fast[key](_fused_grid([normed[p] for p in FUSED_MODES[mode]], weights_matrix[i : i + _CHUNK],
                                          valid)) for i in range(0, len(combos), _CHUNK)])
                bar.update(len(combos))
                top: tuple[float, tuple[float, ...]] | None = None
                for value, weights in zip(values.tolist(), combos):  # ties go to the earlier (smaller) weights
                    if top is None or value > top[0] + 1e-12:
                        top = (value, weights)
                best[norm][mode] = top
    bar.close()
    mean = {n: float(np.mean([best[n][m][0] for m in modes])) for n in normalizations}
    chosen = normalizations[0]
    for n in normalizations[1:]:
        if mean[n] > mean[chosen] + 1e-12:
            chosen = n
    weights = {m: list(best[chosen][m][1]) for m in modes}
    confidence: dict[str, list[float]] = {}
    calibration: dict[str, dict[str, Any]] = {}
    for mode in modes if calibrate else ():
        key = FIRST_STAGES[mode]
        valid = groups[key] >= 0
        parts = [normed_of[(chosen, key)][p] for p in FUSED_MODES[mode]]
        try:
            # the gaps over every candidate, as fuse_scores computes them when the fusion is applied; a
            # candidate the metric ignores (its id is the query's) is fitted as not relevant
            coefficients = fit_confidence(parts, valid, np.where(fast[key].valid, fast[key].gains, 0.0), weights[mode])
        except ValueError as err:
            calibration[mode] = {"dev_plain": best[chosen][mode][0], "kept": False, "error": str(err)}
            logger.info("%s: calibrated fusion not fitted: %s", mode, err)
            continue
        value = float(fast[key](fuse_scores(parts, weights[mode], valid, "none", coefficients)[None])[0])
        kept = value >= best[chosen][mode][0] + CALIBRATION_MIN_GAIN
        calibration[mode] = {"dev_plain": best[chosen][mode][0], "dev_calibrated": value,
                             "confidence": coefficients, "kept": kept}
        logger.info("%s: calibrated fusion dev nDCG@10 %.4f vs the grid's %.4f (%s)", mode, value,
                    best[chosen][mode][0], "kept" if kept else "not kept")
        if kept:
            confidence[mode] = coefficients

    def dev_ndcg(mode: str, norm: str, w: Sequence[float], c: Sequence[float] | None = None) -> float:
        res = scored.fuse(mode, w, k, norm, c)
        return evaluate_run(dev.qrels, res.to_run(query_ids, corpus.doc_ids), [_CUT], ["ndcg"],
                            ignore_identical_ids=config.ignore_identical_ids)[TUNE_METRIC]

    tuned = {m: dev_ndcg(m, chosen, weights[m], confidence.get(m)) for m in modes}
    default = {m: dev_ndcg(m, DEFAULT_NORMALIZATION, DEFAULT_WEIGHTS[m]) for m in modes}
    for m in modes:
        searched = calibration[m]["dev_calibrated"] if m in confidence else best[chosen][m][0]
        if abs(tuned[m] - searched) > 1e-6:
            logger.info("%s: the search's nDCG@10 %.6f differs from pytrec_eval's %.6f (tied scores)", m,
                        searched, tuned[m])
        logger.info("tuned %s on %s (%s): normalization %s, weights %s, dev nDCG@10 %.4f (default %.4f)", m,
                    dev.name, dev.split, chosen, weights[m], tuned[m], default[m])
    tuned_on = {
        "dataset": dev.name, "split": dev.split, "queries": len(dev.queries), "metric": TUNE_METRIC,
        "top_k": config.top_k, "grid": [float(w) for w in grid], "normalizations_tried": list(normalizations),
        "dev": tuned, "dev_default": default,
    }
    if calibrate:
        tuned_on["calibration"] = calibration
        tuned_on["calibration_min_gain"] = CALIBRATION_MIN_GAIN
    return FusionSettings(chosen, weights, tuned_on, confidence)
