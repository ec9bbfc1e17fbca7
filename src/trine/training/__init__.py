from trine._lazy import lazy_exports

# Public name -> the module that defines it, imported on first use (see trine._lazy).
_EXPORTS = {
    "LOSSES": "trine.training.losses",
    "DataError": "trine.data",
    "build_loss": "trine.training.losses",
    "build_trainer": "trine.training.finetuning",
    "finetune": "trine.training.finetuning",
    "load_train_files": "trine.data",
    "parse_args": "trine.training.finetuning",
}

__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
