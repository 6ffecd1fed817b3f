"""Checks and surgery shared by several rules, so each rule module stays a short statement of its own logic."""

from __future__ import annotations

import numpy as np

from deeprebirth.fold import fold_affine_into_linear
from deeprebirth.graph import Graph, Layer

LINEAR_TYPES = ("Convolution", "Deconvolution", "InnerProduct")
MERGE_SUFFIX = "_merge"


def merged(name: str) -> str:
    """The name of a layer (or blob) rebuilt by a lossy merge: ``<name>_merge``, so Caffe's by-name weight loading
    never pairs it with the original's weights. A name that already ends so (made earlier in this rewrite, or by an
    earlier run being slimmed further) stays as it is."""
    return name if name.endswith(MERGE_SUFFIX) else name + MERGE_SUFFIX


def linear_producer(graph: Graph, layer: Layer) -> tuple[Layer | None, str]:
    """The Convolution/Deconvolution/InnerProduct whose output only ``layer`` reads, or None and the reason."""
    producer = graph.producer(layer.bottoms[0])
    if producer.type not in LINEAR_TYPES:
        return None, f"its input comes from a {producer.type}, not a convolution or inner product"
    if graph.only_consumer(layer.bottoms[0]) is not layer:
        return None, f"the output of '{producer.name}' has other consumers"
    if producer.type == "InnerProduct" and producer.proto.inner_product_param.axis not in (1, -1):
        return None, f"'{producer.name}' uses axis {producer.proto.inner_product_param.axis}"
    if producer.type != "InnerProduct" and producer.proto.convolution_param.axis != 1:
        return None, f"'{producer.name}' uses channel axis {producer.proto.convolution_param.axis}"
    if not producer.blobs:
        return None, f"no weights for '{producer.name}'"
    return producer, ""


def passthrough_blocker(graph: Graph, layer: Layer) -> str | None:
    """Why removing the one-in one-out ``layer`` would change the net's interface, or None. When its output is a
    net output, its input must take over that name, which is only possible for a blob nothing else reads and that
    is not itself a net input."""
    top, bottom = layer.tops[0], layer.bottoms[0]
    if graph.consumers(top) or graph.caffe_name(top) == graph.caffe_name(bottom):
        return None
    if len(graph.consumers(bottom)) > 1:
        return f"its output '{graph.caffe_name(top)}' is a net output and its input is read elsewhere too"
    if graph.producer(bottom).type == "Input":
        return f"its output '{graph.caffe_name(top)}' is a net output and its input is a net input"
    return None


def remove_passthrough(graph: Graph, layer: Layer) -> None:
    """Remove a one-in one-out layer: its readers read its input instead. If its output was a net output, the
    input takes over that output's name, so the net's external names do not change."""
    top, bottom = layer.tops[0], layer.bottoms[0]
    if not graph.consumers(top):
        graph.rename_blob(bottom, graph.caffe_name(top))
    graph.replace_uses(top, bottom)
    graph.remove_layer(layer.name)


def fold_affine(linear: Layer, a: np.ndarray, b: np.ndarray) -> None:
    """Fold ``y = a * x + b`` (per output channel) into ``linear``'s weights; it gains a bias if it had none."""
    assert linear.blobs is not None
    weight = linear.blobs[0]
    bias = linear.blobs[1] if len(linear.blobs) > 1 else None
    if linear.type == "InnerProduct":
        out_axis, group = (1 if linear.proto.inner_product_param.transpose else 0), 1
        linear.proto.inner_product_param.bias_term = True
    else:
        out_axis = 1 if linear.type == "Deconvolution" else 0
        group = linear.proto.convolution_param.group
        linear.proto.convolution_param.bias_term = True
    new_weight, new_bias = fold_affine_into_linear(weight, bias, a, b, out_axis, group)
    linear.blobs = [new_weight, new_bias]
    if len(linear.proto.param) == 1:  # keep lr/decay settings meaningful for the new bias blob
        linear.proto.param.add().CopyFrom(linear.proto.param[0])
