"""Reading and writing Caffe files: prototxt (text) and caffemodel (binary), with no pycaffe involved.

Everything old or odd about Caffe's formats is resolved here, once, so that the graph IR and the rules only ever see
a modern, phase-filtered ``NetParameter`` whose inputs are ``Input`` layers:

* legacy V1 ``layers { type: CONVOLUTION blobs_lr: 1 ... }`` are upgraded as Caffe's upgrade_proto does;
* net-level ``input`` / ``input_dim`` / ``input_shape`` become one ``Input`` layer at the front;
* train_val files are filtered by phase (and level/stage) as Caffe's ``Net::FilterNet`` does.

Caffemodels (the wire-format scanner and streaming writer) live in ``deeprebirth.io.caffemodel`` and atomic output in
``deeprebirth.io.atomic``; both are re-exported here, so ``caffe_io`` stays the one door to Caffe's files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from google.protobuf import text_format
from google.protobuf.message import DecodeError

from deeprebirth import caffe_pb2 as pb
from deeprebirth.errors import DeepRebirthError

# re-exported (see __all__): callers read and write every Caffe file through caffe_io
from deeprebirth.io.atomic import atomic_write, atomic_write_bytes
from deeprebirth.io.caffemodel import Weights, blob_to_array, read_weights, write_caffemodel

__all__ = ["DATA_LAYER_TYPES", "PHASES", "V1_LAYER_TYPES", "FilteredLayer", "Weights", "atomic_write",
           "atomic_write_bytes", "blob_to_array", "data_layer_shapes", "format_prototxt", "load_net",
           "load_net_phases", "normalize_net", "normalize_net_phases", "parse_input_shape", "parse_prototxt",
           "read_prototxt", "read_weights", "set_batch", "upgrade_v1_layer", "write_caffemodel", "write_prototxt"]

V1_LAYER_TYPES = {
    "ABSVAL": "AbsVal", "ACCURACY": "Accuracy", "ARGMAX": "ArgMax", "BNLL": "BNLL", "CONCAT": "Concat",
    "CONTRASTIVE_LOSS": "ContrastiveLoss", "CONVOLUTION": "Convolution", "DATA": "Data",
    "DECONVOLUTION": "Deconvolution", "DROPOUT": "Dropout", "DUMMY_DATA": "DummyData",
    "EUCLIDEAN_LOSS": "EuclideanLoss", "ELTWISE": "Eltwise", "EXP": "Exp", "FLATTEN": "Flatten",
    "HDF5_DATA": "HDF5Data", "HDF5_OUTPUT": "HDF5Output", "HINGE_LOSS": "HingeLoss", "IM2COL": "Im2col",
    "IMAGE_DATA": "ImageData", "INFOGAIN_LOSS": "InfogainLoss", "INNER_PRODUCT": "InnerProduct", "LRN": "LRN",
    "MEMORY_DATA": "MemoryData", "MULTINOMIAL_LOGISTIC_LOSS": "MultinomialLogisticLoss", "MVN": "MVN",
    "POOLING": "Pooling", "POWER": "Power", "RELU": "ReLU", "SIGMOID": "Sigmoid",
    "SIGMOID_CROSS_ENTROPY_LOSS": "SigmoidCrossEntropyLoss", "SILENCE": "Silence", "SOFTMAX": "Softmax",
    "SOFTMAX_LOSS": "SoftmaxWithLoss", "SPLIT": "Split", "SLICE": "Slice", "TANH": "TanH",
    "WINDOW_DATA": "WindowData", "THRESHOLD": "Threshold",
}

PHASES = {"TRAIN": pb.TRAIN, "TEST": pb.TEST}
# layers whose output shapes live in files (databases, image lists), not in the prototxt
DATA_LAYER_TYPES = ("Data", "ImageData", "HDF5Data", "WindowData", "VideoData", "AnnotatedData")


# ---------------------------------------------------------------------------------------------------------------
# prototxt


def parse_prototxt(text: str, source: str = "<text>") -> pb.NetParameter:
    """Parse prototxt text; a syntax error or unknown field becomes ``file:line:column: message``."""
    net = pb.NetParameter()
    try:
        text_format.Parse(text, net)
    except text_format.ParseError as err:
        line, column = err.GetLine(), err.GetColumn()
        message = str(err)
        prefix = f"{line}:{column} : "
        message = message.removeprefix(prefix)
        where = f"{source}:{line}:{column}" if line is not None else source
        raise DeepRebirthError(f"{where}: {message}") from None
    return net


def read_prototxt(path: str | os.PathLike[str]) -> pb.NetParameter:
    """Read a prototxt file as written (no upgrade, no filtering)."""
    try:
        raw = Path(path).read_bytes()
    except OSError as err:
        raise DeepRebirthError(f"cannot read: {err.strerror}", file=str(path)) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise DeepRebirthError("not a text prototxt (is it a binary caffemodel?)", file=str(path)) from None
    return parse_prototxt(text, str(path))


def load_net(path: str | os.PathLike[str], phase: str = "TEST") -> pb.NetParameter:
    """Read a prototxt and normalise it: V1 upgrade, net-level inputs -> Input layer, phase filter."""
    return normalize_net(read_prototxt(path), phase=phase, source=str(path))


def normalize_net(net: pb.NetParameter, phase: str = "TEST", source: str | None = None) -> pb.NetParameter:
    """Return a modern copy of ``net``: only ``layer`` entries, inputs as an Input layer, one phase's layers."""
    return normalize_net_phases(net, phase, source)[0]


def load_net_phases(path: str | os.PathLike[str],
                    phase: str = "TEST") -> tuple[pb.NetParameter, list[FilteredLayer]]:
    """``load_net``, and the layers the phase filter set aside (see ``normalize_net_phases``)."""
    return normalize_net_phases(read_prototxt(path), phase=phase, source=str(path))


def normalize_net_phases(net: pb.NetParameter, phase: str = "TEST",
                         source: str | None = None) -> tuple[pb.NetParameter, list[FilteredLayer]]:
    """``normalize_net``, and the layers the phase filter set aside, each with its slot: the number of kept
    layers before it. A train_val net is rewritten in one phase's view and written back with these re-attached."""
    if phase not in PHASES:
        raise DeepRebirthError(f"unknown phase {phase!r} (TRAIN or TEST)", file=source)
    out = pb.NetParameter()
    out.CopyFrom(net)
    if out.layers:
        if out.layer:
            raise DeepRebirthError("net mixes V1 'layers' and modern 'layer' entries", file=source)
        upgraded = [upgrade_v1_layer(v1, source) for v1 in out.layers]
        del out.layers[:]
        out.layer.extend(upgraded)
    _net_inputs_to_input_layer(out, source)
    aside = _filter_by_state(out, phase)
    if not out.layer:  # nothing to rewrite, and a caffemodel without layers is not one Caffe (or we) can read
        raise DeepRebirthError(f"the net has no layers (in phase {phase})", file=source)
    return out, aside


def upgrade_v1_layer(v1: pb.V1LayerParameter, source: str | None = None) -> pb.LayerParameter:
    """One V1 ``layers`` entry -> a modern ``layer`` (the mapping of Caffe's UpgradeV1LayerParameter)."""
    if v1.HasField("layer"):
        raise DeepRebirthError("V0 layer format (layers { layer { ... } }) is not supported", file=source,
                               layer=v1.name or None)
    layer = pb.LayerParameter()
    layer.name = v1.name
    layer.bottom.extend(v1.bottom)
    layer.top.extend(v1.top)
    if v1.HasField("type"):
        type_name = pb.V1LayerParameter.LayerType.Name(v1.type)
        if type_name not in V1_LAYER_TYPES:
            raise DeepRebirthError(f"V1 layer type {type_name} has no modern equivalent", file=source,
                                   layer=v1.name)
        layer.type = V1_LAYER_TYPES[type_name]
    layer.include.extend(v1.include)
    layer.exclude.extend(v1.exclude)
    layer.loss_weight.extend(v1.loss_weight)
    layer.blobs.extend(v1.blobs)
    n_specs = max(len(v1.param), len(v1.blob_share_mode), len(v1.blobs_lr), len(v1.weight_decay))
    for i in range(n_specs):
        spec = layer.param.add()
        if i < len(v1.param):
            spec.name = v1.param[i]
        if i < len(v1.blob_share_mode):
            spec.share_mode = v1.blob_share_mode[i]
        if i < len(v1.blobs_lr):
            spec.lr_mult = v1.blobs_lr[i]
        if i < len(v1.weight_decay):
            spec.decay_mult = v1.weight_decay[i]
    modern_fields = pb.LayerParameter.DESCRIPTOR.fields_by_name
    for field, value in v1.ListFields():
        if field.name.endswith("_param") and field.name in modern_fields:
            getattr(layer, field.name).CopyFrom(value)
    return layer


def _net_inputs_to_input_layer(net: pb.NetParameter, source: str | None) -> None:
    if not net.input:
        if net.input_shape or net.input_dim:
            raise DeepRebirthError("input_shape/input_dim given without 'input' names", file=source)
        return
    names = list(net.input)
    shapes: list[list[int]] = []
    if net.input_shape:
        if len(net.input_shape) != len(names):
            raise DeepRebirthError(f"{len(names)} net inputs but {len(net.input_shape)} input_shape entries",
                                   file=source)
        shapes = [list(shape.dim) for shape in net.input_shape]
    elif net.input_dim:
        if len(net.input_dim) != 4 * len(names):
            raise DeepRebirthError(f"{len(names)} net inputs need {4 * len(names)} input_dim values, "
                                   f"found {len(net.input_dim)}", file=source)
        dims = list(net.input_dim)
        shapes = [dims[4 * i:4 * i + 4] for i in range(len(names))]
    else:
        raise DeepRebirthError(f"net input {names[0]!r} has no input_shape or input_dim", file=source)
    taken = {layer.name for layer in net.layer}
    name = "input"
    suffix = 0
    while name in taken:
        suffix += 1
        name = f"input_{suffix}"
    input_layer = pb.LayerParameter(name=name, type="Input", top=names)
    for dims in shapes:
        input_layer.input_param.shape.add().dim.extend(dims)
    layers = [input_layer, *net.layer]
    del net.layer[:]
    net.layer.extend(layers)
    del net.input[:]
    del net.input_shape[:]
    del net.input_dim[:]


def _state_meets_rule(state: pb.NetState, rule: pb.NetStateRule) -> bool:
    if rule.HasField("phase") and rule.phase != state.phase:
        return False
    if rule.HasField("min_level") and state.level < rule.min_level:
        return False
    if rule.HasField("max_level") and state.level > rule.max_level:
        return False
    if any(stage not in state.stage for stage in rule.stage):
        return False
    return not any(stage in state.stage for stage in rule.not_stage)


@dataclass
class FilteredLayer:
    """A layer the phase filter left out (e.g. the TRAIN data layer when the TEST view is rewritten)."""

    slot: int  # how many kept layers come before it
    param: pb.LayerParameter


def _filter_by_state(net: pb.NetParameter, phase: str) -> list[FilteredLayer]:
    state = pb.NetState()
    state.CopyFrom(net.state)
    state.phase = PHASES[phase]
    kept: list[pb.LayerParameter] = []
    aside: list[FilteredLayer] = []
    for layer in net.layer:
        if layer.include:
            keep = any(_state_meets_rule(state, rule) for rule in layer.include)
        else:
            keep = not any(_state_meets_rule(state, rule) for rule in layer.exclude)
        if keep:
            kept.append(layer)
        else:
            param = pb.LayerParameter()
            param.CopyFrom(layer)
            aside.append(FilteredLayer(len(kept), param))
    if len(kept) != len(net.layer):
        del net.layer[:]
        net.layer.extend(kept)
    return aside


# ---------------------------------------------------------------------------------------------------------------
# data layers: the shape of what they produce lives in their database, not in the prototxt


def set_batch(net: Any, batch: int) -> None:
    """Give every Input layer batch size ``batch``: of a NetParameter, or of a Graph (so shapes.layer_costs match
    a run at that batch)."""
    layers = net.layer if isinstance(net, pb.NetParameter) else [layer.proto for layer in net.layers()]
    for param in layers:
        if param.type == "Input":
            for shape in param.input_param.shape:
                if shape.dim:
                    shape.dim[0] = batch


def parse_input_shape(text: str) -> tuple[str, tuple[int, ...]]:
    """``NAME:N,C,H,W`` (any number of dims) -> (NAME, shape)."""
    name, sep, dims = text.rpartition(":")
    try:
        shape = tuple(int(d) for d in dims.split(","))
    except ValueError:
        shape = ()
    if not sep or not name or not shape or any(d <= 0 for d in shape):
        raise DeepRebirthError(f"input shape {text!r}: expected BLOB:N,C,H,W with positive sizes",
                               options=("input_shapes",))
    return name, shape


def data_layer_shapes(param: pb.LayerParameter, given: dict[str, tuple[int, ...]],
                      folder: Path | None = None) -> tuple[list[tuple[int, ...]] | None, str]:
    """Top shapes of a data layer (Data, ImageData, HDF5Data, ...), or None and why they are unknown.

    A top named in ``given`` (``--input-shape``) takes that shape. Otherwise a ``Data`` layer's image top is
    (batch_size, channels, crop_size or height, crop_size or width) from the first record of its LMDB
    (``data_param.source``, as written or relative to ``folder``), and a second top (the label) is (batch_size,).
    """
    tops = list(param.top)
    if tops and all(top in given for top in tops):
        return [given[top] for top in tops], ""
    first: tuple[int, ...] | None = given.get(tops[0]) if tops else None
    reason = ""
    if first is None and param.type == "Data":
        first, reason = _lmdb_data_shape(param, folder)
    elif first is None:
        reason = f"a {param.type} layer's shape is not read from its files"
    if first is None:
        return None, reason
    shapes = [first]
    for top in tops[1:]:
        if top in given:
            shapes.append(given[top])
        elif param.type in ("Data", "ImageData", "WindowData") and len(tops) == 2:
            shapes.append((first[0],))
        else:
            return None, f"no shape for its top '{top}'"
    return shapes, ""


def _lmdb_data_shape(param: pb.LayerParameter, folder: Path | None) -> tuple[tuple[int, ...] | None, str]:
    data = param.data_param
    if not data.source:
        return None, "its data_param has no source"
    if not data.batch_size:
        return None, "its data_param has no batch_size"
    if data.backend != pb.DataParameter.LMDB:
        return None, f"its source '{data.source}' is a LevelDB, which this tool does not read"
    candidates = [Path(data.source)] + ([folder / data.source] if folder is not None else [])
    source = next((c for c in candidates if (c / "data.mdb").is_file()), None)
    if source is None:
        return None, f"its LMDB '{data.source}' does not exist here"
    import lmdb

    try:
        env = lmdb.open(str(source), readonly=True, lock=False, readahead=False, subdir=True)
        with env.begin() as txn:
            record = next(iter(txn.cursor()), None)
        env.close()
    except lmdb.Error as err:
        return None, f"cannot read its LMDB '{data.source}': {err}"
    if record is None:
        return None, f"its LMDB '{data.source}' is empty"
    datum = pb.Datum()
    try:
        datum.ParseFromString(record[1])
    except DecodeError:
        return None, f"the first record of its LMDB '{data.source}' is not a Caffe Datum"
    channels, height, width = datum.channels, datum.height, datum.width
    if datum.encoded:
        import cv2

        image = cv2.imdecode(np.frombuffer(datum.data, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
        if image is None:
            return None, f"the first image of its LMDB '{data.source}' does not decode"
        height, width = image.shape[:2]
        channels = 1 if image.ndim == 2 else image.shape[2]
        if param.transform_param.force_color:
            channels = 3
        elif param.transform_param.force_gray:
            channels = 1
    crop = param.transform_param.crop_size
    if crop:
        if crop > height or crop > width:
            return None, f"crop_size {crop} is larger than its images ({height}x{width})"
        height = width = crop
    return (data.batch_size, channels, height, width), ""


def format_prototxt(net: pb.NetParameter) -> str:
    return text_format.MessageToString(net)


def write_prototxt(path: str | os.PathLike[str], net: pb.NetParameter) -> None:
    atomic_write_bytes(path, format_prototxt(net))
