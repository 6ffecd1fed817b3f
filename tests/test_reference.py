"""deeprebirth.caffe.reference: the check's reference runtime. OpenCV dnn must give Caffe's values (in-place blobs included),
catch a rewrite that changed the function, name a layer it cannot run, and be chosen only where pycaffe is missing
or when asked; the commands that need real Caffe refuse in one line without it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import graph_from_text, save

from deeprebirth.api import RewriteOptions, rewrite_files
from deeprebirth.caffe import reference
from deeprebirth.caffe.compare import compare_nets
from deeprebirth.caffe.runtime import random_feeds
from deeprebirth.cli import main
from deeprebirth.errors import DeepRebirthError
from deeprebirth.ir.model import load_model, save_model

# conv -> BatchNorm -> Scale -> ReLU, all in place on "conv": the exact folds remove BN and Scale
NET = """name: "small"
input: "data"
input_shape { dim: 2 dim: 3 dim: 10 dim: 10 }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv" convolution_param { num_output: 6 kernel_size: 3 } }
layer { name: "bn" type: "BatchNorm" bottom: "conv" top: "conv" }
layer { name: "scale" type: "Scale" bottom: "conv" top: "conv" scale_param { bias_term: true } }
layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" }
layer { name: "fc" type: "InnerProduct" bottom: "conv" top: "fc" inner_product_param { num_output: 5 } }
layer { name: "prob" type: "Softmax" bottom: "fc" top: "prob" }
"""
FEEDS = random_feeds({"data": (2, 3, 10, 10)}, 3, seed=4)


@pytest.fixture
def model(tmp_path: Path) -> tuple[str, str]:
    return save(graph_from_text(NET, seed=2), tmp_path, "net")


def test_opencv_gives_caffes_values_for_in_place_blobs_and_outputs(model: tuple[str, str]) -> None:
    blobs = ["conv", "fc", "prob"]
    in_opencv = reference.reference_outputs("opencv", *model, FEEDS, blobs)
    in_caffe = reference.reference_outputs("caffe", *model, FEEDS, blobs)
    for got, want in zip(in_opencv, in_caffe):
        # "conv" is read after the in-place BN, Scale and ReLU, as Caffe has it: no negative value survives
        assert got["conv"].shape == (2, 6, 8, 8) and got["conv"].min() == 0.0 and want["conv"].min() == 0.0
        for blob in blobs:
            scale = np.abs(want[blob]).max()
            assert scale > 0 and np.abs(got[blob] - want[blob]).max() / scale < 1e-5, blob


def test_rewrite_checked_in_opencv_passes_and_names_its_reference(model: tuple[str, str], tmp_path: Path) -> None:
    out = (str(tmp_path / "out.prototxt"), str(tmp_path / "out.caffemodel"))
    result = rewrite_files(model[0], out[0], model[1], out[1], tmp_path / "report.json",
                           RewriteOptions(rules="exact", check=3, reference="opencv"))
    check = result.check
    assert check is not None and check.reference == "opencv" and check.passed and check.inputs == 3
    assert {d.blob for d in check.diffs} == {"fc", "prob"} and check.worst.max_rel < 1e-5
    assert json.loads((tmp_path / "report.json").read_text())["check"]["reference"] == "opencv"


def test_opencv_check_fails_when_one_weight_differs(model: tuple[str, str], tmp_path: Path) -> None:
    graph = load_model(*model)
    fc = graph.layer("fc")
    assert fc.blobs is not None
    weights = np.array(fc.blobs[0], copy=True)
    weights[0, np.argmax(np.abs(weights[0]))] *= 1.5
    fc.blobs[0] = weights
    altered = (str(tmp_path / "altered.prototxt"), str(tmp_path / "altered.caffemodel"))
    save_model(graph, *altered)
    same = compare_nets(model, model, FEEDS, ["fc"], reference="opencv")
    assert same.passed and same.worst.max_abs == 0.0
    changed = compare_nets(model, altered, FEEDS, ["fc"], reference="opencv")
    assert not changed.passed and changed.worst.max_rel > 1e-3 and changed.reference == "opencv"


@pytest.mark.parametrize("layer", ['type: "Bias" bottom: "conv" top: "conv"',
                                   'type: "ArgMax" bottom: "conv" top: "conv" argmax_param { axis: 1 }'])
def test_a_layer_opencv_cannot_run_is_named_in_one_line(layer: str, tmp_path: Path) -> None:
    text = NET.replace('type: "ReLU" bottom: "conv" top: "conv"', layer).replace('name: "relu"', 'name: "odd"')
    proto, weights = save(graph_from_text(text, seed=2), tmp_path, "odd")
    kind = layer.split('"')[1]
    with pytest.raises(DeepRebirthError, match=rf"odd.prototxt: OpenCV dnn cannot run layer 'odd' \({kind}\), which "
                                               r"Caffe can: check with --reference caffe") as caught:
        reference.opencv_outputs(proto, weights, FEEDS[:1], ["fc"])
    assert "\n" not in str(caught.value)


def test_the_reference_is_caffe_where_pycaffe_imports_else_opencv(monkeypatch: pytest.MonkeyPatch) -> None:
    assert reference.pycaffe_available()  # this environment has the project's build
    assert reference.pick_reference() == "caffe" and reference.pick_reference("opencv") == "opencv"
    monkeypatch.setattr(reference, "pycaffe_available", lambda: False)
    assert reference.pick_reference() == "opencv"
    with pytest.raises(DeepRebirthError, match="needs pycaffe, which is not importable: `make install` builds it, "
                                               "or put your own Caffe's python/ folder on PYTHONPATH"):
        reference.pick_reference("caffe")
    with pytest.raises(DeepRebirthError, match="unknown reference 'tflite'"):
        reference.pick_reference("tflite")


def test_without_pycaffe_the_cli_checks_in_opencv_and_finetune_refuses(model: tuple[str, str], tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(reference, "pycaffe_available", lambda: False)
    runner = CliRunner()
    out = [str(tmp_path / "out.prototxt"), "--out-weights", str(tmp_path / "out.caffemodel")]
    done = runner.invoke(main, ["rewrite", model[0], *out, "--weights", model[1], "--check", "2"])
    assert done.exit_code == 0, done.stderr
    assert "check PASSED on 2 inputs, both nets in OpenCV dnn" in done.stdout
    done = runner.invoke(main, ["rewrite", model[0], *out, "--weights", model[1], "--check", "2",
                                "--reference", "caffe"])
    assert done.exit_code == 2 and done.stderr.count("\n") == 1 and "needs pycaffe" in done.stderr
    done = runner.invoke(main, ["finetune", *model, *model, "--report", "r.json", "--data", str(tmp_path),
                                "--out", str(tmp_path / "final.caffemodel")])
    assert done.exit_code == 2 and done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith("error: finetune needs pycaffe (real Caffe), which is not importable: `make install`")
    done = runner.invoke(main, ["evaluate", *model, "--data", str(tmp_path)])
    assert done.exit_code == 2 and "evaluate needs pycaffe" in done.stderr


def test_a_forward_failure_is_traced_to_the_first_layer_that_fails() -> None:
    """OpenCV failing mid-net for another reason than a missing layer type: the bisection names the first layer
    whose own forward fails (a stand-in net: layers from 'c3' on fail, as everything after a broken layer does)."""
    import cv2

    class Broken:
        names = ("c1", "r1", "c2", "c3", "r3", "fc")
        calls = 0

        def getLayerNames(self) -> tuple[str, ...]:  # OpenCV's spelling, as the stand-ins below
            return self.names

        def setInput(self, array: np.ndarray, name: str) -> None:
            pass

        def forward(self, layer: str) -> np.ndarray:
            self.calls += 1
            if self.names.index(layer) >= 3:
                raise cv2.error("OpenCV(4.14.0) /src/layer.cpp:10: error: (-215:Assertion failed) inputs.size() == 2")
            return np.zeros(1)

        def getLayer(self, layer: str) -> object:
            return type("L", (), {"type": "Eltwise"})()

    net = Broken()
    error = reference._unsupported(net, FEEDS[0], "n.prototxt", cv2.error("failed"))
    assert str(error) == ("n.prototxt: OpenCV dnn cannot run layer 'c3' (Eltwise), which Caffe can: "
                          "inputs.size() == 2; check with --reference caffe (needs pycaffe)")
    assert net.calls <= 4  # the last layer, then bisection: log2(6) rounded up
