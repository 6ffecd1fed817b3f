"""merge_lrn_into_conv, alone and with merge_pooling_into_conv: the model-zoo chains collapse into conv + ReLU with
every later blob's shape kept, in real Caffe and OpenCV; and the places where it must not fire."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from helpers import graph_from_text, input_feed, run_caffe, save
from streamline_zoo import NETS, ZOO, geometry, rewrite_and_check, same_blobs

from deeprebirth.ir.graph import Graph
from deeprebirth.ir.model import load_model
from deeprebirth.rewrite import rewrite
from deeprebirth.rules import RuleConfig, merge_lrn_into_conv, merge_pooling_into_conv

STREAMLINE = (merge_pooling_into_conv.RULE, merge_lrn_into_conv.RULE)
RULES = (merge_lrn_into_conv.RULE,)
# merged conv -> (kernel, stride, pad) and the original blob its ReLU's output stands for
COLLAPSED = {
    "bvlc_googlenet": {"conv1/7x7_s2_merge": ((7, 4, 3), "pool1/norm1"),
                       "conv2/3x3_merge": ((3, 2, 1), "pool2/3x3_s2")},
    "bvlc_alexnet": {"conv1_merge": ((19, 8, 0), "pool1"), "conv2_merge": ((5, 2, 1), "pool2"),
                     "conv5_merge": ((3, 2, 0), "pool5")},
    "bvlc_reference_caffenet": {"conv1_merge": ((19, 8, 0), "norm1"), "conv2_merge": ((5, 2, 1), "norm2"),
                                "conv5_merge": ((3, 2, 0), "pool5")},
}


def readers(graph: Graph, caffe_name: str) -> list[str]:
    """Names of the layers that read the last blob written under ``caffe_name``."""
    blob = [b for b in graph.blobs() if graph.caffe_blob_names()[b] == caffe_name][-1]
    return [layer.name for layer in graph.consumers(blob)]


@pytest.mark.parametrize("net", ZOO)
def test_model_zoo_chains_collapse_into_conv_relu(net: str, model_zoo: Path,
                                                  tmp_path_factory: pytest.TempPathFactory) -> None:
    before, after, report = rewrite_and_check(model_zoo, net, STREAMLINE, tmp_path_factory.mktemp(net))
    assert "LRN" not in after.layer_types()
    merged = {layer.name: geometry(after, layer.name) for layer in after.layers() if layer.name.endswith("_merge")}
    assert merged == {name: g for name, (g, _) in COLLAPSED[net].items()}
    pools = before.layer_types()["Pooling"] - after.layer_types().get("Pooling", 0)
    assert pools == len(merged) and len(after) == len(before) - before.layer_types()["LRN"] - pools
    for name, (_, end) in COLLAPSED[net].items():
        conv = after.layer(name)
        relu = after.only_consumer(conv.tops[0])
        assert relu is not None and relu.type == "ReLU"
        assert after.caffe_blob_names()[relu.tops[0]] == end
        assert [c.reproduces for c in report.changes if name in c.relearn][-1] == end
        assert [c.name.removesuffix("_merge") for c in after.consumers(relu.tops[0])] == readers(before, end)
    if net == "bvlc_alexnet":  # group 2 is kept, and conv2's kernel too: its weights are the original's
        assert after.layer("conv2_merge").proto.convolution_param.group == 2
        new, old = after.layer("conv2_merge").blobs, before.layer("conv2").blobs
        assert new is not None and same_blobs(new, old)


@pytest.mark.parametrize("net", NETS)
def test_rule_order_does_not_change_the_result(net: str, model_zoo: Path) -> None:
    nets = []
    for rules in (STREAMLINE, STREAMLINE[::-1]):
        graph = load_model(model_zoo / net / "deploy.prototxt")
        rewrite(graph, rules)
        nets.append(graph.to_net())
    assert nets[0] == nets[1]


def test_alone_on_googlenet_keeps_the_pooling(model_zoo: Path, tmp_path: Path) -> None:
    before, after, report = rewrite_and_check(model_zoo, "bvlc_googlenet", RULES, tmp_path)
    assert [c.reproduces for c in report.changes] == ["pool1/norm1", "conv2/norm2"]
    assert report.relearn == ["conv1/7x7_s2_merge", "conv2/3x3_merge"]
    assert len(after) == len(before) - 2 and geometry(after, "conv1/7x7_s2_merge") == (7, 2, 3)
    pool = after.layer("pool1/3x3_s2")
    assert after.caffe_blob_names()[pool.tops[0]] == "pool1/norm1"
    assert [layer.name for layer in after.consumers(pool.tops[0])] == readers(before, "pool1/norm1")
    for name in ("conv1/7x7_s2", "conv2/3x3"):  # init "inherit": the conv's own weights
        new, old = after.layer(f"{name}_merge").blobs, before.layer(name).blobs
        assert new is not None and same_blobs(new, old)


INPUT = 'input: "data" input_shape { dim: 2 dim: 4 dim: 9 dim: 9 }\n'
CONV = 'layer { name: "conv" type: "Convolution" bottom: "data" top: "conv" convolution_param { num_output: 6 ' \
       'kernel_size: 3 weight_filler { type: "gaussian" std: 0.1 } } }\n'
RELU = 'layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" }\n'
POOL = 'layer { name: "pool" type: "Pooling" bottom: "conv" top: "pool" pooling_param { pool: MAX kernel_size: 2 } }\n'
LRN = 'layer { name: "norm" type: "LRN" bottom: "%s" top: "norm" lrn_param { local_size: 5 alpha: 0.1 } }\n'


@pytest.mark.parametrize("chain, end", [
    ("", "conv"), (RELU, "conv"), (POOL, "pool"), (RELU + POOL, "pool"),
    (POOL.replace('top: "pool"', 'top: "conv"') + RELU, "conv"),  # pooling before the ReLU
], ids=["conv", "conv_relu", "conv_pool", "conv_relu_pool", "conv_pool_relu"])
def test_chain_without_lrn_computes_what_was_before_the_lrn(chain: str, end: str, tmp_path: Path) -> None:
    text = INPUT + CONV + chain + LRN % end
    before, after = graph_from_text(text, seed=2), graph_from_text(text, seed=2)
    report = rewrite(after, RULES)
    assert report.relearn == ["conv_merge"] and [c.reproduces for c in report.changes] == ["norm"]
    assert [layer.type for layer in after.layers()] == [layer.type for layer in before.layers()][:-1]
    assert after.caffe_name(after.outputs()[0]) == "norm"
    feed = input_feed(before)
    a = run_caffe(*save(before, tmp_path, "before"), feed, [end, "norm"])
    b = run_caffe(*save(after, tmp_path, "after"), feed, ["norm"])
    assert a["norm"].shape == b["norm"].shape and np.array_equal(a[end], b["norm"])


def test_without_weights_rewrites_the_prototxt_only() -> None:
    graph = graph_from_text(INPUT + CONV + RELU + LRN % "conv", seed=None)
    rewrite(graph, RULES)
    assert graph.layer("conv_merge").blobs is None and "LRN" not in graph.layer_types()


def test_filler_init_draws_seeded_weights() -> None:
    blobs = []
    for seed in (1, 1, 2):
        graph = graph_from_text(INPUT + CONV + RELU + LRN % "conv", seed=0)
        rewrite(graph, RULES, config=RuleConfig(init="filler", seed=seed))
        blobs.append(graph.layer("conv_merge").blobs)
    original = graph_from_text(INPUT + CONV, seed=0).layer("conv").blobs
    assert blobs[0] is not None and blobs[1] is not None and blobs[2] is not None and original is not None
    assert [b.shape for b in blobs[0]] == [b.shape for b in original]
    assert abs(float(blobs[0][0].std()) - 0.1) < 0.02 and not np.any(blobs[0][1])
    assert np.array_equal(blobs[0][0], blobs[1][0]) and not np.array_equal(blobs[0][0], blobs[2][0])


OTHER = 'layer { name: "other" type: "Sigmoid" bottom: "%s" top: "s" }\n'


@pytest.mark.parametrize("text, reason", [
    (INPUT + LRN % "data", "not a chain"),
    (INPUT + CONV + 'layer { name: "ip" type: "InnerProduct" bottom: "conv" top: "ip" '
     'inner_product_param { num_output: 8 } }\nlayer { name: "r" type: "Reshape" bottom: "ip" top: "x" '
     'reshape_param { shape { dim: 2 dim: 2 dim: 2 dim: 2 } } }\n' + LRN % "x", "not a chain"),
    (INPUT + CONV + 'layer { name: "sig" type: "Sigmoid" bottom: "conv" top: "conv" }\n' + LRN % "conv",
     "not a chain"),
    (INPUT + CONV + RELU + 'layer { name: "relu2" type: "ReLU" bottom: "conv" top: "conv" }\n' + LRN % "conv",
     "not a chain"),  # a chain holds one ReLU
    (INPUT + CONV + CONV.replace('"conv"', '"conv2"').replace('bottom: "conv2"', 'bottom: "data"')
     + 'layer { name: "cat" type: "Concat" bottom: "conv" bottom: "conv2" top: "cat" }\n' + LRN % "cat",
     "not a chain"),
    (INPUT + CONV + RELU + OTHER % "conv" + LRN % "conv", "other consumers"),
    (INPUT + CONV + POOL + OTHER % "conv" + LRN % "pool", "other consumers"),
], ids=["on_input", "after_inner_product", "after_sigmoid", "after_two_relus", "after_concat",
        "relu_output_read_twice", "conv_output_read_twice"])
def test_does_not_fire(text: str, reason: str) -> None:
    graph = graph_from_text(text, seed=0)
    report = rewrite(graph, RULES)
    assert not report.changes
    reasons = [s.reason for s in report.skipped["merge_lrn_into_conv"]]
    assert reasons and reason in reasons[0], reasons
