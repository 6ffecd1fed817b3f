"""--init fit: the least-squares start of a merged conv."""

from __future__ import annotations

import numpy as np
import pytest

from deeprebirth.finetune.fit import fit_conv, patches


def conv(x: np.ndarray, w: np.ndarray, b: np.ndarray, stride: tuple[int, int], pad: tuple[int, int],
         out: tuple[int, int]) -> np.ndarray:
    rows = patches(x, w.shape[2:], stride, pad, out)  # type: ignore[arg-type]
    y = rows @ w.reshape(len(w), -1).T + b
    return y.reshape(len(x), *out, len(w)).transpose(0, 3, 1, 2)


def test_patches_match_a_direct_convolution() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 3, 9, 8))
    w = rng.normal(size=(4, 3, 3, 2))
    y = conv(x, w, np.zeros(4), (2, 1), (1, 0), (5, 7))
    direct = np.zeros_like(y)
    padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (0, 0)))
    for o in range(4):
        for i in range(5):
            for j in range(7):
                direct[:, o, i, j] = np.sum(padded[:, :, 2 * i:2 * i + 3, j:j + 2] * w[o], axis=(1, 2, 3))
    assert np.max(np.abs(y - direct)) < 1e-9


@pytest.mark.parametrize("stride, pad", [((1, 1), (0, 0)), ((2, 2), (1, 1)), ((4, 4), (3, 3))])
def test_a_linear_target_is_recovered(stride: tuple[int, int], pad: tuple[int, int]) -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(16, 3, 20, 20))
    w = rng.normal(size=(5, 3, 7, 7)).astype(np.float32)
    b = rng.normal(size=5).astype(np.float32)
    out = ((20 + 2 * pad[0] - 7) // stride[0] + 1, (20 + 2 * pad[1] - 7) // stride[1] + 1)
    y = conv(x, w, b, stride, pad, out)
    fitted_w, fitted_b = fit_conv(x, y, (7, 7), stride, pad, ridge=1e-9)
    assert np.max(np.abs(fitted_w - w)) < 1e-3 and np.max(np.abs(fitted_b - b)) < 1e-3


def test_ridge_shrinks_towards_zero_and_noise_is_averaged() -> None:
    rng = np.random.default_rng(2)
    x = rng.normal(size=(8, 2, 12, 12))
    w = rng.normal(size=(3, 2, 3, 3))
    y = conv(x, w, np.zeros(3), (1, 1), (1, 1), (12, 12))
    noisy = y + rng.normal(0, 0.5, y.shape)
    light, _ = fit_conv(x, noisy, (3, 3), (1, 1), (1, 1), ridge=1e-6)
    heavy, _ = fit_conv(x, noisy, (3, 3), (1, 1), (1, 1), ridge=10.0)
    assert np.max(np.abs(light - w)) < 0.1
    assert np.linalg.norm(heavy) < 0.5 * np.linalg.norm(light)
