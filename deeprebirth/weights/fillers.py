"""New weights from numbers alone: Caffe's fillers (for re-learned layers) and plausible random blobs for a layer
type (for nets without a caffemodel). Reading a layer's fillers from its prototxt is ``deeprebirth.ir.initializers``."""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from deeprebirth.aliases import Shape


@dataclass(frozen=True)
class Filler:
    """The fields of Caffe's FillerParameter that the fillers read, with Caffe's defaults."""

    type: str = "constant"
    value: float = 0.0
    min: float = 0.0
    max: float = 1.0
    mean: float = 0.0
    std: float = 1.0
    variance_norm: str = "FAN_IN"  # "FAN_IN", "FAN_OUT" or "AVERAGE"


def layer_rng(seed: int, name: str) -> np.random.Generator:
    """The generator for a new layer's random weights: one stream per (seed, layer name), so a layer's weights do
    not depend on which other layers a rewrite made first."""
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def fill(filler: Filler, shape: Shape, rng: np.random.Generator) -> np.ndarray:
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
        n = {"FAN_IN": fan_in, "FAN_OUT": fan_out, "AVERAGE": (fan_in + fan_out) / 2}[filler.variance_norm]
        if kind == "xavier":
            limit = math.sqrt(3.0 / n)
            values = rng.uniform(-limit, limit, shape)
        else:
            values = rng.normal(0.0, math.sqrt(2.0 / n), shape)
    else:
        values = rng.normal(0.0, 0.01, shape)
    return values.astype(np.float32)


def plausible_blobs(layer_type: str, shapes: Sequence[Shape], rng: np.random.Generator) -> list[np.ndarray]:
    """Random blobs of ``shapes`` for a layer of ``layer_type`` that keep activations in a sane range: He-normal for
    linear layers with small positive biases; BatchNorm statistics and Scale factors near identity with real
    spread."""
    if layer_type == "BatchNorm":
        c = shapes[0]
        factor = float(rng.uniform(0.5, 2.0))
        blobs = [rng.normal(0, 0.5, c) * factor, rng.uniform(0.5, 2.0, c) * factor, np.array([factor])]
    elif layer_type in ("Scale", "Bias", "PReLU"):
        blobs = [rng.uniform(0.5, 1.5, s) if i == 0 and layer_type != "Bias" else rng.normal(0, 0.2, s)
                 for i, s in enumerate(shapes)]
    else:
        weight = shapes[0]
        fan_in = math.prod(weight) / weight[0] if layer_type != "Deconvolution" else math.prod(weight) / weight[1]
        blobs = [rng.normal(0.0, math.sqrt(2.0 / fan_in), weight)]
        blobs += [rng.normal(0.05, 0.05, s) for s in shapes[1:]]
    return [np.asarray(b, dtype=np.float32).reshape(s) for b, s in zip(blobs, shapes)]
