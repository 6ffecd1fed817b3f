"""fuse_scale_into_conv alone: numerically checked in real Caffe, and its negative cases."""

from __future__ import annotations

from pathlib import Path

from helpers import graph_from_text, input_feed, relative_error, run_caffe, save

from deeprebirth.rewrite import rewrite
from deeprebirth.rules import fuse_scale_into_conv

INPUT = 'input: "data" input_shape { dim: 1 dim: 4 dim: 6 dim: 6 }\n'
CONV = 'layer { name: "conv" type: "Convolution" bottom: "data" top: "c" convolution_param { num_output: 5 ' \
       'kernel_size: 3 } }\n'


def fold(text: str, tmp_path: Path) -> float:
    original = graph_from_text(text, seed=4)
    proto_a, model_a = save(original, tmp_path, "a")
    folded = graph_from_text(text, seed=4)
    report = rewrite(folded, (fuse_scale_into_conv.RULE,))
    assert [c.rule for c in report.changes] == ["fuse_scale_into_conv"]
    assert "Scale" not in folded.layer_types()
    proto_b, model_b = save(folded, tmp_path, "b")
    out = original.caffe_blob_names()[original.outputs()[0]]
    feed = input_feed(original, seed=9)
    return relative_error(run_caffe(proto_a, model_a, feed, [out])[out], run_caffe(proto_b, model_b, feed, [out])[out])


def test_scale_with_bias(tmp_path: Path) -> None:
    assert fold(INPUT + CONV + 'layer { name: "s" type: "Scale" bottom: "c" top: "c" scale_param { bias_term: true } }',
                tmp_path) <= 1e-5


def test_scale_without_bias(tmp_path: Path) -> None:
    assert fold(INPUT + CONV + 'layer { name: "s" type: "Scale" bottom: "c" top: "s" }', tmp_path) <= 1e-5


def test_inner_product_scale(tmp_path: Path) -> None:
    text = INPUT + 'layer { name: "ip" type: "InnerProduct" bottom: "data" top: "c" inner_product_param { ' \
        'num_output: 7 } }\nlayer { name: "s" type: "Scale" bottom: "c" top: "c" scale_param { bias_term: true } }'
    assert fold(text, tmp_path) <= 1e-5


def test_not_per_channel_scale_is_skipped() -> None:
    graph = graph_from_text(INPUT + CONV + 'layer { name: "s" type: "Scale" bottom: "c" top: "c" '
                            'scale_param { axis: 1 num_axes: 2 } }')
    report = rewrite(graph, (fuse_scale_into_conv.RULE,))
    assert not report.changes
    assert "not per-channel" in report.skipped["fuse_scale_into_conv"][0].reason


def test_scale_by_second_input_is_skipped() -> None:
    graph = graph_from_text(INPUT + CONV + CONV.replace('"conv"', '"conv2"').replace('top: "c"', 'top: "d"') +
                            'layer { name: "s" type: "Scale" bottom: "c" bottom: "d" top: "e" }')
    report = rewrite(graph, (fuse_scale_into_conv.RULE,))
    assert not report.changes
    assert "second input" in report.skipped["fuse_scale_into_conv"][0].reason
