"""Per-channel affine maps (BatchNorm, Scale) and folding them into the linear layer before them.

Every per-channel affine map ``y = a * x + b`` that follows a linear layer folds into it: ``W' = W * a`` along the
layer's output-channel axis and ``b' = a * b_old + b``. BatchNorm and Scale are both such maps once their blobs are
decoded. Arithmetic runs in float64 and the results are rounded to float32 once.
"""

from __future__ import annotations

import numpy as np


def batchnorm_affine(mean_sum: np.ndarray, var_sum: np.ndarray, factor: np.ndarray,
                     eps: float) -> tuple[np.ndarray, np.ndarray]:
    """Caffe BatchNorm (global statistics) as ``y = a * x + b``.

    Caffe stores running sums and a scale factor f: mean = blob0 / f, var = blob1 / f, and f == 0 means zero
    statistics. Then ``a = 1 / sqrt(var + eps)`` and ``b = -mean * a``.
    """
    f = float(np.asarray(factor, dtype=np.float64).ravel()[0])
    inv = 0.0 if f == 0 else 1.0 / f
    mean = np.asarray(mean_sum, dtype=np.float64).ravel() * inv
    var = np.asarray(var_sum, dtype=np.float64).ravel() * inv
    a = 1.0 / np.sqrt(var + eps)
    return a, -mean * a


def scale_affine(gamma: np.ndarray, beta: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Caffe Scale (one factor per channel, optional bias) as ``y = a * x + b``, in float64."""
    a = np.asarray(gamma, dtype=np.float64).ravel()
    return a, (np.zeros_like(a) if beta is None else np.asarray(beta, dtype=np.float64).ravel())


def compose_affine(first: tuple[np.ndarray, np.ndarray],
                   second: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """``second(first(x))`` for per-channel affine maps: ``a = a2 * a1``, ``b = a2 * b1 + b2``."""
    (a1, b1), (a2, b2) = first, second
    return a2 * a1, a2 * b1 + b2


def fold_affine_into_linear(weight: np.ndarray, bias: np.ndarray | None, a: np.ndarray, b: np.ndarray,
                            out_axis: int, group: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Fold ``y = a * (W x + bias) + b`` into one linear layer; returns ``(W', bias')`` in float32.

    ``out_axis`` is the weight axis that indexes output channels: 0 for Convolution (N, C/g, kh, kw) and
    InnerProduct (N, K); 1 for a transposed InnerProduct (K, N). For Deconvolution pass ``out_axis=1`` and the
    group count: its weights are (C_in, N/g, kh, kw) and output channel ``gi * N/g + j`` is column ``j`` of the
    rows of group ``gi``.
    """
    w = np.asarray(weight, dtype=np.float64)
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    old_bias = np.zeros_like(a) if bias is None else np.asarray(bias, dtype=np.float64).ravel()
    if out_axis == 1 and group > 1:
        c_in, per_group = w.shape[0], w.shape[1]
        grouped = w.reshape(group, c_in // group, per_group, *w.shape[2:])
        factor = a.reshape(group, 1, per_group, *([1] * (w.ndim - 2)))
        new_w = (grouped * factor).reshape(w.shape)
    else:
        shape = [1] * w.ndim
        shape[out_axis] = a.size
        new_w = w * a.reshape(shape)
    new_b = a * old_bias + b
    return new_w.astype(np.float32), new_b.astype(np.float32)
