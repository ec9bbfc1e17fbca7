"""Evaluation: BEIR/FlagEmbedding test-set loading, pytrec_eval metrics, a multi-mode runner, reports."""

from trine.evaluation.data import DatasetFormatError, RetrievalDataset, detect_layout, load_dataset
from trine.evaluation.manpages import build_manpages_beir
from trine.evaluation.metrics import evaluate_run, truncate_run
from trine.evaluation.report import fusion_summary, markdown_table, mode_table, plot_modes, text_table, write_report
from trine.evaluation.runner import MODES, CorpusIndex, EvalConfig, evaluate_model, index_corpus, run_evaluation
from trine.evaluation.tuning import TUNE_GRID, check_dev_split, tune_fusion

__all__ = [
    "MODES",
    "TUNE_GRID",
    "CorpusIndex",
    "DatasetFormatError",
    "EvalConfig",
    "RetrievalDataset",
    "build_manpages_beir",
    "check_dev_split",
    "detect_layout",
    "evaluate_model",
    "evaluate_run",
    "fusion_summary",
    "mode_table",
    "index_corpus",
    "load_dataset",
    "markdown_table",
    "plot_modes",
    "run_evaluation",
    "text_table",
    "truncate_run",
    "tune_fusion",
    "write_report",
]
