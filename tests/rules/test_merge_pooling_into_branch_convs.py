"""merge_pooling_into_branch_convs: its distribution step is exact in real Caffe; then every branch conv takes the
pooling's stride, on small nets and on GoogLeNet's stage poolings."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from helpers import graph_from_text, input_feed, run_caffe, save
from nets import tiny_inception

from deeprebirth.ir.model import load_model
from deeprebirth.ir.shapes import infer_shapes
from deeprebirth.rewrite import rewrite, select_rules
from deeprebirth.rules import merge_pooling_into_branch_convs
from deeprebirth.rules._shared import distribute

RULE = merge_pooling_into_branch_convs.RULE
INPUT = 'input: "data" input_shape {{ dim: 2 dim: 3 dim: {size} dim: {size} }}\n'


def branch(name: str, kernel: int, relu: bool = True) -> str:
    text = (f'layer {{ name: "{name}" type: "Convolution" bottom: "data" top: "{name}" '
            f'convolution_param {{ num_output: 4 kernel_size: {kernel} pad: {kernel // 2} }} }}\n')
    if relu:
        text += f'layer {{ name: "{name}_relu" type: "ReLU" bottom: "{name}" top: "{name}" }}\n'
    return text


def block(pool: str, extra: str = "", size: int = 16) -> str:
    return (INPUT.format(size=size) + branch("a", 3) + branch("b", 5) + branch("c", 1, relu=False)
            + 'layer { name: "cat" type: "Concat" bottom: "a" bottom: "b" bottom: "c" top: "cat" }\n'
            + f'layer {{ name: "pool" type: "Pooling" bottom: "cat" top: "pool" pooling_param {{ {pool} }} }}\n'
            + extra)


def test_distribution_is_exact_for_max_and_ave_with_ceil_and_pad(tmp_path: Path) -> None:
    cases = (("pool: MAX kernel_size: 3 stride: 2", 16), ("pool: AVE kernel_size: 3 stride: 2", 16),
             ("pool: AVE kernel_size: 3 stride: 2 pad: 1", 15), ("pool: MAX kernel_size: 2 stride: 2", 16),
             ("pool: MAX kernel_size: 3 stride: 2", 15))
    for pool, size in cases:
        original = graph_from_text(block(pool, size=size), seed=3)
        graph = graph_from_text(block(pool, size=size), seed=3)
        pooled = distribute(graph, graph.layer("pool"), graph.layer("cat"))
        graph.check()
        assert len(pooled) == 3 and graph.layer_types()["Pooling"] == 3
        assert [graph.caffe_name(b) for b in graph.outputs()] == ["pool"]
        feed = input_feed(original, seed=1)
        a = run_caffe(*save(original, tmp_path, "a"), feed, ["pool"])["pool"]
        b = run_caffe(*save(graph, tmp_path, "b"), feed, ["pool"])["pool"]
        assert a.shape == b.shape and np.array_equal(a, b), pool


def test_then_each_branch_conv_takes_the_stride() -> None:
    graph = graph_from_text(block("pool: MAX kernel_size: 3 stride: 2"), seed=3)
    before = infer_shapes(graph)
    report = rewrite(graph, (RULE,))
    assert "Pooling" not in graph.layer_types()
    [change] = report.changes
    assert not change.exact and change.reproduces == "pool"
    assert sorted(change.relearn) == ["a_merge", "b_merge", "c_merge"] and sorted(change.removed) == ["a", "b", "c",
                                                                                                     "pool"]
    after = infer_shapes(graph)
    assert after[graph.outputs()[0]] == before["pool"] == (2, 12, 8, 8)
    for name in ("a_merge", "b_merge", "c_merge"):
        assert list(graph.layer(name).proto.convolution_param.stride) == [2]


def test_googlenet_stage_pools_leave_and_shapes_stay(model_zoo: Path) -> None:
    original = load_model(model_zoo / "bvlc_googlenet" / "deploy.prototxt")
    graph = load_model(model_zoo / "bvlc_googlenet" / "deploy.prototxt")
    report = rewrite(graph, select_rules("all"))
    distributed = [c.reproduces for c in report.changes if c.rule == RULE.name]
    assert distributed == ["pool3/3x3_s2", "pool4/3x3_s2"]  # not the final 7x7 average pooling
    pools = [layer.name for layer in graph.layers() if layer.type == "Pooling"]
    assert pools == ["pool5/7x7_s1"]
    before, after = infer_shapes(original), infer_shapes(graph)
    names = graph.caffe_blob_names()
    for blob, shape in after.items():
        if names[blob] in before:
            assert before[names[blob]] == shape, names[blob]
    assert after[graph.outputs()[0]] == before["prob"]


def test_does_not_fire_when_the_concat_is_read_elsewhere() -> None:
    extra = 'layer { name: "other" type: "ReLU" bottom: "cat" top: "other" }\n'
    report = rewrite(graph_from_text(block("pool: MAX kernel_size: 3 stride: 2", extra)), (RULE,))
    assert not report.changes and "also read elsewhere" in report.skipped[RULE.name][0].reason


def test_does_not_fire_when_a_branch_is_not_a_conv() -> None:
    text = block("pool: MAX kernel_size: 3 stride: 2").replace(
        'layer { name: "c" type: "Convolution" bottom: "data" top: "c" convolution_param { num_output: 4 kernel_size: 1 '
        'pad: 0 } }', 'layer { name: "c" type: "Pooling" bottom: "data" top: "c" pooling_param { pool: MAX '
        'kernel_size: 3 pad: 1 } }')
    assert '"c" type: "Pooling"' in text
    report = rewrite(graph_from_text(text), (RULE,))
    assert not report.changes and "does not come from a convolution" in report.skipped[RULE.name][0].reason


def test_does_not_fire_when_a_kernel_would_have_to_grow() -> None:
    report = rewrite(graph_from_text(block("pool: MAX kernel_size: 3 stride: 2", size=15)), (RULE,))
    assert not report.changes and "larger kernel" in report.skipped[RULE.name][0].reason


def test_global_pooling_is_left_alone() -> None:
    graph = graph_from_text(tiny_inception())
    report = rewrite(graph, (RULE,))
    assert [c.reproduces for c in report.changes] == ["pool3"]  # the stage pooling, not the global "gap"
