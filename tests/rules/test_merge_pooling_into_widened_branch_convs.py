"""merge_pooling_into_widened_branch_convs: SqueezeNet's stage poolings after fire modules leave the net; the 1x1
expand conv grows to 3x3 with its weights at the centre; shapes stay, in our inference and in real Caffe."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from helpers import graph_from_text, input_feed, run_caffe, save
from nets import fire_module, squeezenet_v10

from deeprebirth.ir.shapes import infer_shapes
from deeprebirth.rewrite import rewrite, select_rules
from deeprebirth.rules import merge_pooling_into_branch_convs, merge_pooling_into_widened_branch_convs

RULE = merge_pooling_into_widened_branch_convs.RULE
SMALL_FIRES = ((4, 8), (4, 8), (6, 12), (6, 12), (8, 16), (8, 16), (8, 16), (8, 16))


def fire_then_pool(pool: str, size: int = 15) -> str:
    return (f'input: "data" input_shape {{ dim: 2 dim: 3 dim: {size} dim: {size} }}\n'
            + fire_module("fire", "data", 4, 6)
            + f'layer {{ name: "pool" type: "Pooling" bottom: "fire/concat" top: "pool" pooling_param {{ {pool} }} }}\n')


def test_the_1x1_branch_grows_to_3x3_with_its_weights_at_the_centre(tmp_path: Path) -> None:
    original = graph_from_text(fire_then_pool("pool: MAX kernel_size: 3 stride: 2"), seed=3)
    graph = graph_from_text(fire_then_pool("pool: MAX kernel_size: 3 stride: 2"), seed=3)
    before = infer_shapes(graph)
    report = rewrite(graph, (merge_pooling_into_branch_convs.RULE, RULE))
    [change] = report.changes
    assert change.rule == RULE.name and not change.exact and change.reproduces == "pool"
    assert sorted(change.relearn) == ["fire/expand1x1_merge", "fire/expand3x3_merge"]
    assert "Pooling" not in graph.layer_types()
    widened = graph.layer("fire/expand1x1_merge")
    param = widened.proto.convolution_param
    assert list(param.kernel_size) == [3] and list(param.stride) == [2] and not list(param.pad)
    weight, old = widened.blobs[0], original.layer("fire/expand1x1").blobs[0]  # type: ignore[index]
    assert weight.shape == (6, 4, 3, 3)
    assert np.array_equal(weight[:, :, 1, 1], old[:, :, 0, 0])
    centre = np.zeros((3, 3), dtype=bool)
    centre[1, 1] = True
    assert not weight[:, :, ~centre].any()
    assert list(graph.layer("fire/expand3x3_merge").proto.convolution_param.kernel_size) == [3]
    after = infer_shapes(graph)
    assert after[graph.outputs()[0]] == before["pool"] == (2, 12, 7, 7)
    out = run_caffe(*save(graph, tmp_path, "slim"), input_feed(original), ["pool"])["pool"]
    assert out.shape == (2, 12, 7, 7)


def test_average_pooling_spreads_the_1x1_weights_over_the_window() -> None:
    graph = graph_from_text(fire_then_pool("pool: AVE kernel_size: 3 stride: 2"), seed=3)
    old = graph.layer("fire/expand1x1").blobs[0]  # type: ignore[index]
    rewrite(graph, (RULE,))
    weight = graph.layer("fire/expand1x1_merge").blobs[0]  # type: ignore[index]
    assert np.allclose(weight, np.broadcast_to(old / 9, weight.shape), atol=1e-7)


def test_places_the_plain_rule_takes_are_left_to_it() -> None:
    graph = graph_from_text(fire_then_pool("pool: MAX kernel_size: 3 stride: 2", size=16), seed=3)
    report = rewrite(graph, (merge_pooling_into_branch_convs.RULE, RULE))
    assert [c.rule for c in report.changes] == [merge_pooling_into_branch_convs.RULE.name]
    assert list(graph.layer("fire/expand1x1_merge").proto.convolution_param.kernel_size) == [1]


def test_only_1x1_convs_grow_and_only_for_a_stride() -> None:
    stride_one = rewrite(graph_from_text(fire_then_pool("pool: AVE kernel_size: 3 stride: 1")), (RULE,))
    assert not stride_one.changes and "only a 1x1 conv grows" in stride_one.skipped[RULE.name][0].reason
    grown_3x3 = fire_then_pool("pool: MAX kernel_size: 5 stride: 2", size=15)  # 15 -> 6: the 3x3 needs a 4x4
    report = rewrite(graph_from_text(grown_3x3), (RULE,))
    assert not report.changes and "'fire/expand3x3' (kernel 3x3) would have to grow" in \
        report.skipped[RULE.name][0].reason


def test_squeezenet_v10_stage_pools_leave_and_shapes_stay(tmp_path: Path) -> None:
    text = squeezenet_v10(size=99, classes=10, fires=SMALL_FIRES, conv1=16)
    original, graph = graph_from_text(text, seed=1), graph_from_text(text, seed=1)
    report = rewrite(graph, select_rules("all"))
    assert [c.reproduces for c in report.changes if c.rule == RULE.name] == ["pool4", "pool8"]
    assert [layer.name for layer in graph.layers() if layer.type == "Pooling"] == ["pool10"]
    before, after = infer_shapes(original), infer_shapes(graph)
    names = graph.caffe_blob_names()
    for blob, shape in after.items():
        if names[blob] in before:
            assert before[names[blob]] == shape, names[blob]
    out = run_caffe(*save(graph, tmp_path, "slim"), input_feed(original), ["prob"])["prob"]
    assert out.shape == before["prob"]
