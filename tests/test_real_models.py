"""Exact rewrites of real models, checked in real Caffe and loaded in OpenCV dnn."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from helpers import load_script, save

from deeprebirth.api import RewriteOptions, rewrite_files
from deeprebirth.caffe.runtime import caffe_outputs, image_feeds, opencv_forward
from deeprebirth.ir.initializers import random_weights
from deeprebirth.ir.model import load_model


def test_open_nsfw_exact_folds(assets: dict[str, str], photos: list[str], tmp_path: Path) -> None:
    out_proto, out_model = tmp_path / "nsfw.prototxt", tmp_path / "nsfw.caffemodel"
    result = rewrite_files(assets["open_nsfw.prototxt"], out_proto, assets["open_nsfw.caffemodel"], out_model,
                           options=RewriteOptions(rules="exact", check=3, images=photos, tolerance=1e-5))
    report, check = result.report, result.check
    assert report.before.layers == 229
    assert report.after is not None and report.after.layers == 123
    assert report.after.layers_by_type.get("BatchNorm", 0) == 0 and report.after.layers_by_type.get("Scale", 0) == 0
    assert check is not None and check.inputs == 3 + len(photos) == 8
    assert check.passed and check.predictions_changed == 0
    prob = next(d for d in check.diffs if d.blob == "prob")
    assert prob.max_abs <= 1e-5

    # OpenCV dnn loads the rewritten pair and agrees with the original on the photos
    for feed in image_feeds(photos, "data", (1, 3, 224, 224)):
        a = opencv_forward(assets["open_nsfw.prototxt"], assets["open_nsfw.caffemodel"], feed)
        b = opencv_forward(out_proto, out_model, feed)
        assert a.shape == b.shape == (1, 2)
        assert np.max(np.abs(a - b)) <= 1e-5
        assert a.argmax() == b.argmax()


def test_ssd_face_detector_exact_folds(assets: dict[str, str], photos: list[str], tmp_path: Path) -> None:
    out_proto, out_model = tmp_path / "ssd.prototxt", tmp_path / "ssd.caffemodel"
    result = rewrite_files(assets["ssd_face.prototxt"], out_proto, assets["ssd_face.caffemodel"], out_model,
                           options=RewriteOptions(rules="exact"))
    assert result.report.after is not None and result.report.after.layers < result.report.before.layers
    import cv2

    astronaut = cv2.imread(photos[0])
    blob = cv2.dnn.blobFromImage(astronaut, 1.0, (300, 300), (104.0, 177.0, 123.0))
    before = opencv_forward(assets["ssd_face.prototxt"], assets["ssd_face.caffemodel"], {"data": blob})
    after = opencv_forward(out_proto, out_model, {"data": blob})
    confident = lambda d: d[0, 0][d[0, 0, :, 2] > 0.5]
    assert len(confident(before)) == len(confident(after)) == 1
    assert np.max(np.abs(confident(before) - confident(after))) <= 1e-4


def test_efficientnet_lite0_exact_folds(assets: dict[str, str], photos: list[str], tmp_path: Path) -> None:
    """A real ImageNet classifier of the MobileNet kind (depthwise convs, ReLU6, residual adds): the 49 BatchNorm +
    Scale pairs fold away and the classes of a cat and an espresso stay, in Caffe and in OpenCV dnn."""
    lite0 = load_script("benchmarks/efficientnet_lite0.py")
    proto, weights = lite0.build(tmp_path, Path(assets["efficientnet_lite0.pth"]))
    out_proto, out_model = tmp_path / "folded.prototxt", tmp_path / "folded.caffemodel"
    result = rewrite_files(proto, out_proto, weights, out_model,
                           options=RewriteOptions(rules="exact", check=3, images=photos, tolerance=1e-5))
    report, check = result.report, result.check
    assert report.before.layers_by_type["BatchNorm"] == report.before.layers_by_type["Scale"] == 49
    assert report.after is not None and "BatchNorm" not in report.after.layers_by_type
    assert report.after.layers_by_type["ReLU6"] == 33 and report.after.layers_by_type["Eltwise"] == 9
    assert check is not None and check.passed and check.predictions_changed == 0

    cat, espresso = photos[1], photos[2]  # chelsea, coffee
    feeds = image_feeds([cat, espresso], "data", (1, 3, 224, 224), mean=(127.0,) * 3, scale=1 / 128)
    before = [o["prob"][0] for o in caffe_outputs(proto, weights, feeds, ["prob"])]
    after = [o["prob"][0] for o in caffe_outputs(out_proto, out_model, feeds, ["prob"])]
    assert 281 <= before[0].argmax() <= 285 and before[1].argmax() == 967  # ImageNet's cats; espresso
    assert [p.argmax() for p in after] == [p.argmax() for p in before]
    assert max(float(np.max(np.abs(a - b))) for a, b in zip(before, after)) <= 1e-5
    for feed, expected in zip(feeds, before):
        assert np.max(np.abs(opencv_forward(out_proto, out_model, feed)[0] - expected)) <= 1e-5


@pytest.mark.parametrize("model", ["bvlc_googlenet", "bvlc_alexnet", "bvlc_reference_caffenet"])
def test_model_zoo_exact_rewrite_keeps_logits(model: str, model_zoo: Path, tmp_path: Path) -> None:
    graph = load_model(model_zoo / model / "deploy.prototxt")
    random_weights(graph, seed=7)
    proto, weights = save(graph, tmp_path, "original")
    result = rewrite_files(proto, tmp_path / "out.prototxt", weights, tmp_path / "out.caffemodel",
                           options=RewriteOptions(rules="exact", check=2))
    check = result.check
    assert check is not None
    logits = [d for d in check.diffs if d.blob != "prob"]
    assert logits, "the logits under the softmax are compared"
    assert all(d.max_rel <= 1e-4 for d in check.diffs)
    assert result.report.after is not None and result.report.after.layers_by_type.get("Dropout", 0) == 0
    assert result.report.after.output_shapes == result.report.before.output_shapes
