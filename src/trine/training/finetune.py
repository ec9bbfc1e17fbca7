"""`trine finetune`: contrastive fine-tuning (and unsupervised pair training) of an embedder.

The command only: what it runs is :mod:`trine.training.finetuning`, the helpers the training
commands share are in :mod:`trine.training.common`; both are re-exported here for older imports.
"""

from __future__ import annotations

import sys

from trine.training.common import (  # noqa: F401  (re-exported)
    collator_options,
    load_data,
    parse_config,
    plan_dataset,
    run_cli,
    train_and_save,
    training_inputs,
)
from trine.training.finetuning import build_trainer, finetune, parse_args  # noqa: F401  (re-exported)


def main(argv: list[str] | None = None, *, debug: bool = False) -> int:
    return run_cli(argv, parse_args, finetune, debug=debug)


if __name__ == "__main__":
    sys.exit(main())
