"""Loading a prototxt (+ caffemodel) into the graph IR, and saving it back: the one entry point for files."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from deeprebirth import caffe_pb2 as pb
from deeprebirth.aliases import PathLike
from deeprebirth.errors import DeepRebirthError
from deeprebirth.io import caffe_io
from deeprebirth.ir.graph import Graph, attach_weights
from deeprebirth.ir.shapes import expected_param_shapes, infer_shapes


def load_model(prototxt: PathLike, weights: PathLike | None = None, phase: str = "TEST",
               input_shapes: dict[str, tuple[int, ...]] | None = None) -> Graph:
    """Read, normalise, build the IR, infer shapes (which validates the net) and attach weights by layer name.

    A train_val net is seen in ``phase``; the other phase's layers are held aside and saved back with it. Data
    layers get their shapes from ``input_shapes`` (top blob -> shape) or their LMDB (``caffe_io.data_layer_shapes``);
    where neither works the graph carries a warning saying which and why."""
    net, aside = caffe_io.load_net_phases(prototxt, phase=phase)
    graph = Graph.from_net(net, source=str(prototxt), aside=aside)
    given = dict(input_shapes or {})
    folder = Path(prototxt).resolve().parent
    for layer in graph.layers():
        if layer.type not in caffe_io.DATA_LAYER_TYPES:
            continue
        param = pb.LayerParameter()
        param.CopyFrom(layer.proto)
        param.top.extend(graph.caffe_name(t) for t in layer.tops)
        layer.top_shapes, reason = caffe_io.data_layer_shapes(param, given, folder)
        if layer.top_shapes is None:
            graph.warnings.append(f"shapes of {layer.type} layer '{layer.name}' unknown ({reason}): give "
                                  f"the input shape {param.top[0]}:N,C,H,W, or rules that need shapes do not fire")
    unused = set(given) - {graph.caffe_name(t) for layer in graph.layers() if layer.type in caffe_io.DATA_LAYER_TYPES
                           for t in layer.tops}
    if unused:
        raise DeepRebirthError(f"the input shapes name {min(unused)!r}, which is no top of a data layer "
                               f"(in phase {phase})", file=str(prototxt), options=("input_shapes",))
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
    net = graph.to_net(all_phases=True)
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
