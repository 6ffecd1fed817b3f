"""Pooling folded into a conv kernel (deeprebirth.weights.pooling), against conv-then-pool computed in numpy."""

from __future__ import annotations

import numpy as np
import pytest

from deeprebirth.weights.pooling import merge_pool_into_kernel


def conv(x: np.ndarray, w: np.ndarray, stride: int = 1, pad: int = 0) -> np.ndarray:
    """A plain cross-correlation (C, H, W) * (N, C, kh, kw) -> (N, H', W'), Caffe's convolution without bias."""
    x = np.pad(x, ((0, 0), (pad, pad), (pad, pad)))
    windows = np.lib.stride_tricks.sliding_window_view(x, w.shape[2:], axis=(1, 2))[:, ::stride, ::stride]
    return np.einsum("chwij,ncij->nhw", windows, w)


def pool(x: np.ndarray, kernel: int, stride: int, average: bool) -> np.ndarray:
    windows = np.lib.stride_tricks.sliding_window_view(x, (kernel, kernel), axis=(1, 2))[:, ::stride, ::stride]
    return windows.mean(axis=(3, 4)) if average else windows.max(axis=(3, 4))


@pytest.mark.parametrize(("k", "kp", "sp"), [(3, 3, 2), (1, 2, 2), (3, 2, 2), (5, 3, 1)])
def test_average_pooling_kernel_equals_conv_then_average_pooling(k: int, kp: int, sp: int) -> None:
    """No padding, windows inside the input: the averaged kernel at the product stride is exact."""
    rng = np.random.default_rng(k * 10 + kp)
    x, w = rng.standard_normal((3, 13, 13)), rng.standard_normal((4, 3, k, k))
    expected = pool(conv(x, w), kp, sp, average=True)
    field = k + kp - 1  # conv stride 1: the window of kp outputs spans k + kp - 1 inputs
    merged = merge_pool_into_kernel(w, (field, field), (list(range(kp)), list(range(kp))), average=True)
    assert merged.dtype == np.float32
    got = conv(x, merged.astype(np.float64), stride=sp)
    np.testing.assert_allclose(got, expected[:, :got.shape[1], :got.shape[2]], atol=1e-5)
    assert got.shape == expected.shape


def test_max_pooling_kernel_samples_the_conv_at_the_window_centre() -> None:
    """MAX cannot fold exactly: the kernel is placed once, at the central window position (offset 1 of 0, 1, 2),
    so the merged conv is the original conv sampled at every window's centre."""
    rng = np.random.default_rng(2)
    x, w = rng.standard_normal((2, 11, 11)), rng.standard_normal((3, 2, 3, 3))
    merged = merge_pool_into_kernel(w, (5, 5), ([0, 1, 2], [0, 1, 2]), average=False)
    assert np.count_nonzero(merged) == w.size and np.array_equal(merged[:, :, 1:4, 1:4], w.astype(np.float32))
    np.testing.assert_allclose(conv(x, merged.astype(np.float64), stride=2), conv(x, w)[:, 1::2, 1::2][:, :4, :4],
                               atol=1e-5)


def test_kernel_kept_when_the_pooling_is_a_pure_stride() -> None:
    """A 1x1 pooling window at stride 2 is subsampling: the kernel itself, at stride 2."""
    w = np.random.default_rng(3).standard_normal((2, 2, 3, 3))
    for average in (True, False):
        np.testing.assert_array_equal(merge_pool_into_kernel(w, (3, 3), ([0], [0]), average), w.astype(np.float32))


def test_taps_outside_the_new_kernel_are_cropped() -> None:
    """An offset that sticks out of the new kernel drops those taps instead of failing."""
    w = np.ones((1, 1, 3, 3))
    merged = merge_pool_into_kernel(w, (3, 3), ([-1, 0], [0]), average=True)
    np.testing.assert_array_equal(merged[0, 0], [[1, 1, 1], [1, 1, 1], [0.5, 0.5, 0.5]])
