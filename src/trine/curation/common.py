"""What `trine mine`, `trine score` and `trine filter` share: reading a training file, streaming
its raw rows, writing JSONL atomically (never over the input), quieting the encoder's progress bar.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from typing import Any, TextIO

import numpy as np

from trine.data.records import iter_raw_rows, read_records  # noqa: F401  (the curation commands import them here)
from trine.io import atomic_file, check_output_path


def check_output(inputs: str | list[str | None], output_file: str, what: str = "output_file") -> None:
    """The output may never be an input (nor the same file through another path, nor a link or a
    folder): :func:`trine.io.check_output_path`."""
    check_output_path(output_file, inputs=[inputs] if isinstance(inputs, str) else inputs, kind="file", what=what)


def atomic_jsonl(path: str) -> contextlib.AbstractContextManager[TextIO]:
    """A text handle on a temp file beside ``path``; it becomes ``path`` only if the block succeeds."""
    return atomic_file(path, "w")


def write_row(f: TextIO, row: dict[str, Any]) -> None:
    f.write(json.dumps(row, ensure_ascii=False) + "\n")


@contextlib.contextmanager
def quiet(embedder: Any) -> Iterator[None]:
    """Silence the encoder's own progress bar for many small calls (the caller shows one bar)."""
    old = getattr(embedder, "show_progress", None)
    if old is None:
        yield
        return
    embedder.show_progress = False
    try:
        yield
    finally:
        embedder.show_progress = old


def percentiles(xs: np.ndarray | list[float]) -> str:
    xs = np.asarray(xs, dtype=np.float64)
    if xs.size == 0:
        return "none"
    p = np.percentile(xs, [5, 50, 95])
    return f"p5 {p[0]:.3f}  median {p[1]:.3f}  p95 {p[2]:.3f}  (n={xs.size})"
