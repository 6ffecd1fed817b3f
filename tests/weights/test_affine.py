"""BatchNorm / Scale folding (deeprebirth.weights.affine): the folded layer applied to random inputs equals the
layer followed by the affine map, for every weight layout (conv, grouped deconv, inner product, transposed)."""

from __future__ import annotations

import numpy as np
import pytest

from deeprebirth.weights.affine import batchnorm_affine, compose_affine, fold_affine_into_linear, scale_affine

RNG = np.random.default_rng(0)
C = 6


def batchnorm(y: np.ndarray, mean: np.ndarray, var: np.ndarray, eps: float) -> np.ndarray:
    """Caffe's inference BatchNorm on (N, C, ...) computed directly."""
    shape = (1, -1) + (1,) * (y.ndim - 2)
    return (y - mean.reshape(shape)) / np.sqrt(var.reshape(shape) + eps)


def conv1x1(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.einsum("nchw,oc->nohw", x, w[:, :, 0, 0]) + b[None, :, None, None]


def stats() -> tuple[np.ndarray, np.ndarray, float]:
    return RNG.normal(0, 1, C), RNG.uniform(0.2, 3, C), 1e-5


@pytest.mark.parametrize("factor", [1.0, 4.0])
def test_batchnorm_folded_into_conv_equals_conv_then_batchnorm(factor: float) -> None:
    x = RNG.standard_normal((2, 3, 5, 5))
    w, b = RNG.standard_normal((C, 3, 1, 1)), RNG.standard_normal(C)
    mean, var, eps = stats()
    # Caffe stores running sums scaled by the factor in blob 2
    a, shift = batchnorm_affine(mean * factor, var * factor, np.array([factor]), eps)
    new_w, new_b = fold_affine_into_linear(w, b, a, shift, out_axis=0)
    assert new_w.dtype == new_b.dtype == np.float32
    np.testing.assert_allclose(conv1x1(x, new_w, new_b), batchnorm(conv1x1(x, w, b), mean, var, eps), atol=1e-4)


def test_zero_factor_means_zero_statistics() -> None:
    a, b = batchnorm_affine(np.ones(C), np.ones(C), np.array([0.0]), 1e-5)
    np.testing.assert_allclose(a, 1 / np.sqrt(1e-5))
    np.testing.assert_array_equal(b, 0.0)


def test_batchnorm_then_scale_folded_into_inner_product_without_bias() -> None:
    x = RNG.standard_normal((4, 5))
    w = RNG.standard_normal((C, 5))
    mean, var, eps = stats()
    gamma, beta = RNG.uniform(0.5, 2, C), RNG.standard_normal(C)
    both = compose_affine(batchnorm_affine(mean, var, np.array([1.0]), eps), scale_affine(gamma, beta))
    new_w, new_b = fold_affine_into_linear(w, None, *both, out_axis=0)
    expected = batchnorm(x @ w.T, mean, var, eps) * gamma + beta
    np.testing.assert_allclose(x @ new_w.T + new_b, expected, atol=1e-4)


def test_transposed_inner_product_folds_along_axis_1() -> None:
    x, w, b = RNG.standard_normal((4, 5)), RNG.standard_normal((5, C)), RNG.standard_normal(C)
    gamma = RNG.uniform(0.5, 2, C)
    new_w, new_b = fold_affine_into_linear(w, b, *scale_affine(gamma), out_axis=1)
    np.testing.assert_allclose(x @ new_w + new_b, (x @ w + b) * gamma, atol=1e-5)


def test_grouped_deconvolution_scales_each_groups_columns() -> None:
    """Deconvolution weights are (C_in, N/g, kh, kw): output channel gi * N/g + j is column j of group gi's rows."""
    group, c_in, per_group = 2, 4, 3
    w = RNG.standard_normal((c_in, per_group, 1, 1))
    a = np.arange(1, group * per_group + 1, dtype=np.float64)
    new_w, new_b = fold_affine_into_linear(w, None, a, np.zeros_like(a), out_axis=1, group=group)
    for gi in range(group):
        rows = slice(gi * c_in // group, (gi + 1) * c_in // group)
        np.testing.assert_allclose(new_w[rows], w[rows] * a[gi * per_group:(gi + 1) * per_group][None, :, None, None],
                                   rtol=1e-6)
    np.testing.assert_array_equal(new_b, 0.0)


def test_scale_without_bias_is_a_pure_factor() -> None:
    a, b = scale_affine(np.array([[2.0, 3.0]]))
    assert list(a) == [2.0, 3.0] and list(b) == [0.0, 0.0] and a.dtype == np.float64
