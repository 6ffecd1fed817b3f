"""What several rules share, so each rule module stays a short statement of its own logic (and no rule imports
another): graph checks and surgery, the conv chains of streamline slimming, and the pooling merges that
merge_pooling_into_conv, merge_pooling_into_branch_convs and merge_pooling_into_widened_branch_convs build on.

Naming: a layer rebuilt by a lossy merge is a new layer ``<conv>_merge`` (so Caffe's by-name loading of the original
caffemodel leaves it alone). A conv already named ``*_merge`` is a layer made by these rules (in this rewrite, or in an
earlier run whose output is being slimmed further); merging more into it keeps its name, so GoogLeNet's
``conv2/3x3 + norm2 + pool2`` ends as one ``conv2/3x3_merge`` whichever rule fires first. Caveat: should
merge_pooling_into_conv widen such a layer's kernel, a caffemodel from the earlier run no longer fits it by name;
use the caffemodel written with the new prototxt.

Pooling into a convolution (the geometry ``solve_axis`` solves) is explained in merge_pooling_into_conv's docstring;
distributing a pooling over a Concat's branches in merge_pooling_into_branch_convs'.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np

from deeprebirth import caffe_pb2 as pb
from deeprebirth.errors import DeepRebirthError
from deeprebirth.ir.graph import Graph, Layer
from deeprebirth.ir.initializers import layer_fillers
from deeprebirth.ir.shapes import Shape, conv_geometry, conv_output_size, infer_shapes, pool_geometry
from deeprebirth.rules.base import Change, Match, RuleConfig, Skip
from deeprebirth.weights.affine import fold_affine_into_linear
from deeprebirth.weights.fillers import fill, layer_rng
from deeprebirth.weights.pooling import merge_pool_into_kernel

POOL_INTO_CONV = "merge_pooling_into_conv"
POOLS = {pb.PoolingParameter.MAX: "MAX", pb.PoolingParameter.AVE: "AVE"}

LINEAR_TYPES = ("Convolution", "Deconvolution", "InnerProduct")
MERGE_SUFFIX = "_merge"


def merged(name: str) -> str:
    """The name of a layer (or blob) rebuilt by a lossy merge: ``<name>_merge``, so Caffe's by-name weight loading
    never pairs it with the original's weights. A name that already ends so (made earlier in this rewrite, or by an
    earlier run being slimmed further) stays as it is."""
    return name if name.endswith(MERGE_SUFFIX) else name + MERGE_SUFFIX


def linear_producer(graph: Graph, layer: Layer) -> tuple[Layer | None, str]:
    """The Convolution/Deconvolution/InnerProduct whose output only ``layer`` reads, or None and the reason."""
    producer = graph.producer(layer.bottoms[0])
    if producer.type not in LINEAR_TYPES:
        return None, f"its input comes from a {producer.type}, not a convolution or inner product"
    if graph.only_consumer(layer.bottoms[0]) is not layer:
        return None, f"the output of '{producer.name}' has other consumers"
    if producer.type == "InnerProduct" and producer.proto.inner_product_param.axis not in (1, -1):
        return None, f"'{producer.name}' uses axis {producer.proto.inner_product_param.axis}"
    if producer.type != "InnerProduct" and producer.proto.convolution_param.axis != 1:
        return None, f"'{producer.name}' uses channel axis {producer.proto.convolution_param.axis}"
    if not producer.blobs:
        return None, f"no weights for '{producer.name}'"
    return producer, ""


def passthrough_blocker(graph: Graph, layer: Layer) -> str | None:
    """Why removing the one-in one-out ``layer`` would change the net's interface, or None. When its output is a
    net output, its input must take over that name, which is only possible for a blob nothing else reads and that
    is not itself a net input."""
    top, bottom = layer.tops[0], layer.bottoms[0]
    if graph.consumers(top) or graph.caffe_name(top) == graph.caffe_name(bottom):
        return None
    if len(graph.consumers(bottom)) > 1:
        return f"its output '{graph.caffe_name(top)}' is a net output and its input is read elsewhere too"
    if graph.producer(bottom).type == "Input":
        return f"its output '{graph.caffe_name(top)}' is a net output and its input is a net input"
    return None


def remove_passthrough(graph: Graph, layer: Layer) -> None:
    """Remove a one-in one-out layer: its readers read its input instead. If its output was a net output, the
    input takes over that output's name, so the net's external names do not change."""
    top, bottom = layer.tops[0], layer.bottoms[0]
    if not graph.consumers(top):
        graph.rename_blob(bottom, graph.caffe_name(top))
    graph.replace_uses(top, bottom)
    graph.remove_layer(layer.name)


def fold_affine(linear: Layer, a: np.ndarray, b: np.ndarray) -> None:
    """Fold ``y = a * x + b`` (per output channel) into ``linear``'s weights; it gains a bias if it had none."""
    assert linear.blobs is not None
    weight = linear.blobs[0]
    bias = linear.blobs[1] if len(linear.blobs) > 1 else None
    if linear.type == "InnerProduct":
        out_axis, group = (1 if linear.proto.inner_product_param.transpose else 0), 1
        linear.proto.inner_product_param.bias_term = True
    else:
        out_axis = 1 if linear.type == "Deconvolution" else 0
        group = linear.proto.convolution_param.group
        linear.proto.convolution_param.bias_term = True
    new_weight, new_bias = fold_affine_into_linear(weight, bias, a, b, out_axis, group)
    linear.blobs = [new_weight, new_bias]
    if len(linear.proto.param) == 1:  # keep lr/decay settings meaningful for the new bias blob
        linear.proto.param.add().CopyFrom(linear.proto.param[0])


# ---------------------------------------------------------------------------------------------------------------
# streamline slimming: conv chains


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
        rng = layer_rng(config.seed, name)
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


# ---------------------------------------------------------------------------------------------------------------
# pooling into convolutions


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


def pool_conv_merges(graph: Graph) -> Iterator[Match | Skip]:
    """merge_pooling_into_conv's matches: each Pooling after a Convolution [-> ReLU] that the conv can absorb."""
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


def merge_pool_into_conv(graph: Graph, found: Match, config: RuleConfig, rule: str) -> Change:
    """merge_pooling_into_conv's surgery on one match of ``pool_conv_merges`` (one change of ``rule``)."""
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
    return Change(rule, False, removed=[pool.name] + [conv.name] * renamed, added=[name] * renamed,
                  changed=[name] * (not renamed) + [layer.name for layer in kept],
                  summary=f"merged {POOLS[pool.proto.pooling_param.pool]} Pooling '{pool.name}' into Convolution "
                          f"'{conv.name}'" + (f" as '{name}'" if renamed else "")
                          + f" (kernel {kernel}, stride {stride}, pad {pad})",
                  relearn=[name], reproduces=end)


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
        solved = solve_axis(x[2 + i], conv.kernel[i], conv.stride[i], conv.pad[i],
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


def concat_pool_merges(graph: Graph, widen: bool) -> Iterator[Match | Skip]:
    """Matches of merge_pooling_into_branch_convs (``widen`` False) or of merge_pooling_into_widened_branch_convs (True: only the places
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


def merge_pool_into_branch_convs(graph: Graph, found: Match, config: RuleConfig, rule: str) -> Change:
    """Distribute the pooling over the branches, then merge it into each branch conv (one change of ``rule``)."""
    pool, concat = graph.layer(found.layers[0]), graph.layer(found.layers[1])
    output = graph.caffe_name(pool.tops[0])
    pooled = {p.name for p in distribute(graph, pool, concat)}
    merges = [m for m in pool_conv_merges(graph) if isinstance(m, Match) and m.layers[0] in pooled]
    removed, added, relearn = [pool.name], [], []
    for merge in merges:
        change = merge_pool_into_conv(graph, merge, config, POOL_INTO_CONV)
        removed += [name for name in change.removed if name not in pooled]
        added += change.added
        relearn += change.relearn
    assert len(merges) == len(pooled), "match() checked that every branch conv can take the stride"
    return Change(rule, False, removed=removed, added=added, changed=[concat.name], relearn=relearn,
                  reproduces=output,
                  summary=f"merged Pooling '{pool.name}' into the {len(pooled)} branch convs of Concat "
                          f"'{concat.name}' as {', '.join(relearn)}")
