"""Which part of a net to export: the named output blobs and the layers they need."""

from __future__ import annotations

import copy
from collections.abc import Sequence

from deeprebirth.errors import DeepRebirthError
from deeprebirth.ir.graph import Graph


def output_blobs(graph: Graph, names: Sequence[str] | None = None) -> list[str]:
    """SSA blobs for Caffe blob names (the last version of an in-place chain, as Caffe holds it after a forward
    pass); without names, the blobs no layer reads."""
    if not names:
        return graph.outputs()
    latest: dict[str, str] = {}
    for blob in graph.blobs():
        latest[graph.caffe_name(blob)] = blob
    missing = [name for name in names if name not in latest]
    if missing:
        raise DeepRebirthError(f"no blob named {missing[0]!r} in the net", file=graph.source)
    return [latest[name] for name in dict.fromkeys(names)]


def needed_layers(graph: Graph, blobs: Sequence[str]) -> set[str]:
    """Names of the layers that compute ``blobs``."""
    needed: set[str] = set()
    todo = [graph.producer(b).name for b in blobs]
    while todo:
        name = todo.pop()
        if name not in needed:
            needed.add(name)
            todo += [graph.producer(b).name for b in graph.layer(name).bottoms]
    return needed


def prune(graph: Graph, names: Sequence[str]) -> Graph:
    """A copy of ``graph`` with only the layers the named blobs need."""
    pruned = copy.deepcopy(graph)
    needed = needed_layers(pruned, output_blobs(pruned, names))
    for layer in reversed(pruned.layers()):
        if layer.name not in needed:
            pruned.remove_layer(layer.name)
    return pruned
