"""deeprebirth.ir.draw and `deeprebirth draw`: graphviz diagrams of nets, merged layers highlighted."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers import graph_from_text, save

from deeprebirth.cli import main
from deeprebirth.errors import DeepRebirthError
from deeprebirth.ir.draw import FILL, HIGHLIGHT, dot_source, draw_file, merged_layers

ORIGINAL = """name: "orig"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 16 dim: 16 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param { num_output: 8 kernel_size: 3 pad: 1 } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1" pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "fc" type: "InnerProduct" bottom: "pool1" top: "fc" inner_product_param { num_output: 4 } }
"""
MERGED = """name: "merged"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 16 dim: 16 } } }
layer { name: "conv1_merge" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param { num_output: 8 kernel_size: 3 pad: 1 stride: 2 } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "extra" type: "Convolution" bottom: "conv1" top: "extra" convolution_param { num_output: 8 kernel_size: 1 } }
layer { name: "fc" type: "InnerProduct" bottom: "extra" top: "fc" inner_product_param { num_output: 4 } }
"""


def node_groups(svg: str) -> dict[str, str]:
    """SVG node title -> the node's SVG text (graphviz writes one <g class="node"> per node, titled by its id)."""
    return {m.group(1): m.group(0) for m in re.finditer(r'<g id="node\d+" class="node">\s*<title>(.*?)</title>.*?</g>',
                                                         svg, re.DOTALL)}


@pytest.fixture
def nets(tmp_path: Path) -> tuple[str, str]:
    original = save(graph_from_text(ORIGINAL), tmp_path, "orig")[0]
    merged = save(graph_from_text(MERGED), tmp_path, "merged")[0]
    return original, merged


needs_dot = pytest.mark.skipif(shutil.which("dot") is None, reason="graphviz is not installed")


@needs_dot
def test_svg_has_every_layer_and_highlights_merge_layers(nets: tuple[str, str], tmp_path: Path) -> None:
    out = tmp_path / "net.svg"
    result = draw_file(nets[1], out)
    assert result.format == "svg" and result.highlighted == ["conv1_merge"] and result.layers == 5
    nodes = node_groups(out.read_text())
    for name in ("data", "conv1_merge", "relu1", "extra", "fc"):
        assert name in nodes
    assert HIGHLIGHT in nodes["conv1_merge"]
    assert all(HIGHLIGHT not in nodes[n] for n in ("data", "relu1", "extra", "fc"))
    assert FILL["tensor"] in nodes["extra"] and FILL["non-tensor"] in nodes["relu1"] and FILL["other"] in nodes["data"]


@needs_dot
def test_highlight_from_original(nets: tuple[str, str], tmp_path: Path) -> None:
    out = tmp_path / "net.svg"
    result = draw_file(nets[1], out, highlight_from=nets[0])
    assert result.highlighted == ["conv1_merge", "extra"]
    nodes = node_groups(out.read_text())
    assert HIGHLIGHT in nodes["extra"] and HIGHLIGHT not in nodes["fc"]


@needs_dot
def test_png(nets: tuple[str, str], tmp_path: Path) -> None:
    out = tmp_path / "net.png"
    draw_file(nets[0], out)
    assert out.read_bytes()[:4] == b"\x89PNG"


def test_dot_text_needs_no_graphviz(nets: tuple[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "")
    out = tmp_path / "net.dot"
    draw_file(nets[0], out)
    text = out.read_text()
    assert text.startswith('digraph "orig"') and '"conv1" -> "relu1" [label="8x16x16"]' in text


def test_missing_dot_is_a_clear_error(nets: tuple[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "")
    with pytest.raises(DeepRebirthError, match="`dot` is not installed"):
        draw_file(nets[0], tmp_path / "net.svg")
    assert not (tmp_path / "net.svg").exists()


def test_quotes_in_names() -> None:
    graph = graph_from_text(ORIGINAL.replace('name: "relu1"', 'name: "re\\"lu"'), seed=None)
    assert '"re\\"lu"' in dot_source(graph)
    assert merged_layers(graph) == []


# ---------------------------------------------------------------------------------------------------------------
# the command


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.stdout, result.stderr


@needs_dot
def test_cli_draw(nets: tuple[str, str], tmp_path: Path) -> None:
    out = tmp_path / "net.svg"
    code, stdout, err = run("draw", nets[1], str(out), "--highlight-from", nets[0])
    assert code == 0, err
    assert "2 highlighted: conv1_merge, extra" in stdout and out.exists()


@pytest.mark.parametrize("out, needle", [("net.txt", "unknown output format"), ("nofolder/net.svg", "folder")])
def test_cli_draw_bad_input(nets: tuple[str, str], tmp_path: Path, out: str, needle: str) -> None:
    code, _, err = run("draw", nets[0], str(tmp_path / out))
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], err
