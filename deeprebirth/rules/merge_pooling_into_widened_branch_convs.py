"""merge_pooling_into_widened_branch_convs (lossy, streamline slimming): a strided pooling after a Concat of a 1x1
and a KxK branch goes into both branch convs' stride, the 1x1 conv growing to the kernel that stride needs.

Before (SqueezeNet v1.0's pool4 / pool8 after a fire module; 55x55 -> 27x27 for pool4):
    squeeze -> expand1x1 (1x1) -> ReLU --+
            -> expand3x3 (3x3, p1) -> ReLU --+-> Concat -> Pooling (MAX 3, s2) -> y
After:
    squeeze -> expand1x1_merge (3x3, s2, p0) -> ReLU --+
            -> expand3x3_merge (3x3, s2, p0) -> ReLU --+-> Concat -> y

merge_pooling_into_branch_convs refuses this place: a 1x1 conv at stride 2 cannot give the pooled size (ceil
rounding: 28, not 27) nor see the window it pooled over. Here the 1x1 conv is widened to the kernel
_shared.solve_axis finds (the pooling's receptive field, k' = 1 + (kp - 1)), with its inherited 1x1
weights at the centre and zeros around them (weights.pooling.merge_pool_into_kernel, MAX: one window position, the central
one; AVE: the mean over the window, 1/kp² at every position). The KxK branches keep their kernel and take the stride
as in merge_pooling_into_branch_convs. One merge step; its new convs are re-learned together to reproduce y.

Cost: the pooling and its full-size input go; the KxK branch does 1/s² of its work; the 1x1 branch does kp²/s² of
its work (9/4 for SqueezeNet: it grows), so the rule pays where the KxK branches dominate, as in fire modules.

Preconditions: those of merge_pooling_into_branch_convs, except that a branch conv of kernel 1x1 may grow, to at most
the pooling's window, when the pooling's stride is at least 2 on that axis; some branch must need it (else the place
belongs to merge_pooling_into_branch_convs). Any other conv that would have to grow makes it a Skip (GoogLeNet's
final 7x7 average pooling, stride 1, stays).
"""

from __future__ import annotations

from collections.abc import Iterator

from deeprebirth.ir.graph import Graph
from deeprebirth.rules._shared import concat_pool_merges, merge_pool_into_branch_convs
from deeprebirth.rules.base import Change, Match, Rule, RuleConfig, Skip

NAME = "merge_pooling_into_widened_branch_convs"


def match(graph: Graph, config: RuleConfig) -> Iterator[Match | Skip]:
    yield from concat_pool_merges(graph, widen=True)


def apply(graph: Graph, found: Match, config: RuleConfig) -> Change:
    return merge_pool_into_branch_convs(graph, found, config, NAME)


RULE = Rule(NAME, exact=False, group="streamline", match=match, apply=apply)
