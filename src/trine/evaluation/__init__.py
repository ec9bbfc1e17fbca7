"""Evaluation: BEIR/FlagEmbedding test-set loading, pytrec_eval metrics, a multi-mode runner, reports."""

from trine._lazy import lazy_exports

# Public name -> the module that defines it, imported on first use (see trine._lazy).
_EXPORTS = {
    "MODES": "trine.evaluation.config",
    "TUNE_GRID": "trine.evaluation.tuning",
    "CorpusIndex": "trine.evaluation.candidates",
    "DatasetFormatError": "trine.evaluation.data",
    "EvalConfig": "trine.evaluation.config",
    "RetrievalDataset": "trine.evaluation.data",
    "build_manpages_beir": "trine.evaluation.manpages",
    "check_dev_split": "trine.evaluation.tuning",
    "detect_layout": "trine.evaluation.data",
    "evaluate_model": "trine.evaluation.runner",
    "evaluate_run": "trine.evaluation.metrics",
    "fusion_summary": "trine.evaluation.report",
    "mode_table": "trine.evaluation.report",
    "index_corpus": "trine.evaluation.candidates",
    "load_dataset": "trine.evaluation.data",
    "markdown_table": "trine.evaluation.report",
    "plot_modes": "trine.evaluation.report",
    "run_evaluation": "trine.evaluation.runner",
    "text_table": "trine.evaluation.report",
    "truncate_run": "trine.evaluation.metrics",
    "tune_fusion": "trine.evaluation.tuning",
    "write_report": "trine.evaluation.report",
}

__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
