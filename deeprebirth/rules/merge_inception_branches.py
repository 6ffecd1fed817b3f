"""merge_inception_branches (lossy): DeepRebirth's branch slimming of an inception block.

Before (GoogLeNet inception_3a; each conv is followed by a ReLU, not drawn):

    X ---+-----------------+-------------------+-------------------+
         |                 |                   |                   |
      1x1 (64)      3x3_reduce (96)     5x5_reduce (16)     pool 3x3 stride 1
         |                 |                   |                   |
         |             3x3 (128)            5x5 (32)         pool_proj (32)
         +-----------------+---------+---------+-------------------+
                                  Concat (256)
After (widen=balanced):

    X ---------------------+-------------------+
                           |                   |
                    3x3_reduce (96)     5x5_reduce (16)
                           |                   |
                3x3_merge (64 + 128)   5x5_merge (32 + 32)
                           +---------+---------+
                                  Concat (256)

The pooling branch (Pooling stride 1 -> conv) and the thin branch (a conv 1x1 on X) are removed; their channels
are added to the wide branches (convs with a kernel larger than 1x1), so the Concat keeps its width, name and top,
and every layer after the block keeps its weights. ``config.widen`` says where the freed channels go: "3x3" all to
the wide branch with the smallest kernel, "5x5" all to the one with the largest, "balanced" each removed branch to
the nearest wide branch in Concat order (GoogLeNet: 1x1 -> 3x3, pool_proj -> 5x5).

Channel layout (see deeprebirth.weights.branches): a widened conv's outputs are ordered by the original Concat channel they stand
for, so with "balanced" on GoogLeNet's order every channel keeps its position. Otherwise the new Concat's channel
``c`` stands for the original channel ``perm[c]``, and every layer that reads the block output has its input
channels permuted (``W[:, perm]``), followed through per-channel layers (activations, Pooling, Dropout, Split,
WITHIN_CHANNEL LRN; BatchNorm/Scale/Bias/PReLU blobs are permuted too), Concat (as a block of the wider
permutation) and Flatten, down to each Convolution, Deconvolution or InnerProduct.

Preconditions: the Concat joins, along channels, branches that each end in a Convolution (then only parameterless
pointwise layers) and start from one common blob X; there is a pooling branch (one Pooling, stride 1, same spatial
size, no global pooling); nothing outside a removed or widened branch reads its values; there is a wide branch; a
widened conv has group 1, dilation 1, axis 1; shapes are known; with a non-identity ``perm``, every reader of the
block output can be permuted (not an ACROSS_CHANNELS LRN, a group conv, an Eltwise, a net output ...).

Weights: a widened conv is a new layer ``<conv>_merge`` (and its activations ``<name>_merge``, on new blobs
``<blob>_merge``); with ``init="inherit"`` its old output channels keep their weights and the freed ones are drawn
from the layer's fillers (MSRA / zero when the prototxt gives none), seeded by ``config.seed`` and the layer name;
with ``init="filler"`` all of it comes from the fillers. Permuted readers are renamed ``<name>_merge`` as their
weights changed. Without weights only the prototxt changes.

Change: ``removed`` = every layer name that left the net, ``added`` = the widened convs and their activations,
``changed`` = the permuted readers (new names), ``relearn`` = the widened convs, ``reproduces`` = the Concat's top.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from deeprebirth.ir.graph import Graph, Layer
from deeprebirth.ir.initializers import layer_fillers
from deeprebirth.ir.shapes import Shape, conv_geometry, infer_shapes, pool_geometry
from deeprebirth.rules._shared import merged
from deeprebirth.rules.base import RULE_OPTION, Change, Match, Rule, RuleConfig, Skip
from deeprebirth.weights.branches import (
    assign_freed,
    channel_layout,
    embed_permutation,
    expand_permutation,
    own_channels,
    permute_input_channels,
    widen_output_channels,
)
from deeprebirth.weights.fillers import fill, layer_rng

NAME = "merge_inception_branches"

POINTWISE = ("ReLU", "ELU", "Sigmoid", "TanH", "AbsVal", "BNLL", "Power", "Exp", "Log", "Clip", "ReLU6", "Swish", "Dropout")
CHANNEL_BLOBS = ("BatchNorm", "Scale", "Bias", "PReLU")
Shapes = dict[str, Shape | None]


@dataclass(eq=False)
class Branch:
    index: int  # position among the Concat's inputs
    conv: Layer  # the branch's last convolution
    tail: list[Layer]  # pointwise layers from the conv to the Concat
    entry: list[Layer] = field(default_factory=list)  # layers from the block input X to the conv

    @property
    def kind(self) -> str:
        kernel = conv_geometry(self.conv.proto.convolution_param).kernel
        if any(layer.type == "Pooling" for layer in self.entry):
            return "pool"
        if kernel == (1, 1):
            return "thin" if not self.entry else "other"
        return "wide"


def _branch(graph: Graph, concat: Layer, index: int) -> Branch | None:
    tail: list[Layer] = []
    layer = graph.producer(concat.bottoms[index])
    while layer.type in POINTWISE and len(layer.bottoms) == 1 and len(layer.tops) == 1:
        tail.insert(0, layer)
        layer = graph.producer(layer.bottoms[0])
    if layer.type != "Convolution" or len(layer.bottoms) != 1 or len(layer.tops) != 1:
        return None
    return Branch(index, layer, tail)


def _ancestors(graph: Graph, blob: str, depth: int = 8) -> list[str]:
    chain = [blob]
    while len(chain) < depth:
        layer = graph.producer(chain[-1])
        if len(layer.bottoms) != 1 or len(layer.tops) != 1:
            break
        chain.append(layer.bottoms[0])
    return chain


def _block(graph: Graph, concat: Layer) -> tuple[str, list[Branch]] | None:
    """The block input X and the branches, if ``concat`` joins conv branches that start from one blob."""
    found = [_branch(graph, concat, i) for i in range(len(concat.bottoms))]
    branches = [b for b in found if b is not None]
    if len(concat.bottoms) < 2 or len(branches) != len(found):
        return None
    chains = [_ancestors(graph, b.conv.bottoms[0]) for b in branches]
    origin = next((x for x in chains[0] if all(x in chain for chain in chains[1:])), None)
    if origin is None:
        return None
    for branch, chain in zip(branches, chains):
        branch.entry = [graph.producer(blob) for blob in reversed(chain[:chain.index(origin)])]
    return origin, branches


def _concat_axis(layer: Layer, rank: int) -> int:
    p = layer.proto.concat_param
    axis = p.concat_dim if p.HasField("concat_dim") else p.axis
    return axis + rank if axis < 0 else axis


def _leak(graph: Graph, layers: list[Layer], concat: Layer) -> str | None:
    """Why the values of this chain of layers (ending in ``concat``) are read elsewhere, or None."""
    for layer, reader in zip(layers, [*layers[1:], concat]):
        if graph.only_consumer(layer.tops[0]) is not reader:
            others = [r.name for r in graph.consumers(layer.tops[0]) if r is not reader]
            return f"the output of '{layer.name}' is also read by {', '.join(others) or reader.name + ' twice'}"
    return None


def _through(graph: Graph, shapes: Shapes, layer: Layer, blob: str, perm: np.ndarray,
             plan: list[tuple[str, np.ndarray, int]], todo: list[tuple[str, np.ndarray]]) -> str | None:
    """Follow reordered channels into ``layer``: plan its weights' permutation or pass the order on; or why not."""
    t, shape = layer.type, shapes[blob]
    assert shape is not None
    if t in ("Convolution", "Deconvolution"):
        p = layer.proto.convolution_param
        if p.axis != 1 or p.group != 1:
            return f"{t} '{layer.name}' has group {p.group} / axis {p.axis}"
        plan.append((layer.name, perm, 1))
    elif t == "InnerProduct":
        axis = layer.proto.inner_product_param.axis
        if axis not in (1, 1 - len(shape)):
            return f"InnerProduct '{layer.name}' uses axis {axis}"
        plan.append((layer.name, perm, math.prod(shape[2:])))
    elif t == "LRN" and layer.proto.lrn_param.norm_region == layer.proto.lrn_param.ACROSS_CHANNELS:
        return f"LRN '{layer.name}' normalises across channels"
    elif t in (*POINTWISE, "Pooling", "Split", "LRN") or (t == "PReLU" and layer.proto.prelu_param.channel_shared):
        todo.extend((top, perm) for top in layer.tops)
    elif t in CHANNEL_BLOBS and len(layer.bottoms) == 1:
        p = layer.proto.scale_param if t == "Scale" else layer.proto.bias_param
        if t in ("Scale", "Bias") and (p.axis not in (1, 1 - len(shape)) or p.num_axes != 1):
            return f"{t} '{layer.name}' does not act per channel"
        plan.append((layer.name, perm, 1))
        todo.append((layer.tops[0], perm))
    elif t == "Concat" and _concat_axis(layer, len(shape)) == 1:
        inputs = [shapes[b] for b in layer.bottoms]
        widths = [s[1] for s in inputs if s is not None]
        if len(widths) != len(inputs):
            return f"Concat '{layer.name}' has inputs of unknown shape"
        index = layer.bottoms.index(blob)
        todo.append((layer.tops[0], embed_permutation(perm, sum(widths[:index]), sum(widths))))
    elif t == "Flatten" and layer.proto.flatten_param.axis == 1 and layer.proto.flatten_param.end_axis == -1:
        todo.append((layer.tops[0], expand_permutation(perm, math.prod(shape[2:]))))
    else:
        return f"{t} '{layer.name}' reads them"
    return None


def _permutation_plan(graph: Graph, shapes: Shapes, blob: str,
                      perm: np.ndarray) -> tuple[list[tuple[str, np.ndarray, int]], str | None]:
    """The layers whose weights must follow ``perm`` (name, permutation, features per channel), or why not."""
    plan: list[tuple[str, np.ndarray, int]] = []
    todo, seen = [(blob, perm)], set()
    while todo:
        blob, perm = todo.pop(0)
        readers = graph.consumers(blob)
        if not readers:
            return [], f"'{graph.caffe_name(blob)}' is a net output"
        for layer in readers:
            if layer.name in seen or layer.bottoms.count(blob) != 1:
                return [], f"'{layer.name}' reads them more than once"
            seen.add(layer.name)
            reason = _through(graph, shapes, layer, blob, perm, plan, todo)
            if reason:
                return [], reason
    return plan, None


def _plan(graph: Graph, shapes: Shapes, concat: Layer, origin: str, branches: list[Branch],
          config: RuleConfig) -> Match | Skip | None:
    kinds = [b.kind for b in branches]
    if "pool" not in kinds:
        return Skip(concat.name, "no pooling branch") if "thin" in kinds else None
    tops = [shapes[b] for b in concat.bottoms] + [shapes[origin]]
    if any(s is None or len(s) != 4 for s in tops):
        return Skip(concat.name, "unknown or non-4-D shapes")
    if _concat_axis(concat, 4) != 1:
        return Skip(concat.name, "it does not concatenate along channels")
    removed = [b for b in branches if b.kind in ("thin", "pool")]
    for branch in removed:
        if branch.kind == "pool":
            pool = branch.entry[-1]
            param = pool.proto.pooling_param
            if len(branch.entry) != 1 or param.global_pooling or pool.type != "Pooling" \
                    or pool_geometry(param, shapes[origin][2:]).stride != (1, 1):  # type: ignore[index,arg-type]
                return Skip(concat.name, f"pooling branch '{pool.name}' is not one Pooling of stride 1")
        leak = _leak(graph, [*branch.entry, branch.conv, *branch.tail], concat)
        if leak:
            return Skip(concat.name, leak)
    candidates = [b.index for b in branches if b.kind == "wide"]
    if not candidates:
        return Skip(concat.name, "no wide conv branch (kernel larger than 1x1) to take the freed channels")
    widths = [s[1] for s in tops[:-1]]  # type: ignore[index]
    kernels = {b.index: math.prod(conv_geometry(b.conv.proto.convolution_param).kernel) for b in branches}
    target = assign_freed(widths, [b.index for b in removed], candidates, kernels, config.widen)
    kept, sources, perm = channel_layout(widths, target)
    offsets = np.cumsum([0, *widths])
    widen = {}
    for index in sorted(set(target.values())):
        branch = branches[index]
        p = branch.conv.proto.convolution_param
        if p.group != 1 or conv_geometry(p).dilation != (1, 1) or p.axis != 1:
            return Skip(concat.name, f"widened conv '{branch.conv.name}' has group, dilation or axis settings")
        leak = _leak(graph, [branch.conv, *branch.tail], concat)
        if leak:
            return Skip(concat.name, leak)
        widen[index] = (branch.conv.name, [t.name for t in branch.tail],
                        own_channels(sources[index], int(offsets[index]), widths[index]))
    plan: list[tuple[str, np.ndarray, int]] = []
    if not np.array_equal(perm, np.arange(perm.size)):
        plan, reason = _permutation_plan(graph, shapes, concat.tops[0], perm)
        if reason:
            return Skip(concat.name, f"widen={config.widen} reorders the block's channels and {reason}")
    remove = [layer.name for b in [*removed, *(branches[i] for i in widen)]
              for layer in reversed([*(b.entry if b in removed else []), b.conv, *b.tail])]
    involved = (concat.name, *remove, *(name for name, _, _ in plan))
    return Match(involved, {"kept": kept, "widen": widen, "remove": remove, "permute": plan,
                            "removed_branches": [b.conv.name for b in removed]})


def match(graph: Graph, config: RuleConfig) -> Iterator[Match | Skip]:
    RULE_OPTION["widen"].validate(config.widen)
    shapes = infer_shapes(graph)
    for concat in graph.layers():
        if concat.type != "Concat":
            continue
        block = _block(graph, concat)
        found = _plan(graph, shapes, concat, *block, config) if block else None
        if found is not None:
            yield found


def _widened(graph: Graph, conv: Layer, own: np.ndarray, config: RuleConfig) -> Layer:
    top = graph.new_blob(merged(graph.caffe_name(conv.tops[0])))
    layer = conv.clone(name=graph.fresh_layer_name(merged(conv.name)), tops=[top])
    layer.proto.convolution_param.num_output = own.size
    if conv.blobs is not None:
        RULE_OPTION["init"].validate(config.init)
        rng = layer_rng(config.seed, conv.name)
        fillers = layer_fillers(conv)
        fresh = [fill(fillers[min(i, 1)], (own.size, *b.shape[1:]), rng) for i, b in enumerate(conv.blobs)]
        layer.blobs = widen_output_channels(conv.blobs, own, fresh) if config.init == "inherit" else fresh
    return layer


def _permuted(layer: Layer, perm: np.ndarray, inner: int) -> list[np.ndarray] | None:
    if layer.blobs is None:
        return None
    blobs = list(layer.blobs)
    if layer.type in ("Convolution", "Deconvolution", "InnerProduct"):
        transposed = layer.type == "InnerProduct" and layer.proto.inner_product_param.transpose
        axis = 0 if layer.type == "Deconvolution" or transposed else 1
        blobs[0] = permute_input_channels(blobs[0], perm, axis, inner)
    elif layer.type == "BatchNorm":
        blobs[:2] = [b[perm] for b in blobs[:2]]
    elif layer.type != "PReLU" or not layer.proto.prelu_param.channel_shared:
        blobs = [b[perm] for b in blobs]
    return blobs


def apply(graph: Graph, found: Match, config: RuleConfig) -> Change:
    data = found.data
    concat = graph.layer(found.layers[0])
    bottoms, added, changed, relearn = list(concat.bottoms), [], [], []
    intended: list[str] = []
    for index, (conv_name, tail, own) in data["widen"].items():
        new = graph.add_layer(_widened(graph, graph.layer(conv_name), own, config), at=conv_name)
        added.append(new.name)
        intended.append(merged(conv_name))
        relearn.append(new.name)
        for name in tail:
            old = graph.layer(name)
            in_place = graph.caffe_name(old.tops[0]) == graph.caffe_name(old.bottoms[0])
            top = graph.new_blob(graph.caffe_name(new.tops[0]) if in_place else merged(graph.caffe_name(old.tops[0])))
            new = graph.add_layer(old.clone(name=graph.fresh_layer_name(merged(name)), bottoms=[new.tops[0]],
                                            tops=[top]), at=new.name)
            added.append(new.name)
            intended.append(merged(name))
        bottoms[index] = new.tops[0]
    graph.replace_layer(concat.name, concat.clone(bottoms=[bottoms[k] for k in data["kept"]]))
    for name in data["remove"]:
        graph.remove_layer(name)
    for i, (name, wanted) in enumerate(zip(added, intended)):  # "<x>_merge" layers rebuilt: names back once free
        if wanted != name and wanted not in graph:
            graph.rename_layer(name, wanted)
            added[i] = wanted
            relearn[:] = [wanted if r == name else r for r in relearn]
    removed = [name for name in data["remove"] if name not in added]
    for name, perm, inner in data["permute"]:
        old = graph.layer(name)
        new = graph.replace_layer(name, old.clone(name=graph.fresh_layer_name(merged(name)),
                                                  blobs=_permuted(old, perm, inner)))
        removed.append(name)
        changed.append(new.name)
    summary = (f"merged branches {', '.join(data['removed_branches'])} of '{concat.name}' into "
               f"{', '.join(relearn)} (widen={config.widen}); Concat width kept"
               + (f"; input channels of {len(changed)} readers permuted" if changed else ""))
    return Change(NAME, False, removed=removed, added=added, changed=changed, summary=summary, relearn=relearn,
                  reproduces=graph.caffe_name(concat.tops[0]))


RULE = Rule(NAME, exact=False, group="branch", match=match, apply=apply)
