"""Reading a user's UTF-8 text files (training data, corpora, test sets) line by line, so that a
byte that is not UTF-8 is reported with its file and line instead of stopping with a traceback."""

from __future__ import annotations

import re
from typing import TextIO

_UNDECODABLE = re.compile("[\udc80-\udcff]")  # bytes that are not UTF-8, as ``surrogateescape`` reads them


def open_text(path: str) -> TextIO:
    """A UTF-8 text file (a leading byte-order mark skipped), read line by line; a byte that is not
    UTF-8 does not stop the reading: :func:`not_utf8` finds it in its line."""
    return open(path, encoding="utf-8-sig", errors="surrogateescape")


def not_utf8(line: str) -> str | None:
    """For a line read with :func:`open_text`: ``"not UTF-8: ..."`` naming the first bad byte, or None."""
    found = _UNDECODABLE.search(line)
    if found is None:
        return None
    return f"not UTF-8: byte 0x{ord(found.group()) - 0xDC00:02x} at column {found.start() + 1}"
