"""mkdocs hook: the command-line reference page (``cli.md``), rendered from trine's own parsers at every build
(:func:`trine.cli.reference.render_markdown`), so it always documents the code being built."""

from __future__ import annotations

import sys
from pathlib import Path

from mkdocs.structure.files import File, Files

# The tree being documented, before any installed copy of trine.
SRC = str(Path(__file__).resolve().parents[2] / "src")


def on_files(files: Files, config) -> Files:
    if SRC not in sys.path:
        sys.path.insert(0, SRC)
    from trine.cli.reference import render_markdown

    files.append(File.generated(config, "cli.md", content=render_markdown()))
    return files
