"""The fine-tuning losses in stock Caffe layers, checked in real Caffe against numpy and central differences."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from deeprebirth import caffe_pb2 as pb
from deeprebirth.caffe.runtime import import_caffe
from deeprebirth.finetune.losses import LOG_FLOOR, add_distillation, distillation_loss, softmax
from deeprebirth.io import caffe_io

N, C = 5, 7


def distillation_net(temperature: float, weight: float) -> pb.NetParameter:
    net = pb.NetParameter(name="kd", force_backward=True)
    for name in ("student", "teacher"):
        layer = net.layer.add(name=name, type="Input", top=[name])
        layer.input_param.shape.add(dim=[N, C])
    add_distillation(net, "student", "teacher", temperature, weight, N)
    return net


def caffe_distillation(tmp_path: Path, z: np.ndarray, t: np.ndarray, temperature: float,
                       weight: float) -> tuple[float, np.ndarray]:
    caffe = import_caffe()
    path = tmp_path / "kd.prototxt"
    caffe_io.write_prototxt(path, distillation_net(temperature, weight))
    net = caffe.Net(str(path), caffe.TRAIN)
    net.blobs["student"].data[...] = z
    net.blobs["teacher"].data[...] = t
    out = net.forward()
    net.backward()
    loss = float(out["loss_kd"]) * weight / N  # the top holds the unweighted sum
    return loss, np.array(net.blobs["student"].diff, dtype=np.float64)


def cross_entropy(z: np.ndarray, t: np.ndarray, temperature: float, weight: float) -> float:
    """What the Caffe layers compute: w · T² · mean_n Σ_c −p log(q + floor)."""
    p, q = softmax(t, temperature), softmax(z, temperature)
    return float(weight * temperature ** 2 * np.mean(np.sum(-p * np.log(q + LOG_FLOOR), axis=1)))


@pytest.mark.parametrize("temperature, weight", [(4.0, 0.5), (1.0, 1.0), (2.5, 0.3)])
def test_distillation_value_and_gradient_match_numpy_and_central_differences(tmp_path: Path, temperature: float,
                                                                             weight: float) -> None:
    rng = np.random.default_rng(int(temperature * 10))
    z = rng.normal(0, 3, (N, C)).astype(np.float32)
    t = rng.normal(0, 3, (N, C)).astype(np.float32)
    loss, grad = caffe_distillation(tmp_path, z, t, temperature, weight)
    assert loss == pytest.approx(cross_entropy(z.astype(np.float64), t, temperature, weight), rel=1e-5)
    # the closed form: w · T · (q − p) / N
    expected = weight * temperature * (softmax(z, temperature) - softmax(t, temperature)) / N
    assert np.max(np.abs(grad - expected)) < 1e-6
    numeric = np.zeros_like(grad)
    h = 1e-5
    z64 = z.astype(np.float64)
    for i in range(N):
        for j in range(C):
            up, down = z64.copy(), z64.copy()
            up[i, j] += h
            down[i, j] -= h
            numeric[i, j] = (cross_entropy(up, t, temperature, weight) - cross_entropy(down, t, temperature, weight)) / (
                2 * h)
    assert np.max(np.abs(grad - numeric)) < 1e-6 * max(1.0, float(np.max(np.abs(numeric)))) * 10


def test_distillation_loss_is_zero_when_the_student_agrees_and_grows_with_disagreement() -> None:
    rng = np.random.default_rng(0)
    t = rng.normal(0, 2, (8, 10))
    assert distillation_loss(t, t, 4.0) == pytest.approx(0.0, abs=1e-9)
    near = distillation_loss(t + rng.normal(0, 0.1, t.shape), t, 4.0)
    far = distillation_loss(t + rng.normal(0, 2.0, t.shape), t, 4.0)
    assert 0 < near < far
