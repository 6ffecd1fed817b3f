"""New weights: Caffe's fillers (for re-learned layers) and plausible random weights (for nets without a
caffemodel, e.g. model-zoo prototxts in tests and benchmarks)."""

from __future__ import annotations

import math

import numpy as np

from deeprebirth import caffe_pb2 as pb
from deeprebirth.graph import Graph, Layer
from deeprebirth.shapes import Shape, expected_param_shapes


def fill(filler: pb.FillerParameter, shape: Shape, rng: np.random.Generator) -> np.ndarray:
    """Values as Caffe's filler of that type would draw them (fan_in = count / shape[0], fan_out = count / shape[1])."""
    count = math.prod(shape)
    fan_in = count / shape[0] if shape else 1
    fan_out = count / shape[1] if len(shape) > 1 else 1
    kind = filler.type or "constant"
    if kind == "constant":
        values = np.full(shape, filler.value)
    elif kind == "uniform":
        values = rng.uniform(filler.min, filler.max, shape)
    elif kind == "gaussian":
        values = rng.normal(filler.mean, filler.std, shape)
    elif kind in ("xavier", "msra"):
        n = {pb.FillerParameter.FAN_IN: fan_in, pb.FillerParameter.FAN_OUT: fan_out,
             pb.FillerParameter.AVERAGE: (fan_in + fan_out) / 2}[filler.variance_norm]
        if kind == "xavier":
            limit = math.sqrt(3.0 / n)
            values = rng.uniform(-limit, limit, shape)
        else:
            values = rng.normal(0.0, math.sqrt(2.0 / n), shape)
    else:
        values = rng.normal(0.0, 0.01, shape)
    return values.astype(np.float32)


def layer_fillers(layer: Layer) -> tuple[pb.FillerParameter, pb.FillerParameter]:
    """(weight filler, bias filler) from the layer's prototxt; MSRA and zero when it gives none."""
    param = layer.proto.inner_product_param if layer.type == "InnerProduct" else layer.proto.convolution_param
    weight = pb.FillerParameter(type="msra")
    bias = pb.FillerParameter(type="constant")
    if param.HasField("weight_filler"):
        weight.CopyFrom(param.weight_filler)
    if param.HasField("bias_filler"):
        bias.CopyFrom(param.bias_filler)
    return weight, bias


def random_weights(graph: Graph, seed: int = 0) -> None:
    """Give every learnable layer random weights that keep activations in a sane range (He-normal for linear
    layers, small positive biases; BatchNorm statistics and Scale factors near identity with real spread)."""
    rng = np.random.default_rng(seed)
    for name, shapes in expected_param_shapes(graph).items():
        if not shapes:
            continue
        layer = graph.layer(name)
        blobs = []
        if layer.type == "BatchNorm":
            c = shapes[0]
            factor = float(rng.uniform(0.5, 2.0))
            blobs = [rng.normal(0, 0.5, c) * factor, rng.uniform(0.5, 2.0, c) * factor, np.array([factor])]
        elif layer.type in ("Scale", "Bias", "PReLU"):
            blobs = [rng.uniform(0.5, 1.5, s) if i == 0 and layer.type != "Bias" else rng.normal(0, 0.2, s)
                     for i, s in enumerate(shapes)]
        else:
            weight = shapes[0]
            fan_in = math.prod(weight) / weight[0] if layer.type != "Deconvolution" else \
                math.prod(weight) / weight[1]
            blobs = [rng.normal(0.0, math.sqrt(2.0 / fan_in), weight)]
            blobs += [rng.normal(0.05, 0.05, s) for s in shapes[1:]]
        layer.blobs = [np.asarray(b, dtype=np.float32).reshape(s) for b, s in zip(blobs, shapes)]
