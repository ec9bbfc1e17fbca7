"""The one rule for a text trine encodes, wherever it comes from (a corpus line, a training record, a query
file, a server request): it holds a character that is not white space, and it is valid Unicode (JSON's
``"\\ud800"`` escape gives a lone surrogate, which no tokenizer can encode)."""

from __future__ import annotations

import functools
import re
import string

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


@functools.lru_cache(maxsize=256)
def _template_problem(template: str, fields: int) -> str | None:
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as err:  # a lone brace: "Single '{' encountered in format string"
        return f"{err} (write a literal brace as {{{{ or }}}})"
    names = [name for _, name, _, _ in parts if name is not None]
    for _, name, spec, conversion in parts:
        if name is None:
            continue
        if not (name == "" or name.isdigit()):
            return (f"{{{name}}}: only the plain fields {{}} (or {{0}}..{{{fields - 1}}}) are allowed, no names, "
                    "attributes or indexes")
        if spec or conversion:
            return f"{{{name}{'!' + conversion if conversion else ''}{':' + spec if spec else ''}}}: no format " \
                   "spec or conversion is allowed (plain {} fields only)"
    shown = repr(template if len(template) <= 80 else template[:77] + "...")
    if len(names) != fields:
        return f"{shown} has {len(names)} field{'s' * (len(names) != 1)}, needs exactly {fields}" + (
            " ({}{}: the instruction, then the text)" if fields == 2 else "")
    if any(names) and not all(names):
        return f"{shown} mixes automatic {{}} and numbered {{0}} fields"
    if all(names) and sorted(int(n) for n in names) != list(range(fields)):
        return f"{shown}: numbered fields must be {{0}}..{{{fields - 1}}}, each once"
    return None


def check_template(template: str, name: str = "instruction_format", fields: int = 2) -> str:
    """``template`` if it is a safe :meth:`str.format` template of exactly ``fields`` plain fields (``{}`` or
    ``{0}``..., each once; literal braces doubled), else :class:`ValueError` naming ``name``. Templates come from
    requests and files: a format spec (``{0:>1000000000}``) would make one short template allocate gigabytes, and
    attribute or index access (``{0.__class__}``) reads objects, so only plain fields pass."""
    if not isinstance(template, str):
        raise ValueError(f"{name}: must be a string, got {type(template).__name__}")
    problem = _template_problem(template, fields)
    if problem:
        raise ValueError(f"{name}: {problem}")
    return template


def format_instruction(template: str, instruction: str, text: str, name: str = "instruction_format") -> str:
    """``template`` (FlagEmbedding's ``{}{}``: the instruction, then the text; a literal ``\\n`` in it is a
    newline, as FlagEmbedding's command lines pass it) filled with ``instruction`` and ``text``, after
    :func:`check_template`."""
    template = template.replace("\\n", "\n")
    check_template(template, name)
    return template.format(instruction, text)
