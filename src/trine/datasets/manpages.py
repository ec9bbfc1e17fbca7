"""Real English retrieval text from Debian's man pages (packages ``manpages`` and ``manpages-dev``).

Each page gives a query (the NAME one-liner after " - ") and a document (its DESCRIPTION
section). The .deb files are fetched with ``apt-get download`` (no root needed) and unpacked
with ``dpkg-deb -x`` into a cache folder; nothing is installed system-wide.

``apt-get download`` needs the system's package lists. On a machine that has none yet (a fresh
container), trine runs ``apt-get update`` only when asked: ``update_package_lists=True`` or the
environment variable ``TRINE_APT_UPDATE=1`` (the demo and the test suite ask), as root, and says
so in the log; otherwise the error gives the command to run.
"""

from __future__ import annotations

import glob
import gzip
import json
import logging
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass

PACKAGES = ("manpages", "manpages-dev")
DEFAULT_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "trine", "manpages")
APT_UPDATE = ("apt-get", "update", "-qq")
APT_UPDATE_ENV = "TRINE_APT_UPDATE"

logger = logging.getLogger(__name__)


def apt_update_asked(update_package_lists: bool | None = None) -> bool:
    """``update_package_lists``, or (None) the environment variable ``TRINE_APT_UPDATE`` (1/true/yes)."""
    if update_package_lists is not None:
        return bool(update_package_lists)
    return os.environ.get(APT_UPDATE_ENV, "").strip().lower() in ("1", "true", "yes")


@dataclass(frozen=True)
class ManPage:
    page: str  # e.g. "chmod.2"
    name: str  # the NAME one-liner after " - "
    description: str  # the DESCRIPTION section as plain text


_FONT = re.compile(r"\\f(\[[^\]]*\]|\(..|.)")
_ESCAPES = [
    (re.compile(r"\\\(em|\\\(en"), " - "),
    (re.compile(r"\\\((aq|cq|oq)"), "'"),
    (re.compile(r"\\\((dq|lq|rq)"), '"'),
    (re.compile(r"\\\(bu"), "*"),
    (re.compile(r"\\\(.."), " "),
    (re.compile(r"\\\[[^\]]*\]"), " "),
    (re.compile(r"\\[-e]"), lambda m: "-" if m.group(0) == "\\-" else "\\"),
    (re.compile(r"\\[&|^/,%:~ 0]"), ""),
    (re.compile(r'\\".*$'), ""),
]
_TEXT_MACROS = {"B", "I", "BR", "RB", "IR", "RI", "BI", "IB", "SM", "SB", "UR", "MT", "TQ", "IP", "TP"}


def _plain(line: str) -> str:
    line = _FONT.sub("", line)
    for pattern, repl in _ESCAPES:
        line = pattern.sub(repl, line)
    return line.replace("\\", "")


def parse_roff(text: str) -> dict[str, str]:
    """Section name -> plain text, for the sections of one roff man page."""
    sections: dict[str, list[str]] = {}
    current = None
    for raw in text.splitlines():
        if raw.startswith(('.\\"', "'\\\"")):
            continue
        if raw.startswith((".SH", ".Sh")):
            current = raw[3:].strip().strip('"').upper()
            sections.setdefault(current, [])
            continue
        if current is None:
            continue
        if raw.startswith("."):
            macro, _, rest = raw[1:].partition(" ")
            if macro in _TEXT_MACROS and rest:
                rest = " ".join(p.strip('"') for p in re.findall(r'"[^"]*"|\S+', rest))
                if macro in {"BR", "RB", "IR", "RI", "BI", "IB"}:
                    parts = re.findall(r'"[^"]*"|\S+', raw[1:].partition(" ")[2])
                    rest = "".join(p.strip('"') for p in parts)
                sections[current].append(_plain(rest))
            continue
        sections[current].append(_plain(raw))
    return {k: re.sub(r"\s+", " ", " ".join(v)).strip() for k, v in sections.items()}


def _fetch(cache_dir: str, update_package_lists: bool | None = None) -> str:
    root = os.path.join(cache_dir, "root")
    if os.path.isdir(os.path.join(root, "usr", "share", "man")):
        return root
    os.makedirs(cache_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        download = ["apt-get", "download", *PACKAGES]
        update = " ".join(APT_UPDATE)
        try:
            done = subprocess.run(download, cwd=tmp, capture_output=True, text=True)
            if done.returncode != 0 and apt_update_asked(update_package_lists):
                # A fresh machine has no package lists yet: fetch them (asked for), then retry once.
                if not (hasattr(os, "geteuid") and os.geteuid() == 0):
                    raise RuntimeError(
                        f"could not fetch Debian packages {PACKAGES} with `{' '.join(download)}`: "
                        f"{done.stderr.strip()}\n(`{update}` was asked for but needs root: run `sudo {update}`, "
                        "then retry)"
                    )
                logger.warning("`%s` failed; running `%s` (as root, asked by update_package_lists or %s=1) "
                               "to fetch Debian's package lists", " ".join(download), update, APT_UPDATE_ENV)
                subprocess.run(list(APT_UPDATE), check=True, capture_output=True, text=True)
                done = subprocess.run(download, cwd=tmp, capture_output=True, text=True)
            done.check_returncode()
        except (OSError, subprocess.CalledProcessError) as err:
            detail = getattr(err, "stderr", "") or str(err)
            raise RuntimeError(
                f"could not fetch Debian packages {PACKAGES} with `{' '.join(download)}`: {detail.strip()}\n"
                f"(the package lists may be missing: run `{update}` as root once, then retry; or let trine run "
                f"it: {APT_UPDATE_ENV}=1 or update_package_lists=True)"
            ) from err
        staging = os.path.join(tmp, "root")
        for deb in glob.glob(os.path.join(tmp, "*.deb")):
            subprocess.run(["dpkg-deb", "-x", deb, staging], check=True)
        os.replace(staging, root)
    return root


def load_manpages(cache_dir: str = DEFAULT_CACHE, min_description_chars: int = 40, *,
                  update_package_lists: bool | None = None) -> list[ManPage]:
    """All English man pages with a NAME one-liner and a DESCRIPTION, sorted by page name.

    Parsed pages are cached as JSONL next to the unpacked packages. ``update_package_lists``: when
    ``apt-get download`` fails, run ``apt-get update`` (as root, logged) and retry; None: as the
    environment variable ``TRINE_APT_UPDATE`` says (default: no, the error names the command).
    """
    cached = os.path.join(cache_dir, "pages.jsonl")
    if os.path.exists(cached):
        with open(cached) as f:
            return [ManPage(**json.loads(line)) for line in f]
    root = _fetch(cache_dir, update_package_lists)
    pages = []
    for path in sorted(glob.glob(os.path.join(root, "usr", "share", "man", "man*", "*.gz"))):
        with gzip.open(path, "rt", errors="replace") as f:
            text = f.read()
        if text.lstrip().startswith(".so "):
            continue  # a stub that points at another page
        sections = parse_roff(text)
        name_line, description = sections.get("NAME", ""), sections.get("DESCRIPTION", "")
        if " - " not in name_line or len(description) < min_description_chars:
            continue
        name = name_line.split(" - ", 1)[1].strip()
        if name:
            pages.append(ManPage(os.path.basename(path)[: -len(".gz")], name, description))
    tmp = cached + ".tmp"
    with open(tmp, "w") as f:
        for p in pages:
            f.write(json.dumps(p.__dict__) + "\n")
    os.replace(tmp, cached)
    return pages
