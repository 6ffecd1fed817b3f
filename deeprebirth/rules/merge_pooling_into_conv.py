"""merge_pooling_into_conv (lossy, streamline slimming): a Pooling after a conv goes into the conv's stride.

Before:  x -> Convolution (k, s, p) [-> ReLU] -> Pooling (MAX | AVE; kp, sp, pp) -> y -> ...
After:   x -> Convolution <conv>_merge (k', s·sp, p') [-> ReLU] -> y -> ...      (y keeps its name and shape)

Preconditions: the conv has one input, no dilation and channel axis 1 (groups are fine: pooling acts per channel,
so each group's outputs still depend only on its own inputs); the conv's output, and the ReLU's, are read only by
the next layer of the chain; the pooling is MAX or AVE, not global, with one top; all shapes are known; some kernel
and pad give exactly y's shape (else Skip).

Shape rule, per axis. Caffe's convolution rounds down, its pooling rounds up and then drops a last window that would
start in the padding, so the shape must be solved: with S = s·sp find k', p' (0 <= p' < k') such that
floor((in + 2p' - k') / S) + 1 = out. Kernels are tried in this order:
  1. k' = k: the paper's "multiply the stride" (GoogLeNet conv1 k7 s2 p3 + pool 3/2 on 224 -> k7 s4 p3: 56);
  2. k' = k_rf = k + (kp - 1)·s, the receptive field of one pooled output (AlexNet conv1 k11 s4 + pool 3/2 on 227
     -> k19 s8 p0: 27, where k11 s8 would give 28); it keeps every input the original output saw;
  3. the kernels in between, smallest first.
The pad is the fitting one nearest the conv's own p (k' = k), else nearest the pad that centres the new window on
the original receptive field, p + pp·s - (k_rf - k') // 2.

Weights (init "inherit"; biases copied): for pooling-window position a (0 <= a < kp) the original kernel starts at
offset p' - p - pp·s + a·s inside the new window (weights.pooling.merge_pool_into_kernel). MAX: the kernel placed
once, at the window position nearest the centre that fits; a kept kernel is thus copied as it is, and the merged
conv is the original conv sampled at one position of each window (ReLU commutes with MAX). AVE: the mean of the
kernel over all positions, exactly AVE pooling of the conv away from borders when k' = k_rf and no ReLU sits
between. Lossy either way: the new conv is re-learned (``relearn``) to reproduce y.

The matching and surgery live in ``_shared`` (pool_conv_merges, merge_pool_into_conv): the branch-conv rules apply
this merge to every branch of a Concat.
"""

from __future__ import annotations

from collections.abc import Iterator

from deeprebirth.ir.graph import Graph
from deeprebirth.rules._shared import POOL_INTO_CONV, merge_pool_into_conv, pool_conv_merges
from deeprebirth.rules.base import Change, Match, Rule, RuleConfig, Skip

NAME = POOL_INTO_CONV


def match(graph: Graph, config: RuleConfig) -> Iterator[Match | Skip]:
    yield from pool_conv_merges(graph)


def apply(graph: Graph, found: Match, config: RuleConfig) -> Change:
    return merge_pool_into_conv(graph, found, config, NAME)


RULE = Rule(NAME, exact=False, group="streamline", match=match, apply=apply)
