"""Accuracy in real Caffe on a net whose predictions are known: its class scores are its input pixels."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import graph_from_text, save

from deeprebirth.caffe.evaluate import (
    activations_per_image,
    evaluate_files,
    evaluation_batch,
    paired_change_error,
    top_k,
)
from deeprebirth.cli import main
from deeprebirth.errors import DeepRebirthError

CLASSES = 10
PASS_THROUGH = f"""name: "pass_through"
layer {{ name: "data" type: "Input" top: "data" input_param {{ shape {{ dim: 1 dim: 1 dim: 1 dim: {CLASSES} }} }} }}
layer {{ name: "fc" type: "InnerProduct" bottom: "data" top: "fc" inner_product_param {{ num_output: {CLASSES} }} }}
layer {{ name: "prob" type: "Softmax" bottom: "fc" top: "prob" }}
"""


def pass_through(folder: Path, stem: str, permutation: np.ndarray | None = None) -> tuple[str, str]:
    """A net that predicts class ``permutation[argmax(pixels)]``: identity weights, rows permuted."""
    graph = graph_from_text(PASS_THROUGH)
    weight = np.eye(CLASSES, dtype=np.float32)
    if permutation is not None:
        weight = weight[np.argsort(permutation)]
    graph.layer("fc").blobs = [weight, np.zeros(CLASSES, np.float32)]
    return save(graph, folder, stem)


@pytest.fixture
def data(tmp_path: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    """40 images whose pixel ranking is known; label k-th best for a chosen k per image."""
    rng = np.random.default_rng(0)
    ranks = np.array([0] * 20 + [1] * 6 + [4] * 4 + [5] * 6 + [9] * 4)  # the label's rank among the scores
    x = np.empty((len(ranks), 1, 1, CLASSES), np.uint8)
    labels = np.empty(len(ranks), np.int64)
    predicted = np.empty(len(ranks), np.int64)
    for i, rank in enumerate(ranks):
        order = rng.permutation(CLASSES)  # order[0] scores highest
        x[i, 0, 0, order] = np.arange(250, 250 - 20 * CLASSES, -20)
        labels[i], predicted[i] = order[rank], order[0]
    path = tmp_path / "data.npz"
    np.savez(path, x=x, y=labels)
    return path, labels, predicted


def test_top1_and_top5_on_a_net_whose_predictions_are_known(tmp_path: Path, data) -> None:  # type: ignore[no-untyped-def]
    path, _, _ = data
    result = evaluate_files(*pass_through(tmp_path, "net"), path, batch=7)  # a last, partial batch too
    assert result.images == 40 and result.classes == CLASSES
    assert result.top1 == pytest.approx(20 / 40)
    assert result.top5 == pytest.approx(30 / 40)  # ranks 0, 1 and 4
    assert result.agreement is None


def test_agreement_with_a_reference(tmp_path: Path, data) -> None:  # type: ignore[no-untyped-def]
    path, labels, predicted = data
    swap = np.arange(CLASSES)
    swap[[0, 1]] = [1, 0]  # the reference calls 0 what the net calls 1, and the other way round
    reference = pass_through(tmp_path, "reference", swap)
    result = evaluate_files(*pass_through(tmp_path, "net"), path, reference=reference)
    assert result.agreement == pytest.approx(np.mean(~np.isin(predicted, [0, 1])))
    assert result.reference_top1 == pytest.approx(np.mean(swap[predicted] == labels))
    change = (predicted == labels).astype(float) - (swap[predicted] == labels)
    assert np.any(change != 0)  # the swap moves some images' verdict, so the change has noise to report
    assert result.top1_change_error == pytest.approx(np.std(change, ddof=1) / np.sqrt(len(change)))


def test_the_noise_on_a_top1_change_comes_only_from_the_images_the_nets_disagree_on() -> None:
    net = np.array([1, 1, 0, 0, 1, 1, 0, 0], bool)
    reference = np.array([1, 0, 1, 0, 1, 0, 1, 0], bool)  # d = 0, 1, -1, 0, 0, 1, -1, 0
    assert paired_change_error(net, reference) == pytest.approx(np.sqrt(4 / 7) / np.sqrt(8))
    assert paired_change_error(net, net) == 0.0  # the same verdicts: a change of exactly 0, no noise
    both_right = np.ones(100, bool)
    one_flip = both_right.copy()
    one_flip[0] = False
    assert paired_change_error(one_flip, both_right) == pytest.approx(0.01)  # std of (-1, 0 x 99) is 0.1
    assert np.isnan(paired_change_error(net[:1], reference[:1]))


def test_top_k_counts_ties_by_position() -> None:
    scores = np.array([[0.5, 0.5, 0.0], [0.1, 0.2, 0.7]])
    assert top_k(scores, np.array([1, 2]), 1) == 0.5
    assert top_k(scores, np.array([1, 0]), 2) == 0.5


def test_image_folder_and_list_file(tmp_path: Path) -> None:
    import cv2

    net = pass_through(tmp_path, "net")
    lines = []
    for label in range(3):
        (tmp_path / "images" / f"c{label}").mkdir(parents=True)
        pixels = np.zeros((1, CLASSES), np.uint8)
        pixels[0, label] = 200
        cv2.imwrite(str(tmp_path / "images" / f"c{label}" / "a.png"), pixels)
        lines.append(f"images/c{label}/a.png {label}")
    assert evaluate_files(*net, tmp_path / "images").top1 == 1.0
    (tmp_path / "list.txt").write_text("\n".join(lines[::-1]) + "\n")
    assert evaluate_files(*net, tmp_path / "list.txt").top1 == 1.0


def test_errors(tmp_path: Path, data) -> None:  # type: ignore[no-untyped-def]
    net = pass_through(tmp_path, "net")
    with pytest.raises(DeepRebirthError, match="no such file or folder"):
        evaluate_files(*net, tmp_path / "missing")
    unlabelled = tmp_path / "x.npz"
    np.savez(unlabelled, x=np.zeros((2, 1, 1, CLASSES), np.uint8))
    with pytest.raises(DeepRebirthError, match="no labels"):
        evaluate_files(*net, unlabelled)
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, x=np.zeros((2, 1, 1, 5), np.uint8), y=np.zeros(2, int))
    with pytest.raises(DeepRebirthError, match="image size 1x5 does not fit the net's input 1x10"):
        evaluate_files(*net, wrong)


def test_cli(tmp_path: Path, data) -> None:  # type: ignore[no-untyped-def]
    path, _, _ = data
    net = pass_through(tmp_path, "net")
    out = tmp_path / "result.json"
    done = CliRunner().invoke(main, ["evaluate", *net, "--data", str(path), "--reference", *net, "--json", str(out)])
    assert done.exit_code == 0, done.output
    assert "50.00%" in done.output and "100.00%" in done.output
    assert "top-1 change +0.00 points, standard error 0.00" in done.output  # the net against itself
    assert json.loads(out.read_text())["top1"] == 0.5
    bad = CliRunner().invoke(main, ["evaluate", *net, "--data", str(tmp_path / "nowhere")])
    assert bad.exit_code == 2 and bad.output.count("\n") == 1


WIDE = """name: "wide"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 10 dim: 3 dim: 224 dim: 224 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
  convolution_param { num_output: 256 kernel_size: 3 pad: 1 } }
layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" }
layer { name: "pool" type: "Pooling" bottom: "conv" top: "pool" pooling_param { pool: AVE global_pooling: true } }
"""


def test_the_default_batch_follows_the_nets_activations() -> None:
    """An in-place ReLU shares its blob; 3x224x224 + 256x224x224 + 256 activations an image, 8 bytes each in a
    pycaffe net: 104 MB, so 10 images in 1 GiB; a small net: the cap of 100."""
    wide = graph_from_text(WIDE)
    assert activations_per_image(wide) == 3 * 224 * 224 + 256 * 224 * 224 + 256
    assert evaluation_batch(wide) == 10
    assert evaluation_batch(graph_from_text(PASS_THROUGH)) == 100
