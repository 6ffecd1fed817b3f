"""The package's imports as the code states them, read with ``ast`` (nothing is imported): what
``tests/test_layout.py`` checks and ``scripts/draw_architecture.py`` draws."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "deeprebirth"
GENERATED = {"caffe_pb2.py"}


def modules(folder: Path = PACKAGE) -> list[Path]:
    return sorted(p for p in folder.rglob("*.py") if p.name not in GENERATED)


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: Path, root: Path = ROOT) -> set[str]:
    """Every module ``path`` imports, at the top or inside a function, as absolute dotted names; ``from a import b``
    yields both ``a`` and ``a.b`` (``b`` may be a submodule). A string that is a dotted name in the package counts
    too: it is how ``importlib`` imports on first use (``api._ELSEWHERE``)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module_name(path, root).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
        elif (isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("deeprebirth.")
              and all(part.isidentifier() for part in node.value.split("."))):
            found.add(node.value)
    return found


def module_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """Module -> the package's modules it imports (names resolved to the module that defines them). A package's
    ``__init__`` is left out of its own submodules' imports: Python runs it first anyway, it is no dependency."""
    paths = {module_name(p, root): p for p in modules(root / "deeprebirth")}
    graph: dict[str, set[str]] = {}
    for name, path in paths.items():
        targets = set()
        for imported in imports(path, root):
            while imported and imported not in paths:
                imported = imported.rpartition(".")[0]
            if imported and imported != name and not name.startswith(imported + "."):
                targets.add(imported)
        graph[name] = targets
    return graph


def unit(module: str) -> str:
    """The folder a module lives in, or the module itself at the top of the package: ``deeprebirth.ir.graph`` ->
    ``ir``, ``deeprebirth.api`` -> ``api``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def folder_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """The same imports between folders (and top-level modules)."""
    graph: dict[str, set[str]] = {}
    for module, targets in module_graph(root).items():
        graph.setdefault(unit(module), set()).update(unit(t) for t in targets if unit(t) != unit(module))
    return graph


def cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle of ``graph`` (its nodes, first repeated last), or [] when there is none."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state and (found := visit(target)):
                return found
        state[node] = 2
        path.pop()
        return []

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return []
