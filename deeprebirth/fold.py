"""Pure weight math: numpy arrays in, numpy arrays out. No graph, no protobuf.

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


# streamline slimming


def merge_pool_into_kernel(weight: np.ndarray, kernel: tuple[int, int], offsets: tuple[list[int], list[int]],
                           average: bool) -> np.ndarray:
    """A convolution kernel (N, C/g, kh, kw) widened to ``kernel`` for a conv that absorbs the pooling after it.

    ``offsets[axis][a]`` is where the original kernel starts inside the new one for pooling-window position ``a``
    along that axis (it may stick out: those taps are cropped). ``average``: the mean of the kernel placed at every
    window position, which is AVE pooling of the conv exactly wherever no window touches a border (and no ReLU sits
    between). Otherwise (MAX) the kernel is placed once, at the window position nearest the window's centre whose
    placement fits (clamped into the new kernel when none fits): the conv sampled at the centre of each window.
    """
    w = np.asarray(weight, dtype=np.float64)
    kh, kw = w.shape[2:]
    new = np.zeros((*w.shape[:2], *kernel), dtype=np.float64)

    def place(oh: int, ow: int, factor: float) -> None:
        h0, w0 = max(oh, 0), max(ow, 0)
        h1, w1 = min(oh + kh, kernel[0]), min(ow + kw, kernel[1])
        if h0 < h1 and w0 < w1:
            new[:, :, h0:h1, w0:w1] += factor * w[:, :, h0 - oh:h1 - oh, w0 - ow:w1 - ow]

    if average:
        factor = 1.0 / (len(offsets[0]) * len(offsets[1]))
        for oh in offsets[0]:
            for ow in offsets[1]:
                place(oh, ow, factor)
    else:
        place(_central_offset(offsets[0], kh, kernel[0]), _central_offset(offsets[1], kw, kernel[1]), 1.0)
    return new.astype(np.float32)


def _central_offset(offsets: list[int], size: int, new_size: int) -> int:
    centre = (len(offsets) - 1) / 2
    order = sorted(range(len(offsets)), key=lambda a: (not 0 <= offsets[a] <= new_size - size, abs(a - centre), a))
    return min(max(offsets[order[0]], 0), new_size - size)
