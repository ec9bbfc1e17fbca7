"""Evaluation: BEIR/FlagEmbedding test-set loading, pytrec_eval metrics, a multi-mode runner, reports."""

from trine.evaluation.data import DatasetFormatError, RetrievalDataset, detect_layout, load_dataset
from trine.evaluation.manpages import build_manpages_beir
from trine.evaluation.metrics import evaluate_run, truncate_run
from trine.evaluation.report import markdown_table, plot_modes, text_table, write_report
from trine.evaluation.runner import MODES, EvalConfig, evaluate_model, run_evaluation

__all__ = [
    "MODES",
    "DatasetFormatError",
    "EvalConfig",
    "RetrievalDataset",
    "build_manpages_beir",
    "detect_layout",
    "evaluate_model",
    "evaluate_run",
    "load_dataset",
    "markdown_table",
    "plot_modes",
    "run_evaluation",
    "text_table",
    "truncate_run",
    "write_report",
]
