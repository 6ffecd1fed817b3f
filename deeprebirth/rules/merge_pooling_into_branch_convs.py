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

from deeprebirth import caffe_pb2 as pb
from deeprebirth.graph import Graph, Layer
from deeprebirth.rules import merge_pooling_into_conv
from deeprebirth.rules.base import Change, Match, Rule, RuleConfig, Skip
from deeprebirth.shapes import Shape, conv_geometry, infer_shapes, pool_geometry

NAME = "merge_pooling_into_branch_convs"


def _branch_reason(graph: Graph, shapes: dict[str, Shape | None], concat: Layer, pool: Layer, blob: str,
                   widen: bool = False) -> str:
    """Why the Concat input ``blob`` is not a conv [-> ReLU] branch, read only by the Concat, whose conv could take
    the pooling as a stride with its own kernel ('' if it is). With ``widen``, a 1x1 conv may instead grow to the
    pooling's window (merge_pooling_into_widened_branch_convs)."""
    if graph.only_consumer(blob) is not concat:
        return f"its input '{graph.caffe_name(blob)}' is also read elsewhere"
    producer = graph.producer(blob)
    if producer.type == "ReLU":
        if graph.only_consumer(producer.bottoms[0]) is not producer:
            return f"the input of '{producer.name}' is also read elsewhere"
        producer = graph.producer(producer.bottoms[0])
    if producer.type != "Convolution" or len(producer.bottoms) != 1:
        return f"its input '{graph.caffe_name(blob)}' does not come from a convolution"
    x, c, y = shapes[producer.bottoms[0]], shapes[blob], shapes[pool.tops[0]]
    if x is None or c is None or y is None or len(x) != 4:
        return "shapes unknown"
    conv = conv_geometry(producer.proto.convolution_param)
    window = pool_geometry(pool.proto.pooling_param, (c[2], c[3]))
    for i in range(2):
        solved = merge_pooling_into_conv.solve_axis(x[2 + i], conv.kernel[i], conv.stride[i], conv.pad[i],
                                                    window.kernel[i], window.stride[i], window.pad[i], y[2 + i])
        if conv.dilation[i] != 1 or solved is None:
            return f"'{producer.name}' could not take the pooling as a stride"
        if solved[0] == conv.kernel[i]:
            continue
        if not widen:
            return f"'{producer.name}' could not take the pooling as a stride without a larger kernel"
        if conv.kernel != (1, 1) or window.stride[i] < 2 or solved[0] > window.kernel[i]:
            return (f"'{producer.name}' (kernel {conv.kernel[0]}x{conv.kernel[1]}) would have to grow to take the "
                    f"pooling as a stride; only a 1x1 conv grows, to at most the pooling's window, at stride 2 or more")
    return ""


def _needs_widening(graph: Graph, shapes: dict[str, Shape | None], concat: Layer, pool: Layer) -> bool:
    return any(_branch_reason(graph, shapes, concat, pool, blob) for blob in concat.bottoms)


def match(graph: Graph, config: RuleConfig) -> Iterator[Match | Skip]:
    yield from find(graph, widen=False)


def find(graph: Graph, widen: bool) -> Iterator[Match | Skip]:
    """Matches of this rule (``widen`` False) or of merge_pooling_into_widened_branch_convs (True: only the places
    where some 1x1 branch conv must grow, so the two rules never claim the same pooling)."""
    for pool in graph.layers():
        if pool.type != "Pooling" or graph.producer(pool.bottoms[0]).type != "Concat":
            continue
        concat = graph.producer(pool.bottoms[0])
        param = pool.proto.pooling_param
        if param.global_pooling or param.pool not in (pb.PoolingParameter.MAX, pb.PoolingParameter.AVE):
            continue  # nothing a conv could absorb as a stride: not worth a Skip line
        if len(pool.tops) != 1 or graph.only_consumer(concat.tops[0]) is not pool:
            yield Skip(pool.name, f"the output of Concat '{concat.name}' is also read elsewhere")
            continue
        axis = concat.proto.concat_param.concat_dim if concat.proto.concat_param.HasField("concat_dim") \
            else concat.proto.concat_param.axis
        if axis not in (1, -3):
            yield Skip(pool.name, f"Concat '{concat.name}' joins along axis {axis}, not channels")
            continue
        shapes = infer_shapes(graph)
        reasons = [r for r in (_branch_reason(graph, shapes, concat, pool, b, widen) for b in concat.bottoms) if r]
        if reasons:
            yield Skip(pool.name, reasons[0])
            continue
        if widen and not _needs_widening(graph, shapes, concat, pool):
            continue  # merge_pooling_into_branch_convs' own place
        yield Match((pool.name, concat.name))


def distribute(graph: Graph, pool: Layer, concat: Layer) -> list[Layer]:
    """Part 1 (exact): one copy of ``pool`` on each input of ``concat``; the Concat (same name) then writes the
    pooling's output blob. Returns the new poolings."""
    output = graph.caffe_name(pool.tops[0])
    pooled = []
    for i, blob in enumerate(concat.bottoms):
        branch_pool = pool.clone(name=graph.fresh_layer_name(f"{pool.name}_{i}"), bottoms=[blob],
                                 tops=[graph.new_blob(f"{output}_{i}")])
        pooled.append(graph.add_layer(branch_pool, at=graph.producer(blob).name))
    joined = concat.clone(name=graph.fresh_layer_name(concat.name + "_pooled"),
                          bottoms=[p.tops[0] for p in pooled], tops=[graph.new_blob(output)])
    graph.add_layer(joined, at=concat.name)
    graph.replace_uses(pool.tops[0], joined.tops[0])
    graph.remove_layer(pool.name)
    graph.remove_layer(concat.name)
    graph.rename_layer(joined.name, concat.name)
    return pooled


def apply(graph: Graph, found: Match, config: RuleConfig) -> Change:
    return merge(graph, found, config, NAME)


def merge(graph: Graph, found: Match, config: RuleConfig, rule: str) -> Change:
    """Distribute the pooling over the branches, then merge it into each branch conv (one change of ``rule``)."""
    pool, concat = graph.layer(found.layers[0]), graph.layer(found.layers[1])
    output = graph.caffe_name(pool.tops[0])
    pooled = {p.name for p in distribute(graph, pool, concat)}
    merges = [m for m in merge_pooling_into_conv.match(graph, config) if isinstance(m, Match) and m.layers[0] in pooled]
    removed, added, relearn = [pool.name], [], []
    for merge in merges:
        change = merge_pooling_into_conv.apply(graph, merge, config)
        removed += [name for name in change.removed if name not in pooled]
        added += change.added
        relearn += change.relearn
    assert len(merges) == len(pooled), "match() checked that every branch conv can take the stride"
    return Change(rule, False, removed=removed, added=added, changed=[concat.name], relearn=relearn,
                  reproduces=output,
                  summary=f"merged Pooling '{pool.name}' into the {len(pooled)} branch convs of Concat "
                          f"'{concat.name}' as {', '.join(relearn)}")


RULE = Rule(NAME, exact=False, group="streamline", match=match, apply=apply)
