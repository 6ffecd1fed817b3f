"""Which intermediate blobs the whole-net phase matches (``finetune.hints``): cuts of the slim net between the
relearned layers and the logits, present with the same shape in the original, spread over the net."""

from __future__ import annotations

import networkx as nx
from helpers import graph_from_text
from nets import squeezenet_v10, tiny_inception

from deeprebirth.finetune.hints import MAX_HINTS, hint_blobs
from deeprebirth.ir.graph import Graph
from deeprebirth.ir.shapes import infer_shapes
from deeprebirth.rewrite import rewrite, select_rules


def slimmed(text: str) -> tuple[Graph, Graph, list[str]]:
    original, slim = graph_from_text(text, seed=1), graph_from_text(text, seed=1)
    report = rewrite(slim, select_rules("all"))
    return original, slim, report.relearn


def caffe_flow(graph: Graph) -> tuple[nx.DiGraph, dict[str, str]]:
    """Blob-to-blob edges by Caffe name, and each name's final SSA blob."""
    names = graph.caffe_blob_names()
    flow = nx.DiGraph()
    for layer in graph.layers():
        flow.add_edges_from((names[b], names[t]) for b in layer.bottoms for t in layer.tops if names[b] != names[t])
    return flow, {names[blob]: blob for blob in graph.blobs()}


def test_squeezenet_hints_are_fire_outputs_after_the_merged_stem() -> None:
    original, slim, relearn = slimmed(squeezenet_v10(size=99, classes=20))
    assert relearn and "pool1" not in slim and "pool4" not in slim and "pool8" not in slim
    every = hint_blobs(original, slim, relearn, "conv10", limit=100)
    # the merged stem writes pool1, which every later blob depends on: each fire module's squeeze and output
    # (pool4 and pool8 merged into fire4's and fire8's expands, which then write those blobs instead)
    fires = [f"fire{i}/{part}" for i in range(2, 10) for part in ("squeeze1x1", "concat")]
    assert every == ["pool1"] + [name.replace("fire4/concat", "pool4").replace("fire8/concat", "pool8")
                                 for name in fires]
    picked = hint_blobs(original, slim, relearn, "conv10")
    assert len(picked) == MAX_HINTS and set(picked) <= set(every) and picked[-1] == every[-1]
    shapes, original_shapes = infer_shapes(slim), infer_shapes(original)
    flow, final = caffe_flow(slim)
    _, original_final = caffe_flow(original)
    for name in every:
        assert shapes[final[name]] == original_shapes[original_final[name]]
        cut = flow.copy()
        cut.remove_node(name)
        assert not nx.has_path(cut, "data", "conv10"), name


def test_nothing_upstream_of_the_first_relearned_layer_is_a_hint() -> None:
    original, slim, relearn = slimmed(tiny_inception(size=32))
    every = hint_blobs(original, slim, relearn, "classifier", limit=100)
    assert every[0] == "norm1" and every[-1] == "gap" and "classifier" not in every  # conv1_merge writes norm1
    late = [name for name in relearn if name.startswith("inception_3/")]
    assert late
    names = slim.caffe_blob_names()
    flow, _ = caffe_flow(slim)
    reachable = set().union(*(nx.descendants(flow, names[top]) | {names[top]}
                              for name in late for top in slim.layer(name).tops))
    after = hint_blobs(original, slim, late, "classifier", limit=100)
    assert after == [name for name in every if name in reachable] and "norm1" not in after


def test_without_relearned_layers_there_are_no_hints() -> None:
    text = squeezenet_v10(size=99, classes=20)
    original, slim = graph_from_text(text, seed=1), graph_from_text(text, seed=1)
    assert hint_blobs(original, slim, [], "conv10") == []
    assert hint_blobs(original, slim, ["conv1"], "no_such_blob") == []
