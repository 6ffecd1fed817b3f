"""The tier table in tests/conftest.py stays true: every row names a test that exists, and every marker it applies
is registered, so a renamed test cannot silently fall out of its tier."""

from __future__ import annotations

import ast
import configparser
from pathlib import Path

import conftest

ROOT = Path(__file__).resolve().parents[1]


def _test_names(module: Path) -> set[str]:
    tree = ast.parse(module.read_text())
    return {node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef) and node.name.startswith("test")}


def _registered() -> set[str]:
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    return {line.split(":")[0].strip() for line in config["tool:pytest"]["markers"].splitlines() if line.strip()}


def test_every_row_of_the_table_names_a_test_that_exists() -> None:
    registered = _registered()
    assert {"caffe", "runtimes", "training", "timing", "slow"} <= registered
    fixtures = _test_names(ROOT / "tests" / "conftest.py") | {
        node.name for node in ast.walk(ast.parse((ROOT / "tests" / "conftest.py").read_text()))
        if isinstance(node, ast.FunctionDef)}
    for what, markers in conftest.TIERS:
        assert markers and set(markers) <= registered, what
        if what.startswith("fixture:"):
            assert what[len("fixture:"):] in fixtures, what
            continue
        path, _, test = what.partition("::")
        assert (ROOT / path).exists(), what
        if test:
            assert test.split("[")[0] in _test_names(ROOT / path), what


def test_the_fast_tier_leaves_out_only_what_is_marked_slow() -> None:
    makefile = (ROOT / "Makefile").read_text()
    assert '-m "not slow"' in makefile and "test-fast" not in makefile
