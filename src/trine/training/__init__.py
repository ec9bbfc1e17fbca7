from trine.training.data import DataError, load_train_files
from trine.training.finetune import build_trainer, finetune, parse_args
from trine.training.losses import contrastive_loss

__all__ = ["DataError", "build_trainer", "contrastive_loss", "finetune", "load_train_files", "parse_args"]
