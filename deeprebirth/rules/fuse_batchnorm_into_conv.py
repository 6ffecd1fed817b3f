"""fuse_batchnorm_into_conv (exact): fold an inference-mode BatchNorm into the linear layer before it.

Before:  Convolution | Deconvolution | InnerProduct -> BatchNorm      (a Scale after it is folded next by
After:   the same layer with new weights and a bias                   fuse_scale_into_conv)

Preconditions: the BatchNorm uses global statistics (``use_global_stats`` unset or true, the TEST default); its
input comes from a Convolution, Deconvolution or InnerProduct whose output nothing else reads; weights are present.

Formula (``m = blob0 / f``, ``v = blob1 / f``, f = blob2, f = 0 meaning zero statistics; eps from the prototxt):
    a = 1 / sqrt(v + eps),   W' = W * a (per output channel),   b' = (b - m) * a
"""

from __future__ import annotations

from collections.abc import Iterator

from deeprebirth.ir.graph import Graph
from deeprebirth.rules._shared import fold_affine, linear_producer, remove_passthrough
from deeprebirth.rules.base import Change, Match, Rule, RuleConfig, Skip
from deeprebirth.weights.affine import batchnorm_affine

NAME = "fuse_batchnorm_into_conv"


def match(graph: Graph, config: RuleConfig) -> Iterator[Match | Skip]:
    for bn in graph.layers():
        if bn.type != "BatchNorm":
            continue
        param = bn.proto.batch_norm_param
        if param.HasField("use_global_stats") and not param.use_global_stats:
            yield Skip(bn.name, "use_global_stats is false: it normalises with batch statistics")
            continue
        if not bn.blobs:
            yield Skip(bn.name, "no weights: folding needs the BatchNorm statistics (the weights were not given)")
            continue
        linear, reason = linear_producer(graph, bn)
        if linear is None:
            yield Skip(bn.name, reason)
            continue
        yield Match((bn.name, linear.name))


def apply(graph: Graph, found: Match, config: RuleConfig) -> Change:
    bn, linear = graph.layer(found.layers[0]), graph.layer(found.layers[1])
    assert bn.blobs is not None
    a, b = batchnorm_affine(bn.blobs[0], bn.blobs[1], bn.blobs[2], bn.proto.batch_norm_param.eps)
    fold_affine(linear, a, b)
    remove_passthrough(graph, bn)
    return Change(NAME, True, removed=[bn.name], added=[], changed=[linear.name],
                  summary=f"folded BatchNorm '{bn.name}' into {linear.type} '{linear.name}'")


RULE = Rule(NAME, exact=True, group="exact", match=match, apply=apply)
