"""Draw a net as a graphviz diagram: layers as boxes coloured by the paper's classes, merged layers highlighted.

The DOT text is built from the IR (so in-place layers appear as a chain, as they act); graphviz's ``dot`` renders
it to SVG, PNG or PDF by the output's extension (``.dot``/``.gv`` writes the DOT text itself and needs no
graphviz). The output is written atomically.

A layer counts as merged when its name ends with ``_merge`` (the rewriter's naming) or, given the original net,
when the original has no layer of that name.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

from deeprebirth.errors import DeepRebirthError
from deeprebirth.io import caffe_io
from deeprebirth.ir.classify import type_class
from deeprebirth.ir.graph import Graph, Layer
from deeprebirth.ir.model import PathLike, load_model
from deeprebirth.ir.shapes import Shape, infer_shapes

FILL = {"tensor": "#9ecae1", "non-tensor": "#fdd0a2", "other": "#e0e0e0"}
HIGHLIGHT = "#d62728"
FORMATS = {".svg": "svg", ".png": "png", ".pdf": "pdf", ".dot": "dot", ".gv": "dot"}


@dataclass
class DrawResult:
    path: str
    format: str
    layers: int
    highlighted: list[str]


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _details(layer: Layer) -> str:
    """The settings that matter for speed, in a few characters (``7x7 /2 64``)."""
    if layer.type in ("Convolution", "Deconvolution"):
        p = layer.proto.convolution_param
        k = list(p.kernel_size) or [p.kernel_h, p.kernel_w]
        s = list(p.stride) or ([p.stride_h] if p.HasField("stride_h") else [1])
        group = f" g{p.group}" if p.group > 1 else ""
        return f"{k[0]}x{k[-1]} /{s[0]} {p.num_output}{group}"
    if layer.type == "Pooling":
        p = layer.proto.pooling_param
        kind = {0: "max", 1: "ave", 2: "stochastic"}.get(p.pool, "?")
        return f"{kind} global" if p.global_pooling else f"{kind} {p.kernel_size} /{p.stride}"
    if layer.type == "InnerProduct":
        return str(layer.proto.inner_product_param.num_output)
    return ""


def merged_layers(graph: Graph, original: Graph | None = None) -> list[str]:
    """Layers a rewrite made: named ``*_merge``, or (given the original) absent from it."""
    return [layer.name for layer in graph.layers()
            if layer.name.endswith("_merge") or (original is not None and layer.name not in original)]


def dot_source(graph: Graph, highlight: Collection[str] = ()) -> str:
    """The DOT text of ``graph``; edges carry the blob's shape (without the batch) where it is known."""
    try:
        shapes: dict[str, Shape | None] = infer_shapes(graph)
    except DeepRebirthError:
        shapes = {}
    highlight = set(highlight)
    lines = [f"digraph {_quote(graph.name or 'net')} {{",
             "  rankdir=TB; nodesep=0.25; ranksep=0.3;",
             '  node [shape=box, style="rounded,filled", fontname="Helvetica", fontsize=10, margin="0.12,0.04"];',
             '  edge [fontname="Helvetica", fontsize=8, color="#555555", arrowsize=0.6];',
             f"  label={_quote(graph.name or '')}; labelloc=t; fontname=Helvetica;"]
    for layer in graph.layers():
        label = f"{layer.name}\n{layer.type}"
        details = _details(layer)
        if details:
            label += f"  {details}"
        attrs = [f"label={_quote(label)}", f'fillcolor="{FILL[type_class(layer.type)]}"']
        if layer.name in highlight:
            attrs += [f'color="{HIGHLIGHT}"', "penwidth=3", 'style="rounded,filled,bold"', f'fontcolor="{HIGHLIGHT}"']
        lines.append(f"  {_quote(layer.name)} [{', '.join(attrs)}];")
    for layer in graph.layers():
        for blob in layer.bottoms:
            shape = shapes.get(blob)
            label = "x".join(map(str, shape[1:])) if shape else ""
            edge_attrs = f" [label={_quote(label)}]" if label else ""
            lines.append(f"  {_quote(graph.producer(blob).name)} -> {_quote(layer.name)}{edge_attrs};")
    lines.append("  subgraph cluster_legend {")
    lines.append('    label="legend"; fontsize=9; color="#bbbbbb";')
    legend = [("legend_tensor", "tensor layer", FILL["tensor"], ""),
              ("legend_non_tensor", "non-tensor layer", FILL["non-tensor"], ""),
              ("legend_other", "input / other", FILL["other"], ""),
              ("legend_merged", "merged layer", "#ffffff",
               f', color="{HIGHLIGHT}", penwidth=3, fontcolor="{HIGHLIGHT}"')]
    for node, text, fill, extra in legend:
        lines.append(f'    {node} [label={_quote(text)}, fillcolor="{fill}", fontsize=8{extra}];')
    lines.append("    " + " -> ".join(n for n, *_ in legend) + " [style=invis];")
    lines.append("  }")
    lines.append("}")
    return "\n".join(lines) + "\n"


def render(dot_text: str, fmt: str) -> bytes:
    """Run graphviz's ``dot`` on ``dot_text``; a clear error when it is not installed or fails."""
    if fmt == "dot":
        return dot_text.encode()
    dot = shutil.which("dot")
    if dot is None:
        raise DeepRebirthError("graphviz's `dot` is not installed (apt-get install graphviz), "
                               "or write a .dot file instead")
    done = subprocess.run([dot, f"-T{fmt}"], input=dot_text.encode(), capture_output=True, check=False)
    if done.returncode != 0:
        lines = done.stderr.decode(errors="replace").strip().splitlines()
        raise DeepRebirthError(f"dot failed: {lines[-1] if lines else f'exit code {done.returncode}'}")
    return done.stdout


def draw_file(prototxt: PathLike, out: PathLike, highlight_from: PathLike | None = None,
              phase: str = "TEST") -> DrawResult:
    """Draw ``prototxt`` into ``out`` (.svg, .png, .pdf, .dot); highlight merged layers."""
    fmt = FORMATS.get(Path(out).suffix.lower())
    if fmt is None:
        raise DeepRebirthError(f"unknown output format (use {', '.join(sorted(FORMATS))})", file=str(out))
    graph = load_model(prototxt, phase=phase)
    original = load_model(highlight_from, phase=phase) if highlight_from is not None else None
    highlighted = merged_layers(graph, original)
    caffe_io.atomic_write_bytes(out, render(dot_source(graph, highlighted), fmt))
    return DrawResult(str(out), fmt, len(graph), highlighted)
