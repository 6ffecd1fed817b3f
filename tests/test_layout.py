"""The package's boundaries, read from the source with ``ast`` (nothing is imported; the reader is
``scripts/import_graph.py``, which ``scripts/draw_architecture.py`` draws from too): the folders are layers and an
import never runs up the order in LAYERS, no modules import each other in a cycle, rules do not import each other,
only the CLI touches click, the CLI reaches the library through ``api`` alone, the weight math knows no graph and no
Caffe, and every module over 400 lines says in its docstring why it stays one module."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scripts.import_graph import (  # the reader lives beside the drawing script, outside the package
    PACKAGE,
    cycle,
    folder_graph,
    imports,
    module_graph,
    modules,
    unit,
)

# The layers, bottom to top: a folder (or a module at the top of the package) imports only its own layer or the
# ones before it here. New folders and top-level modules must be placed here before anything may import them.
LAYERS = (
    "deeprebirth",  # the package's __init__
    "caffe_pb2",  # generated from proto/caffe.proto
    "errors",  # the one user-facing error type
    "option",  # a user choice declared once (flag, default, help, validation)
    "aliases",  # the shared type aliases
    "weights",  # pure numpy weight math
    "io",  # Caffe's files
    "ir",  # the graph, shapes, layer classes, drawings
    "rules",  # one rule per module
    "rewrite",  # the fixed-point driver
    "caffe",  # running nets in Caffe and OpenCV dnn, isolation, comparison, accuracy, data
    "export",  # ONNX, MNN and ncnn, the runtime registry and sessions, --check
    "measure",  # time per layer and per forward, in Caffe and in any runtime
    "finetune",  # re-learning after a lossy rewrite
    "plan",  # which merges pay: by time, by accuracy risk
    "pipeline",  # a rewrite of files end to end, with its options
    "batch",  # a model zoo in worker processes
    "api",  # the facade the CLI calls
    "cli",  # the click commands
)
GRAPH = module_graph()
MAX_LINES = 400
# the sentence a module over MAX_LINES carries in its docstring, followed by its reason
MARKER = "Kept as one module:"


def _rule_modules() -> dict[str, Path]:
    helpers = {"__init__", "base", "_shared"}
    return {f"deeprebirth.rules.{p.stem}": p for p in modules(PACKAGE / "rules") if p.stem not in helpers}


def _ours(names: set[str]) -> set[str]:
    return {n for n in names if n == "deeprebirth" or n.startswith("deeprebirth.")}


def test_the_parser_sees_every_kind_of_import(tmp_path: Path) -> None:
    # the checks below are only as good as imports(): a relative, a nested and a from-import must all show up
    folder = tmp_path / "deeprebirth" / "rules"
    folder.mkdir(parents=True)
    module = folder / "x.py"
    module.write_text("import click\nfrom . import merge_pooling_into_conv\n"
                      "def f():\n    from deeprebirth.ir.graph import Graph\n")
    found = imports(module, tmp_path)
    assert {"click", "deeprebirth.rules.merge_pooling_into_conv", "deeprebirth.ir.graph"} <= found


def test_every_folder_has_its_place_in_the_layers() -> None:
    found = {unit(name) for name in GRAPH} | {"caffe_pb2"}
    assert found == set(LAYERS), "place new folders and top-level modules in LAYERS; remove gone ones"


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_imports_never_run_up_the_layers(module: str) -> None:
    # every import counts, function-local ones included: a lazy import is still a dependency
    level = LAYERS.index(unit(module))
    upward = sorted(t for t in GRAPH[module] if LAYERS.index(unit(t)) > level)
    assert upward == [], f"{module} ({unit(module)}) imports from a layer above it"


def test_no_import_cycles_between_modules() -> None:
    assert cycle(GRAPH) == []


def test_no_import_cycles_between_folders() -> None:
    assert cycle(folder_graph()) == []


def test_a_cycle_is_found_when_there_is_one() -> None:
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) == []


def test_there_are_rules_to_check() -> None:
    assert len(_rule_modules()) >= 5


@pytest.mark.parametrize("name", sorted(_rule_modules()))
def test_no_rule_imports_another_rule(name: str) -> None:
    rules = _rule_modules()
    others = {other for other in rules if other != name}
    assert not imports(rules[name]) & others, f"{name} imports another rule; shared code goes in rules/_shared.py"


def test_only_the_cli_imports_click() -> None:
    offenders = [str(p.relative_to(ROOT)) for p in modules(PACKAGE) if p.parent != PACKAGE / "cli"
                 if any(i == "click" or i.startswith("click.") for i in imports(p))]
    assert offenders == []


def test_the_cli_reaches_the_library_through_the_api_only() -> None:
    ours = set().union(*(_ours(imports(p)) for p in modules(PACKAGE / "cli")))
    # ``from deeprebirth import api`` yields "deeprebirth" and "deeprebirth.api"
    allowed = {i for i in ours if i in ("deeprebirth", "deeprebirth.api")
               or i.startswith(("deeprebirth.api.", "deeprebirth.cli"))}
    assert ours - allowed == set()
    assert "deeprebirth.api" in ours


def test_no_library_module_imports_the_api() -> None:
    importers = [name for name, targets in GRAPH.items() if "deeprebirth.api" in targets
                 and unit(name) != "cli"]
    assert importers == []


def _graph_or_caffe(name: str) -> bool:
    top = name.split(".")
    return (name.startswith(("deeprebirth.caffe", "deeprebirth.ir", "deeprebirth.io", "google.protobuf"))
            or top[0] in ("caffe", "networkx", "onnx"))


def test_the_weight_math_knows_no_graph_and_no_caffe() -> None:
    offenders = {}
    for path in modules(PACKAGE / "weights"):
        hits = sorted(i for i in imports(path) if _graph_or_caffe(i))
        if hits:
            offenders[path.name] = hits
    assert offenders == {}


def test_a_long_module_says_why_it_stays_one() -> None:
    unexplained = []
    for path in [*modules(PACKAGE), *modules(ROOT / "examples")]:
        lines = len(path.read_text().splitlines())
        if lines <= MAX_LINES:
            continue
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        if MARKER not in " ".join(doc.split()):
            unexplained.append(f"{path.relative_to(ROOT)} ({lines} lines)")
    assert unexplained == [], f"split these, or state the reason in the docstring after {MARKER!r}"


def test_the_committed_drawing_shows_the_imports_as_they_are() -> None:
    """docs/architecture.svg holds one titled edge per arrow (graphviz writes ``a->b`` as each edge's title): they
    must be the arrows scripts/draw_architecture.py draws from the code today, else the picture is stale (redraw
    it with ``python scripts/draw_architecture.py``)."""
    import html
    import re

    from scripts.draw_architecture import dot_source
    from scripts.import_graph import folder_graph

    drawn = {html.unescape(t) for t in re.findall(r"<title>([^<]*&#45;&gt;[^<]*)</title>",
                                                   (ROOT / "docs" / "architecture.svg").read_text())}
    wanted = {f"{a}->{b}" for a, b in re.findall(r'^  "([^"]+)" -> "([^"]+)"', dot_source(folder_graph()), re.MULTILINE)}
    assert wanted and drawn == wanted, f"redraw docs/architecture.svg: missing {wanted - drawn}, stale {drawn - wanted}"
