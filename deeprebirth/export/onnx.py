"""Caffe IR -> ONNX: one small function per Caffe layer type, listed in ``CONVERTERS``.

Each converter reads one IR layer (settings, weights, the inferred shapes of its bottoms) and emits ONNX nodes with
exactly Caffe's inference semantics; a setting ONNX cannot express exactly is refused with a reason, never
approximated. Layers that are identities at inference (Dropout, Split, one-input Concat/Eltwise/Slice) emit nothing:
their tops are aliases of their bottom.

Value names: every blob keeps its IR (SSA) name, so in-place chains stay unambiguous (``conv1`` -> ``conv1@1``);
graph inputs and outputs carry the Caffe blob names (``data``, ``prob``). Weights become initializers named
``<layer>.<what>``.

Pooling follows Caffe, not ONNX's ``ceil_mode``: Caffe rounds the output size up and then drops a last window that
would start inside the padding. The exporter takes Caffe's output size ``O`` and emits explicit pads
``begin = pad``, ``end = (O - 1) * stride + kernel - size - pad`` with ``ceil_mode = 0``, which ONNX rounds to
exactly ``O``. MAX pooling ignores padded cells in both. AVE pooling divides, in Caffe, by the window clipped to
``[-pad, size + pad)``: with ``end <= pad`` that is the whole kernel (``count_include_pad = 1``); with
``end > pad`` (the ceil rule added a window reaching past the padding) the input is zero-padded by ``pad`` first
and the pool counts only cells inside that padded input (``count_include_pad = 0``). A negative ``end`` (stride
larger than kernel, or FLOOR rounding) crops the unused rows with a Slice first.

Kept as one module: one small converter per Caffe layer type, listed in ``CONVERTERS`` below them; a new type is one
function and one line here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from deeprebirth import caffe_pb2 as pb
from deeprebirth.errors import DeepRebirthError
from deeprebirth.export.subgraph import needed_layers, output_blobs
from deeprebirth.ir.graph import Graph, Layer
from deeprebirth.ir.shapes import Shape, conv_geometry, infer_shapes, pool_geometry

DEFAULT_OPSET = 13
MIN_OPSET = 13  # Softmax over one axis and Split's sizes as an input need 13

# Types refused with a reason of their own (the rest: "has no ONNX equivalent").
REFUSED_WHY = {
    "PriorBox": "an SSD-only layer (anchor generation) with no standard ONNX operator",
    "DetectionOutput": "an SSD-only layer (box decoding + NMS) with no exact standard ONNX operator",
    "Normalize": "an SSD-only layer (L2 normalisation with learned scale) not exported",
    "STOCHASTIC": "stochastic pooling has no ONNX operator",
}


@dataclass
class _Context:
    """What converters share: the IR, shapes, value names and the nodes and initializers emitted so far."""

    graph: Graph
    shapes: dict[str, Shape | None]
    value: dict[str, str] = field(default_factory=dict)  # SSA blob -> ONNX value name
    outputs: dict[str, str] = field(default_factory=dict)  # SSA blob -> wanted graph output name
    nodes: list[onnx.NodeProto] = field(default_factory=list)
    initializers: list[TensorProto] = field(default_factory=list)
    used: set[str] = field(default_factory=set)

    def fresh(self, base: str) -> str:
        name, k = base, 1
        while name in self.used:
            name, k = f"{base}_{k}", k + 1
        self.used.add(name)
        return name

    def inp(self, blob: str) -> str:
        return self.value[blob]

    def shape(self, blob: str) -> Shape:
        shape = self.shapes[blob]
        assert shape is not None
        return shape

    def top(self, layer: Layer, index: int = 0) -> str:
        """The ONNX name a converter writes ``layer``'s top ``index`` to (the Caffe name for a graph output)."""
        blob = layer.tops[index]
        name = self.outputs[blob] if blob in self.outputs else self.fresh(blob)
        self.used.add(name)
        self.value[blob] = name
        return name

    def alias(self, top: str, bottom: str) -> None:
        """``top`` holds the same value as ``bottom`` (an identity at inference)."""
        self.value[top] = self.value[bottom]

    def const(self, layer: Layer, what: str, array: np.ndarray | Sequence[float] | Sequence[int] | float,
              dtype: type = np.float32) -> str:
        name = self.fresh(f"{layer.name}.{what}")
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array, dtype=dtype), name))
        return name

    def tmp(self, layer: Layer, what: str) -> str:
        return self.fresh(f"{layer.name}/{what}")

    def node(self, op: str, inputs: Sequence[str], outputs: Sequence[str], layer: Layer, **attrs: Any) -> None:
        self.nodes.append(helper.make_node(op, list(inputs), list(outputs), name=self.fresh(f"{layer.name}:{op}"),
                                           **attrs))


def _refuse(layer: Layer, reason: str) -> DeepRebirthError:
    return DeepRebirthError(f"cannot export {layer.type} to ONNX: {reason}", layer=layer.name)


def _blobs(layer: Layer, count: int) -> list[np.ndarray]:
    if layer.blobs is None or len(layer.blobs) < count:
        raise _refuse(layer, f"needs {count} weight blob(s) (give the caffemodel)")
    return [np.asarray(b, dtype=np.float32) for b in layer.blobs]


def _broadcast(array: np.ndarray, rank: int, axis: int) -> np.ndarray:
    """Reshape a per-axis parameter that covers axes ``axis..`` of a rank-``rank`` blob so ONNX broadcasts it."""
    return array.reshape(tuple(array.shape) + (1,) * (rank - axis - array.ndim))


# ---------------------------------------------------------------------------------------------------------------
# converters: (context, layer) -> None


def _convolution(ctx: _Context, layer: Layer) -> None:
    p = layer.proto.convolution_param
    if p.axis != 1:
        raise _refuse(layer, f"axis {p.axis} (only 1, the channel axis)")
    g = conv_geometry(p)
    blobs = _blobs(layer, 2 if p.bias_term else 1)
    weights = [ctx.const(layer, "weight", blobs[0])] + ([ctx.const(layer, "bias", blobs[1])] if p.bias_term else [])
    op = "Conv" if layer.type == "Convolution" else "ConvTranspose"
    for i, bottom in enumerate(layer.bottoms):
        ctx.node(op, [ctx.inp(bottom), *weights], [ctx.top(layer, i)], layer, kernel_shape=list(g.kernel),
                 strides=list(g.stride), pads=[*g.pad, *g.pad], dilations=list(g.dilation), group=p.group)


def pool_pads(size: int, kernel: int, stride: int, pad: int, out: int) -> tuple[int, int]:
    """(begin, end) pads that make ONNX's floor-rounded pooling produce Caffe's ``out`` windows (end may be
    negative: that many trailing cells are never read)."""
    return pad, (out - 1) * stride + kernel - size - pad


def _pooling(ctx: _Context, layer: Layer) -> None:
    p = layer.proto.pooling_param
    if p.pool == pb.PoolingParameter.STOCHASTIC:
        raise _refuse(layer, REFUSED_WHY["STOCHASTIC"])
    bottom = layer.bottoms[0]
    h, w = ctx.shape(bottom)[2:]
    oh, ow = ctx.shape(layer.tops[0])[2:]
    x = ctx.inp(bottom)
    is_max = p.pool == pb.PoolingParameter.MAX
    if p.global_pooling:
        ctx.node("GlobalMaxPool" if is_max else "GlobalAveragePool", [x], [ctx.top(layer)], layer)
        return
    g = pool_geometry(p, (h, w))
    begin, end = zip(*(pool_pads(size, g.kernel[i], g.stride[i], g.pad[i], out)
                       for i, (size, out) in enumerate(((h, oh), (w, ow)))))
    if any(e >= k for e, k in zip(end, g.kernel)):
        raise _refuse(layer, "its last window lies wholly outside the input (Caffe outputs -FLT_MAX or NaN there)")
    if min(end) < 0:  # rows/columns no window reads: crop them
        keep = [size + min(e, 0) for size, e in zip((h, w), end)]
        cropped = ctx.tmp(layer, "crop")
        ctx.node("Slice", [x, ctx.const(layer, "starts", [0, 0], np.int64), ctx.const(layer, "ends", keep, np.int64),
                           ctx.const(layer, "axes", [2, 3], np.int64)], [cropped], layer)
        x, end = cropped, tuple(max(e, 0) for e in end)
    attrs: dict[str, Any] = {"kernel_shape": list(g.kernel), "strides": list(g.stride)}
    if is_max:
        ctx.node("MaxPool", [x], [ctx.top(layer)], layer, pads=[*begin, *end], **attrs)
        return
    if all(e <= b for b, e in zip(begin, end)):  # every window ends inside Caffe's padded area: divide by k*k
        ctx.node("AveragePool", [x], [ctx.top(layer)], layer, pads=[*begin, *end], count_include_pad=1, **attrs)
        return
    if max(begin) > 0:  # zero-pad by `pad`, then count only cells inside that padded input
        padded = ctx.tmp(layer, "pad")
        ctx.node("Pad", [x, ctx.const(layer, "pads", [0, 0, *begin, 0, 0, *begin], np.int64)], [padded], layer)
        x = padded
    extra = [max(e - b, 0) for b, e in zip(begin, end)]
    ctx.node("AveragePool", [x], [ctx.top(layer)], layer, pads=[0, 0, *extra], count_include_pad=0, **attrs)


def _inner_product(ctx: _Context, layer: Layer) -> None:
    p = layer.proto.inner_product_param
    shape = ctx.shape(layer.bottoms[0])
    axis = p.axis + len(shape) if p.axis < 0 else p.axis
    blobs = _blobs(layer, 2 if p.bias_term else 1)
    x = ctx.inp(layer.bottoms[0])
    if len(shape) != 2 or axis != 1:
        flat = ctx.tmp(layer, "flatten")
        ctx.node("Flatten", [x], [flat], layer, axis=axis)
        x = flat
    out_shape = ctx.shape(layer.tops[0])
    needs_reshape = len(out_shape) != 2
    gemm = ctx.tmp(layer, "gemm") if needs_reshape else ctx.top(layer)
    inputs = [x, ctx.const(layer, "weight", blobs[0])] + ([ctx.const(layer, "bias", blobs[1])] if p.bias_term else [])
    ctx.node("Gemm", inputs, [gemm], layer, transB=0 if p.transpose else 1)
    if needs_reshape:
        ctx.node("Reshape", [gemm, ctx.const(layer, "shape", out_shape, np.int64)], [ctx.top(layer)], layer)


def _relu(ctx: _Context, layer: Layer) -> None:
    slope = layer.proto.relu_param.negative_slope
    if slope:
        ctx.node("LeakyRelu", [ctx.inp(layer.bottoms[0])], [ctx.top(layer)], layer, alpha=float(slope))
    else:
        ctx.node("Relu", [ctx.inp(layer.bottoms[0])], [ctx.top(layer)], layer)


def _relu6(ctx: _Context, layer: Layer) -> None:
    p = layer.proto.relu6_param  # a mobile Caffe layer (MobileNet v2 ports): min(max(x, 0), threshold)
    if p.negative_slope:
        raise _refuse(layer, "a ReLU6 with a negative slope has no single ONNX operator")
    ctx.node("Clip", [ctx.inp(layer.bottoms[0]), ctx.const(layer, "min", 0.0), ctx.const(layer, "max", p.threshold)],
             [ctx.top(layer)], layer)


def _prelu(ctx: _Context, layer: Layer) -> None:
    (slope,) = _blobs(layer, 1)[:1]
    rank = len(ctx.shape(layer.bottoms[0]))
    slope = slope.reshape(1) if slope.size == 1 and layer.proto.prelu_param.channel_shared else \
        _broadcast(slope.reshape(-1), rank, 1)
    ctx.node("PRelu", [ctx.inp(layer.bottoms[0]), ctx.const(layer, "slope", slope)], [ctx.top(layer)], layer)


def _elu(ctx: _Context, layer: Layer) -> None:
    ctx.node("Elu", [ctx.inp(layer.bottoms[0])], [ctx.top(layer)], layer, alpha=float(layer.proto.elu_param.alpha))


def _unary(op: str) -> Callable[[_Context, Layer], None]:
    def convert(ctx: _Context, layer: Layer) -> None:
        ctx.node(op, [ctx.inp(layer.bottoms[0])], [ctx.top(layer)], layer)

    return convert


def _lrn(ctx: _Context, layer: Layer) -> None:
    p = layer.proto.lrn_param
    x = ctx.inp(layer.bottoms[0])
    if p.norm_region == pb.LRNParameter.ACROSS_CHANNELS:
        ctx.node("LRN", [x], [ctx.top(layer)], layer, size=p.local_size, alpha=float(p.alpha), beta=float(p.beta),
                 bias=float(p.k))
        return
    # WITHIN_CHANNEL, as Caffe computes it: x * (1 + alpha * avgpool_{n x n, pad (n-1)/2}(x^2)) ^ -beta (k unused;
    # the average divides by n*n, padding included)
    if p.local_size % 2 == 0:
        raise _refuse(layer, "WITHIN_CHANNEL LRN needs an odd local_size")
    pad = (p.local_size - 1) // 2
    square, mean, scaled, shifted, power = (ctx.tmp(layer, s) for s in ("sq", "mean", "scaled", "shifted", "pow"))
    ctx.node("Mul", [x, x], [square], layer)
    ctx.node("AveragePool", [square], [mean], layer, kernel_shape=[p.local_size] * 2, strides=[1, 1],
             pads=[pad] * 4, count_include_pad=1)
    ctx.node("Mul", [mean, ctx.const(layer, "alpha", float(p.alpha))], [scaled], layer)
    ctx.node("Add", [scaled, ctx.const(layer, "one", 1.0)], [shifted], layer)
    ctx.node("Pow", [shifted, ctx.const(layer, "neg_beta", float(-p.beta))], [power], layer)
    ctx.node("Mul", [x, power], [ctx.top(layer)], layer)


def _concat(ctx: _Context, layer: Layer) -> None:
    if len(layer.bottoms) == 1:
        ctx.alias(layer.tops[0], layer.bottoms[0])
        return
    p = layer.proto.concat_param
    axis = p.concat_dim if p.HasField("concat_dim") else p.axis
    ctx.node("Concat", [ctx.inp(b) for b in layer.bottoms], [ctx.top(layer)], layer, axis=axis)


def _eltwise(ctx: _Context, layer: Layer) -> None:
    p = layer.proto.eltwise_param
    coeffs = list(p.coeff)
    if coeffs and len(coeffs) != len(layer.bottoms):
        raise _refuse(layer, f"{len(coeffs)} coefficients for {len(layer.bottoms)} inputs")
    inputs = [ctx.inp(b) for b in layer.bottoms]
    if p.operation == pb.EltwiseParameter.SUM and any(c != 1 for c in coeffs):
        for i, c in enumerate(coeffs):
            if c != 1:
                scaled = ctx.tmp(layer, f"coeff{i}")
                ctx.node("Mul", [inputs[i], ctx.const(layer, f"coeff{i}", float(c))], [scaled], layer)
                inputs[i] = scaled
    elif len(layer.bottoms) == 1:
        ctx.alias(layer.tops[0], layer.bottoms[0])
        return
    op = {pb.EltwiseParameter.SUM: "Sum", pb.EltwiseParameter.PROD: "Mul", pb.EltwiseParameter.MAX: "Max"}
    if p.operation == pb.EltwiseParameter.PROD:  # Mul is binary: chain it
        while len(inputs) > 2:
            partial = ctx.tmp(layer, "prod")
            ctx.node("Mul", inputs[:2], [partial], layer)
            inputs = [partial, *inputs[2:]]
    ctx.node(op[p.operation], inputs, [ctx.top(layer)], layer)


def _softmax(ctx: _Context, layer: Layer) -> None:
    ctx.node("Softmax", [ctx.inp(layer.bottoms[0])], [ctx.top(layer)], layer, axis=layer.proto.softmax_param.axis)


def _batchnorm(ctx: _Context, layer: Layer) -> None:
    p = layer.proto.batch_norm_param
    if p.HasField("use_global_stats") and not p.use_global_stats:
        raise _refuse(layer, "use_global_stats: false normalises by each batch's own statistics")
    blobs = _blobs(layer, 3)
    if len(blobs) != 3:
        raise _refuse(layer, f"{len(blobs)} weight blobs (BVLC BatchNorm has 3: mean, variance, scale factor)")
    factor = float(blobs[2].ravel()[0])
    inv = 0.0 if factor == 0 else 1.0 / factor
    mean = (blobs[0].astype(np.float64).ravel() * inv).astype(np.float32)
    var = (blobs[1].astype(np.float64).ravel() * inv).astype(np.float32)
    c = mean.size
    ctx.node("BatchNormalization", [ctx.inp(layer.bottoms[0]), ctx.const(layer, "gamma", np.ones(c)),
                                    ctx.const(layer, "beta", np.zeros(c)), ctx.const(layer, "mean", mean),
                                    ctx.const(layer, "var", var)], [ctx.top(layer)], layer, epsilon=float(p.eps))


def _scale_or_bias(ctx: _Context, layer: Layer) -> None:
    """Scale: y = x * gamma (+ beta); Bias: y = x + beta. gamma/beta cover axes [axis, axis + num_axes) of x and
    come from the weights or, with two bottoms, from bottom 1."""
    is_scale = layer.type == "Scale"
    p = layer.proto.scale_param if is_scale else layer.proto.bias_param
    shape = ctx.shape(layer.bottoms[0])
    rank = len(shape)
    axis = p.axis + rank if p.axis < 0 else p.axis
    x = ctx.inp(layer.bottoms[0])
    blobs = list(layer.blobs or [])
    if len(layer.bottoms) > 1:
        other = ctx.shape(layer.bottoms[1])
        factor = ctx.inp(layer.bottoms[1])
        target = tuple(other) + (1,) * (rank - axis - len(other))
        if target != tuple(other):
            reshaped = ctx.tmp(layer, "factor")
            ctx.node("Reshape", [factor, ctx.const(layer, "factor_shape", target, np.int64)], [reshaped], layer)
            factor = reshaped
    else:
        if not blobs:
            raise _refuse(layer, "needs its weight blob (give the caffemodel)")
        factor = ctx.const(layer, "gamma" if is_scale else "beta", _broadcast(blobs.pop(0).astype(np.float32),
                                                                                rank, axis))
    bias = is_scale and p.bias_term
    if bias and not blobs:
        raise _refuse(layer, "bias_term is set but the bias blob is missing")
    product = ctx.tmp(layer, "scaled") if bias else ctx.top(layer)
    ctx.node("Mul" if is_scale else "Add", [x, factor], [product], layer)
    if bias:
        beta = ctx.const(layer, "beta", _broadcast(blobs[0].astype(np.float32), rank, axis))
        ctx.node("Add", [product, beta], [ctx.top(layer)], layer)


def _power(ctx: _Context, layer: Layer) -> None:
    """y = (shift + scale * x) ^ power, each step emitted only when it is not the identity."""
    p = layer.proto.power_param
    steps = [(op, name, value) for op, name, value, identity in (("Mul", "scale", p.scale, 1.0),
                                                                ("Add", "shift", p.shift, 0.0),
                                                                ("Pow", "power", p.power, 1.0))
             if value != identity]
    if not steps:
        ctx.alias(layer.tops[0], layer.bottoms[0])
        return
    x = ctx.inp(layer.bottoms[0])
    for k, (op, name, value) in enumerate(steps):
        out = ctx.top(layer) if k == len(steps) - 1 else ctx.tmp(layer, name)
        ctx.node(op, [x, ctx.const(layer, name, float(value))], [out], layer)
        x = out


def _reshape(ctx: _Context, layer: Layer) -> None:
    """Flatten and Reshape: the inferred output shape, written out."""
    shape = ctx.shape(layer.tops[0])
    ctx.node("Reshape", [ctx.inp(layer.bottoms[0]), ctx.const(layer, "shape", shape, np.int64)], [ctx.top(layer)],
             layer)


def _slice(ctx: _Context, layer: Layer) -> None:
    if len(layer.tops) == 1:
        ctx.alias(layer.tops[0], layer.bottoms[0])
        return
    p = layer.proto.slice_param
    rank = len(ctx.shape(layer.bottoms[0]))
    axis = p.slice_dim if p.HasField("slice_dim") else p.axis
    axis = axis + rank if axis < 0 else axis
    sizes = [ctx.shape(top)[axis] for top in layer.tops]
    ctx.node("Split", [ctx.inp(layer.bottoms[0]), ctx.const(layer, "split", sizes, np.int64)],
             [ctx.top(layer, i) for i in range(len(layer.tops))], layer, axis=axis)


def _identity(ctx: _Context, layer: Layer) -> None:
    """Split (every top) and Dropout (an identity at inference in BVLC Caffe)."""
    for top in layer.tops:
        ctx.alias(top, layer.bottoms[0])


def _crop(ctx: _Context, layer: Layer) -> None:
    p = layer.proto.crop_param
    shape, target = ctx.shape(layer.bottoms[0]), ctx.shape(layer.bottoms[1])
    axis = p.axis + len(shape) if p.axis < 0 else p.axis
    axes = list(range(axis, len(shape)))
    offsets = list(p.offset)
    if offsets and len(offsets) not in (1, len(axes)):
        raise _refuse(layer, f"{len(offsets)} offsets for {len(axes)} cropped axes")
    starts = [(offsets[0] if len(offsets) == 1 else offsets[k]) if offsets else 0 for k in range(len(axes))]
    ends = [s + target[a] for s, a in zip(starts, axes)]
    if any(e > shape[a] for e, a in zip(ends, axes)):
        raise _refuse(layer, f"crop of {shape} to {target} at offsets {starts} runs past the input")
    ctx.node("Slice", [ctx.inp(layer.bottoms[0]), ctx.const(layer, "starts", starts, np.int64),
                       ctx.const(layer, "ends", ends, np.int64), ctx.const(layer, "axes", axes, np.int64)],
             [ctx.top(layer)], layer)


def _permute(ctx: _Context, layer: Layer) -> None:
    rank = len(ctx.shape(layer.bottoms[0]))
    order = list(layer.proto.permute_param.order)
    order += [i for i in range(rank) if i not in order]
    ctx.node("Transpose", [ctx.inp(layer.bottoms[0])], [ctx.top(layer)], layer, perm=order)


Converter = Callable[[_Context, Layer], None]

CONVERTERS: dict[str, Converter] = {
    "Convolution": _convolution, "Deconvolution": _convolution, "Pooling": _pooling, "InnerProduct": _inner_product,
    "ReLU": _relu, "ReLU6": _relu6, "PReLU": _prelu, "ELU": _elu, "Sigmoid": _unary("Sigmoid"), "TanH": _unary("Tanh"),
    "AbsVal": _unary("Abs"), "BNLL": _unary("Softplus"), "LRN": _lrn, "Concat": _concat, "Eltwise": _eltwise,
    "Softmax": _softmax, "BatchNorm": _batchnorm, "Scale": _scale_or_bias, "Bias": _scale_or_bias, "Power": _power,
    "Flatten": _reshape, "Reshape": _reshape, "Slice": _slice, "Split": _identity, "Crop": _crop,
    "Dropout": _identity, "Permute": _permute,
}


# ---------------------------------------------------------------------------------------------------------------
# the driver


def _value_info(name: str, shape: Shape) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape))


def to_onnx(graph: Graph, opset: int = DEFAULT_OPSET, outputs: Sequence[str] | None = None) -> onnx.ModelProto:
    """The ONNX model of ``graph`` (weights attached; Input layers of known shape).

    ``outputs``: Caffe blob names to expose as the graph outputs (default: the blobs no layer reads); only the
    layers they need are exported, so a net's exportable front (e.g. an SSD backbone) can be exported alone.
    Raises DeepRebirthError naming the first layer that cannot be exported exactly.
    """
    if opset < MIN_OPSET or opset > onnx.defs.onnx_opset_version():
        raise DeepRebirthError(f"opset {opset} is not supported (from {MIN_OPSET} to "
                               f"{onnx.defs.onnx_opset_version()})")
    shapes = infer_shapes(graph)
    wanted = output_blobs(graph, outputs)
    needed = needed_layers(graph, wanted)
    sub = [layer for layer in graph.layers() if layer.name in needed]
    for layer in sub:
        if layer.type != "Input" and layer.type not in CONVERTERS:
            why = REFUSED_WHY.get(layer.type, "no ONNX equivalent")
            raise DeepRebirthError(f"cannot export {layer.type} to ONNX: {why}", file=graph.source, layer=layer.name)
    ctx = _Context(graph, shapes)
    ctx.used |= {b for layer in graph.layers() for b in layer.tops} | {graph.caffe_name(b) for b in wanted}
    ctx.outputs = {blob: graph.caffe_name(blob) for blob in wanted}
    inputs = []
    for layer in sub:
        if layer.type == "Input":
            for top in layer.tops:
                shape = shapes[top]
                if shape is None:
                    raise DeepRebirthError("input of unknown shape", file=graph.source, layer=layer.name)
                ctx.value[top] = graph.caffe_name(top)
                inputs.append(_value_info(graph.caffe_name(top), shape))
            continue
        try:
            CONVERTERS[layer.type](ctx, layer)
        except DeepRebirthError as err:
            raise DeepRebirthError(err.message, file=graph.source, layer=err.layer or layer.name) from None
    graph_outputs = []
    for blob in wanted:
        name = ctx.outputs[blob]
        if ctx.value[blob] != name:  # an alias (Dropout ...) or an input: give the output its Caffe name
            ctx.nodes.append(helper.make_node("Identity", [ctx.value[blob]], [name], name=ctx.fresh(f"{name}:Identity")))
        shape = shapes[blob]
        assert shape is not None
        graph_outputs.append(_value_info(name, shape))
    onnx_graph = helper.make_graph(ctx.nodes, graph.name or "deeprebirth", inputs, graph_outputs, ctx.initializers)
    opsets = [helper.make_opsetid("", opset)]
    model = helper.make_model(onnx_graph, opset_imports=opsets, producer_name="deeprebirth")
    model.ir_version = helper.find_min_ir_version_for(opsets)
    return model
