"""Real architectures exported to ONNX, original and slimmed: ONNX Runtime must match real Caffe within 1e-4
relative on the logits and the probabilities (random inputs and real photos), and onnx.checker must pass."""

from __future__ import annotations

import copy
from pathlib import Path

import onnx
import onnxruntime as ort
import pytest
from helpers import graph_from_text, relative_error, save
from nets import squeezenet_v10
from streamline_zoo import ZOO, original

from deeprebirth.api import RewriteOptions, rewrite_files
from deeprebirth.caffe.compare import compared_blobs
from deeprebirth.caffe.runtime import forward, image_feeds, open_net, random_feeds
from deeprebirth.errors import DeepRebirthError
from deeprebirth.export.api import ExportOptions, export_files
from deeprebirth.io.caffe_io import set_batch
from deeprebirth.ir.graph import Graph
from deeprebirth.ir.model import load_model
from deeprebirth.rewrite import rewrite, select_rules


def assert_matches_caffe(proto: str, weights: str, folder: Path, photos: list[str], tolerance: float = 1e-4,
                         outputs: list[str] | None = None) -> dict[str, float]:
    """Export (batch 1) through the public API, then compare Caffe and ONNX Runtime output by output."""
    graph = load_model(proto)
    names = outputs or compared_blobs(graph)
    out = folder / "model.onnx"
    result = export_files(proto, weights, out, ExportOptions(batch=1, outputs=names))  # runs onnx.checker too
    assert onnx.load(str(out), load_external_data=False).opset_import[0].version == 13
    (name, shape), = result.inputs.items()
    feeds = random_feeds(result.inputs, 1, seed=5) + image_feeds(photos, name, shape)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    worst = dict.fromkeys(names, 0.0)
    net = open_net(proto, weights)
    for feed in feeds:
        want = forward(net, feed, names)
        got = dict(zip(names, session.run(names, feed)))
        for blob in names:
            assert got[blob].shape == want[blob].shape
            worst[blob] = max(worst[blob], relative_error(want[blob], got[blob]))
    assert all(error <= tolerance for error in worst.values()), worst
    return worst


@pytest.mark.parametrize("slim", [False, True], ids=["original", "slimmed"])
@pytest.mark.parametrize("net", ZOO)
def test_model_zoo_export_matches_caffe(net: str, slim: bool, model_zoo: Path, photos: list[str],
                                        tmp_path: Path) -> None:
    graph = copy.deepcopy(original(model_zoo, net, tmp_path)[0])
    set_batch(graph, 1)
    if slim:
        report = rewrite(graph, select_rules("all"))
        assert report.relearn
    proto, weights = save(graph, tmp_path, net)
    assert_matches_caffe(proto, weights, tmp_path, photos[:1])


@pytest.mark.parametrize("slim", [False, True], ids=["original", "slimmed"])
def test_squeezenet_fire_modules_export_matches_caffe(slim: bool, photos: list[str], tmp_path: Path) -> None:
    """SqueezeNet v1.0's layout (fire modules: a 1x1 squeeze, then 1x1 and 3x3 expands concatenated), at 99x99 to
    keep it quick; slimmed, pool4 and pool8 go into the widened expand convs."""
    graph = graph_from_text(squeezenet_v10(size=99, classes=20), seed=3)
    if slim:
        report = rewrite(graph, select_rules("all"))
        assert "merge_pooling_into_widened_branch_convs" in report.rules and report.relearn
        assert "pool4" not in graph and "pool8" not in graph
    proto, weights = save(graph, tmp_path, "squeezenet")
    assert_matches_caffe(proto, weights, tmp_path, photos[:1])


@pytest.mark.parametrize("rules", [None, "exact"], ids=["original", "folded"])
def test_open_nsfw_export_matches_caffe(rules: str | None, assets: dict[str, str], photos: list[str],
                                        tmp_path: Path) -> None:
    proto, weights = assets["open_nsfw.prototxt"], assets["open_nsfw.caffemodel"]
    if rules:
        folded = tmp_path / "folded.prototxt", tmp_path / "folded.caffemodel"
        rewrite_files(proto, folded[0], weights, folded[1], options=RewriteOptions(rules=rules))
        proto, weights = str(folded[0]), str(folded[1])
    worst = assert_matches_caffe(proto, weights, tmp_path, photos)
    assert worst["prob"] <= 1e-5


def test_ssd_face_detector_refused_by_name_backbone_exported(assets: dict[str, str], photos: list[str],
                                                             tmp_path: Path) -> None:
    proto, weights = assets["ssd_face.prototxt"], assets["ssd_face.caffemodel"]
    with pytest.raises(DeepRebirthError) as err:
        export_files(proto, weights, tmp_path / "ssd.onnx")
    message = str(err.value)
    assert "SSD-only" in message and "layer '" in message and "\n" not in message
    assert not (tmp_path / "ssd.onnx").exists()
    graph = load_model(proto)
    ssd_only = {"Normalize", "PriorBox", "DetectionOutput"}
    first = next(layer for layer in graph.layers() if layer.type in ssd_only)
    assert first.name in message and first.type in message
    # the backbone and every detection head standard ONNX reaches: the convolutions feeding a Permute
    heads = [graph.caffe_name(layer.bottoms[0]) for layer in graph.layers() if layer.type == "Permute"]
    reachable = [h for h in heads if not _needs(graph, h, ssd_only)]
    assert len(reachable) >= 4
    assert_matches_caffe(proto, weights, tmp_path, photos[:1], outputs=reachable)


def _needs(graph: Graph, blob: str, types: set[str]) -> bool:
    from deeprebirth.export.subgraph import needed_layers, output_blobs

    return any(graph.layer(name).type in types for name in needed_layers(graph, output_blobs(graph, [blob])))


@pytest.mark.parametrize("to", ["mnn", "ncnn"])
def test_slimmed_googlenet_in_mnn_and_ncnn_agrees_with_caffe(to: str, model_zoo: Path, photos: list[str],
                                                             tmp_path: Path) -> None:
    graph = copy.deepcopy(original(model_zoo, "bvlc_googlenet", tmp_path)[0])
    set_batch(graph, 1)
    rewrite(graph, select_rules("all"))
    proto, weights = save(graph, tmp_path, "slim")
    result = export_files(proto, weights, tmp_path / f"slim.{to}", ExportOptions(
        to=to, outputs=["loss3/classifier", "prob"], check=1, images=photos))
    check = result.check
    assert check is not None and check.inputs == 1 + len(photos)
    assert check.passed and check.predictions_changed == 0, check
    assert check.worst.max_rel <= (1e-4 if to == "mnn" else 1e-5)
