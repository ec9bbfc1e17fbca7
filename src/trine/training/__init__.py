from trine.data import DataError, load_train_files
from trine.training.finetuning import build_trainer, finetune, parse_args
from trine.training.losses import LOSSES, build_loss

__all__ = ["LOSSES", "DataError", "build_loss", "build_trainer", "finetune", "load_train_files", "parse_args"]
