"""Which layers a least-squares refit fits (``deeprebirth.finetune.refit``), onto which of the original's blobs, at
which sample rows.

A layer's target is the original's blob of the same Caffe name and shape as its output; a merged inception branch,
whose blob is new, is aimed at its channels of the module's Concat. A Tucker chain's bias-free core is planned
with its 1x1 expand: the two are one linear map onto the expand's blob. Rows: every sampled image for an
InnerProduct, a random draw of output positions over the sample for a Convolution (at most ``MAX_ROWS``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from deeprebirth.ir.shapes import ConvGeometry

MIN_ROWS_PER_COLUMN = 1  # sample rows per column of X, at least
MAX_ROWS = 32768  # sample rows per layer (output positions over the sampled images)


@dataclass
class Plan:
    """One layer to refit: where its target comes from and which of its output positions are rows."""

    name: str
    relu: bool
    blob: str  # the original's blob holding the target ...
    channels: slice  # ... these channels of it (a merged inception branch: its part of the Concat)
    image: np.ndarray  # sample rows: the image (index into the sample), output row, output column
    oy: np.ndarray | None  # None: an InnerProduct, one row per image
    ox: np.ndarray | None
    expand: str | None = None  # a Tucker core's expand: the two are fit as one map, then split at the core's rank


def plan_layer(slim_net: Any, original_net: Any, name: str, names: list[str], tops: dict[str, list[str]],
               bottoms: dict[str, list[str]], geometry: dict[str, ConvGeometry], concats: set[str], images: int,
               rng: np.random.Generator) -> Plan | str:
    """What refitting layer ``name`` takes (its target's source, its sample rows), or why it is not refit."""
    layer = slim_net.layers[names.index(name)]
    params = slim_net.params.get(name, [])
    expand = tucker_expand(slim_net, name, names, tops, bottoms, geometry) if len(params) == 1 else None
    if len(params) != 2 and expand is None:
        return "no bias"
    if layer.type == "Convolution" and name not in geometry:
        return "grouped or dilated"
    top = tops[expand or name][0]  # a Tucker core's target is its expand's
    later = [n for n in names[names.index(expand or name) + 1:] if top in bottoms[n]]
    relu = bool(later) and in_place_relu(slim_net, names, later[0], bottoms, tops)
    source = original_source(slim_net, original_net, top, later, bottoms, tops, concats)
    if source is None:
        return "no blob of that name and shape in the original, nor a Concat's part of one"
    columns = int(np.prod(params[0].data.shape[1:])) + 1
    if layer.type == "InnerProduct":
        if images < MIN_ROWS_PER_COLUMN * columns:
            return f"{images} sample rows for {columns} columns"
        return Plan(name, relu, *source, np.arange(images), None, None)
    shape = slim_net.blobs[top].data.shape
    positions = shape[2] * shape[3]
    total = images * positions
    if total < MIN_ROWS_PER_COLUMN * columns:
        return f"{total} sample rows for {columns} columns"
    picks = np.sort(rng.choice(total, min(total, MAX_ROWS, max(8192, 4 * columns)), replace=False))
    image, rest = np.divmod(picks, positions)
    oy, ox = np.divmod(rest, shape[3])
    return Plan(name, relu, *source, image, oy, ox, expand)


def tucker_expand(slim_net: Any, name: str, names: list[str], tops: dict[str, list[str]],
                  bottoms: dict[str, list[str]], geometry: dict[str, ConvGeometry]) -> str | None:
    """The expand of a bias-free Convolution ``name`` (a Tucker core): the one layer reading its output, a 1x1
    Convolution with stride 1, no pad and a bias, that reads nothing else; None where there is none."""
    readers = [n for n in names if tops[name][0] in bottoms[n]]
    if name not in geometry or len(readers) != 1 or len(bottoms[readers[0]]) != 1:
        return None
    g = geometry.get(readers[0])
    one = g is not None and g.kernel == (1, 1) and g.stride == (1, 1) and g.pad == (0, 0)
    return readers[0] if one and len(slim_net.params.get(readers[0], [])) == 2 else None


def original_source(slim_net: Any, original_net: Any, top: str, later: list[str], bottoms: dict[str, list[str]],
                    tops: dict[str, list[str]], concats: set[str]) -> tuple[str, slice] | None:
    """Where the original holds the slim net's blob ``top``: its blob of the same name and shape; else, where
    ``top`` goes (after in-place layers) into a channel Concat whose output the original has at the same shape
    (a merged inception branch: the rewrite keeps the Concat's width and channel order), that output's channels at
    ``top``'s place."""
    shape = slim_net.blobs[top].data.shape
    if top in original_net.blobs and original_net.blobs[top].data.shape == shape:
        return top, slice(None)
    concat = next((n for n in later if bottoms[n] != tops[n]), None)
    if concat is None or concat not in concats or tops[concat][0] not in original_net.blobs:
        return None
    whole = tops[concat][0]
    if original_net.blobs[whole].data.shape != slim_net.blobs[whole].data.shape:
        return None
    start = sum(slim_net.blobs[b].data.shape[1] for b in bottoms[concat][:bottoms[concat].index(top)])
    return whole, slice(start, start + shape[1])


def in_place_relu(net: Any, names: list[str], consumer: str, bottoms: dict[str, list[str]],
                  tops: dict[str, list[str]]) -> bool:
    layer = net.layers[names.index(consumer)]
    return layer.type == "ReLU" and bottoms[consumer] == tops[consumer]
