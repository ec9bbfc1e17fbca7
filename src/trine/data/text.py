"""The one rule for a text trine encodes, wherever it comes from (a corpus line, a training record, a query
file, a server request): it holds a character that is not white space, and it is valid Unicode (JSON's
``"\\ud800"`` escape gives a lone surrogate, which no tokenizer can encode)."""

from __future__ import annotations

import re

_SURROGATE = re.compile("[\ud800-\udfff]")


def text_problem(text: str) -> str | None:
    """Why ``text`` cannot be encoded (``"empty text"``, ``"only white space"``, ``"lone surrogate U+D800 at
    character 1 (not valid Unicode)"``), or None for a good text."""
    if not text:
        return "empty text"
    found = _SURROGATE.search(text)
    if found is not None:
        return f"lone surrogate U+{ord(found.group()):04X} at character {found.start() + 1} (not valid Unicode)"
    if text.isspace():
        return "only white space"
    return None
