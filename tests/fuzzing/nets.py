"""Random valid Caffe nets (see the package docstring): ``NetGenerator`` behind a ``Chooser``."""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from deeprebirth.io import caffe_io
from deeprebirth.ir.graph import Graph
from deeprebirth.ir.initializers import random_weights
from deeprebirth.ir.shapes import conv_output_size, infer_shapes, pool_output_size

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
    graph = Graph.from_net(caffe_io.normalize_net(caffe_io.parse_prototxt(text)), source="<test>")
    infer_shapes(graph)
    if seed is not None:
        random_weights(graph, seed)
    return graph


def hypothesis_nets(max_steps: int = 8) -> Any:
    """A hypothesis strategy of random valid net texts."""
    from hypothesis import strategies as st

    @st.composite
    def nets(draw: Callable[[Any], Any]) -> str:
        return random_net_text(DrawChooser(draw), max_steps)

    return nets()
