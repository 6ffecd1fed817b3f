"""Random valid Caffe nets, and a mutation fuzzer for prototxt text and caffemodel bytes.

One module for three users: the hypothesis properties (tests/test_properties.py), the CI-sized fuzz
(tests/test_fuzz.py) and the long fuzz run (benchmarks/fuzz.py). The generator is written against a tiny
``Chooser`` interface so the same code is driven by a seeded ``random.Random`` (reproducible fuzz seeds) or by
hypothesis' ``draw`` (so failing nets shrink to small ones).

Every net the generator writes is one real Caffe accepts and runs: the properties run them in pycaffe, and Caffe
aborts the whole process on a net it refuses, so "valid" here means valid for Caffe, not only for deeprebirth.

The fuzzer's contract (what ``run_case`` checks): any input bytes end either in written outputs that load again,
or in exit code 2 with one ``error: ...`` line on stderr and no output file at all. Anything else (another
exception, a traceback, exit 3, a hang, a stray temp file, an output we cannot read back) is a crash.
"""

from __future__ import annotations

import contextlib
import math
import random
import re
import shutil
import signal
import traceback
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, Protocol, TypeVar

from click.testing import CliRunner
from helpers import graph_from_text

from deeprebirth import caffe_io
from deeprebirth.cli import main
from deeprebirth.errors import DeepRebirthError
from deeprebirth.graph import Graph
from deeprebirth.model import load_model, save_model
from deeprebirth.shapes import conv_output_size, pool_output_size

T = TypeVar("T")

MAX_CHANNELS = 16
MAX_SIZE = 40


# ---------------------------------------------------------------------------------------------------------------
# choices: a seeded Random or hypothesis' draw


class Chooser(Protocol):
    def integer(self, lo: int, hi: int) -> int: ...

    def choice(self, options: Sequence[T]) -> T: ...

    def chance(self, p: float) -> bool: ...


class RandomChooser:
    """Choices from a seeded ``random.Random``: the same seed gives the same net."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def integer(self, lo: int, hi: int) -> int:
        return self.rng.randint(lo, hi)

    def choice(self, options: Sequence[T]) -> T:
        return options[self.rng.randrange(len(options))]

    def chance(self, p: float) -> bool:
        return self.rng.random() < p


class DrawChooser:
    """Choices drawn through hypothesis (shrinks towards small integers, the first option and False)."""

    def __init__(self, draw: Callable[[Any], Any]) -> None:
        from hypothesis import strategies as st

        self.draw, self.st = draw, st

    def integer(self, lo: int, hi: int) -> int:
        return int(self.draw(self.st.integers(lo, hi)))

    def choice(self, options: Sequence[T]) -> T:
        return options[self.integer(0, len(options) - 1)]

    def chance(self, p: float) -> bool:
        return self.integer(0, 999) >= 1000 - int(p * 1000)  # 0, where shrinking goes, is False


# ---------------------------------------------------------------------------------------------------------------
# random valid nets


@dataclass
class _Blob:
    name: str
    shape: tuple[int, ...]
    read: bool = False  # whether a layer reads the blob's current value (then Caffe allows no in-place layer on it)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


class NetGenerator:
    """Builds one random net, layer by layer, keeping every shape valid for Caffe.

    Blobs stay available after they are read, so later layers branch off them (multi-consumer blobs); in-place
    layers (ReLU, BatchNorm, Scale, Dropout) overwrite a blob under its own name.
    """

    def __init__(self, choose: Chooser) -> None:
        self.c = choose
        self.lines: list[str] = []
        self.blobs: list[_Blob] = []
        self.count = 0

    # -- plumbing

    def _name(self, kind: str) -> str:
        self.count += 1
        return f"{kind}{self.count}"

    def _emit(self, name: str, type_: str, bottoms: Sequence[str], tops: Sequence[str], params: str = "") -> None:
        parts = [f'name: "{name}"', f'type: "{type_}"'] + [f'bottom: "{b}"' for b in bottoms]
        parts += [f'top: "{t}"' for t in tops]
        self.lines.append("layer { " + " ".join(parts) + (f" {params}" if params else "") + " }")
        for blob in self.blobs:
            if blob.name in bottoms:
                blob.read = blob.name not in tops  # an in-place top is a new value nobody reads yet

    def _pick(self, rank: int | None = 4) -> _Blob | None:
        options = [b for b in self.blobs if rank is None or len(b.shape) == rank]
        if not options:
            return None
        # prefer recent blobs (chains), but keep older ones reachable (branches, multi-consumer blobs)
        if self.c.chance(0.6):
            return options[-1]
        return self.c.choice(options)

    def _new(self, name: str, shape: tuple[int, ...]) -> _Blob:
        blob = _Blob(name, shape)
        self.blobs.append(blob)
        return blob

    def _top(self, x: _Blob, kind: str, in_place_ok: bool = True) -> tuple[str, bool]:
        # Caffe inserts a Split for a blob with several readers, after which an in-place reader would become a
        # second producer of the name ("Top blob produced by multiple sources"): in place only on unread blobs.
        in_place = in_place_ok and not x.read and self.c.chance(0.5)
        return (x.name if in_place else self._name(kind)), in_place

    # -- the net

    def input(self) -> None:
        n, c = self.c.integer(1, 2), self.c.integer(1, 6)
        h, w = self.c.integer(1, 17), self.c.integer(1, 17)
        form = self.c.choice(["layer", "input_shape", "input_dim"])
        if form == "layer":
            self.lines.append(f'layer {{ name: "data" type: "Input" top: "data" '
                              f'input_param {{ shape {{ dim: {n} dim: {c} dim: {h} dim: {w} }} }} }}')
        elif form == "input_shape":
            self.lines.append(f'input: "data" input_shape {{ dim: {n} dim: {c} dim: {h} dim: {w} }}')
        else:
            self.lines.append(f'input: "data" input_dim: {n} input_dim: {c} input_dim: {h} input_dim: {w}')
        self._new("data", (n, c, h, w))

    def convolution(self, x: _Blob, deconv: bool = False) -> _Blob:
        n, c, h, w = x.shape
        group = self.c.choice(_divisors(c)) if self.c.chance(0.3) else 1
        per_group = self.c.integer(1, max(1, MAX_CHANNELS // group // 2))
        out = group * per_group
        if self.c.chance(0.2):
            kh, kw = self.c.integer(1, 3), self.c.integer(1, 3)
            kernel = f"kernel_h: {kh} kernel_w: {kw}"
        else:
            kh = kw = self.c.choice([1, 3, 2, 5])
            kernel = f"kernel_size: {kh}"
        stride = self.c.integer(1, 2)
        pad = self.c.integer(0, 2)
        dilation = self.c.choice([1, 1, 2])
        if deconv:
            size = [stride * (s - 1) + dilation * (k - 1) + 1 - 2 * pad for s, k in ((h, kh), (w, kw))]
        else:
            size = [conv_output_size(s, k, stride, pad, dilation) for s, k in ((h, kh), (w, kw))]
        if min(size) < 1 or max(size) > MAX_SIZE:  # fall back to a geometry that always fits
            kernel, kh, kw, stride, pad, dilation = "kernel_size: 1", 1, 1, 1, 0, 1
            size = [h, w]
        bias = "" if self.c.chance(0.7) else " bias_term: false"
        extra = (f" stride: {stride}" if stride != 1 else "") + (f" pad: {pad}" if pad else "")
        extra += f" dilation: {dilation}" if dilation != 1 else ""
        extra += f" group: {group}" if group != 1 else ""
        name = self._name("deconv" if deconv else "conv")
        self._emit(name, "Deconvolution" if deconv else "Convolution", [x.name], [name],
                   f"convolution_param {{ num_output: {out} {kernel}{extra}{bias} }}")
        return self._new(name, (n, out, size[0], size[1]))

    def batchnorm_scale(self, x: _Blob) -> None:
        top, _ = self._top(x, "bn")
        eps = self.c.choice(["", " eps: 0.001", " eps: 0.1"])
        stats = self.c.choice(["", " use_global_stats: true"])
        params = f"batch_norm_param {{{stats}{eps} }}" if stats or eps else ""
        self._emit(self._name("bn"), "BatchNorm", [x.name], [top], params)
        if top != x.name:
            x = self._new(top, x.shape)
        if self.c.chance(0.8):
            self.scale(x)

    def scale(self, x: _Blob) -> None:
        top, _ = self._top(x, "scale")
        bias = " scale_param { bias_term: true }" if self.c.chance(0.6) else ""
        self._emit(self._name("scale"), "Scale", [x.name], [top], bias.strip())
        if top != x.name:
            self._new(top, x.shape)

    def elementwise(self, x: _Blob) -> None:
        type_ = self.c.choice(["ReLU", "ReLU", "Dropout", "Sigmoid", "TanH"])
        top, _ = self._top(x, type_.lower())
        params = ""
        if type_ == "ReLU" and self.c.chance(0.3):
            params = "relu_param { negative_slope: 0.1 }"
        elif type_ == "Dropout":
            params = f"dropout_param {{ dropout_ratio: {self.c.choice([0.5, 0.2])} }}"
        self._emit(self._name(type_.lower()), type_, [x.name], [top], params)
        if top != x.name:
            self._new(top, x.shape)

    def pooling(self, x: _Blob) -> _Blob:
        n, c, h, w = x.shape
        pool = self.c.choice(["MAX", "AVE"])
        name = self._name("pool")
        if self.c.chance(0.2):
            self._emit(name, "Pooling", [x.name], [name], f"pooling_param {{ pool: {pool} global_pooling: true }}")
            return self._new(name, (n, c, 1, 1))
        k = self.c.integer(1, 3)
        stride = self.c.integer(1, k)  # a stride past the kernel makes Caffe's ceil mode pool empty windows
        pad = self.c.integer(0, k - 1)
        if k > h + 2 * pad or k > w + 2 * pad:
            k, stride, pad = 1, 1, 0
        size = [pool_output_size(s, k, stride, pad) for s in (h, w)]
        self._emit(name, "Pooling", [x.name], [name],
                   f"pooling_param {{ pool: {pool} kernel_size: {k} stride: {stride} pad: {pad} }}")
        return self._new(name, (n, c, size[0], size[1]))

    def lrn(self, x: _Blob) -> _Blob:
        name = self._name("lrn")
        region = self.c.choice(["ACROSS_CHANNELS", "WITHIN_CHANNEL"])
        size = self.c.choice([1, 3, 5])
        self._emit(name, "LRN", [x.name], [name], f"lrn_param {{ local_size: {size} alpha: 0.0001 beta: 0.75 "
                                                  f"norm_region: {region} }}")
        return self._new(name, x.shape)

    def _sibling(self, x: _Blob, same_channels: bool) -> _Blob:
        """Another blob with x's N, H, W (and channels, if asked): an existing one or a new 1x1 branch from x."""
        n, c, h, w = x.shape
        options = [b for b in self.blobs if b is not x and len(b.shape) == 4 and b.shape[0] == n
                   and b.shape[2:] == (h, w) and (not same_channels or b.shape[1] == c)]
        if options and self.c.chance(0.5):
            return self.c.choice(options)
        name = self._name("branch")
        out = c if same_channels else self.c.integer(1, 8)
        self._emit(name, "Convolution", [x.name], [name], f"convolution_param {{ num_output: {out} kernel_size: 1 }}")
        return self._new(name, (n, out, h, w))

    def concat(self, x: _Blob) -> _Blob:
        others = [self._sibling(x, False) for _ in range(self.c.integer(1, 2))]
        parts = [x, *others]
        name = self._name("concat")
        self._emit(name, "Concat", [p.name for p in parts], [name])
        return self._new(name, (x.shape[0], sum(p.shape[1] for p in parts), *x.shape[2:]))

    def eltwise(self, x: _Blob) -> _Blob:
        other = self._sibling(x, True)
        op = self.c.choice(["SUM", "PROD", "MAX"])
        coeff = " coeff: 0.5 coeff: -1.5" if op == "SUM" and self.c.chance(0.4) else ""
        name = self._name("eltwise")
        self._emit(name, "Eltwise", [x.name, other.name], [name], f"eltwise_param {{ operation: {op}{coeff} }}")
        return self._new(name, x.shape)

    def slice(self, x: _Blob) -> None:
        n, c, h, w = x.shape
        if c < 2:
            return
        names = [self._name("slice"), self._name("slice")]
        if c % 2 == 0 and self.c.chance(0.5):
            self._emit(self._name("slice"), "Slice", [x.name], names)
            sizes = [c // 2, c // 2]
        else:
            point = self.c.integer(1, c - 1)
            self._emit(self._name("slice"), "Slice", [x.name], names, f"slice_param {{ slice_point: {point} }}")
            sizes = [point, c - point]
        for name, size in zip(names, sizes):
            self._new(name, (n, size, h, w))

    def inner_product(self, x: _Blob) -> _Blob:
        name = self._name("fc")
        out = self.c.integer(1, 10)
        extra = " bias_term: false" if self.c.chance(0.2) else ""
        extra += " transpose: true" if self.c.chance(0.15) else ""
        self._emit(name, "InnerProduct", [x.name], [name], f"inner_product_param {{ num_output: {out}{extra} }}")
        return self._new(name, (x.shape[0], out))

    def flatten(self, x: _Blob) -> _Blob:
        name = self._name("flatten")
        self._emit(name, "Flatten", [x.name], [name])
        return self._new(name, (x.shape[0], math.prod(x.shape[1:])))

    def softmax(self, x: _Blob) -> None:
        name = self._name("prob")
        self._emit(name, "Softmax", [x.name], [name])
        self._new(name, x.shape)

    def step(self) -> None:
        x4 = self._pick(4)
        if x4 is None or self.c.chance(0.1):
            x2 = self._pick(2)
            if x2 is not None:
                kind = self.c.choice(["fc", "fc_bn", "softmax", "elementwise"])
                if kind == "fc" or kind == "fc_bn":
                    fc = self.inner_product(x2)
                    if kind == "fc_bn":
                        self.batchnorm_scale(fc)
                elif kind == "softmax":
                    self.softmax(x2)
                else:
                    self.elementwise(x2)
                return
            if x4 is None:
                return
        kind = self.c.choice(["conv_bn", "conv_bn", "conv", "deconv_bn", "pool", "elementwise", "scale", "lrn",
                              "concat", "eltwise", "slice", "fc", "flatten", "softmax", "bn"])
        if kind in ("conv", "conv_bn", "deconv_bn"):
            y = self.convolution(x4, deconv=kind == "deconv_bn")
            if kind != "conv":
                self.batchnorm_scale(y)
            if self.c.chance(0.5):
                self.elementwise(self.blobs[-1] if self.blobs[-1].shape == y.shape else y)
        elif kind == "bn":
            self.batchnorm_scale(x4)
        else:
            getattr(self, {"pool": "pooling", "fc": "inner_product"}.get(kind, kind))(x4)

    def text(self, layers: int) -> str:
        self.input()
        for _ in range(layers):
            self.step()
        return 'name: "random"\n' + "\n".join(self.lines) + "\n"


def random_net_text(choose: Chooser, max_steps: int = 8) -> str:
    """A random valid net as prototxt text (1 to ``max_steps`` building steps after the input)."""
    return NetGenerator(choose).text(choose.integer(1, max_steps))


def net_graph(text: str, seed: int | None = 0) -> Graph:
    """The generated net as a graph, with random weights unless ``seed`` is None."""
    return graph_from_text(text, seed)


def hypothesis_nets(max_steps: int = 8) -> Any:
    """A hypothesis strategy of random valid net texts."""
    from hypothesis import strategies as st

    @st.composite
    def nets(draw: Callable[[Any], Any]) -> str:
        return random_net_text(DrawChooser(draw), max_steps)

    return nets()


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
        encoded = caffe_io._encode_varint(value)
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


# ---------------------------------------------------------------------------------------------------------------
# running one case through the CLI


@dataclass
class Outcome:
    kind: str  # "ok", "error" (a clean DeepRebirthError) or "crash"
    detail: str  # for errors: the message with paths and numbers blanked; for crashes: what went wrong
    message: str = ""  # for errors: the line as printed


class Hang(BaseException):
    """Raised by the alarm when a case runs too long (a BaseException, so no ``except Exception`` swallows it)."""


@contextlib.contextmanager
def _alarm(seconds: float) -> Iterator[None]:
    def fire(signum: int, frame: FrameType | None) -> None:
        raise Hang()

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def error_kind(line: str) -> str:
    """A clean error's message with file names, quoted names and numbers blanked, for counting by kind."""
    text = line.removeprefix("error: ")
    text = re.sub(r"\S*(case|in|out)\.(prototxt|caffemodel)\S*", "FILE", text)
    text = re.sub(r"'[^']*'", "'…'", text)
    text = re.sub(r'"[^"]*"', '"…"', text)
    text = re.sub(r"(Expected|got|found:?) .*", r"\1 …", text)
    text = re.sub(r"-?\d+(\.\d+)?(e[-+]?\d+)?", "N", text)
    text = re.sub(r"\([^)]*\)", "(…)", text)
    return text[:90]


def _crash_where(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if "deeprebirth" in f.filename] or frames
    where = f"{Path(ours[-1].filename).name}:{ours[-1].lineno}" if ours else "?"
    return f"{type(exc).__name__} at {where}: {str(exc)[:120]}"


def run_case(case: Case, folder: Path, rules: str = "all", timeout: float = 20.0) -> Outcome:
    """Run ``deeprebirth rewrite`` on the case in ``folder`` (emptied first) and judge the result."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    proto, model = folder / "in.prototxt", folder / "in.caffemodel"
    proto.write_bytes(case.prototxt)
    args = ["rewrite", str(proto), str(folder / "out.prototxt"), "--rules", rules]
    if case.caffemodel is not None:
        model.write_bytes(case.caffemodel)
        args += ["--weights", str(model), "--out-weights", str(folder / "out.caffemodel")]
    try:
        # Python warnings (numpy's RuntimeWarning ...) are more lines on the user's stderr; pytest would swallow them
        with _alarm(timeout), warnings.catch_warnings(record=True) as warned:
            warnings.simplefilter("always")
            for hidden in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
                warnings.filterwarnings("ignore", category=hidden)  # as a plain `deeprebirth` process hides them
            result = CliRunner().invoke(main, args)
    except Hang:
        return Outcome("crash", f"hang: more than {timeout:g} s")
    if warned:
        where = f"{Path(warned[0].filename).name}:{warned[0].lineno}"
        return Outcome("crash", f"warning printed: {warned[0].category.__name__} at {where}: {warned[0].message}")
    inputs = {"in.prototxt", "in.caffemodel"}
    left = sorted(p.name for p in folder.iterdir() if p.name not in inputs)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        return Outcome("crash", _crash_where(result.exception))
    if result.exit_code == 0:
        wanted = ["out.caffemodel", "out.prototxt"] if case.caffemodel is not None else ["out.prototxt"]
        if left != wanted:
            return Outcome("crash", f"ok, but the folder holds {left}")
        try:
            load_model(folder / "out.prototxt", folder / "out.caffemodel" if case.caffemodel is not None else None)
        except DeepRebirthError as err:
            return Outcome("crash", f"ok, but the output does not load again: {err}")
        return Outcome("ok", "")
    lines = result.stderr.strip().splitlines()
    if result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in lines[0]:
        if left:
            return Outcome("crash", f"clean error, but files were left: {left}")
        return Outcome("error", error_kind(lines[0]), lines[0])
    return Outcome("crash", f"exit {result.exit_code}: {' | '.join(lines[-3:])[:200]}")


@dataclass
class FuzzStats:
    cases: int = 0
    ok: int = 0
    errors: int = 0
    crashes: int = 0
    error_kinds: Counter[str] = field(default_factory=Counter)
    crash_kinds: Counter[str] = field(default_factory=Counter)
    mutations: Counter[str] = field(default_factory=Counter)
    crash_cases: list[tuple[Case, Outcome]] = field(default_factory=list)

    def add(self, case: Case, outcome: Outcome) -> None:
        self.cases += 1
        self.mutations.update(case.mutations)
        if outcome.kind == "ok":
            self.ok += 1
        elif outcome.kind == "error":
            self.errors += 1
            self.error_kinds[outcome.detail] += 1
        else:
            self.crashes += 1
            self.crash_kinds[outcome.detail] += 1
            if len(self.crash_cases) < 50:
                self.crash_cases.append((case, outcome))


def fuzz(cases: int, folder: Path, seed: int = 0, seeds: int = 12, rules: str = "all",
         on_case: Callable[[int, Case, Outcome], None] | None = None) -> FuzzStats:
    """Run ``cases`` mutated inputs, made from ``seeds`` random valid nets; reproducible for a given ``seed``."""
    folder.mkdir(parents=True, exist_ok=True)
    seed_dir = folder / "seeds"
    seed_dir.mkdir(exist_ok=True)
    pool = make_seeds(seeds, seed_dir, seed)
    rng = random.Random(seed)
    stats = FuzzStats()
    for i in range(cases):
        case = make_case(pool, rng, i)
        outcome = run_case(case, folder / "case", rules)
        stats.add(case, outcome)
        if on_case is not None:
            on_case(i, case, outcome)
    return stats


# ---------------------------------------------------------------------------------------------------------------
# real Caffe, in a worker process


def caffe_outputs(prototxt: str, caffemodel: str, feed: dict[str, Any], blobs: Sequence[str]) -> dict[str, Any]:
    """Forward once in pycaffe; meant to run in a spawned worker, where a Caffe abort cannot kill the tests."""
    from deeprebirth.caffe_runtime import forward, open_net

    return forward(open_net(prototxt, caffemodel), feed, list(blobs))
