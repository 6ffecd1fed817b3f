"""Mutations of prototxt text and caffemodel bytes, and fuzz cases made from the generated nets."""

from __future__ import annotations

import math
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from deeprebirth.io import caffemodel
from deeprebirth.ir.model import save_model

from .nets import RandomChooser, net_graph, random_net_text

# ---------------------------------------------------------------------------------------------------------------
# mutations


EXTREME_NUMBERS = ["0", "-1", "-7", "1", "2147483647", "2147483648", "4294967295", "4294967296", "-2147483649",
                   "9223372036854775807", "18446744073709551615", "18446744073709551616", "99999999999999999999999",
                   "1e308", "-1e308", "1e-320", "nan", "inf", "-inf", "0.5", "-0.0", "3.4e38", "65536", "1000000"]
TOKENS = ["{", "}", '"', ":", " ", "\n", "layer {", "}", "bottom: \"data\"", "top: \"data\"", "#", "\\", "\x00",
          "\xff", "type: \"Convolution\"", "type: \"Python\"", "group: 0", "num_output: 0", "kernel_size: 0",
          "dim: 0", "dim: -3", "axis: 7", "axis: -9", "slice_point: 999", "pad: 99", "stride: 0"]
NUMBER = re.compile(rb"-?\d+(\.\d+)?(e-?\d+)?")


def _flip(data: bytearray, rng: random.Random) -> None:
    if data:
        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)


def _set_byte(data: bytearray, rng: random.Random) -> None:
    if data:
        data[rng.randrange(len(data))] = rng.choice([0, 0x7F, 0x80, 0xFF, rng.randrange(256)])


def _truncate(data: bytearray, rng: random.Random) -> None:
    del data[rng.randrange(len(data) + 1):]


def _insert(data: bytearray, rng: random.Random) -> None:
    at = rng.randrange(len(data) + 1)
    data[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))


def _delete_range(data: bytearray, rng: random.Random) -> None:
    if data:
        at = rng.randrange(len(data))
        del data[at:at + rng.randint(1, 16)]


def _duplicate_range(data: bytearray, rng: random.Random) -> None:
    if data:
        at = rng.randrange(len(data))
        chunk = data[at:at + rng.randint(1, 64)]
        to = rng.randrange(len(data) + 1)
        data[to:to] = chunk


def _varint_extreme(data: bytearray, rng: random.Random) -> None:
    """Overwrite a few bytes with an extreme varint (a huge length, dim or count)."""
    if data:
        at = rng.randrange(len(data))
        value = rng.choice([0, 1, 2**31 - 1, 2**31, 2**32, 2**63 - 1, 2**64 - 1, 2**35])
        encoded = caffemodel._encode_varint(value)
        data[at:at + rng.randint(1, len(encoded))] = encoded


def _insert_token(data: bytearray, rng: random.Random) -> None:
    at = rng.randrange(len(data) + 1)
    data[at:at] = rng.choice(TOKENS).encode("utf-8", errors="surrogateescape")


def _lines(data: bytearray) -> list[bytes]:
    return bytes(data).split(b"\n")


def _delete_line(data: bytearray, rng: random.Random) -> None:
    lines = _lines(data)
    del lines[rng.randrange(len(lines))]
    data[:] = b"\n".join(lines)


def _duplicate_line(data: bytearray, rng: random.Random) -> None:
    lines = _lines(data)
    i = rng.randrange(len(lines))
    lines.insert(rng.randrange(len(lines) + 1), lines[i])
    data[:] = b"\n".join(lines)


def _swap_lines(data: bytearray, rng: random.Random) -> None:
    lines = _lines(data)
    i, j = rng.randrange(len(lines)), rng.randrange(len(lines))
    lines[i], lines[j] = lines[j], lines[i]
    data[:] = b"\n".join(lines)


def _numbers(data: bytearray) -> list[re.Match[bytes]]:
    return list(NUMBER.finditer(bytes(data)))


def _swap_numbers(data: bytearray, rng: random.Random) -> None:
    found = _numbers(data)
    if len(found) >= 2:
        a, b = sorted(rng.sample(found, 2), key=lambda m: m.start())
        data[:] = (data[:a.start()] + b.group() + data[a.end():b.start()] + a.group() + data[b.end():])


def _extreme_number(data: bytearray, rng: random.Random) -> None:
    found = _numbers(data)
    if found:
        m = rng.choice(found)
        data[m.start():m.end()] = rng.choice(EXTREME_NUMBERS).encode()


LAYER_TYPES = ["Convolution", "Deconvolution", "Pooling", "InnerProduct", "BatchNorm", "Scale", "ReLU", "Dropout",
               "Concat", "Eltwise", "Slice", "Flatten", "Softmax", "LRN", "Input", "Split", "Reshape", "Crop",
               "Bias", "PReLU", "ArgMax", "Python", "Data", "ImageData", "MyCustomLayer", "", "Permute", "PriorBox",
               "Normalize", "DetectionOutput", "Silence", "Accuracy", "SoftmaxWithLoss", "MemoryData", "DummyData"]
FIELDS = ["group: 3", "group: 1000000", "group: 0", "axis: 0", "axis: 3", "axis: -1", "axis: -5", "dilation: 0",
          "dilation: 7", "pad_h: 1", "kernel_h: 2", "kernel_w: 0", "stride_h: 3", "stride: 0", "stride: 1 stride: 2",
          "kernel_size: 1 kernel_size: 2 kernel_size: 3", "pad: 1 pad: 2 pad: 3", "round_mode: FLOOR",
          "global_pooling: true", "num_output: 0", "num_output: 4294967295", "bias_term: false", "bias_term: true",
          "slice_point: 0", "slice_point: 1 slice_point: 1", "concat_dim: 5", "end_axis: 0", "transpose: true",
          "local_size: 0", "local_size: 4", "eps: -1", "eps: 0", "use_global_stats: false", "num_axes: 0",
          "num_axes: -1", "coeff: 1", "operation: PROD", "pool: STOCHASTIC", "shape { dim: 0 }",
          "shape { dim: -1 dim: 2 }", "top_k: 0", "engine: CUDNN", "dim: 1", "dim: 1000000000"]


def _quoted(data: bytearray, key: bytes) -> list[re.Match[bytes]]:
    return list(re.finditer(rb"\b" + key + rb':\s*"([^"\n]*)"', bytes(data)))


def _retype(data: bytearray, rng: random.Random) -> None:
    """Give a layer another type (known, unknown, data, Python or empty): the text stays well-formed."""
    found = _quoted(data, b"type")
    if found:
        m = rng.choice(found)
        data[m.start(1):m.end(1)] = rng.choice(LAYER_TYPES).encode()


def _rename_blob(data: bytearray, rng: random.Random) -> None:
    """Point a bottom or top at another blob name of the net (cycles, in-place forms, double producers)."""
    found = _quoted(data, b"bottom") + _quoted(data, b"top")
    names = sorted({m.group(1) for m in found} | {b"nowhere"})
    if found:
        m = rng.choice(found)
        data[m.start(1):m.end(1)] = rng.choice(names)


def _insert_field(data: bytearray, rng: random.Random) -> None:
    """Add a (often contradictory or extreme) setting inside some layer's parameter message."""
    found = list(re.finditer(rb"_param \{|shape \{", bytes(data)))
    if found:
        m = rng.choice(found)
        data[m.end():m.end()] = b" " + rng.choice(FIELDS).encode() + b" "


LAYER_FIELDS = ["blobs { shape { dim: 3 } data: 1 data: 2 data: 3 }", "blobs { shape { dim: 2 } data: 1 }",
                "blobs { num: 1 channels: 1 height: 1 width: 2 data: 1 data: 2 }", "blobs { double_data: 1e300 }",
                "include { phase: TRAIN }", "exclude { phase: TEST }", "include { stage: \"x\" }", "phase: TRAIN",
                'bottom: "data"', 'top: "data"', 'top: "extra"', "param { lr_mult: 1 }", "loss_weight: 1",
                'python_param { module: "fuzz_never_imported" layer: "X" }',
                'transform_param { mean_file: "/nonexistent/mean.binaryproto" }',
                'data_param { source: "/nonexistent/lmdb" batch_size: 1 }', "propagate_down: false"]
NET_FIELDS = ['input: "extra"', "input_dim: 1", "input_shape { dim: 1 }", "state { phase: TRAIN }",
              "state { level: 3 stage: \"a\" }", 'layers { name: "v1" type: CONVOLUTION }', "force_backward: true",
              'layer { name: "ghost" type: "MyCustomLayer" bottom: "data" top: "ghost" }',
              ('layer { name: "py" type: "Python" bottom: "data" top: "py" '
               'python_param { module: "fuzz_never_imported" layer: "X" } }')]


def _insert_layer_field(data: bytearray, rng: random.Random) -> None:
    found = list(re.finditer(rb"layer \{", bytes(data)))
    if found:
        m = rng.choice(found)
        data[m.end():m.end()] = b" " + rng.choice(LAYER_FIELDS).encode() + b" "


def _insert_net_field(data: bytearray, rng: random.Random) -> None:
    lines = _lines(data)
    lines.insert(rng.randrange(len(lines) + 1), rng.choice(NET_FIELDS).encode())
    data[:] = b"\n".join(lines)


TEXT_MUTATORS: dict[str, Callable[[bytearray, random.Random], None]] = {
    "insert_layer_field": _insert_layer_field, "insert_net_field": _insert_net_field,
    "flip": _flip, "truncate": _truncate, "insert": _insert, "insert_token": _insert_token,
    "delete_line": _delete_line, "duplicate_line": _duplicate_line, "swap_lines": _swap_lines,
    "swap_numbers": _swap_numbers, "extreme_number": _extreme_number, "delete_range": _delete_range,
    "retype": _retype, "rename_blob": _rename_blob, "insert_field": _insert_field,
}


def _structured(data: bytearray, rng: random.Random) -> None:
    """Parse the caffemodel and break its meaning, not its syntax: drop, add or swap blobs, change a dim, put
    NaN/Inf/huge values in, rename a layer; then write it back."""
    from deeprebirth import caffe_pb2 as pb
    net = pb.NetParameter()
    try:
        net.ParseFromString(bytes(data))
    except Exception:  # noqa: BLE001  (an earlier mutation broke the bytes: nothing to parse)
        return
    layers = [layer for layer in net.layer if layer.blobs]
    if not layers:
        return
    layer = rng.choice(layers)
    blob = rng.choice(layer.blobs)
    what = rng.choice(["drop_blob", "add_blob", "dim", "nan", "inf", "huge", "rename", "swap", "legacy", "no_shape",
                       "double"])
    if what == "drop_blob":
        del layer.blobs[rng.randrange(len(layer.blobs))]
    elif what == "add_blob":
        layer.blobs.add().CopyFrom(blob)
    elif what == "dim" and blob.shape.dim:
        blob.shape.dim[rng.randrange(len(blob.shape.dim))] = rng.choice([0, 1, 2**31, 2**40, 7])
    elif what in ("nan", "inf", "huge") and blob.data:
        blob.data[rng.randrange(len(blob.data))] = {"nan": math.nan, "inf": -math.inf, "huge": 3.4e38}[what]
    elif what == "rename" and isinstance(layer.name, str):  # (a name that is not UTF-8 comes back as bytes)
        first = net.layer[0].name
        layer.name = rng.choice([layer.name + "_x", ""] + ([first] if isinstance(first, str) else []))
    elif what == "swap" and len(layers) > 1:
        other = rng.choice(layers)
        layer.blobs[0].CopyFrom(other.blobs[0])
    elif what == "legacy":
        dims = list(blob.shape.dim)
        blob.ClearField("shape")
        blob.num, blob.channels, blob.height, blob.width = ([1] * 4 + dims)[-4:] if len(dims) <= 4 else dims[:4]
    elif what == "no_shape":
        blob.ClearField("shape")
    elif what == "double":
        blob.double_data.extend(blob.data)
        blob.ClearField("data")
    data[:] = net.SerializeToString()


BINARY_MUTATORS: dict[str, Callable[[bytearray, random.Random], None]] = {
    "flip": _flip, "set_byte": _set_byte, "truncate": _truncate, "insert": _insert, "delete_range": _delete_range,
    "duplicate_range": _duplicate_range, "varint_extreme": _varint_extreme, "structured": _structured,
    "structured2": _structured,
}


@dataclass
class Case:
    """One fuzz input: the (mutated) prototxt and caffemodel, and which mutations made them."""

    prototxt: bytes
    caffemodel: bytes | None
    mutations: list[str]
    seed: int


@dataclass
class Seed:
    prototxt: bytes
    caffemodel: bytes


def make_seeds(count: int, folder: Path, seed: int = 0) -> list[Seed]:
    """``count`` random valid nets with random weights, as the bytes of their files."""
    rng = random.Random(seed)
    seeds = []
    for i in range(count):
        text = random_net_text(RandomChooser(rng), max_steps=rng.randint(2, 8))
        graph = net_graph(text, seed=i)
        proto, model = folder / f"seed{i}.prototxt", folder / f"seed{i}.caffemodel"
        save_model(graph, proto, model)
        # mutate the generator's own text (it has the legacy input forms), with the written caffemodel
        seeds.append(Seed(text.encode(), model.read_bytes()))
    return seeds


def make_case(seeds: Sequence[Seed], rng: random.Random, index: int) -> Case:
    seed = seeds[rng.randrange(len(seeds))]
    proto, model = bytearray(seed.prototxt), bytearray(seed.caffemodel)
    mutations = []
    target = rng.choice(["prototxt", "prototxt", "caffemodel", "caffemodel", "both"])
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        if target in ("prototxt", "both"):
            name = rng.choice(sorted(TEXT_MUTATORS))
            TEXT_MUTATORS[name](proto, rng)
            mutations.append(f"prototxt:{name}")
        if target in ("caffemodel", "both"):
            name = rng.choice(sorted(BINARY_MUTATORS))
            BINARY_MUTATORS[name](model, rng)
            mutations.append(f"caffemodel:{name}")
    return Case(bytes(proto), bytes(model), mutations, index)
