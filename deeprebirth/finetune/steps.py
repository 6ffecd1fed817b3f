"""Planning layer-wise steps from a rewrite report, and building a step's student net (pure IR work, no Caffe).

The rewrite report lists the lossy changes and, for each, the new layers to re-learn (``relearn``) and the blob of
the ORIGINAL net whose activation they should reproduce (``reproduces``). Changes that share a new layer (GoogLeNet
conv1: pooling merged, then LRN merged into the same ``conv1_merge``) form one *step*; steps are ordered by the
position of their blob in the original net, as in the paper: merge one layer or module, fine-tune, go on.

A step's student net is the slim net's layers up to the step's blob B (the "prefix": earlier steps, this step's
new layers, the layers between) and, optionally, the ORIGINAL net's layers after B (the "suffix", original
weights): the net with merges 1..k applied and k+1.. not yet. The suffix may stop at a later blob (``until``), so a
step can be judged a few blocks downstream with the layers in between free to adapt.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import networkx as nx

from deeprebirth import caffe_pb2 as pb
from deeprebirth.caffe.evaluate import NetIO
from deeprebirth.errors import DeepRebirthError
from deeprebirth.ir.graph import Graph
from deeprebirth.ir.shapes import infer_shapes

if TYPE_CHECKING:
    from deeprebirth.rewrite import RewriteReport
    from deeprebirth.rules import Change


@dataclass
class Step:
    """One layer-wise step: the changes whose new layers are learned together."""

    index: int  # 1-based, in network order
    relearn: list[str]  # new layers (slim net)
    rules: list[str]
    changes: list[int]  # positions in the report's "changes"
    reproduces: str  # Caffe blob of the original net
    blob: str  # Caffe blob of the slim net at the same position
    final: bool = False  # the whole-net phase: every layer learns at 1x

    @property
    def name(self) -> str:
        return "whole net" if self.final else ", ".join(self.relearn)




class _Groups:
    """Union-find over the indices of the report's changes: which changes one step re-learns together."""

    def __init__(self, members: list[int]) -> None:
        self.parent = {i: i for i in members}

    def root(self, i: int) -> int:
        while self.parent[i] != i:
            i = self.parent[i]
        return i

    def join(self, a: int, b: int) -> None:
        self.parent[self.root(a)] = self.root(b)

    def members(self) -> list[list[int]]:
        found: dict[int, list[int]] = {}
        for i in self.parent:
            found.setdefault(self.root(i), []).append(i)
        return list(found.values())


def plan_steps(report: RewriteReport, original: Graph, slim: Graph) -> list[Step]:
    """Group the report's lossy changes into steps and locate each step's blob in both nets.

    Changes join one step when they share a new layer (conv1 + pool1, then + norm1: one ``conv1_merge``), when a
    later change removed a layer an earlier one made (a merged conv that decompose_conv_tucker split: the merge is
    learned through the pieces), or when they reproduce the same blob (the branches of one inception module)."""
    changes = report.changes
    lossy = [i for i, c in enumerate(changes) if c.relearn]
    groups = _Groups(lossy)
    made = _join_shared_layers(changes, lossy, groups)
    still = set(report.relearn)  # the new layers no later change removed (each one in ``made``)
    missing = sorted(name for name in still if name not in slim)
    if missing:
        raise DeepRebirthError(f"the report's change {made[missing[0]] + 1} re-learns '{missing[0]}', which the slim "
                               "net does not have: report and nets do not match")
    _join_same_blob(changes, lossy, groups, original)
    order = {layer.name: k for k, layer in enumerate(original.layers())}

    def position(blob: str) -> int:
        return order[final_writer(original, blob)[1]]  # type: ignore[index]

    steps = []
    for members in groups.members():
        names = {name for i in members for name in changes[i].relearn if name in still}
        relearn = [layer.name for layer in slim.layers() if layer.name in names]
        if not relearn:
            continue
        reproduces = max((changes[i].reproduces or "" for i in members), key=position)
        if final_writer(slim, reproduces) is None:
            raise DeepRebirthError(f"the slim net has no blob '{reproduces}' (the rules keep the name of the blob a "
                                   "merge reproduces): report and nets do not match")
        rules = list(dict.fromkeys(changes[i].rule for i in members))
        steps.append(Step(0, relearn, rules, members, reproduces, reproduces))
    steps.sort(key=lambda step: position(step.reproduces))
    for k, step in enumerate(steps, 1):
        step.index = k
    _check_shapes(steps, original, slim)
    return steps


def _join_shared_layers(changes: list[Change], lossy: list[int], groups: _Groups) -> dict[str, int]:
    """Join changes that make, extend or remove the same new layer; returns new layer -> the latest change that
    made it."""
    made: dict[str, int] = {}
    for i in lossy:
        change = changes[i]
        for name in change.removed:
            if name in made:
                groups.join(made.pop(name), i)
        for name in change.relearn:
            if name in made:
                groups.join(made[name], i)
            made[name] = i
        if change.rule == "merge_inception_branches" and change.changed:
            raise DeepRebirthError(f"change {i + 1} ({change.summary}) reorders the channels of "
                                   f"'{change.reproduces}', which layer-wise fine-tuning compares with the "
                                   "original's channel by channel; rewrite with a widen mode that keeps the channel "
                                   "order (balanced, on GoogLeNet-ordered blocks)")
    return made


def _join_same_blob(changes: list[Change], lossy: list[int], groups: _Groups, original: Graph) -> None:
    """Join changes that reproduce the same blob of the original (the branches of one inception module)."""
    by_blob: dict[str, int] = {}
    for i in lossy:
        blob = changes[i].reproduces
        if not blob or final_writer(original, blob) is None:
            raise DeepRebirthError(f"change {i + 1} ({changes[i].rule}) reproduces blob {blob!r}, which the "
                                   "original net does not have: report and nets do not match")
        if blob in by_blob:
            groups.join(i, by_blob[blob])
        by_blob[blob] = i


def _check_shapes(steps: list[Step], original: Graph, slim: Graph) -> None:
    o_shapes, s_shapes = infer_shapes(original), infer_shapes(slim)
    for step in steps:
        a = o_shapes[final_writer(original, step.reproduces)[0]]  # type: ignore[index]
        b = s_shapes[final_writer(slim, step.blob)[0]]  # type: ignore[index]
        if a != b:
            raise DeepRebirthError(f"blob '{step.reproduces}' has shape {a} in the original net but {b} in the slim "
                                   "net: report and nets do not match")


def final_step(steps: list[Step], original: Graph, slim: Graph) -> Step:
    """The closing step: the whole slim net, up to its logits (the input of a final Softmax, else its output).
    Its ``relearn`` lists every step's new layers (the only ones that learn with ``freeze_rest``)."""
    output = NetIO.of(slim).output
    _, last = final_writer(slim, output)  # type: ignore[misc]
    producer = slim.layer(last)
    logits = slim.caffe_name(producer.bottoms[0]) if producer.type == "Softmax" else output
    if final_writer(original, logits) is None:
        raise DeepRebirthError(f"the original net has no blob '{logits}' (the slim net's logits) to compare with")
    relearn = [name for step in steps for name in step.relearn]
    return Step(len(steps) + 1, relearn, ["final"], [], logits, logits, final=True)


def final_writer(graph: Graph, blob: str) -> tuple[str, str] | None:
    """(SSA blob, layer) of the last layer that writes Caffe blob ``blob`` (in-place layers included)."""
    names = graph.caffe_blob_names()
    found = None
    for layer in graph.layers():
        for top in layer.tops:
            if names[top] == blob:
                found = (top, layer.name)
    return found


def prefix(graph: Graph, layer: str) -> set[str]:
    return set(nx.ancestors(graph.dag(), layer)) | {layer}


# ---------------------------------------------------------------------------------------------------------------
# building the nets of a step


@dataclass
class StepNet:
    """A net for one step: layers in Caffe form, where each layer's weights come from, and how fast it learns."""

    net: pb.NetParameter
    source: dict[str, tuple[str, str]]  # layer name here -> ("slim" | "original", layer name there)
    factor: dict[str, float]  # layer name -> lr multiplier (0: frozen)
    blob: str  # the step's blob, as named in this net
    output: str | None  # the prediction blob (None for a prefix alone)
    until: str | None = None  # the original's blob ``until`` as named in this net (a suffix that stops there)


def build_step_net(step: Step, slim: Graph, original: Graph, with_suffix: bool, shared: set[str],
                   new_lr_mult: float, freeze_rest: bool, until: str | None = None) -> StepNet:
    """The slim prefix up to the step's blob, and (``with_suffix``) the original's layers after it, all of them or
    (``until``, a blob of the original) only those that blob depends on."""
    s_blob, s_last = final_writer(slim, step.blob)  # type: ignore[misc]
    keep = prefix(slim, s_last)
    s_names = slim.caffe_blob_names()
    step_net = StepNet(pb.NetParameter(name=f"{slim.name or 'net'}_step{step.index}"), {}, {}, s_names[s_blob], None)
    new = set(step.relearn)
    for param in slim.to_net().layer:
        if param.name in keep:
            step_net.net.layer.add().CopyFrom(param)
            step_net.source[param.name] = ("slim", param.name)
            step_net.factor[param.name] = new_lr_mult if param.name in new else (0.0 if freeze_rest else 1.0)
    if not with_suffix:
        return step_net
    taken_blobs = {s_names[b] for layer in slim.layers() if layer.name in keep for b in layer.tops}
    rename = _append_original_suffix(step_net, step, original, keep, taken_blobs, shared, freeze_rest, until)
    if until is not None:
        step_net.until = rename(final_writer(original, until)[0])  # type: ignore[index]
        return step_net
    hybrid = Graph.from_net(step_net.net, source="<step net>")
    outputs = hybrid.outputs()
    step_net.output = hybrid.caffe_name(outputs[0]) if outputs else None
    return step_net


def _append_original_suffix(step_net: StepNet, step: Step, original: Graph, taken_layers: set[str],
                            taken_blobs: set[str], shared: set[str], freeze_rest: bool,
                            until: str | None) -> Callable[[str], str]:
    """Splice the original's layers after the step's blob onto ``step_net`` (reading the slim prefix's blob where
    they read the step's blob); returns how the original's blobs are named in the step net."""
    o_blob, o_last = final_writer(original, step.reproduces)  # type: ignore[misc]
    before = prefix(original, o_last)
    o_names = original.caffe_blob_names()
    o_params = {p.name: p for p in original.to_net().layer}
    needed: set[str] | None = None
    if until is not None:
        found = final_writer(original, until)
        if found is None:
            raise DeepRebirthError(f"the original net has no blob '{until}'")
        needed = prefix(original, found[1])

    def rename(blob: str) -> str:
        name = o_names[blob]
        return name + "/original" if name in taken_blobs else name

    for layer in original.layers():
        if layer.name in before or layer.type == "Input" or (needed is not None and layer.name not in needed):
            continue
        bottoms = []
        for blob in layer.bottoms:
            if original.producer(blob).name in before:
                if blob != o_blob:
                    raise DeepRebirthError(f"layer '{layer.name}' of the original net reads '{o_names[blob]}', from "
                                           f"before the step's blob '{step.reproduces}': the slim and the original "
                                           "net cannot be spliced there")
                bottoms.append(step_net.blob)
            else:
                bottoms.append(rename(blob))
        param = step_net.net.layer.add()
        param.CopyFrom(o_params[layer.name])
        name = layer.name + "/original" if layer.name in taken_layers else layer.name
        param.name = name
        del param.bottom[:]
        del param.top[:]
        param.bottom.extend(bottoms)
        param.top.extend(rename(t) for t in layer.tops)
        step_net.source[name] = ("original", layer.name)
        step_net.factor[name] = (0.0 if freeze_rest else 1.0) if layer.name in shared else 0.0
    return rename

