"""Progress bars: trine's one ``bar`` (tqdm) and the one switch that silences every bar (``--quiet``).

``silence()`` turns off trine's bars and those of huggingface_hub (downloads) and transformers
(checkpoint loading, the Trainer's) in this process and in the processes it starts (torchrun ranks,
device-pool workers inherit the environment), without importing either library when it is not loaded yet.
"""

from __future__ import annotations

import os
import sys
from typing import Any

_silenced = False


def silence() -> None:
    """No progress bar from here on: trine's, huggingface_hub's, transformers' and any tqdm's created later."""
    global _silenced
    _silenced = True
    # read when huggingface_hub / tqdm are first imported (here or in a child process)
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    os.environ["TQDM_DISABLE"] = "1"
    # transformers' warnings (its checkpoint LOAD REPORT of keys a head does not use) are chatter to a quiet
    # run too; its errors still show. A verbosity the user set is kept.
    user_verbosity = "TRANSFORMERS_VERBOSITY" in os.environ
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    if "transformers" in sys.modules:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
        if not user_verbosity:
            transformers_logging.set_verbosity_error()


def silenced() -> bool:
    """Whether :func:`silence` was called (also true in a child of a silenced process)."""
    return _silenced or os.environ.get("TQDM_DISABLE", "") == "1"


def bar(*args: Any, disable: bool = False, **kwargs: Any) -> Any:
    """A tqdm bar (``tqdm.auto``), off when ``disable`` or after :func:`silence`."""
    from tqdm.auto import tqdm

    return tqdm(*args, disable=disable or silenced(), **kwargs)


def step(message: str) -> None:
    """One line for a phase that has no bar (a step of a pipeline), on stderr; silenced with the bars."""
    if not silenced():
        print(message, file=sys.stderr, flush=True)
