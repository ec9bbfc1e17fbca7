"""What `trine mine`, `trine score` and `trine filter` share: reading a training file, streaming
its raw rows, writing JSONL atomically (never over the input), and the encoder's outputs as arrays.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from typing import Any, TextIO

import numpy as np

from trine.io import atomic_file, check_output_path
from trine.textfiles import open_text
from trine.training.data import DataError, Record, read_file


def check_output(inputs: str | list[str | None], output_file: str, what: str = "output_file") -> None:
    """The output may never be an input (nor the same file through another path, nor a link or a
    folder): :func:`trine.io.check_output_path`."""
    check_output_path(output_file, inputs=[inputs] if isinstance(inputs, str) else inputs, kind="file", what=what)


def read_records(path: str) -> list[Record]:
    """Every record of a training file, validated; every problem raised at once as file:line: field."""
    problems: list[str] = []
    records = read_file(path, problems)[0]
    if problems:
        raise DataError(problems)
    if not records:
        raise DataError([f"{path}: no records"])
    return records


def iter_raw_rows(path: str) -> Iterator[dict[str, Any]]:
    """The file's JSON objects in order (blank lines skipped, as ``read_file`` does), one at a time.

    Used after :func:`read_records` validated the file, so that output rows keep every field of
    their input row without holding the whole file twice.
    """
    with open_text(path) as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def atomic_jsonl(path: str) -> contextlib.AbstractContextManager[TextIO]:
    """A text handle on a temp file beside ``path``; it becomes ``path`` only if the block succeeds."""
    return atomic_file(path, "w")


def write_row(f: TextIO, row: dict[str, Any]) -> None:
    f.write(json.dumps(row, ensure_ascii=False) + "\n")


def dense_array(encoded: Any) -> np.ndarray:
    """Dense vectors from ``Embedder.encode*`` (an array) or ``M3Embedder.encode*`` (a dict)."""
    vecs = encoded["dense_vecs"] if isinstance(encoded, dict) else encoded
    if vecs is None:
        raise ValueError("the encoder returned no dense vectors")
    return np.ascontiguousarray(np.asarray(vecs, dtype=np.float32))


def is_m3(embedder: Any) -> bool:
    """True for an ``M3Embedder`` (three outputs), False for a dense ``Embedder``."""
    from trine.inference.embedder import M3Embedder

    return isinstance(embedder, M3Embedder)


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
