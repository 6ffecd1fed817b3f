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
offset p' - p - pp·s + a·s inside the new window (fold.merge_pool_into_kernel). MAX: the kernel placed once, at the
window position nearest the centre that fits; a kept kernel is thus copied as it is, and the merged conv is the
original conv sampled at one position of each window (ReLU commutes with MAX). AVE: the mean of the kernel over all
positions, exactly AVE pooling of the conv away from borders when k' = k_rf and no ReLU sits between. Lossy either
way: the new conv is re-learned (``relearn``) to reproduce y.
"""

from __future__ import annotations

from collections.abc import Iterator

from deeprebirth import caffe_pb2 as pb
from deeprebirth.fold import merge_pool_into_kernel
from deeprebirth.graph import Graph
from deeprebirth.rules.base import Change, Match, Rule, RuleConfig, Skip
from deeprebirth.rules.streamline import (
    conv_chain,
    merged_name,
    new_weights,
    replace_chain,
)
from deeprebirth.shapes import (
    Shape,
    conv_geometry,
    conv_output_size,
    infer_shapes,
    pool_geometry,
)

NAME = "merge_pooling_into_conv"
POOLS = {pb.PoolingParameter.MAX: "MAX", pb.PoolingParameter.AVE: "AVE"}


def solve_axis(size: int, k: int, s: int, p: int, kp: int, sp: int, pp: int, out: int) -> tuple[int, int] | None:
    """(k', p') for one axis as the module docstring says, or None."""
    stride, field = s * sp, k + (kp - 1) * s
    for kernel in dict.fromkeys([k, field, *range(k + 1, field)]):
        want = p if kernel == k else p + pp * s - (field - kernel) // 2
        pads = [q for q in range(kernel) if conv_output_size(size, kernel, stride, q) == out]
        if pads:
            return kernel, min((abs(q - want), q) for q in pads)[1]
    return None


def set_geometry(param: pb.ConvolutionParameter, kernel: tuple[int, int], stride: tuple[int, int],
                 pad: tuple[int, int]) -> None:
    """Write kernel/stride/pad in the short form when square, else the _h/_w form (Caffe forbids mixing)."""
    for name in ("kernel_size", "stride", "pad", "kernel_h", "kernel_w", "stride_h", "stride_w", "pad_h", "pad_w"):
        param.ClearField(name)
    for value, short, long in ((kernel, "kernel_size", "kernel"), (stride, "stride", "stride"), (pad, "pad", "pad")):
        if value[0] != value[1]:
            setattr(param, f"{long}_h", value[0])
            setattr(param, f"{long}_w", value[1])
        elif short == "kernel_size" or value[0] != (1 if short == "stride" else 0):
            getattr(param, short).append(value[0])


def match(graph: Graph, config: RuleConfig) -> Iterator[Match | Skip]:
    shapes: dict[str, Shape | None] | None = None
    for pool in graph.layers():
        if pool.type != "Pooling":
            continue
        param = pool.proto.pooling_param
        if param.global_pooling:
            yield Skip(pool.name, "global pooling: its window is the whole input")
            continue
        if param.pool not in POOLS:
            yield Skip(pool.name, "STOCHASTIC pooling")
            continue
        if len(pool.tops) != 1:
            yield Skip(pool.name, "it also outputs the positions of the maxima")
            continue
        chain, reason = conv_chain(graph, pool, ("ReLU",))
        if not chain:
            yield Skip(pool.name, reason)
            continue
        conv = chain[0]
        geometry = conv_geometry(conv.proto.convolution_param)
        if geometry.dilation != (1, 1):
            yield Skip(pool.name, f"'{conv.name}' is dilated {geometry.dilation}")
            continue
        shapes = infer_shapes(graph) if shapes is None else shapes
        x, c, y = shapes[conv.bottoms[0]], shapes[conv.tops[0]], shapes[pool.tops[0]]
        if x is None or c is None or y is None or len(x) != 4:
            yield Skip(pool.name, "shapes unknown")
            continue
        window = pool_geometry(param, (c[2], c[3]))
        solved = [solve_axis(x[2 + i], geometry.kernel[i], geometry.stride[i], geometry.pad[i], window.kernel[i],
                             window.stride[i], window.pad[i], y[2 + i]) for i in range(2)]
        if solved[0] is None or solved[1] is None:
            yield Skip(pool.name, f"no kernel from {geometry.kernel} to the receptive field and no pad give the "
                                  f"pooled size {y[2:]} at stride {geometry.stride[0] * window.stride[0]}")
            continue
        kernel = (solved[0][0], solved[1][0])
        pad = (solved[0][1], solved[1][1])
        offsets = tuple([pad[i] - geometry.pad[i] - window.pad[i] * geometry.stride[i] + a * geometry.stride[i]
                         for a in range(window.kernel[i])] for i in range(2))
        stride = (geometry.stride[0] * window.stride[0], geometry.stride[1] * window.stride[1])
        yield Match((pool.name, *(layer.name for layer in chain[:-1])),
                    {"kernel": kernel, "stride": stride, "pad": pad, "offsets": offsets})


def apply(graph: Graph, found: Match, config: RuleConfig) -> Change:
    pool = graph.layer(found.layers[0])
    chain = [graph.layer(name) for name in found.layers[1:]] + [pool]
    conv, kept = chain[0], chain[1:-1]
    kernel, stride, pad, offsets = (found.data[key] for key in ("kernel", "stride", "pad", "offsets"))
    name = merged_name(graph, conv)
    merged = conv.clone(name=name)
    set_geometry(merged.proto.convolution_param, kernel, stride, pad)
    average = pool.proto.pooling_param.pool == pb.PoolingParameter.AVE
    shapes = [(*b.shape[:2], *kernel) if i == 0 else b.shape for i, b in enumerate(conv.blobs or [])]
    merged.blobs = new_weights(conv, shapes, name, config, lambda old: [
        merge_pool_into_kernel(old[0], kernel, offsets, average), *(b.copy() for b in old[1:])])
    end = graph.caffe_name(pool.tops[0])
    replace_chain(graph, chain, merged, kept, [end] * len(chain[:-1]))
    renamed = name != conv.name
    return Change(NAME, False, removed=[pool.name] + [conv.name] * renamed, added=[name] * renamed,
                  changed=[name] * (not renamed) + [layer.name for layer in kept],
                  summary=f"merged {POOLS[pool.proto.pooling_param.pool]} Pooling '{pool.name}' into Convolution "
                          f"'{conv.name}'" + (f" as '{name}'" if renamed else "")
                          + f" (kernel {kernel}, stride {stride}, pad {pad})",
                  relearn=[name], reproduces=end)


RULE = Rule(NAME, exact=False, group="streamline", match=match, apply=apply)
