"""Lazy package exports (PEP 562): a package names what it exports and where it lives, and the
module is imported on first use. ``import trine`` (and ``trine --help``) then costs what the
package itself needs, not torch, transformers, FAISS and every model family at once."""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from typing import Any


def lazy_exports(package: str, exports: dict[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for ``package``: ``exports`` maps each public name to the
    module that defines it (one dict, so another name is one more line). A name is imported on
    first access and cached in the package's namespace; a submodule's name imports the submodule;
    any other name raises AttributeError as usual."""
    namespace = importlib.import_module(package).__dict__

    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            # ``trine.scoring`` after a bare ``import trine``: the eager package imported its
            # submodules as a side effect, and code may still lean on that
            if not name.startswith("_") and importlib.util.find_spec(f"{package}.{name}") is not None:
                return importlib.import_module(f"{package}.{name}")
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(exports))

    return __getattr__, __dir__
