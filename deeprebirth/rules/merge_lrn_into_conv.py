"""merge_lrn_into_conv (lossy, streamline slimming): drop an LRN after a conv chain; the conv is re-learned.

Before:  x -> Convolution [-> ReLU] [-> Pooling] -> LRN -> y -> ...        (ReLU and Pooling in either order)
After:   x -> Convolution <conv>_merge [-> ReLU] [-> Pooling] -> y -> ...   (y keeps its name and shape)

Preconditions: walking back from the LRN through at most one ReLU and at most one Pooling reaches a Convolution
with one input and channel axis 1; every layer on the way has one input and one output, and each output is read
only by the next layer (a second reader would see the re-learned conv change under it). Groups and dilation do not
matter: the conv's geometry is unchanged. (LRN also mixes neighbouring channels across group borders; the re-learned
conv approximates that as well as it can.)

No formula: LRN, y = x · (k + α/n · Σ x²)^(-β), is a nonlinear normalisation with no tensor form. The conv becomes a
new layer ``<conv>_merge`` to re-learn (``relearn``) so that the chain's end reproduces y. Weights: "inherit"
copies the conv's (same shapes: the rest of the chain is unchanged); "filler" draws them from the conv's fillers.

Blob names: the chain's end is written under y's name (with y's shape), and so is every blob an in-place layer at
the end overwrites; blobs before keep their names. Together with merge_pooling_into_conv the chains collapse into
one conv + ReLU in either rule order: GoogLeNet conv1/7x7_s2 + pool1 + norm1 -> conv1/7x7_s2_merge (k7 s4) -> ReLU
-> pool1/norm1, conv2/3x3 + norm2 + pool2 -> conv2/3x3_merge (k3 s2) -> ReLU -> pool2/3x3_s2.
"""

from __future__ import annotations

from collections.abc import Iterator

from deeprebirth.ir.graph import Graph
from deeprebirth.rules._shared import (
    conv_chain,
    merged_name,
    new_weights,
    replace_chain,
)
from deeprebirth.rules.base import Change, Match, Rule, RuleConfig, Skip

NAME = "merge_lrn_into_conv"


def match(graph: Graph, config: RuleConfig) -> Iterator[Match | Skip]:
    for lrn in graph.layers():
        if lrn.type != "LRN":
            continue
        chain, reason = conv_chain(graph, lrn, ("ReLU", "Pooling"))
        if not chain:
            yield Skip(lrn.name, reason)
            continue
        yield Match((lrn.name, *(layer.name for layer in chain[:-1])))


def apply(graph: Graph, found: Match, config: RuleConfig) -> Change:
    lrn = graph.layer(found.layers[0])
    chain = [graph.layer(name) for name in found.layers[1:]] + [lrn]
    conv, kept = chain[0], chain[1:-1]
    name = merged_name(graph, conv)
    merged = conv.clone(name=name)
    merged.blobs = new_weights(conv, [b.shape for b in conv.blobs or []], name, config,
                               lambda old: [b.copy() for b in old])
    end = graph.caffe_name(lrn.tops[0])
    names = [graph.caffe_name(layer.tops[0]) for layer in chain[:-1]]
    names[-1] = end
    for i in range(len(names) - 1, 0, -1):  # an in-place layer at the end writes over its input: same name
        if graph.caffe_name(chain[i].tops[0]) != graph.caffe_name(chain[i].bottoms[0]):
            break
        names[i - 1] = end
    replace_chain(graph, chain, merged, kept, names)
    renamed = name != conv.name
    return Change(NAME, False, removed=[lrn.name] + [conv.name] * renamed, added=[name] * renamed,
                  changed=[name] * (not renamed) + [layer.name for layer in kept],
                  summary=f"removed LRN '{lrn.name}' after Convolution '{conv.name}'"
                          + (f", now '{name}'" if renamed else "") + " to re-learn",
                  relearn=[name], reproduces=end)


RULE = Rule(NAME, exact=False, group="streamline", match=match, apply=apply)
