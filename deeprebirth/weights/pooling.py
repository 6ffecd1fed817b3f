"""Pooling folded into the convolution before it (streamline slimming): a wider kernel that samples, or averages,
the conv over the pooling window. numpy only; which offsets apply is the caller's geometry."""

from __future__ import annotations

import numpy as np


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
