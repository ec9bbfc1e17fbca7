"""Training diagnostics: every ``diagnostics_steps`` steps, what the batch in memory says about the model.

Computed from the representations the loss was computed on (no extra forward pass), on the main
process, for each head the mode trains. Under DDP with ``negatives_cross_device`` the batch is the
one the loss sees: every rank's queries and passages are gathered (:func:`gather_batch`, at the
recorded steps only), so the numbers are those of one process training on the global batch; without
cross-device negatives they are the main process's local batch.

- ``accuracy``: share of queries whose positive scores strictly above every other candidate the
  loss sees (the batch's passages with in-batch negatives, else the query's own group);
- score margins: positive minus the best hard negative of the query's group (``margin_*``), and
  minus the best other candidate (``margin_in_batch_*``), with their distribution;
- ``negatives_above_positive``: share of hard negatives scoring above their query's positive; each
  such negative is a false-negative suspect, written out with its texts;
- dense vectors: ``alignment`` (mean squared distance of a query to its positive) and
  ``uniformity`` (log mean Gaussian potential over pairs of passages), Wang & Isola 2020, both on
  L2-normalised vectors; ``mean_cosine`` over pairs of passages; the vectors' norms;
- lexical weights: non-zero weights per text and SPLADE's FLOPS (``sum_j (mean_i w_ij)^2``);
- the loss and its per-head parts, and any held-out retrieval metric logged (``eval_*``).

A warning is logged when a sign of collapse or divergence appears: a loss or score that is not
finite, passages whose mean pairwise cosine reaches ``collapse_cosine`` (every text gets nearly one
vector), or lexical weights that are all zero. Files in ``diagnostics_dir`` (each rewritten
atomically at every record): ``diagnostics.jsonl``, ``false_negative_suspects.jsonl``,
``diagnostics.png`` and ``report.md``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from transformers import TrainerCallback

from trine.io import atomic_file, check_output_path, is_trine_folder, write_marker
from trine.modeling.heads import lexical_matrix
from trine.scoring import colbert_scores_padded

logger = logging.getLogger(__name__)

# The few numbers also put in the Trainer's logs (the rest is in diagnostics.jsonl).
LOGGED = ("accuracy", "margin_mean", "negatives_above_positive", "alignment", "uniformity")


def _percentiles(xs: np.ndarray) -> dict[str, float]:
    p5, p50, p95 = np.percentile(xs, [5, 50, 95])
    return {"p5": float(p5), "p50": float(p50), "p95": float(p95)}


def score_diagnostics(scores: np.ndarray, group_size: int, in_batch_negatives: bool = True) -> dict[str, Any]:
    """Diagnostics of one head's queries x passages score matrix (local batch; each query's group
    ``[positive, negative_1, ...]`` contiguous, starting at column ``query * group_size``).

    Returns the numbers, the ``margins`` (per query, for the histogram) and ``suspects``: the
    ``(query, passage column, score, positive score)`` of every hard negative above its positive."""
    scores = np.asarray(scores, dtype=np.float64)
    n_q, n_p = scores.shape
    if n_p != n_q * group_size:
        raise ValueError(f"{n_p} passages for {n_q} queries in groups of {group_size}")
    rows = np.arange(n_q)
    pos_cols = rows * group_size
    pos = scores[rows, pos_cols]
    candidates = np.ones_like(scores, dtype=bool)
    if not in_batch_negatives:
        candidates[:] = False
        for i in range(n_q):
            candidates[i, i * group_size: (i + 1) * group_size] = True
    others = candidates.copy()
    others[rows, pos_cols] = False
    out: dict[str, Any] = {"queries": int(n_q), "candidates": int(candidates[0].sum()),
                           "positive_mean": float(pos.mean())}
    best_other = np.where(others, scores, -np.inf).max(axis=1) if others.any() else np.full(n_q, -np.inf)
    out["accuracy"] = float((pos > best_other).mean())
    if others.any():
        in_batch_margin = pos - best_other
        out["margin_in_batch_mean"] = float(in_batch_margin.mean())
        out["margin_in_batch"] = _percentiles(in_batch_margin)
    margins = np.zeros(0)
    suspects: list[tuple[int, int, float, float]] = []
    if group_size > 1:
        hard = np.stack([scores[i, i * group_size + 1: (i + 1) * group_size] for i in range(n_q)])
        margins = pos - hard.max(axis=1)
        above = hard > pos[:, None]
        out.update(hard_negative_mean=float(hard.mean()), margin_mean=float(margins.mean()),
                   margin_min=float(margins.min()), margin=_percentiles(margins),
                   negatives_above_positive=float(above.mean()))
        for i, j in zip(*np.nonzero(above)):
            suspects.append((int(i), int(i * group_size + 1 + j), float(hard[i, j]), float(pos[i])))
    if in_batch_negatives and n_q > 1:
        foreign = np.ones_like(scores, dtype=bool)
        for i in range(n_q):
            foreign[i, i * group_size: (i + 1) * group_size] = False
        out["in_batch_negative_mean"] = float(scores[foreign].mean())
    out["margins"] = margins.tolist()
    out["suspects"] = suspects
    return out


def embedding_diagnostics(queries: np.ndarray, passages: np.ndarray, group_size: int) -> dict[str, float]:
    """Alignment, uniformity (t = 2), mean pairwise cosine of the passages, and norms of dense vectors."""
    q = np.asarray(queries, dtype=np.float64)
    p = np.asarray(passages, dtype=np.float64)
    q_norm = np.linalg.norm(q, axis=1)
    p_norm = np.linalg.norm(p, axis=1)
    qn = q / np.maximum(q_norm, 1e-12)[:, None]
    pn = p / np.maximum(p_norm, 1e-12)[:, None]
    positives = pn[np.arange(len(qn)) * group_size]
    norms = np.concatenate([q_norm, p_norm])
    out = {"alignment": float(((qn - positives) ** 2).sum(1).mean()),
           "norm_mean": float(norms.mean()), "norm_std": float(norms.std())}
    if len(pn) > 1:
        cos = pn @ pn.T
        upper = np.triu_indices(len(pn), k=1)
        sq_dist = np.maximum(2.0 - 2.0 * cos[upper], 0.0)
        out["uniformity"] = float(np.log(np.mean(np.exp(-2.0 * sq_dist))))
        out["mean_cosine"] = float(cos[upper].mean())
    return out


def lexical_diagnostics(token_weights: torch.Tensor, input_ids: torch.Tensor, vocab_size: int) -> dict[str, float]:
    """Non-zero lexical weights per text (distinct tokens with a weight > 0) and FLOPS of a batch."""
    mat = lexical_matrix(token_weights.float(), input_ids, vocab_size)
    nonzeros = (mat > 0).sum(1).float()
    return {"nonzeros_mean": float(nonzeros.mean()), "nonzeros_min": float(nonzeros.min()),
            "flops": float((mat.abs().mean(0) ** 2).sum())}


def head_scores(head: str, q: dict[str, torch.Tensor], p: dict[str, torch.Tensor], vocab_size: int) -> torch.Tensor:
    """Raw similarities (no temperature) of one head, queries x passages, in float32."""
    if head == "dense":
        return q["dense_vecs"].float() @ p["dense_vecs"].float().T
    if head == "sparse":
        return (lexical_matrix(q["token_weights"].float(), q["input_ids"], vocab_size)
                @ lexical_matrix(p["token_weights"].float(), p["input_ids"], vocab_size).T)
    if head == "colbert":
        return colbert_scores_padded(q["colbert_vecs"].float(), q["colbert_mask"], p["colbert_vecs"].float(),
                                     p["colbert_mask"])
    raise ValueError(f"unknown head {head!r}")


def diagnose(q: dict[str, torch.Tensor], p: dict[str, torch.Tensor], heads: Sequence[str], *, loss: float,
             parts: dict[str, float] | None = None, in_batch_negatives: bool = True, vocab_size: int | None = None,
             collapse_cosine: float = 0.99) -> tuple[dict[str, Any], list[str]]:
    """One record of diagnostics from a batch's representations (as the training model's ``encode``
    gives them) and its loss; and the warnings it raises (collapse, divergence)."""
    n_q = next(iter(q.values())).size(0)
    n_p = next(iter(p.values())).size(0)
    group = n_p // n_q
    record: dict[str, Any] = {"loss": float(loss), "loss_parts": {k: float(v) for k, v in (parts or {}).items()},
                              "group_size": group, "in_batch_negatives": bool(in_batch_negatives), "heads": {}}
    warnings: list[str] = []
    if not math.isfinite(record["loss"]):
        warnings.append(f"the loss is {record['loss']}: training diverged (lower the learning rate, check the data)")
    with torch.no_grad():
        for head in heads:
            s = head_scores(head, q, p, vocab_size or 0).cpu().numpy()
            if not np.isfinite(s).all():
                warnings.append(f"{head} scores are not finite: training diverged")
                record["heads"][head] = {"finite": False}
                continue
            entry = score_diagnostics(s, group, in_batch_negatives)
            if head == "dense":
                entry.update(embedding_diagnostics(q["dense_vecs"].float().cpu().numpy(),
                                                   p["dense_vecs"].float().cpu().numpy(), group))
                if entry.get("mean_cosine", -1.0) >= collapse_cosine:
                    warnings.append(f"dense vectors collapsing: mean cosine of the batch's passages "
                                    f"{entry['mean_cosine']:.4f} >= {collapse_cosine} (uniformity "
                                    f"{entry['uniformity']:.4f}); every text gets nearly one vector")
            if head == "sparse":
                for side, reps in (("query", q), ("passage", p)):
                    entry[side] = lexical_diagnostics(reps["token_weights"], reps["input_ids"], vocab_size)
                if entry["passage"]["nonzeros_mean"] == 0 or entry["query"]["nonzeros_mean"] == 0:
                    warnings.append("lexical weights are all zero: the lexical head collapsed")
            record["heads"][head] = entry
    return record, warnings


def _detach(reps: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in reps.items()}


# per-token representations with their companion (ids or mask), gathered padded to the longest rank's length
_PADDED = (("token_weights", "input_ids"), ("colbert_vecs", "colbert_mask"), ("input_ids", "attention_mask"))


def _gather_side(reps: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    from trine.training.distributed import gather_padded, gather_with_grad

    out: dict[str, torch.Tensor] = {}
    if "dense_vecs" in reps:
        out["dense_vecs"] = gather_with_grad(reps["dense_vecs"])
    for values, companion in _PADDED:  # a fixed order, the same on every rank: the gathers pair up
        if values in reps and companion in reps and values not in out:
            out[values], out[companion] = gather_padded(reps[values], reps[companion])
    missing = sorted(set(reps) - set(out))
    if missing:
        raise ValueError(f"diagnostics: cannot gather the representations {missing} across ranks")
    return out


def gather_batch(q: dict[str, torch.Tensor], p: dict[str, torch.Tensor], inputs: dict[str, Any] | None = None
                 ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, Any] | None]:
    """Every rank's queries and passages (and token ids, for the suspects' texts), concatenated in rank
    order, as the loss with cross-device negatives sees them: query i's group starts at passage column
    ``i * group_size`` of the global batch. Per-token tensors are padded to the longest rank's length.
    A collective: every rank must call it at the same step."""
    with torch.no_grad():
        gathered_inputs = None
        if inputs is not None:
            gathered_inputs = {side: _gather_side({k: inputs[side][k] for k in ("input_ids", "attention_mask")})
                               for side in ("queries", "passages")}
        return _gather_side(q), _gather_side(p), gathered_inputs


class TrainingDiagnostics(TrainerCallback):
    """Records diagnostics every ``every`` steps (and at step 1) from the batch being trained on,
    through :meth:`capture` around the trainer's forward pass; writes the files in ``out_dir``."""

    def __init__(self, every: int, out_dir: str, *, collapse_cosine: float = 0.99, max_suspects: int = 20,
                 main_process: bool = True, inputs: Sequence[str | None] = (), check_folder: bool = True,
                 gather: bool = False):
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"diagnostics_steps must be a positive integer (0: off), got {every!r}")
        if not -1.0 < collapse_cosine <= 1.0:
            raise ValueError(f"diagnostics_collapse_cosine is a cosine in (-1, 1], got {collapse_cosine}")
        if max_suspects < 0:
            raise ValueError(f"diagnostics_max_suspects must be >= 0, got {max_suspects}")
        if check_folder:  # an existing folder trine wrote is written into; any other non-empty one is refused
            check_output_path(out_dir, inputs=inputs, overwrite=True, what="diagnostics_dir")
        self.every = every
        self.out_dir = out_dir
        self.collapse_cosine = collapse_cosine
        self.max_suspects = max_suspects
        self.main_process = main_process
        self.gather = gather  # DDP with cross-device negatives: every rank takes part in gathering the batch
        self.last_step = 0  # the last step observed (on every rank: gradient accumulation observes the first only)
        self.records: list[dict[str, Any]] = []
        self.suspects: list[dict[str, Any]] = []
        self.evals: list[dict[str, Any]] = []
        self.warnings: list[str] = []

    @classmethod
    def from_args(cls, args: Any, inputs: Sequence[str | None] = ()) -> TrainingDiagnostics:
        out_dir = args.diagnostics_dir or os.path.join(args.output_dir, "diagnostics")
        gather = bool(getattr(args, "negatives_cross_device", False)) and args.world_size > 1
        return cls(args.diagnostics_steps, out_dir, collapse_cosine=args.diagnostics_collapse_cosine,
                   max_suspects=args.diagnostics_max_suspects, main_process=args.process_index == 0,
                   inputs=inputs, check_folder=args.diagnostics_dir is not None, gather=gather)

    def due(self, step: int) -> bool:
        observed = self.last_step == step  # gradient accumulation: the first micro-batch only
        return (self.main_process or self.gather) and not observed and (step == 1 or step % self.every == 0)

    @contextlib.contextmanager
    def capture(self, trainer: Any, inputs: dict[str, Any]) -> Iterator[None]:
        """Around the forward pass of step ``global_step + 1``: when due, the training model's
        ``loss_from_reps`` is wrapped for the block, and what it saw is diagnosed before the backward
        pass; a few numbers are added to the loss output's ``stats`` (the Trainer logs them)."""
        step = trainer.state.global_step + 1
        inner = trainer.accelerator.unwrap_model(trainer.model)
        if not self.due(step) or not hasattr(inner, "loss_from_reps"):
            yield
            return
        original = inner.loss_from_reps

        def wrapped(q, p, teacher_scores=None, in_batch_negatives=True):  # noqa: ANN001
            out = original(q, p, teacher_scores, in_batch_negatives)
            with torch.autocast(next(iter(q.values())).device.type, enabled=False):
                self._observe(step, inner, _detach(q), _detach(p), out, in_batch_negatives, inputs)
            return out

        inner.loss_from_reps = wrapped  # an instance attribute: DDP's forward and gradient caching both call it
        try:
            yield
        finally:
            del inner.loss_from_reps

    def _observe(self, step: int, inner: Any, q: dict[str, torch.Tensor], p: dict[str, torch.Tensor],
                 out: dict[str, Any], in_batch_negatives: bool, inputs: dict[str, Any]) -> None:
        self.last_step = step
        if self.gather and in_batch_negatives:  # the loss saw every rank's passages: so do the diagnostics
            q, p, inputs = gather_batch(q, p, inputs)
        if not self.main_process:
            return
        encoder = inner.encoder
        record, warnings = diagnose(
            q, p, getattr(inner, "heads", ("dense",)), loss=float(out["loss"].detach()), parts=out.get("parts"),
            in_batch_negatives=in_batch_negatives, vocab_size=getattr(encoder, "vocab_size", None),
            collapse_cosine=self.collapse_cosine)
        record = {"step": step, **record}
        main = record["heads"].get("dense") or next(iter(record["heads"].values()), {})
        stats = out.setdefault("stats", {})
        for name in LOGGED:
            if isinstance(main.get(name), float):
                stats[f"diag_{name}"] = main[name]
        suspects = self._suspects(step, record, inputs, getattr(encoder, "tokenizer", None))
        record["suspects"] = len(suspects)
        for warning in warnings:
            logger.warning("step %d: %s", step, warning)
        self.warnings += [f"step {step}: {w}" for w in warnings]
        record["warnings"] = warnings
        self.records.append(record)
        self.suspects += suspects
        logger.info("step %d diagnostics: %s", step, ", ".join(f"{k} {v:.4f}" for k, v in stats.items()
                                                             if k.startswith("diag_")))
        self.write()

    def _suspects(self, step: int, record: dict[str, Any], inputs: dict[str, Any], tokenizer: Any
                  ) -> list[dict[str, Any]]:
        """The hard negatives scoring above their positive (the worst first), with the texts as the
        model saw them (decoded, instructions included)."""
        found = []
        for head, entry in record["heads"].items():
            for query, column, score, positive in entry.pop("suspects", []):
                found.append({"step": step, "head": head, "query_row": query, "passage_row": column,
                              "negative_score": score, "positive_score": positive})
        found.sort(key=lambda s: s["positive_score"] - s["negative_score"])
        found = found[: self.max_suspects]
        if tokenizer is not None and found:
            group = record["group_size"]

            def text(features: dict[str, torch.Tensor], row: int) -> str:
                ids = features["input_ids"][row][features["attention_mask"][row].bool()]
                return tokenizer.decode(ids.tolist(), skip_special_tokens=True)

            for s in found:
                s["query"] = text(inputs["queries"], s["query_row"])
                s["positive"] = text(inputs["passages"], s["query_row"] * group)
                s["negative"] = text(inputs["passages"], s["passage_row"])
        return found

    # ------------------------------------------------------------------------------------ callbacks
    def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001
        metrics = {k: v for k, v in (logs or {}).items() if k.startswith("eval_") and isinstance(v, (int, float))}
        if metrics and self.main_process:
            self.evals.append({"step": state.global_step, **metrics})
            self.write()

    # -------------------------------------------------------------------------------------- files
    def write(self) -> None:
        if not self.main_process:
            return
        os.makedirs(self.out_dir, exist_ok=True)
        if not is_trine_folder(self.out_dir):
            write_marker(self.out_dir)
        with atomic_file(os.path.join(self.out_dir, "diagnostics.jsonl")) as f:
            for row in [*self.records, *({"eval": e} for e in self.evals)]:
                f.write(json.dumps(row) + "\n")
        with atomic_file(os.path.join(self.out_dir, "false_negative_suspects.jsonl")) as f:
            for row in self.suspects:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        if self.records:
            with atomic_file(os.path.join(self.out_dir, "diagnostics.png"), "wb") as f:
                self._plot(f)
        with atomic_file(os.path.join(self.out_dir, "report.md")) as f:
            f.write(self._report())

    def _series(self, head: str, name: str) -> tuple[list[int], list[float]]:
        steps, values = [], []
        for r in self.records:
            value = r["heads"].get(head, {}).get(name)
            if isinstance(value, float):
                steps.append(r["step"])
                values.append(value)
        return steps, values

    def _plot(self, handle: Any) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        heads = list(self.records[-1]["heads"])
        panels = [("loss", "loss"), ("accuracy", "in-batch accuracy"), ("margin_mean", "margin (pos - best hard neg)"),
                  ("negatives_above_positive", "share of negatives above positive"),
                  ("uniformity", "uniformity (dense)"), ("alignment", "alignment (dense)")]
        fig, axes = plt.subplots(2, 4, figsize=(16, 7))
        flat = axes.ravel()
        for ax, (name, title) in zip(flat, panels):
            if name == "loss":
                ax.plot([r["step"] for r in self.records], [r["loss"] for r in self.records], marker=".", label="loss")
                for part in self.records[-1]["loss_parts"]:
                    xs = [r["step"] for r in self.records if part in r["loss_parts"]]
                    ax.plot(xs, [r["loss_parts"][part] for r in self.records if part in r["loss_parts"]],
                            marker=".", label=part)
            else:
                for head in heads:
                    xs, ys = self._series(head, name)
                    if xs:
                        ax.plot(xs, ys, marker=".", label=head)
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("step", fontsize=8)
            if ax.lines:
                ax.legend(fontsize=7)
        ax = flat[6]
        for head in heads:
            margins = self.records[-1]["heads"][head].get("margins") or []
            if margins:
                ax.hist(margins, bins=20, alpha=0.5, label=head)
        ax.set_title(f"margins at step {self.records[-1]['step']}", fontsize=9)
        if ax.patches:
            ax.legend(fontsize=7)
        ax = flat[7]
        names = sorted({k for e in self.evals for k in e if k != "step"})
        for name in names:
            ax.plot([e["step"] for e in self.evals if name in e], [e[name] for e in self.evals if name in e],
                    marker=".", label=name)
        ax.set_title("held-out retrieval" if names else "held-out retrieval (no eval_data)", fontsize=9)
        if names:
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(handle, format="png", dpi=100)
        plt.close(fig)

    def _report(self) -> str:
        lines = ["# Training diagnostics", ""]
        if not self.records:
            return "\n".join(lines + ["No step recorded yet.", ""])
        last = self.records[-1]
        lines += [f"Last record: step {last['step']}, loss {last['loss']:.4f}, "
                  f"{len(self.records)} records, {len(self.suspects)} false-negative suspects written.", "",
                  "| head | accuracy | margin mean | negatives above positive | uniformity | alignment | mean cosine |",
                  "|---|---|---|---|---|---|---|"]
        for head, e in last["heads"].items():
            cells = [e.get(k) for k in ("accuracy", "margin_mean", "negatives_above_positive", "uniformity",
                                        "alignment", "mean_cosine")]
            lines.append(f"| {head} | " + " | ".join("-" if c is None else f"{c:.4f}" for c in cells) + " |")
        sparse = last["heads"].get("sparse")
        if sparse and "query" in sparse:
            lines += ["", f"Lexical weights: {sparse['query']['nonzeros_mean']:.1f} non-zeros per query, "
                          f"{sparse['passage']['nonzeros_mean']:.1f} per passage; FLOPS of the passages "
                          f"{sparse['passage']['flops']:.4f}."]
        if self.evals:
            lines += ["", "Held-out retrieval: " + ", ".join(f"{k} {v:.4f}" for k, v in self.evals[-1].items()
                                                            if k != "step") + f" (step {self.evals[-1]['step']})."]
        lines += ["", "![diagnostics](diagnostics.png)", "", "## Warnings", ""]
        lines += [f"- {w}" for w in self.warnings] or ["None."]
        return "\n".join(lines) + "\n"
