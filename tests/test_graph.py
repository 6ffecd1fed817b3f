"""The IR (deeprebirth.ir.graph): use-def links kept in step by every mutation, in-place layers in single-assignment
form and back, V1 nets, phase filtering, and ``check()`` catching a graph out of step."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from helpers import graph_from_text, input_feed, run_caffe, save

from deeprebirth import caffe_pb2 as pb
from deeprebirth.errors import DeepRebirthError
from deeprebirth.io import caffe_io
from deeprebirth.ir.graph import Graph, GraphError
from deeprebirth.ir.model import load_model, save_model

FIXTURES = Path(__file__).parent / "fixtures"

# conv -> in-place ReLU -> in-place Dropout, read twice (a pooling and a second conv), then a Concat
NET = """
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 8 dim: 8 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv" convolution_param { num_output: 4 kernel_size: 3 pad: 1 } }
layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" }
layer { name: "drop" type: "Dropout" bottom: "conv" top: "conv" }
layer { name: "pool" type: "Pooling" bottom: "conv" top: "pool" pooling_param { pool: MAX kernel_size: 3 pad: 1 } }
layer { name: "conv2" type: "Convolution" bottom: "conv" top: "conv2" convolution_param { num_output: 2 kernel_size: 1 } }
layer { name: "cat" type: "Concat" bottom: "pool" bottom: "conv2" top: "cat" }
"""


def roundtrip(path: str | Path, phase: str, tmp_path: Path) -> tuple[pb.NetParameter, pb.NetParameter]:
    graph = load_model(path, phase=phase)
    out = tmp_path / "roundtrip.prototxt"
    save_model(graph, out)
    return graph.to_net(), load_model(out, phase=phase).to_net()


def use_def(graph: Graph) -> dict[str, list[str]]:
    """Every blob -> the names of the layers reading it, from the layers' bottoms alone (the ground truth)."""
    readers: dict[str, list[str]] = {blob: [] for blob in graph.blobs()}
    for layer in graph.layers():
        for blob in dict.fromkeys(layer.bottoms):
            readers[blob].append(layer.name)
    return readers


def assert_links(graph: Graph) -> None:
    graph.check()
    for blob, readers in use_def(graph).items():
        assert [layer.name for layer in graph.consumers(blob)] == readers, blob
        assert blob in graph.producer(blob).tops


def test_in_place_chain_is_single_assignment_and_written_back_in_place() -> None:
    graph = graph_from_text(NET, seed=None)
    relu, drop = graph.layer("relu"), graph.layer("drop")
    versions = [graph.layer("conv").tops[0], relu.tops[0], drop.tops[0]]
    assert len(set(versions)) == 3 and {graph.caffe_name(v) for v in versions} == {"conv"}
    assert relu.bottoms == versions[:1] and drop.bottoms == versions[1:2]
    assert [layer.name for layer in graph.consumers(versions[2])] == ["pool", "conv2"]
    assert graph.only_consumer(versions[0]) is relu and graph.only_consumer(versions[2]) is None
    written = {layer.name: (list(layer.bottom), list(layer.top)) for layer in graph.to_net().layer}
    assert written["relu"] == (["conv"], ["conv"]) and written["drop"] == (["conv"], ["conv"])
    assert written["conv2"] == (["conv"], ["conv2"])
    assert_links(graph)


def test_mutations_keep_use_def_links_in_step() -> None:
    graph = graph_from_text(NET, seed=None)
    dropped = graph.layer("drop")
    graph.replace_uses(dropped.tops[0], dropped.bottoms[0])  # what removing a pass-through layer does
    graph.remove_layer("drop")
    assert_links(graph)
    assert [layer.name for layer in graph.consumers(graph.layer("relu").tops[0])] == ["pool", "conv2"]
    # a new layer between conv2 and the Concat, sorted right after conv2; the Concat rebuilt to read it
    conv2, cat = graph.layer("conv2"), graph.layer("cat")
    act = graph.add_layer(graph.layer("relu").clone(name="conv2_relu", bottoms=[conv2.tops[0]],
                                                    tops=[graph.new_blob("conv2_relu")]), at="conv2")
    assert [layer.name for layer in graph.consumers(conv2.tops[0])] == ["conv2_relu", "cat"]
    graph.replace_layer("cat", cat.clone(bottoms=[cat.bottoms[0], act.tops[0]]))
    assert [layer.name for layer in graph.layers()][-3:] == ["conv2", "conv2_relu", "cat"]
    assert graph.outputs() == [graph.layer("cat").tops[0]]
    assert_links(graph)
    assert_links(Graph.from_net(graph.to_net()))  # the written net reads back to the same links
    graph.rename_layer("pool", "pool_renamed")
    assert graph.producer(graph.layer("cat").bottoms[0]).name == "pool_renamed"
    assert_links(graph)


def test_removing_a_layer_still_read_is_refused_and_check_catches_edits_behind_its_back() -> None:
    graph = graph_from_text(NET, seed=None)
    with pytest.raises(GraphError, match="still read"):
        graph.remove_layer("pool")
    with pytest.raises(GraphError, match="reads unknown blob"):
        graph.add_layer(graph.layer("pool").clone(name="ghost", bottoms=["nowhere"], tops=[graph.new_blob("g")]))
    graph.layer("cat").bottoms.reverse()  # a bottom list edited directly: the edges no longer match it
    with pytest.raises(GraphError, match="edges out of step"):
        graph.check()


def test_fresh_names_never_collide() -> None:
    graph = graph_from_text(NET, seed=None)
    assert graph.fresh_layer_name("pool") == "pool_1" and graph.fresh_layer_name("new") == "new"
    ssa = graph.new_blob("conv")
    assert ssa not in graph.blobs() and graph.caffe_name(ssa) == "conv" and ssa != "conv"


INPUT = 'layer { name: "d" type: "Input" top: "x" input_param { shape { dim: 1 } } }\n'


@pytest.mark.parametrize(("text", "problem"), [
    ('layer { name: "a" type: "ReLU" bottom: "x" top: "y" }', "not produced by any earlier layer"),
    (INPUT + 'layer { name: "d" type: "ReLU" bottom: "x" top: "y" }', "duplicate layer name"),
    (INPUT + 'layer { name: "e" type: "Input" top: "x" input_param { shape { dim: 1 } } }', "already produced by layer 'd'"),
])
def test_malformed_nets_name_the_layer_and_problem(text: str, problem: str) -> None:
    with pytest.raises(DeepRebirthError, match=problem):
        graph_from_text(text, seed=None)


def test_other_phase_layers_go_back_where_they_were(model_zoo: Path) -> None:
    path = model_zoo / "bvlc_googlenet" / "train_val.prototxt"
    graph = load_model(path, phase="TEST")
    assert graph.aside and all([rule.phase for rule in item.param.include] == [pb.TRAIN] for item in graph.aside)
    written = graph.to_net(all_phases=True)
    original = caffe_io.read_prototxt(path)
    assert [layer.name for layer in written.layer] == [layer.name for layer in original.layer]


def test_in_place_layers_stay_in_place(assets: dict[str, str]) -> None:
    original = caffe_io.read_prototxt(assets["open_nsfw.prototxt"])
    written = load_model(assets["open_nsfw.prototxt"]).to_net()
    in_place = {layer.name for layer in original.layer if list(layer.top) == list(layer.bottom)[:len(layer.top)]}
    assert len(in_place) >= 53 * 2
    for layer in written.layer:
        if layer.name in in_place:
            assert list(layer.top) == list(layer.bottom)[:len(layer.top)], layer.name


def test_v1_format_is_upgraded_like_caffe(tmp_path: Path) -> None:
    path = FIXTURES / "v1_lenet.prototxt"
    raw = caffe_io.read_prototxt(path)
    assert len(raw.layers) == 9 and not raw.layer
    net = caffe_io.load_net(path)
    types = [layer.type for layer in net.layer]
    assert types == ["Input", "Convolution", "Pooling", "Convolution", "Pooling", "InnerProduct", "ReLU", "Dropout",
                     "InnerProduct", "Softmax"]
    conv1 = net.layer[1]
    assert [(p.lr_mult, p.decay_mult) for p in conv1.param] == [(1, 1), (2, 0)]
    assert list(net.layer[0].input_param.shape[0].dim) == [2, 1, 28, 28]
    first, second = roundtrip(path, "TEST", tmp_path)
    assert first == second

    # Caffe reads the V1 file itself: with the same weights, our upgraded net must give the same outputs.
    graph = load_model(path)
    from deeprebirth.ir.initializers import random_weights

    random_weights(graph, seed=3)
    proto, model = save(graph, tmp_path, "upgraded")
    feed = input_feed(graph)
    ours = run_caffe(proto, model, feed, ["prob", "ip2"])
    theirs = run_caffe(str(path), model, feed, ["prob", "ip2"])
    assert np.array_equal(ours["ip2"], theirs["ip2"])


def test_train_val_is_filtered_by_phase(model_zoo: Path) -> None:
    path = model_zoo / "bvlc_googlenet" / "train_val.prototxt"
    test_net = caffe_io.load_net(path, phase="TEST")
    train_net = caffe_io.load_net(path, phase="TRAIN")
    data_test = [layer for layer in test_net.layer if layer.type == "Data"]
    data_train = [layer for layer in train_net.layer if layer.type == "Data"]
    assert len(data_test) == 1 and data_test[0].include[0].phase == pb.TEST
    assert len(data_train) == 1 and data_train[0].include[0].phase == pb.TRAIN
    assert any(layer.type == "Accuracy" for layer in test_net.layer)
    assert not any(layer.type == "Accuracy" for layer in train_net.layer)


def test_graph_is_independent_of_pycaffe(model_zoo: Path) -> None:
    graph = Graph.from_net(caffe_io.load_net(model_zoo / "bvlc_googlenet" / "deploy.prototxt"))
    graph.check()
    assert graph.outputs() == ["prob"]
    assert len(graph) == 143



def test_sources_are_input_and_data_layer_tops_alike(model_zoo: Path) -> None:
    deploy = Graph.from_net(caffe_io.load_net(model_zoo / "bvlc_googlenet" / "deploy.prototxt"))
    train = Graph.from_net(caffe_io.load_net(model_zoo / "bvlc_googlenet" / "train_val.prototxt", phase="TRAIN"))
    assert [blob for blob in deploy.blobs() if deploy.is_source(blob)] == deploy.inputs() == ["data"]
    assert [train.caffe_name(b) for b in train.blobs() if train.is_source(b)] == ["data", "label"]
    assert train.inputs() == []
    assert not train.is_source(train.consumers(train.blobs()[0])[0].tops[0])
