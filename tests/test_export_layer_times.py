"""Per-layer times inside ONNX Runtime (its profiling trace), MNN (its per-op callbacks) and OpenCV dnn (its
per-layer tick counters), mapped back to the Caffe layers; ncnn, which exposes none, says so in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers import graph_from_text, save
from nets import tiny_inception

from deeprebirth.cli import main
from deeprebirth.errors import DeepRebirthError
from deeprebirth.ir.classify import RUNTIME_OP
from deeprebirth.measure.layer_times import attribute, layer_owners, owner_of, profile_on_runtime

# every type of tiny_inception does work except the activations runtimes fuse into the conv and the Dropout
WORKING_TYPES = {"Convolution", "Pooling", "LRN", "InnerProduct", "Softmax"}


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    # 128x128: a few ms per pass, so the runtime's fixed per-run overhead is a minor part of it
    return save(graph_from_text(tiny_inception(size=128), seed=4), tmp_path_factory.mktemp("net"), "tiny")


def net_types(prototxt: str) -> set[str]:
    return {layer.type for layer in graph_from_text(Path(prototxt).read_text(), seed=None).layers()} - {"Input"}


def test_runtime_op_names_map_back_to_caffe_layers() -> None:
    graph = graph_from_text(tiny_inception(), seed=None)
    owners = layer_owners(graph)
    assert owner_of("conv1@1_1_nchwc", owners) == "conv1"  # ORT: Conv fused with its in-place ReLU, NCHWc
    assert owner_of("pool1:MaxPool", owners) == "pool1"  # the exporter's own node name
    assert owner_of("inception_1/pool_1_nchwc", owners) == "inception_1/pool"
    assert owner_of("norm1_raster_3", owners) == "norm1"  # MNN splits LRN into raster/unary/binary ops
    assert owner_of("ReorderOutput_token_70", owners) is None  # added by ORT: no Caffe layer
    layers, no_op = attribute(graph, [("conv1@1_1_nchwc", "Conv", 2.0), ("conv1_relu:Relu", "Relu", 0.5),
                                      ("ReorderInput", "ReorderInput", 0.25), ("pool1_1_nchwc", "MaxPool", 1.0)])
    times = {layer.name: (layer.type, layer.ms) for layer in layers}
    assert times == {"conv1": ("Convolution", 2.0), "conv1_relu": ("ReLU", 0.5), "pool1": ("Pooling", 1.0),
                     "ReorderInput": (f"{RUNTIME_OP}ReorderInput", 0.25)}
    assert "norm1" in {layer.name for layer in no_op} and "data" not in {layer.name for layer in no_op}


# per-op sum over the forward, per round: OpenCV's layer ticks add up to its own total, inside the timed pass
@pytest.mark.parametrize("runtime, shares", [("onnxruntime", (0.5, 1.1)), ("mnn", (0.5, 1.5)), ("opencv", (0.5, 1.0))])
def test_per_type_times_cover_every_layer_type(runtime: str, shares: tuple[float, float],
                                               model: tuple[str, str]) -> None:
    profile = profile_on_runtime(*model, runtime, rounds=8, warmup=2)
    timed = {row.type: row.ms for row in profile.by_type()}
    assert WORKING_TYPES <= {t for t, ms in timed.items() if ms > 0}, timed
    assert profile.types() == net_types(model[0])  # each type either timed or listed as having no op of its own
    assert {layer.type for layer in profile.no_op} <= {"ReLU", "Dropout", "Concat"}
    # ORT: whole passes also pay the binding's input/output copies; MNN: per-op times also hold its callbacks
    low, high = shares
    assert low <= profile.op_share <= high, profile.op_share
    assert profile.total_ms <= high * profile.forward_ms  # medians per op: noise pushes the sum down, never up
    if runtime == "onnxruntime":  # NCHWc layout changes: real work no Caffe layer asked for, kept apart
        assert any(t.startswith(RUNTIME_OP) for t in timed)
    if runtime == "opencv":  # every ReLU follows a conv, and OpenCV fuses the activation into it: 0 ticks
        relus = {layer.name for layer in graph_from_text(Path(model[0]).read_text(), seed=None).layers()
                 if layer.type == "ReLU"}
        assert relus and relus <= {layer.name for layer in profile.no_op}
        assert not any(t.startswith(RUNTIME_OP) for t in timed)  # it runs the Caffe layers themselves


@pytest.mark.parametrize("runtime", ["onnxruntime", "opencv"])
def test_profile_cli_per_layer_in_a_runtime(runtime: str, model: tuple[str, str], tmp_path: Path) -> None:
    runner = CliRunner()
    report = tmp_path / "layers.json"
    result = runner.invoke(main, ["profile", model[0], "--weights", model[1], "--runtime", runtime,
                                  "--rounds", "3", "--top", "3", "--json", str(report)])
    assert result.exit_code == 0, result.stderr
    assert "per-op sum" in result.stdout and "slowest layers" in result.stdout
    assert "LRN" in result.stdout and f"no op of their own in {runtime}" in result.stdout
    assert "no per-layer times" not in result.stdout
    payload = json.loads(report.read_text())
    assert payload["runtime"] == runtime and payload["forward_ms"] > 0
    assert {row["type"] for row in payload["by_type"]} >= WORKING_TYPES


def test_runtime_without_per_layer_times_says_so_in_one_line(model: tuple[str, str]) -> None:
    result = CliRunner().invoke(main, ["profile", model[0], "--runtime", "ncnn", "--rounds", "1", "--warmup", "0"])
    assert result.exit_code == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if "per-layer" in line]
    assert len(lines) == 1 and lines[0].startswith("no per-layer times in ncnn: ")
    assert "LRN" not in result.stdout  # no invented per-type numbers
    with pytest.raises(DeepRebirthError, match="no per-layer times in ncnn"):
        profile_on_runtime(*model, "ncnn")


def test_weights_opencv_cannot_read_are_one_line_naming_the_file(model: tuple[str, str], tmp_path: Path) -> None:
    broken = tmp_path / "broken.caffemodel"
    broken.write_bytes(Path(model[1]).read_bytes()[:1000])
    result = CliRunner().invoke(main, ["profile", model[0], "--weights", str(broken), "--runtime", "opencv",
                                       "--rounds", "1", "--warmup", "0"])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and model[0] in lines[0] and "OpenCV dnn cannot load the net" in lines[0], lines
