"""The exceptions trine raises for a user's mistakes (bad input, bad options, unsafe outputs).

Every one of them is a ``ValueError`` and means "nothing was trained or written": the command line
prints its message on one line-group and exits with code 2 (1 is kept for failures while running).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator


class UserError(ValueError):
    """Bad input or options: the message names the path (and line / field where there is one)."""


class OptionError(UserError):
    """An option has the wrong type or value: the message names the option, the value and what was expected."""


class InputError(UserError):
    """A file or folder the user gave cannot be read: ``path[:line]: field: message``."""


class MissingInputError(InputError, FileNotFoundError):
    """A file or folder the user named does not exist (also a ``FileNotFoundError``)."""


class NonFiniteOutputError(UserError):
    """The model gave a NaN or infinite vector or weight (float16 overflowing, say, with finite weights):
    nothing is written or returned. A user's error (exit code 2), not a failure while running: the same
    model, precision and text give it again; the message says what to change."""


class OutputPathError(UserError):
    """An output path would replace an input, the working folder, an ancestor of either, or a folder
    trine did not write (or one it wrote, without ``overwrite``)."""


def first_line(err: BaseException) -> str:
    """The first line of an error's message (libraries' messages run on with advice that does not apply)."""
    text = str(err).strip()
    return text.splitlines()[0].strip() if text else type(err).__name__


def report_user_errors(work: Callable[[], int], *, debug: bool = False,
                       words: Callable[[str], str] | None = None) -> int:
    """The command line's one exit-code policy: ``work()``'s own code; a :class:`UserError` (bad
    input, bad options, an unsafe output) prints ``error: <message>`` on stderr and gives 2, with no
    traceback (``debug``: raised again, traceback and all). Any other error propagates (exit 1).
    ``words`` puts the message in the command line's words (``--heads random`` where the library
    says ``init_missing_heads='random'``: :func:`trine.config.command_line_words`)."""
    try:
        return work()
    except UserError as err:
        if debug:
            raise
        print(f"error: {words(str(err)) if words else err}", file=sys.stderr)
        return 2


@contextlib.contextmanager
def options_checked() -> Iterator[None]:
    """A ``ValueError`` about the arguments a command passed to the library (raised before anything
    was written: building a trainer, an embedder, a config) is the user's :class:`OptionError`
    (exit 2, no traceback); errors that already are :class:`UserError` pass unchanged."""
    try:
        yield
    except UserError:
        raise
    except ValueError as err:
        raise OptionError(str(err)) from err
