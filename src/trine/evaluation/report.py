"""Evaluation reports: a printed table, ``results.json``, ``results.md`` and a plot comparing modes and models."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

from trine.evaluation.runner import main_metric_table
from trine.io import atomic_folder


def report_metrics(result: Mapping[str, Any], metrics: Sequence[str] | None = None) -> list[str]:
    """The metrics to show: given, or ``ndcg@10``/``recall@10``/``mrr@10`` style picks of what was computed."""
    first = next(iter(result["models"].values()))["metrics"]
    available = list(next(iter(first.values())))
    if metrics is not None:
        missing = [m for m in metrics if m not in available]
        if missing:
            raise ValueError(f"metrics {missing} were not computed; available: {available}")
        return list(metrics)
    ks = sorted({int(m.split("@")[1]) for m in available})
    k = 10 if 10 in ks else ks[-1]
    picks = [m for m in available if m.endswith(f"@{k}")]
    largest = [m for m in available if m.startswith("recall@") and m.endswith(f"@{ks[-1]}")]
    return picks + [m for m in largest if m not in picks]


def markdown_table(result: Mapping[str, Any], metrics: Sequence[str] | None = None) -> str:
    cols = report_metrics(result, metrics)
    lines = ["| model | mode | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    for row in main_metric_table(result, cols):
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def text_table(result: Mapping[str, Any], metrics: Sequence[str] | None = None) -> str:
    cols = report_metrics(result, metrics)
    rows = [["model", "mode", *cols], *main_metric_table(result, cols)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows)


def mode_table(result: Mapping[str, Any], metric: str = "ndcg@10") -> str:
    """One ``metric`` as a table of modes (rows) by models (columns), 4 decimals: each column shows
    what a model (a step of a pipeline) gives in every mode."""
    models = list(result["models"])
    modes: list[str] = []
    for entry in result["models"].values():
        modes.extend(m for m in entry["metrics"] if m not in modes)
    rows = [["mode", *models]]
    for mode in modes:
        values = [result["models"][label]["metrics"].get(mode, {}).get(metric) for label in models]
        rows.append([mode, *("" if v is None else f"{v:.4f}" for v in values)])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return f"{metric}\n" + "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows)


def _weights(values: Sequence[float]) -> str:
    return "(" + ", ".join(f"{w:g}" for w in values) + ")"


def _confidence(settings: Mapping[str, Any], mode: str) -> str:
    """`` confidence c1,c2`` when ``mode`` fuses with calibrated-fusion coefficients, else nothing."""
    coefficients = settings.get("confidence", {}).get(mode)
    return "" if coefficients is None else f" confidence {_weights(coefficients)}"


def fusion_summary(result: Mapping[str, Any]) -> str:
    """One line per model that fused modes: the normalization and weights used and where each came
    from (given, model folder, default); and, for a tuned model, the dev split, the tuned weights'
    dev nDCG@10 beside the default weights', and the file written. Empty when nothing was fused."""
    lines = []
    for label, entry in result["models"].items():
        tuning = entry.get("tuning")
        if tuning is not None:
            on = tuning["tuned_on"]
            parts = [f"{m} {_weights(w)}{_confidence(tuning, m)}: dev {on['metric']} {on['dev'][m]:.4f} "
                     f"(default {on['dev_default'][m]:.4f})" for m, w in tuning["weights"].items()]
            lines.append(f"tuned {label} on {on['dataset']}/{on['split']} ({on['queries']} queries), normalization "
                         f"{tuning['normalization']}: " + "; ".join(parts) + f" -> {tuning['file']}")
        fusion = entry.get("fusion")
        if fusion is not None:
            source = fusion["source"]
            parts = [f"{m} {_weights(w)}{_confidence(fusion, m)} ({source['weights'][m]})"
                     for m, w in fusion["weights"].items()]
            lines.append(f"fusion {label}: normalization {fusion['normalization']} ({source['normalization']}); "
                         + "; ".join(parts))
    return "\n".join(lines)


def plot_modes(result: Mapping[str, Any], path: str, metric: str) -> None:
    """Grouped bars: one group per mode, one bar per model, height = ``metric``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(result["models"])
    modes: list[str] = []
    for entry in result["models"].values():
        modes.extend(m for m in entry["metrics"] if m not in modes)
    width = 0.8 / len(models)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(modes) * max(1, len(models)) ** 0.5), 4.0))
    for i, label in enumerate(models):
        values = [result["models"][label]["metrics"].get(m, {}).get(metric, 0.0) for m in modes]
        xs = [j + (i - (len(models) - 1) / 2) * width for j in range(len(modes))]
        bars = ax.bar(xs, values, width, label=label)
        ax.bar_label(bars, fmt="%.3f", fontsize=7)
    ax.set_xticks(range(len(modes)), modes)
    ax.set_ylabel(metric)
    ax.set_title(f"{result['dataset']} ({result['split']}, {result['queries']} queries, "
                 f"{result['documents']} documents)")
    ax.set_ylim(0, 1.05 * max(1e-9, max(
        result["models"][m]["metrics"].get(mode, {}).get(metric, 0.0) for m in models for mode in modes)))
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(result: Mapping[str, Any], out_dir: str | os.PathLike, metrics: Sequence[str] | None = None,
                 plot_metric: str | None = None, *, overwrite: bool = False,
                 inputs: Sequence[str | os.PathLike | None] = ()) -> dict[str, str]:
    """Write ``results.json``, ``results.md`` and ``modes.png`` into ``out_dir`` (a new folder, or,
    with ``overwrite``, one trine wrote, replaced whole; never one of the ``inputs`` or a folder
    holding them: :func:`trine.io.atomic_folder`)."""
    cols = report_metrics(result, metrics)
    plot_metric = plot_metric or cols[0]
    report_metrics(result, [plot_metric])  # raises, naming what is available, if it was not computed
    with atomic_folder(out_dir, overwrite=overwrite, inputs=inputs) as tmp:
        with open(os.path.join(tmp, "results.json"), "w") as f:
            json.dump(result, f, indent=1)
        with open(os.path.join(tmp, "results.md"), "w") as f:
            f.write(f"# {result['dataset']} ({result['split']}): {result['queries']} queries, "
                    f"{result['documents']} documents\n\n")
            f.write(markdown_table(result, cols) + "\n")
            summary = fusion_summary(result)
            if summary:
                f.write("\n" + "\n".join(f"- {line}" for line in summary.splitlines()) + "\n")
        plot_modes(result, os.path.join(tmp, "modes.png"), plot_metric)
    out = os.path.abspath(os.fspath(out_dir))
    return {k: os.path.join(out, f) for k, f in (("json", "results.json"), ("markdown", "results.md"),
                                                   ("plot", "modes.png"))}
