"""The package's boundaries, read from the source with ``ast`` (nothing is imported): rules do not import each
other, only the CLI touches click, the CLI reaches the library through ``api`` alone, the weight math knows no graph
and no Caffe, and every module over 400 lines says in its docstring why it stays one module."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "deeprebirth"
MAX_LINES = 400
# the sentence a module over MAX_LINES carries in its docstring, followed by its reason
MARKER = "Kept as one module:"
GENERATED = {"caffe_pb2.py"}


def _modules(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.py") if p.name not in GENERATED)


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path, root: Path = ROOT) -> set[str]:
    """Every module ``path`` imports, at the top or inside a function, as absolute dotted names; ``from a import b``
    yields both ``a`` and ``a.b`` (``b`` may be a submodule)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = _module_name(path, root).split(".")
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
    return found


def _rule_modules() -> dict[str, Path]:
    helpers = {"__init__", "base", "_shared"}
    return {f"deeprebirth.rules.{p.stem}": p for p in _modules(PACKAGE / "rules") if p.stem not in helpers}


def test_the_parser_sees_every_kind_of_import(tmp_path: Path) -> None:
    # the checks below are only as good as _imports: a relative, a nested and a from-import must all show up
    folder = tmp_path / "deeprebirth" / "rules"
    folder.mkdir(parents=True)
    module = folder / "x.py"
    module.write_text("import click\nfrom . import merge_pooling_into_conv\n"
                      "def f():\n    from deeprebirth.graph import Graph\n")
    found = _imports(module, tmp_path)
    assert {"click", "deeprebirth.rules.merge_pooling_into_conv", "deeprebirth.graph"} <= found


def test_there_are_rules_to_check() -> None:
    assert len(_rule_modules()) >= 5


@pytest.mark.parametrize("name", sorted(_rule_modules()))
def test_no_rule_imports_another_rule(name: str) -> None:
    rules = _rule_modules()
    others = {other for other in rules if other != name}
    assert not _imports(rules[name]) & others, f"{name} imports another rule; shared code goes in rules/_shared.py"


def test_only_the_cli_imports_click() -> None:
    offenders = [str(p.relative_to(ROOT)) for p in _modules(PACKAGE)
                 if not p.name.startswith("cli") or p.parent != PACKAGE
                 if any(i == "click" or i.startswith("click.") for i in _imports(p))]
    assert offenders == []


def test_the_cli_reaches_the_library_through_the_api_only() -> None:
    ours = {i for i in _imports(PACKAGE / "cli.py") if i == "deeprebirth" or i.startswith("deeprebirth.")}
    # ``from deeprebirth import api`` yields "deeprebirth" and "deeprebirth.api"
    allowed = {i for i in ours if i == "deeprebirth" or i == "deeprebirth.api"
               or i.split(".")[1].startswith("cli_")}
    assert ours - allowed == set()
    assert "deeprebirth.api" in ours


def _graph_or_caffe(name: str) -> bool:
    top = name.split(".")
    return (name.startswith(("deeprebirth.caffe", "deeprebirth.graph", "deeprebirth.model", "deeprebirth.shapes",
                             "google.protobuf"))
            or top[0] in ("caffe", "networkx", "onnx"))


def test_the_weight_math_knows_no_graph_and_no_caffe() -> None:
    offenders = {}
    for path in _modules(PACKAGE / "weights"):
        hits = sorted(i for i in _imports(path) if _graph_or_caffe(i))
        if hits:
            offenders[path.name] = hits
    assert offenders == {}


def test_a_long_module_says_why_it_stays_one() -> None:
    unexplained = []
    for path in [*_modules(PACKAGE), *_modules(ROOT / "examples")]:
        lines = len(path.read_text().splitlines())
        if lines <= MAX_LINES:
            continue
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        if MARKER not in " ".join(doc.split()):
            unexplained.append(f"{path.relative_to(ROOT)} ({lines} lines)")
    assert unexplained == [], f"split these, or state the reason in the docstring after {MARKER!r}"
