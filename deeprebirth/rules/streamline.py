"""Shared by the streamline-slimming rules (merge_pooling_into_conv, merge_lrn_into_conv): find a chain
``Convolution -> ReLU / Pooling ... -> layer``, name and initialise the merged conv, rebuild the chain.

Naming: the merged conv is a new layer ``<conv>_merge`` (so Caffe's by-name loading of the original caffemodel
leaves it alone). A conv already named ``*_merge`` is a layer made by these rules (in this rewrite, or in an earlier
run whose output is being slimmed further); merging more into it keeps its name, so GoogLeNet's
``conv2/3x3 + norm2 + pool2`` ends as one ``conv2/3x3_merge`` whichever rule fires first. Caveat: should
merge_pooling_into_conv widen such a layer's kernel, a caffemodel from the earlier run no longer fits it by name;
use the caffemodel written with the new prototxt.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence

import numpy as np

from deeprebirth.errors import DeepRebirthError
from deeprebirth.graph import Graph, Layer
from deeprebirth.initializers import fill, layer_fillers
from deeprebirth.rules.base import RuleConfig
from deeprebirth.rules.common import merged
from deeprebirth.shapes import Shape


def conv_chain(graph: Graph, end: Layer, between: tuple[str, ...]) -> tuple[list[Layer], str]:
    """``[conv, *links, end]`` where each link's type is in ``between`` (each type at most once), every layer has
    one input and one output, and each output is read only by the next layer; ``([], reason)`` when not."""
    chain = [end]
    while True:
        head = chain[0]
        if len(head.bottoms) != 1:
            return [], f"'{head.name}' has {len(head.bottoms)} inputs"
        producer = graph.producer(head.bottoms[0])
        seen = [layer.type for layer in chain[:-1]]
        if producer.type != "Convolution" and (producer.type not in between or producer.type in seen):
            kinds = " / ".join(("Convolution", *between))
            return [], f"its input comes from {producer.type} '{producer.name}', not a chain of {kinds}"
        if len(producer.tops) != 1 or graph.only_consumer(head.bottoms[0]) is not head:
            return [], f"the output of '{producer.name}' has other consumers"
        chain.insert(0, producer)
        if producer.type == "Convolution":
            break
    conv = chain[0]
    if len(conv.bottoms) != 1:
        return [], f"'{conv.name}' has {len(conv.bottoms)} inputs (shared weights)"
    if conv.proto.convolution_param.axis != 1:
        return [], f"'{conv.name}' uses channel axis {conv.proto.convolution_param.axis}"
    return chain, ""


def merged_name(graph: Graph, conv: Layer) -> str:
    return conv.name if merged(conv.name) == conv.name else graph.fresh_layer_name(merged(conv.name))


def new_weights(conv: Layer, shapes: Sequence[Shape], name: str, config: RuleConfig,
                inherit: Callable[[list[np.ndarray]], list[np.ndarray]]) -> list[np.ndarray] | None:
    """Blobs for the merged conv: None without weights; ``inherit(old blobs)`` or Caffe's fillers (seeded by
    ``config.seed`` and the layer name) as ``config.init`` says."""
    if conv.blobs is None:
        return None
    if config.init == "inherit":
        blobs = inherit(conv.blobs)
    elif config.init == "filler":
        rng = np.random.default_rng([config.seed, zlib.crc32(name.encode())])
        fillers = layer_fillers(conv)
        blobs = [fill(fillers[min(i, 1)], shape, rng) for i, shape in enumerate(shapes)]
    else:
        raise DeepRebirthError(f"unknown init {config.init!r} (known: inherit, filler)")
    assert [b.shape for b in blobs] == [tuple(s) for s in shapes], (name, [b.shape for b in blobs], shapes)
    return blobs


def replace_chain(graph: Graph, chain: list[Layer], merged: Layer, kept: list[Layer], names: list[str]) -> None:
    """Replace ``chain`` (from conv_chain) by ``merged -> kept...``: ``merged`` takes the conv's place and input,
    ``kept`` are layers of the chain rebuilt in order (same name and settings, new blobs written under ``names``,
    one per new layer); the readers of the chain's end read the new end. The other chain layers go."""
    conv, end = chain[0], chain[-1]
    kept_names = {layer.name for layer in kept}
    assert end.name not in kept_names and len(names) == len(kept) + 1
    for layer in kept:  # take them out of the old chain so their names are free
        graph.replace_uses(layer.tops[0], layer.bottoms[0])
        graph.remove_layer(layer.name)
    graph.replace_uses(conv.tops[0], conv.bottoms[0])  # the conv's old top is read no more, so it can be replaced
    merged.bottoms, merged.tops = list(conv.bottoms), [graph.new_blob(names[0])]
    graph.replace_layer(conv.name, merged)
    last = merged
    for layer, name in zip(kept, names[1:], strict=True):
        last = graph.add_layer(layer.clone(bottoms=[last.tops[0]], tops=[graph.new_blob(name)]), at=last.name)
    graph.replace_uses(end.tops[0], last.tops[0])
    for layer in reversed(chain[1:]):
        if layer.name not in kept_names:
            graph.remove_layer(layer.name)
