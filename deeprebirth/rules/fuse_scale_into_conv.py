"""fuse_scale_into_conv (exact): fold a per-channel Scale (with or without bias) into the linear layer before it.

Before:  Convolution | Deconvolution | InnerProduct -> Scale
After:   the same layer with new weights and a bias

Preconditions: the Scale has one bottom (its factor is a learned blob, not a second input), ``axis: 1`` and
``num_axes: 1`` (one factor per channel); its input comes from a Convolution, Deconvolution or InnerProduct whose
output nothing else reads; weights are present.

Formula (gamma = blob0, beta = blob1 or 0):   W' = W * gamma (per output channel),   b' = b * gamma + beta
"""

from __future__ import annotations

from collections.abc import Iterator

from deeprebirth.ir.graph import Graph
from deeprebirth.rules._shared import fold_affine, linear_producer, remove_passthrough
from deeprebirth.rules.base import Change, Match, Rule, RuleConfig, Skip
from deeprebirth.weights.affine import scale_affine

NAME = "fuse_scale_into_conv"


def match(graph: Graph, config: RuleConfig) -> Iterator[Match | Skip]:
    for scale in graph.layers():
        if scale.type != "Scale":
            continue
        param = scale.proto.scale_param
        if len(scale.bottoms) != 1:
            yield Skip(scale.name, "its factor is a second input, not a learned blob")
            continue
        if param.axis not in (1, -3) or param.num_axes != 1:
            yield Skip(scale.name, f"not per-channel (axis {param.axis}, num_axes {param.num_axes})")
            continue
        if not scale.blobs:
            yield Skip(scale.name, "no weights: folding needs the Scale factors (the weights were not given)")
            continue
        linear, reason = linear_producer(graph, scale)
        if linear is None:
            yield Skip(scale.name, reason)
            continue
        yield Match((scale.name, linear.name))


def apply(graph: Graph, found: Match, config: RuleConfig) -> Change:
    scale, linear = graph.layer(found.layers[0]), graph.layer(found.layers[1])
    assert scale.blobs is not None
    a, b = scale_affine(scale.blobs[0], scale.blobs[1] if len(scale.blobs) > 1 else None)
    fold_affine(linear, a, b)
    remove_passthrough(graph, scale)
    return Change(NAME, True, removed=[scale.name], added=[], changed=[linear.name],
                  summary=f"folded Scale '{scale.name}' into {linear.type} '{linear.name}'")


RULE = Rule(NAME, exact=True, group="exact", match=match, apply=apply)
