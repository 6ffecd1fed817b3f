"""New weights for a graph's layers: the fillers a layer's prototxt names (for re-learned layers) and plausible
random weights for a whole net (for nets without a caffemodel, e.g. model-zoo prototxts in tests and benchmarks).
The numbers themselves are drawn by ``deeprebirth.weights.fillers``."""

from __future__ import annotations

import numpy as np

from deeprebirth import caffe_pb2 as pb
from deeprebirth.ir.graph import Graph, Layer
from deeprebirth.ir.shapes import expected_param_shapes
from deeprebirth.weights.fillers import Filler, plausible_blobs


def _filler(param: pb.FillerParameter) -> Filler:
    return Filler(type=param.type, value=param.value, min=param.min, max=param.max, mean=param.mean, std=param.std,
                  variance_norm=pb.FillerParameter.VarianceNorm.Name(param.variance_norm))


def layer_fillers(layer: Layer) -> tuple[Filler, Filler]:
    """(weight filler, bias filler) from the layer's prototxt; MSRA and zero when it gives none."""
    param = layer.proto.inner_product_param if layer.type == "InnerProduct" else layer.proto.convolution_param
    weight = _filler(param.weight_filler) if param.HasField("weight_filler") else Filler(type="msra")
    bias = _filler(param.bias_filler) if param.HasField("bias_filler") else Filler(type="constant")
    return weight, bias


def random_weights(graph: Graph, seed: int = 0) -> None:
    """Give every learnable layer random weights (``plausible_blobs``), drawn in layer order from one seed."""
    rng = np.random.default_rng(seed)
    for name, shapes in expected_param_shapes(graph).items():
        if not shapes:
            continue
        layer = graph.layer(name)
        layer.blobs = plausible_blobs(layer.type, shapes, rng)
