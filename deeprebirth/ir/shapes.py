"""Shape inference and per-layer cost (parameters, MACs, activation memory) following Caffe's own formulas.

Each supported type has one small function ``(layer, bottom shapes) -> top shapes``. A type without one (a fork's
custom layer, a data layer whose shape lives in a database) gives unknown shapes, and everything downstream of it is
unknown too: rules do not touch layers whose shapes are unknown.

Kept as one module: it is a table of small per-type rules (``SHAPE_FUNCTIONS``) that is read, and extended, one
type at a time in one place.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from deeprebirth import caffe_pb2 as pb
from deeprebirth.aliases import Shape
from deeprebirth.errors import DeepRebirthError
from deeprebirth.ir.graph import Graph, Layer

ShapeFn = Callable[[Layer, list[Shape]], list[Shape]]

MAX_BLOB_ELEMENTS = 2**31 - 1  # Caffe's Blob refuses more (INT_MAX)


class ShapeError(Exception):
    """A layer's settings that do not fit its inputs."""


# ---------------------------------------------------------------------------------------------------------------
# spatial geometry shared by convolution, deconvolution and pooling


@dataclass(frozen=True)
class ConvGeometry:
    kernel: tuple[int, int]
    stride: tuple[int, int]
    pad: tuple[int, int]
    dilation: tuple[int, int]


def _pair(repeated: list[int], h: int | None, w: int | None, default: int | None, what: str) -> tuple[int, int]:
    if h is not None or w is not None:
        if h is None or w is None:
            raise ShapeError(f"{what}_h and {what}_w must be given together")
        return h, w
    values = list(repeated)
    if not values:
        if default is None:
            raise ShapeError(f"no {what} given")
        return default, default
    if len(values) == 1:
        return values[0], values[0]
    if len(values) == 2:
        return values[0], values[1]
    raise ShapeError(f"{len(values)} {what} values for a 2-D layer")


def conv_geometry(param: pb.ConvolutionParameter) -> ConvGeometry:
    def opt(name: str) -> int | None:
        return getattr(param, name) if param.HasField(name) else None

    return ConvGeometry(
        kernel=_pair(list(param.kernel_size), opt("kernel_h"), opt("kernel_w"), None, "kernel"),
        stride=_pair(list(param.stride), opt("stride_h"), opt("stride_w"), 1, "stride"),
        pad=_pair(list(param.pad), opt("pad_h"), opt("pad_w"), 0, "pad"),
        dilation=_pair(list(param.dilation), None, None, 1, "dilation"),
    )


def pool_geometry(param: pb.PoolingParameter, spatial: tuple[int, int]) -> ConvGeometry:
    def opt(name: str) -> int | None:
        return getattr(param, name) if param.HasField(name) else None

    if param.global_pooling:
        kernel = spatial
    else:
        kernel = _pair([param.kernel_size] if param.HasField("kernel_size") else [],
                       opt("kernel_h"), opt("kernel_w"), None, "kernel")
    stride = _pair([param.stride], opt("stride_h"), opt("stride_w"), 1, "stride")
    pad = _pair([param.pad], opt("pad_h"), opt("pad_w"), 0, "pad")
    if param.global_pooling:
        stride, pad = (1, 1), (0, 0)
    return ConvGeometry(kernel, stride, pad, (1, 1))


def conv_output_size(size: int, kernel: int, stride: int, pad: int, dilation: int = 1) -> int:
    """Caffe convolution: rounds down."""
    extent = dilation * (kernel - 1) + 1
    return (size + 2 * pad - extent) // stride + 1


def pool_output_size(size: int, kernel: int, stride: int, pad: int, ceil: bool = True) -> int:
    """Caffe pooling: rounds up, then drops a last window that would start inside the padding."""
    span = size + 2 * pad - kernel
    out = (-(-span // stride) if ceil else span // stride) + 1
    if pad and (out - 1) * stride >= size + pad:
        out -= 1
    return out


def _positive(shape: Shape, layer: Layer) -> Shape:
    if any(d <= 0 for d in shape):
        raise ShapeError(f"output shape {shape} has a non-positive size")
    if math.prod(shape) > MAX_BLOB_ELEMENTS:
        raise ShapeError(f"output shape {shape} exceeds Caffe's blob size limit")
    return shape


def _one(bottoms: list[Shape], rank: int | None = 4) -> Shape:
    if not bottoms:
        raise ShapeError("needs a bottom")
    if rank is not None and len(bottoms[0]) != rank:
        raise ShapeError(f"expects a {rank}-D input, got {bottoms[0]}")
    return bottoms[0]


def _axis(axis: int, rank: int) -> int:
    real = axis + rank if axis < 0 else axis
    if not 0 <= real < rank:
        raise ShapeError(f"axis {axis} out of range for a {rank}-D blob")
    return real


# ---------------------------------------------------------------------------------------------------------------
# per-type shape functions


def _convolution(layer: Layer, bottoms: list[Shape]) -> list[Shape]:
    n, c, h, w = _one(bottoms)
    if len(layer.tops) != len(bottoms) or any(b != bottoms[0] for b in bottoms):  # Caffe: one top per bottom
        raise ShapeError(f"{len(bottoms)} bottoms of shapes {bottoms} need as many tops of one shape, "
                         f"{len(layer.tops)} given")
    p = layer.proto.convolution_param
    g = conv_geometry(p)
    group = p.group
    if p.num_output <= 0:
        raise ShapeError("num_output must be positive")
    if group <= 0 or c % group or p.num_output % group:
        raise ShapeError(f"group {group} does not divide channels {c} and num_output {p.num_output}")
    if min(g.kernel) <= 0 or min(g.stride) <= 0 or min(g.dilation) <= 0 or min(g.pad) < 0:
        raise ShapeError("kernel, stride and dilation must be positive, pad non-negative")
    if p.num_output * (c // group) * g.kernel[0] * g.kernel[1] > MAX_BLOB_ELEMENTS:
        raise ShapeError("the weights exceed Caffe's blob size limit")
    if layer.type == "Deconvolution":
        size = [g.stride[i] * ((h, w)[i] - 1) + g.dilation[i] * (g.kernel[i] - 1) + 1 - 2 * g.pad[i]
                for i in range(2)]
    else:
        size = [conv_output_size((h, w)[i], g.kernel[i], g.stride[i], g.pad[i], g.dilation[i]) for i in range(2)]
    return [_positive((n, p.num_output, size[0], size[1]), layer)] * len(layer.tops)


def _pooling(layer: Layer, bottoms: list[Shape]) -> list[Shape]:
    n, c, h, w = _one(bottoms)
    p = layer.proto.pooling_param
    g = pool_geometry(p, (h, w))
    if min(g.kernel) <= 0 or min(g.stride) <= 0:
        raise ShapeError("kernel and stride must be positive")
    if g.pad[0] >= g.kernel[0] or g.pad[1] >= g.kernel[1]:
        raise ShapeError("pad must be smaller than the kernel")
    ceil = not (p.HasField("round_mode") and p.round_mode == pb.PoolingParameter.FLOOR)
    size = [pool_output_size((h, w)[i], g.kernel[i], g.stride[i], g.pad[i], ceil) for i in range(2)]
    return [_positive((n, c, size[0], size[1]), layer)] * len(layer.tops)


def _inner_product(layer: Layer, bottoms: list[Shape]) -> list[Shape]:
    shape = _one(bottoms, None)
    p = layer.proto.inner_product_param
    axis = _axis(p.axis, len(shape))
    if p.num_output <= 0:
        raise ShapeError("num_output must be positive")
    if math.prod(shape[axis:]) * p.num_output > MAX_BLOB_ELEMENTS:
        raise ShapeError(f"{p.num_output} x {math.prod(shape[axis:])} weights exceed Caffe's blob size limit")
    return [_positive(shape[:axis] + (p.num_output,), layer)]


def _same(layer: Layer, bottoms: list[Shape]) -> list[Shape]:
    # Caffe's ExactNumTopBlobs(1) (Split: any number); rules that remove such a layer rely on its one top
    if layer.type != "Split" and len(layer.tops) != 1:
        raise ShapeError(f"takes one top, {len(layer.tops)} given")
    return [_one(bottoms, None)] * len(layer.tops)


def _eltwise(layer: Layer, bottoms: list[Shape]) -> list[Shape]:
    if any(b != bottoms[0] for b in bottoms):
        raise ShapeError(f"inputs differ in shape: {bottoms}")
    return [bottoms[0]]


def _concat(layer: Layer, bottoms: list[Shape]) -> list[Shape]:
    p = layer.proto.concat_param
    axis = p.concat_dim if p.HasField("concat_dim") else p.axis
    axis = _axis(axis, len(bottoms[0]))
    for b in bottoms[1:]:
        if len(b) != len(bottoms[0]) or any(b[i] != bottoms[0][i] for i in range(len(b)) if i != axis):
            raise ShapeError(f"inputs differ outside the concat axis: {bottoms}")
    total = sum(b[axis] for b in bottoms)
    return [bottoms[0][:axis] + (total,) + bottoms[0][axis + 1:]]


def _slice(layer: Layer, bottoms: list[Shape]) -> list[Shape]:
    shape = _one(bottoms, None)
    p = layer.proto.slice_param
    axis = _axis(p.slice_dim if p.HasField("slice_dim") else p.axis, len(shape))
    points = [0, *p.slice_point, shape[axis]]
    if p.slice_point:
        if len(p.slice_point) != len(layer.tops) - 1:
            raise ShapeError("slice_point count must be one less than the tops")
        sizes = [points[i + 1] - points[i] for i in range(len(layer.tops))]
    else:
        if shape[axis] % len(layer.tops):
            raise ShapeError(f"axis size {shape[axis]} does not split into {len(layer.tops)} tops")
        sizes = [shape[axis] // len(layer.tops)] * len(layer.tops)
    return [_positive(shape[:axis] + (s,) + shape[axis + 1:], layer) for s in sizes]


def _flatten(layer: Layer, bottoms: list[Shape]) -> list[Shape]:
    shape = _one(bottoms, None)
    p = layer.proto.flatten_param
    start, end = _axis(p.axis, len(shape)), _axis(p.end_axis, len(shape))
    return [shape[:start] + (math.prod(shape[start:end + 1]),) + shape[end + 1:]]


def _reshape(layer: Layer, bottoms: list[Shape]) -> list[Shape]:
    shape = _one(bottoms, None)
    p = layer.proto.reshape_param
    start = _axis(p.axis, len(shape) + 1) if p.axis >= 0 else len(shape) + 1 + p.axis
    end = len(shape) if p.num_axes == -1 else start + p.num_axes
    if end > len(shape):
        raise ShapeError("reshape axes run past the input")
    dims = []
    for i, d in enumerate(p.shape.dim):
        dims.append(shape[start + i] if d == 0 else d)
    new = list(shape[:start]) + dims + list(shape[end:])
    if new.count(-1) > 1:
        raise ShapeError("more than one -1 in reshape")
    if -1 in new:
        known = math.prod(d for d in new if d != -1)
        if known == 0 or math.prod(shape) % known:
            raise ShapeError(f"cannot reshape {shape} into {tuple(new)}")
        new[new.index(-1)] = math.prod(shape) // known
    if math.prod(new) != math.prod(shape):
        raise ShapeError(f"cannot reshape {shape} into {tuple(new)}")
    return [tuple(new)]


def _crop(layer: Layer, bottoms: list[Shape]) -> list[Shape]:
    if len(bottoms) != 2:
        raise ShapeError("needs two bottoms")
    axis = _axis(layer.proto.crop_param.axis, len(bottoms[0]))
    return [bottoms[0][:axis] + bottoms[1][axis:]]


def _input(layer: Layer, bottoms: list[Shape]) -> list[Shape]:
    shapes = [tuple(int(d) for d in s.dim) for s in layer.proto.input_param.shape]
    if len(shapes) == 1:
        shapes = shapes * len(layer.tops)
    if len(shapes) != len(layer.tops):
        raise ShapeError(f"{len(layer.tops)} tops but {len(shapes)} shapes")
    return [_positive(s, layer) for s in shapes]


def _memory_data(layer: Layer, bottoms: list[Shape]) -> list[Shape]:
    p = layer.proto.memory_data_param
    return [(p.batch_size, p.channels, p.height, p.width), (p.batch_size,)][:len(layer.tops)]


def _dummy_data(layer: Layer, bottoms: list[Shape]) -> list[Shape]:
    shapes = [tuple(int(d) for d in s.dim) for s in layer.proto.dummy_data_param.shape]
    return (shapes * len(layer.tops))[:len(layer.tops)] if len(shapes) == 1 else shapes


def _scalar_loss(layer: Layer, bottoms: list[Shape]) -> list[Shape]:
    return [()] * len(layer.tops)


def _argmax(layer: Layer, bottoms: list[Shape]) -> list[Shape]:
    shape = _one(bottoms, None)
    p = layer.proto.argmax_param
    if p.HasField("axis"):
        axis = _axis(p.axis, len(shape))
        return [shape[:axis] + (p.top_k,) + shape[axis + 1:]]
    return [(shape[0], 2 if p.out_max_val else 1, p.top_k)]


def _permute(layer: Layer, bottoms: list[Shape]) -> list[Shape]:
    shape = _one(bottoms, None)
    order = list(layer.proto.permute_param.order)
    order += [i for i in range(len(shape)) if i not in order]
    return [tuple(shape[i] for i in order)]


def _prior_box(layer: Layer, bottoms: list[Shape]) -> list[Shape]:
    p = layer.proto.prior_box_param
    ratios = [1.0]
    for r in p.aspect_ratio:
        for value in ([r, 1.0 / r] if p.flip else [r]):
            if all(abs(value - known) > 1e-6 for known in ratios):
                ratios.append(value)
    priors = len(p.min_size) * len(ratios) + len(p.max_size)
    _, _, h, w = _one(bottoms)
    return [(1, 2, h * w * priors * 4)]


def _detection_output(layer: Layer, bottoms: list[Shape]) -> list[Shape]:
    return [(1, 1, 1, 7)]  # Caffe's shape at set-up; forward resizes it to the detections found


SHAPE_FUNCTIONS: dict[str, ShapeFn] = {
    "Convolution": _convolution, "Deconvolution": _convolution, "Pooling": _pooling,
    "InnerProduct": _inner_product, "Concat": _concat, "Eltwise": _eltwise, "Slice": _slice, "Flatten": _flatten,
    "Reshape": _reshape, "Crop": _crop, "Input": _input, "MemoryData": _memory_data, "DummyData": _dummy_data,
    "ArgMax": _argmax, "Permute": _permute, "PriorBox": _prior_box, "DetectionOutput": _detection_output,
    "SoftmaxWithLoss": _scalar_loss, "EuclideanLoss": _scalar_loss, "Accuracy": _scalar_loss,
    "SigmoidCrossEntropyLoss": _scalar_loss, "HingeLoss": _scalar_loss, "InfogainLoss": _scalar_loss,
    "MultinomialLogisticLoss": _scalar_loss, "Silence": lambda layer, b: [],
}
for _type in ("LRN", "BatchNorm", "Scale", "Bias", "ReLU", "PReLU", "ELU", "Sigmoid", "TanH", "AbsVal", "BNLL",
              "Power", "Exp", "Log", "Threshold", "Dropout", "Softmax", "Clip", "ReLU6", "Swish", "MVN", "Split",
              "Normalize"):
    SHAPE_FUNCTIONS[_type] = _same


# ---------------------------------------------------------------------------------------------------------------
# learnable blobs each layer type expects


def param_shapes(layer: Layer, bottoms: list[Shape]) -> list[Shape] | None:
    """Shapes of the weight blobs Caffe would create for ``layer``; None for a type whose blobs we do not model."""
    t = layer.type
    if t in ("Convolution", "Deconvolution"):
        p = layer.proto.convolution_param
        g = conv_geometry(p)
        c = bottoms[0][1]
        weight = (p.num_output, c // p.group, *g.kernel) if t == "Convolution" else \
            (c, p.num_output // p.group, *g.kernel)
        return [weight, (p.num_output,)] if p.bias_term else [weight]
    if t == "InnerProduct":
        ip = layer.proto.inner_product_param
        k = math.prod(bottoms[0][_axis(ip.axis, len(bottoms[0])):])
        matrix: Shape = (k, ip.num_output) if ip.transpose else (ip.num_output, k)
        return [matrix, (ip.num_output,)] if ip.bias_term else [matrix]
    if t == "BatchNorm":
        c = bottoms[0][1] if len(bottoms[0]) > 1 else 1
        return [(c,), (c,), (1,)]
    if t in ("Scale", "Bias"):
        p = layer.proto.scale_param if t == "Scale" else layer.proto.bias_param
        if len(bottoms) > 1:
            return [bottoms[1]] if t == "Scale" and p.bias_term else []  # the factor comes from bottom 1
        axis = _axis(p.axis, len(bottoms[0]))
        num_axes = p.num_axes
        shape = bottoms[0][axis:] if num_axes == -1 else bottoms[0][axis:axis + num_axes]
        if t == "Bias":
            return [shape]
        return [shape, shape] if p.bias_term else [shape]
    if t == "PReLU":  # a shared slope is a 0-D blob in Caffe, and its by-name loading checks shapes strictly
        return [()] if layer.proto.prelu_param.channel_shared else [(bottoms[0][1],)]
    if t == "Normalize":  # SSD's L2 normalisation: one learned scale per channel (or one 0-D scale for all)
        return [()] if layer.proto.norm_param.channel_shared else [(bottoms[0][1],)]
    if t in SHAPE_FUNCTIONS:
        return []
    return None


# ---------------------------------------------------------------------------------------------------------------
# whole-net inference and costs


@dataclass(frozen=True)
class LayerCost:
    name: str
    type: str
    top_shapes: list[Shape] | None  # None: unknown
    params: int  # learnable values
    macs: int  # multiply-accumulates of the layer's tensor arithmetic (conv, deconv, inner product, scale)
    activation_bytes: int  # float32 bytes of the tops this layer adds (in-place tops add nothing)


def infer_shapes(graph: Graph) -> dict[str, Shape | None]:
    """Shape of every blob (None where unknown); errors name the layer and what does not fit."""
    shapes: dict[str, Shape | None] = {}
    for layer in graph.layers():
        bottoms = [shapes[b] for b in layer.bottoms]
        if layer.top_shapes is not None:  # a data layer whose shapes were found at load time
            shapes.update(zip(layer.tops, layer.top_shapes))
            continue
        fn = SHAPE_FUNCTIONS.get(layer.type)
        if fn is None or any(b is None for b in bottoms):
            for top in layer.tops:
                shapes[top] = None
            continue
        try:
            tops = fn(layer, bottoms)  # type: ignore[arg-type]
        except (ShapeError, ZeroDivisionError, IndexError) as err:
            raise DeepRebirthError(f"{layer.type}: {err}", file=graph.source, layer=layer.name) from None
        if len(tops) != len(layer.tops):
            raise DeepRebirthError(f"{layer.type} produces {len(tops)} tops, {len(layer.tops)} listed",
                                   file=graph.source, layer=layer.name)
        for top, shape in zip(layer.tops, tops):
            shapes[top] = tuple(int(d) for d in shape)
    return shapes


def expected_param_shapes(graph: Graph, shapes: dict[str, Shape | None] | None = None) -> dict[str, list[Shape]]:
    """Per layer with modelled blobs: the weight shapes it needs (layers with unknown input shapes left out)."""
    shapes = infer_shapes(graph) if shapes is None else shapes
    expected = {}
    for layer in graph.layers():
        bottoms = [shapes[b] for b in layer.bottoms]
        if any(b is None for b in bottoms):
            continue
        try:
            found = param_shapes(layer, bottoms)  # type: ignore[arg-type]
        except ShapeError as err:
            raise DeepRebirthError(f"{layer.type}: {err}", file=graph.source, layer=layer.name) from None
        if found is not None:
            expected[layer.name] = found
    return expected


def layer_costs(graph: Graph, shapes: dict[str, Shape | None] | None = None) -> list[LayerCost]:
    shapes = infer_shapes(graph) if shapes is None else shapes
    costs = []
    for layer in graph.layers():
        tops = [shapes[t] for t in layer.tops]
        known = all(t is not None for t in tops)
        params = sum(int(b.size) for b in layer.blobs) if layer.blobs else 0
        if not layer.blobs and known:
            bottoms = [shapes[b] for b in layer.bottoms]
            if all(b is not None for b in bottoms):
                expected = param_shapes(layer, bottoms) or []  # type: ignore[arg-type]
                params = sum(math.prod(s) for s in expected)
        macs = 0
        if known and tops:
            out = tops[0]
            assert out is not None
            if layer.type in ("Convolution", "Deconvolution"):
                p = layer.proto.convolution_param
                g = conv_geometry(p)
                bottom = shapes[layer.bottoms[0]]
                assert bottom is not None
                per_output = (bottom[1] // p.group) * g.kernel[0] * g.kernel[1]
                macs = math.prod(out) * per_output if layer.type == "Convolution" else \
                    math.prod(bottom) * (p.num_output // p.group) * g.kernel[0] * g.kernel[1]
            elif layer.type == "InnerProduct":
                bottom = shapes[layer.bottoms[0]]
                assert bottom is not None
                axis = _axis(layer.proto.inner_product_param.axis, len(bottom))
                macs = math.prod(out) * math.prod(bottom[axis:])
            elif layer.type in ("Scale", "BatchNorm", "Bias"):
                macs = math.prod(out)
        act = 0
        if known:
            for i, top in enumerate(layer.tops):
                in_place = i < len(layer.bottoms) and graph.caffe_name(top) == graph.caffe_name(layer.bottoms[i])
                if not in_place:
                    act += 4 * math.prod(tops[i])  # type: ignore[arg-type]
        costs.append(LayerCost(layer.name, layer.type, tops if known else None, params, macs, act))  # type: ignore
    return costs
