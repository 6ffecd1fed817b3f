"""Every slimming rule together (``rewrite`` with its defaults) on the model-zoo nets and a small inception net:
what a lossy rewrite must keep, checked in our shape inference, in real Caffe and in OpenCV dnn."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
from helpers import graph_from_text
from nets import tiny_inception
from streamline_zoo import ZOO, caffe_shapes, feed, original, same_blobs, shapes_by_name

from deeprebirth.caffe.runtime import opencv_forward
from deeprebirth.ir.graph import Graph
from deeprebirth.rewrite import rewrite, select_rules

STOCK_CAFFE_TYPES = {"Input", "Convolution", "ReLU", "Pooling", "LRN", "Concat", "InnerProduct", "Dropout", "Softmax",
                     "Split"}


def check_slimmed(before: Graph, caffe_before: dict[str, tuple[int, ...]], folder: Path, stem: str) -> Graph:
    after = copy.deepcopy(before)
    report = rewrite(after, select_rules("all"))
    assert report.relearn, "the default rules slim the net"
    old, new = shapes_by_name(before), shapes_by_name(after)
    kept = old.keys() & new.keys()
    assert {n: old[n] for n in kept} == {n: new[n] for n in kept}, "every surviving blob keeps its shape"
    for layer in before.layers():  # Concat widths stay (a Concat that took in a stage pooling joins smaller maps)
        if layer.type == "Concat":
            width = new[after.caffe_name(after.layer(layer.name).tops[0])][1]  # type: ignore[index]
            assert width == old[before.caffe_name(layer.tops[0])][1], layer.name  # type: ignore[index]
    for layer in after.layers():
        assert layer.type in STOCK_CAFFE_TYPES, layer.type
        if layer.name in before:
            assert same_blobs(layer.blobs, before.layer(layer.name).blobs), f"{layer.name} changed in place"
        else:
            assert layer.name.endswith("_merge"), layer.name
    assert set(report.relearn) <= {layer.name for layer in after.layers()}
    caffe_after, proto, model = caffe_shapes(after, folder, stem)
    final = before.caffe_name(before.outputs()[0])
    assert caffe_after[final] == caffe_before[final]
    assert {n: caffe_before[n] for n in caffe_before.keys() & caffe_after.keys()} == \
        {n: caffe_after[n] for n in caffe_before.keys() & caffe_after.keys()}
    assert opencv_forward(proto, model, feed(after)).shape == caffe_before[final]
    return after


@pytest.mark.parametrize("net", ZOO)
def test_model_zoo_slimmed_with_every_rule(net: str, model_zoo: Path, tmp_path: Path) -> None:
    before, caffe_before = original(model_zoo, net, tmp_path)
    after = check_slimmed(before, caffe_before, tmp_path, f"{net}_slim")
    pools = [layer.name for layer in after.layers() if layer.type == "Pooling"]
    assert "LRN" not in after.layer_types()
    if net == "bvlc_googlenet":
        assert pools == ["pool5/7x7_s1"] and len(after) < len(before)


def test_small_inception_net_slimmed_with_every_rule(tmp_path: Path) -> None:
    before = graph_from_text(tiny_inception(), seed=2)
    caffe_before = caffe_shapes(before, tmp_path, "tiny")[0]
    after = check_slimmed(before, caffe_before, tmp_path, "tiny_slim")
    assert after.layer_types().get("Pooling") == 1  # only the global average pooling is left
