"""The import graph of src/trine, read with ``ast`` (nothing is imported): data at the bottom,
curation below training, and no module importing an entry point."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src"
# Compatibility re-exports kept for users and tests: nothing in src/ may depend on them.
SHIMS = {"trine.training.data"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def parse_modules() -> dict[str, tuple[Path, ast.Module]]:
    return {module_name(p): (p, ast.parse(p.read_text(encoding="utf-8"), str(p)))
            for p in sorted((SRC / "trine").rglob("*.py"))}


MODULES = parse_modules()


def imported(name: str) -> set[str]:
    """The trine modules ``name`` imports anywhere in its body (function-level imports too): each
    ``from X import Y`` counts X, and X.Y when that is a module."""
    path, tree = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in MODULES)
        elif (isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == ["_EXPORTS"]
              and isinstance(node.value, ast.Dict)):  # a lazy export table (trine._lazy): name -> module
            found.update(v.value for v in node.value.values if isinstance(v, ast.Constant))
    return {m for m in found if m in MODULES}


def loaded(name: str) -> set[str]:
    """What importing ``name`` itself runs: ``name`` and every package above it."""
    parts = name.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts) + 1)}


GRAPH = {name: imported(name) for name in MODULES}


def reachable(start: str) -> set[str]:
    """Every module that importing ``start`` may run (packages above each import included)."""
    seen: set[str] = set()
    todo = [start]
    while todo:
        for m in loaded(todo.pop()):
            if m not in seen:
                seen.add(m)
                todo.extend(GRAPH[m])
    return seen


def is_entry_point(name: str) -> bool:
    """A module run as a program: it holds an ``if __name__ == "__main__":`` block."""
    return any(isinstance(node, ast.If) and "__main__" in ast.unparse(node.test) for node in MODULES[name][1].body)


# ... or the console script (`trine = "trine.cli:main"` in pyproject.toml), a package of command modules
ENTRY_POINTS = {name for name in MODULES if is_entry_point(name)} | {"trine.cli"}


def test_the_graph_is_read():
    assert {"trine.cli", "trine.__main__", "trine.training.finetune", "trine.training.pretrain",
            "trine.training.reranker"} <= ENTRY_POINTS
    assert "trine.cli" in GRAPH["trine.__main__"]
    assert "trine.data.reader" in reachable("trine.curation.mining")


@pytest.mark.parametrize("name", sorted(m for m in MODULES if m.startswith("trine.curation")))
def test_curation_sits_below_training(name):
    assert not {m for m in reachable(name) if m == "trine.training" or m.startswith("trine.training.")}


@pytest.mark.parametrize("name", sorted(m for m in MODULES if m.startswith("trine.data")))
def test_data_sits_at_the_bottom(name):
    """The data module imports nothing of trine's but its errors."""
    assert GRAPH[name] <= {"trine.errors"} | {m for m in MODULES if m.startswith("trine.data")}


def test_no_module_imports_an_entry_point():
    allowed = {("trine.__main__", "trine.cli")}  # ``python -m trine`` is ``trine``
    offenders = sorted((name, m) for name, deps in GRAPH.items() for m in deps
                       if m in ENTRY_POINTS and m != name and (name, m) not in allowed
                       and not name.startswith(m + "."))  # a command module inside its own package
    assert not offenders


def test_nothing_in_src_uses_a_compatibility_shim():
    assert not sorted((name, m) for name, deps in GRAPH.items() for m in deps if m in SHIMS and name not in SHIMS)


# ------------------------------------------------------------------ no loops, and the layers the page states
ARCHITECTURE = SRC.parent / "docs" / "architecture.md"
# Import cycles allowed by name (none): an entry here is a known defect, never a silent exception.
KNOWN_CYCLES: list[set[str]] = []


def strongly_connected(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components of ``graph`` larger than one module (Tarjan's algorithm, iterative:
    the graph is deep enough for Python's recursion limit to matter). A package importing its own
    submodules (``from trine.cli import index`` in ``trine/cli/__init__.py``) counts itself, harmlessly."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[set[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, edges = work[-1]
            nxt = next(edges, None)
            if nxt is not None:
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph.get(nxt, ())))))
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(component)
    return found


def test_the_cycle_finder_finds_cycles():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"e"}, "f": {"d"}}
    assert sorted(map(sorted, strongly_connected(graph))) == [["a", "b", "c"]]
    assert strongly_connected({"a": {"b"}, "b": set()}) == []


def test_no_module_imports_its_way_back_into_itself():
    """No strongly connected component larger than one module, function-level imports included: a piece two
    modules share moves down a layer instead of one of them importing the other inside a function."""
    cycles = [sorted(c) for c in strongly_connected(GRAPH) if c not in KNOWN_CYCLES]
    assert not cycles, f"import cycles: {cycles}"


def group_of(name: str) -> str:
    """The layer unit of a module: the package or module right under ``trine`` (``trine`` for the root)."""
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else "trine"


def stated_layers() -> list[list[str]]:
    """The layer table of docs/architecture.md's "Layers" section (its first fenced block), bottom first:
    one line per layer, ``<number>  <name> <name> ...``."""
    text = ARCHITECTURE.read_text(encoding="utf-8")
    section = text.split("\n## Layers\n", 1)[1].split("\n## ", 1)[0]
    block = section.split("```", 2)[1]
    layers = []
    for line in block.splitlines()[1:]:
        if line.strip():
            number, *names = line.split()
            assert number == str(len(layers)), f"docs/architecture.md Layers: line {line!r} out of order"
            layers.append(names)
    return layers


LAYERS = stated_layers()
RANK = {name: i for i, names in enumerate(LAYERS) for name in names}


def test_the_page_places_every_package_once():
    stated = [name for names in LAYERS for name in names]
    assert len(stated) == len(set(stated)), "a package is in two layers"
    assert set(stated) == {group_of(m) for m in MODULES}, "the page's layers and src/trine's packages differ"


def test_every_import_goes_down_the_stated_layers():
    """A module imports modules of its own package or of a lower layer only (docs/architecture.md, "Layers")."""
    offenders = sorted((name, m) for name, deps in GRAPH.items() for m in deps
                       if group_of(m) != group_of(name) and RANK[group_of(m)] >= RANK[group_of(name)])
    assert not offenders, f"imports against the stated layers: {offenders}"
