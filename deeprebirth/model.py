"""Loading a prototxt (+ caffemodel) into the graph IR, and saving it back: the one entry point for files."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from deeprebirth import caffe_io
from deeprebirth.errors import DeepRebirthError
from deeprebirth.graph import Graph, attach_weights
from deeprebirth.shapes import expected_param_shapes, infer_shapes

PathLike = str | os.PathLike[str]


def load_model(prototxt: PathLike, weights: PathLike | None = None, phase: str = "TEST") -> Graph:
    """Read, normalise, build the IR, infer shapes (which validates the net) and attach weights by layer name."""
    net = caffe_io.load_net(prototxt, phase=phase)
    graph = Graph.from_net(net, source=str(prototxt))
    shapes = infer_shapes(graph)
    if weights is not None:
        found = caffe_io.read_weights(weights)
        attach_weights(graph, found, expected_param_shapes(graph, shapes), source=str(weights))
        for layer in graph.layers():
            for i, blob in enumerate(layer.blobs or []):
                if not np.isfinite(blob).all():
                    raise DeepRebirthError(f"weight blob {i} holds NaN or Inf values", file=str(weights),
                                           layer=layer.name)
    return graph


def save_model(graph: Graph, prototxt: PathLike, caffemodel: PathLike | None = None) -> None:
    """Write the prototxt and, if asked, the caffemodel (both atomically)."""
    net = graph.to_net()
    if caffemodel is not None:
        expected = expected_param_shapes(graph)
        missing = [layer.name for layer in graph.layers() if layer.blobs is None and expected.get(layer.name)]
        if missing:
            raise DeepRebirthError(f"cannot write weights: layers without weights: {', '.join(missing[:5])}",
                                   file=str(caffemodel))
        caffe_io.write_caffemodel(caffemodel, net, graph.weights())
    caffe_io.write_prototxt(prototxt, net)


def same_file(a: PathLike, b: PathLike) -> bool:
    a, b = Path(a), Path(b)
    if a.exists() and b.exists():
        return a.samefile(b)
    return a.resolve() == b.resolve()
