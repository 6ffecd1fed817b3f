"""merge_pooling_into_branch_convs (lossy, streamline slimming): a pooling after a Concat of conv branches goes
into every branch conv's stride.

Before:  conv_a [-> ReLU] --+                                  conv_a_merge (stride x s) [-> ReLU] --+
                            +-> Concat -> Pooling (s) -> y  =>                                       +-> Concat -> y
         conv_b [-> ReLU] --+                                  conv_b_merge (stride x s) [-> ReLU] --+

This is how GoogLeNet's stage poolings (pool3/3x3_s2 after inception_3b, pool4/3x3_s2 after inception_4e) leave the
net, and the Concat then joins small blobs. Two parts:
1. ``distribute`` (exact): pooling works on each channel alone with the same window for every channel, and a
   channel-axis Concat only places channels side by side, so pool(concat(a, b)) = concat(pool(a), pool(b)) element
   for element (MAX, AVE with its padded divisor, Caffe's rounding and pad clipping included);
2. each branch is then conv [-> ReLU] -> pool, and merge_pooling_into_conv puts the pooling into the conv's stride.
The whole is one merge step: its new convs are re-learned together to reproduce y.

Preconditions: the Concat joins along channels (axis 1) and only the Pooling reads its output; the Pooling is MAX or
AVE with one top; every Concat input comes from an undilated Convolution, directly or through a ReLU, that nothing
else reads; and each of those convs can take the pooling as a pure stride, keeping its kernel (so no conv grows: a
pooling that a conv could only absorb with a larger kernel, such as GoogLeNet's final 7x7 average pooling, stays).
"""

from __future__ import annotations

from collections.abc import Iterator

from deeprebirth.ir.graph import Graph
from deeprebirth.rules._shared import concat_pool_merges, merge_pool_into_branch_convs
from deeprebirth.rules.base import Change, Match, Rule, RuleConfig, Skip

NAME = "merge_pooling_into_branch_convs"


def match(graph: Graph, config: RuleConfig) -> Iterator[Match | Skip]:
    yield from concat_pool_merges(graph, widen=False)


def apply(graph: Graph, found: Match, config: RuleConfig) -> Change:
    return merge_pool_into_branch_convs(graph, found, config, NAME)


RULE = Rule(NAME, exact=False, group="streamline", match=match, apply=apply)
