"""File-writing helpers shared by checkpoints, indexes and datasets."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temp folder beside ``path``; on success it replaces ``path`` whole, on error it is removed."""
    path = os.path.abspath(os.fspath(path))
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-" + os.path.basename(path) + "-", dir=parent)
    try:
        yield tmp
        if os.path.exists(path):
            old = tempfile.mkdtemp(prefix=".old-" + os.path.basename(path) + "-", dir=parent)
            os.rmdir(old)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_folder(path: str | os.PathLike, write: Callable[[str], None], *, atomic: bool = True) -> None:
    """``write(folder)`` into ``path``; ``atomic``: the folder appears whole or not at all (written
    aside, then renamed over any old one). Trainers write into their own checkpoint folders with
    ``atomic=False``."""
    if not atomic:
        os.makedirs(path, exist_ok=True)
        write(os.fspath(path))
        return
    with atomic_folder(path) as tmp:
        write(tmp)
