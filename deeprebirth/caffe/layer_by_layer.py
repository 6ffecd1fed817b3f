"""A pycaffe net run one layer at a time over many images in chunks, keeping between layers only the blobs a later
layer still reads (as numpy, per chunk). A caller can read or change a layer's parameters between its turn and the
next (``deeprebirth.finetune.refit`` fits each layer on its inputs that way) while holding one chunk's activations
in Caffe, not the whole sample's."""

from __future__ import annotations

from typing import Any

import numpy as np


class LayerByLayer:
    """``net`` (at a chunk's batch, or more) run layer ``k`` by ``forward(k)`` on every chunk of ``inputs`` (blob
    name -> its chunks); ``chunks[blob]``: a live blob's values, chunk by chunk. Call ``forward`` for every layer,
    in order."""

    def __init__(self, net: Any, inputs: dict[str, list[np.ndarray]]) -> None:
        self.net = net
        self.names = list(net._layer_names)
        self.chunks = dict(inputs)
        self.last_read = last_readers(net)

    def forward(self, k: int) -> None:
        """Run layer ``k`` on every chunk; keep its tops where a later layer reads them."""
        name = self.names[k]
        bottoms, tops = list(self.net.bottom_names[name]), list(self.net.top_names[name])
        if self.net.layers[k].type == "Split":  # Caffe's split tops share the bottom's data
            for top in tops:
                self.chunks[top] = self.chunks[bottoms[0]]
        elif bottoms:
            outputs: dict[str, list[np.ndarray]] = {top: [] for top in tops}
            for j, first in enumerate(self.chunks[bottoms[0]]):
                for bottom in bottoms:
                    self.net.blobs[bottom].data[:len(first)] = self.chunks[bottom][j]
                self.net._forward(k, k)
                for top in tops:
                    outputs[top].append(np.array(self.net.blobs[top].data[:len(first)]))
            self.chunks.update(outputs)
        for blob in list(self.chunks):
            if self.last_read.get(blob, -1) <= k:
                del self.chunks[blob]


def last_readers(net: Any) -> dict[str, int]:
    """Each blob of ``net`` that a layer reads: the index of the last layer reading it."""
    return {b: k for k, n in enumerate(net._layer_names) for b in net.bottom_names[n]}


def live_activations_per_image(net: Any) -> float:
    """The most activations of one image that ``LayerByLayer`` keeps at once on ``net``: the blobs written so far
    that a later layer reads (a Split's tops are its bottom)."""
    names = list(net._layer_names)
    last_read = last_readers(net)
    live: dict[str, int] = {}
    most = 0
    for k, name in enumerate(names):
        if net.layers[k].type != "Split":
            for top in net.top_names[name]:
                live[top] = int(np.prod(net.blobs[top].data.shape[1:]))
        most = max(most, sum(live.values()))
        live = {b: size for b, size in live.items() if last_read.get(b, -1) > k}
    return float(most)
