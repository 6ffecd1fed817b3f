"""fuse_batchnorm_into_conv (with fuse_scale_into_conv after it): numerically checked in real Caffe."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from helpers import graph_from_text, input_feed, relative_error, run_caffe, save

from deeprebirth.rewrite import rewrite
from deeprebirth.rules import fuse_batchnorm_into_conv, fuse_scale_into_conv

FOLDS = (fuse_batchnorm_into_conv.RULE, fuse_scale_into_conv.RULE)
INPUT = 'input: "data" input_shape { dim: 2 dim: 8 dim: 9 dim: 7 }\n'


def net(producer: str, bn: str = 'layer { name: "bn" type: "BatchNorm" bottom: "y" top: "y" }',
        scale: str = 'layer { name: "sc" type: "Scale" bottom: "y" top: "y" scale_param { bias_term: true } }') -> str:
    return INPUT + producer + "\n" + bn + "\n" + scale + \
        '\nlayer { name: "relu" type: "ReLU" bottom: "y" top: "y" }'


CONV = 'layer { name: "lin" type: "Convolution" bottom: "data" top: "y" convolution_param { num_output: 6 ' \
       'kernel_size: 3 pad: 1 %s } }'
DECONV = 'layer { name: "lin" type: "Deconvolution" bottom: "data" top: "y" convolution_param { num_output: 6 ' \
         'kernel_size: 3 stride: 2 %s } }'
IP = 'layer { name: "lin" type: "InnerProduct" bottom: "data" top: "y" inner_product_param { num_output: 10 %s } }'

CASES = {
    "conv+bn+scale": net(CONV % ""),
    "conv_without_bias+bn+scale": net(CONV % "bias_term: false"),
    "conv+bn_only": net(CONV % "", scale=""),
    "conv+bn+scale_without_bias": net(CONV % "", scale='layer { name: "sc" type: "Scale" bottom: "y" top: "y" }'),
    "group_conv+bn": net(CONV % "group: 2"),
    "depthwise_conv+bn": net(CONV.replace("num_output: 6", "num_output: 8") % "group: 8"),
    "strided_rect_conv+bn": net(CONV.replace("kernel_size: 3 pad: 1", "kernel_h: 3 kernel_w: 1 stride: 2") % ""),
    "deconv+bn+scale": net(DECONV % ""),
    "group_deconv+bn": net(DECONV % "group: 2"),
    "inner_product+bn+scale": net(IP % ""),
    "bn_eps_from_prototxt": net(CONV % "", bn='layer { name: "bn" type: "BatchNorm" bottom: "y" top: "y" '
                                              'batch_norm_param { eps: 0.01 } }'),
    "bn_not_in_place": INPUT + (CONV % "") + '\nlayer { name: "bn" type: "BatchNorm" bottom: "y" top: "z" }'
                      '\nlayer { name: "sc" type: "Scale" bottom: "z" top: "w" scale_param { bias_term: true } }',
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_fold_matches_caffe(case: str, tmp_path: Path) -> None:
    original = graph_from_text(CASES[case], seed=11)
    proto_a, model_a = save(original, tmp_path, "original")
    folded = graph_from_text(CASES[case], seed=11)
    report = rewrite(folded, FOLDS)
    types = folded.layer_types()
    assert "BatchNorm" not in types and "Scale" not in types
    assert report.changes[0].rule == "fuse_batchnorm_into_conv"
    assert all(c.exact for c in report.changes)
    proto_b, model_b = save(folded, tmp_path, "folded")
    output = folded.caffe_blob_names()[folded.outputs()[0]]
    feed = input_feed(original, seed=5)
    a = run_caffe(proto_a, model_a, feed, [output])[output]
    b = run_caffe(proto_b, model_b, feed, [output])[output]
    assert a.shape == b.shape
    assert relative_error(a, b) <= 1e-5, case


def test_zero_scale_factor_means_zero_statistics(tmp_path: Path) -> None:
    text = net(CONV % "", scale="")
    original = graph_from_text(text, seed=2)
    bn = original.layer("bn")
    assert bn.blobs is not None
    bn.blobs[2] = np.zeros(1, dtype=np.float32)  # as NVCaffe writes it
    proto_a, model_a = save(original, tmp_path, "a")
    folded = graph_from_text(text, seed=2)
    folded.layer("bn").blobs[2] = np.zeros(1, dtype=np.float32)  # type: ignore[index]
    rewrite(folded, FOLDS)
    proto_b, model_b = save(folded, tmp_path, "b")
    feed = input_feed(original)
    a = run_caffe(proto_a, model_a, feed, ["y"])["y"]
    b = run_caffe(proto_b, model_b, feed, ["y"])["y"]
    assert relative_error(a, b) <= 1e-5


def test_conv_gains_a_bias_and_keeps_its_name() -> None:
    graph = graph_from_text(net(CONV % "bias_term: false"), seed=1)
    before = graph.layer("lin").blobs
    assert before is not None and len(before) == 1
    rewrite(graph, FOLDS)
    conv = graph.layer("lin")
    assert conv.proto.convolution_param.bias_term
    assert conv.blobs is not None and [b.shape for b in conv.blobs] == [(6, 8, 3, 3), (6,)]


def skipped(text: str, seed: int | None = 0) -> list[str]:
    graph = graph_from_text(text, seed=seed)
    report = rewrite(graph, FOLDS)
    assert not report.changes
    return [s.reason for s in report.skipped.get("fuse_batchnorm_into_conv", [])]


def test_does_not_fold_batch_statistics() -> None:
    reasons = skipped(net(CONV % "", bn='layer { name: "bn" type: "BatchNorm" bottom: "y" top: "y" '
                                       'batch_norm_param { use_global_stats: false } }', scale=""))
    assert reasons and "use_global_stats" in reasons[0]


def test_does_not_fold_when_conv_output_has_other_consumers() -> None:
    text = INPUT + (CONV % "") + '\nlayer { name: "other" type: "ReLU" bottom: "y" top: "r" }' \
        '\nlayer { name: "bn" type: "BatchNorm" bottom: "y" top: "b" }'
    reasons = skipped(text)
    assert reasons and "other consumers" in reasons[0]


def test_does_not_fold_without_weights() -> None:
    reasons = skipped(net(CONV % "", scale=""), seed=None)
    assert reasons and "no weights" in reasons[0]


def test_does_not_fold_after_pooling() -> None:
    text = INPUT + 'layer { name: "pool" type: "Pooling" bottom: "data" top: "y" ' \
        'pooling_param { pool: MAX kernel_size: 2 } }\nlayer { name: "bn" type: "BatchNorm" bottom: "y" top: "y" }'
    reasons = skipped(text)
    assert reasons and "Pooling" in reasons[0]
