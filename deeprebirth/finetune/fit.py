"""A fitted start for a merged convolution (``--init fit``): closed-form least squares, numpy in, numpy out.

Before:  the merged conv starts from the original conv's weights (``inherit``), so its output is far from what
the removed pooling/LRN made.
After:   its weights W (C_out × C_in × kh × kw) and bias b minimise, over sampled output positions,

    Σ ‖ W · patch(X) + b − Y ‖² + λ ‖W‖²

where X is the conv's input (the slim net's blob, from data) and Y the original net's activation that the merge
replaces (the blob the rewrite report says it reproduces), i.e. ridge regression over input patches, as channel
pruning and ThiNet reconstruct a layer. ``λ`` is ``ridge`` × the mean diagonal of the patches' Gram matrix, so it
depends neither on the data's scale nor on how many positions are sampled.

Preconditions: group 1, dilation 1, the conv's output has Y's shape. The fit is linear: it ignores the ReLU after
the conv and cannot make a max-pool (the best linear stand-in for one is a blur); whether it helps end to end is
measured, not assumed (README, schedule table).
"""

from __future__ import annotations

import numpy as np

MAX_ROWS = 50_000  # sampled output positions (the normal equations need only a few times the patch size)


def patches(x: np.ndarray, kernel: tuple[int, int], stride: tuple[int, int], pad: tuple[int, int],
            out_size: tuple[int, int]) -> np.ndarray:
    """Input patches of every output position: (N · out_h · out_w) × (C · kh · kw), in Caffe's weight order."""
    n, c, h, w = x.shape
    (kh, kw), (sh, sw), (ph, pw), (oh, ow) = kernel, stride, pad, out_size
    padded = np.zeros((n, c, max(h + 2 * ph, (oh - 1) * sh + kh), max(w + 2 * pw, (ow - 1) * sw + kw)),
                      dtype=np.float64)
    padded[:, :, ph:ph + h, pw:pw + w] = x
    cols = np.empty((n, oh, ow, c, kh, kw), dtype=np.float64)
    for i in range(kh):
        for j in range(kw):
            cols[:, :, :, :, i, j] = padded[:, :, i:i + sh * oh:sh, j:j + sw * ow:sw].transpose(0, 2, 3, 1)
    return cols.reshape(n * oh * ow, c * kh * kw)


def fit_conv(x: np.ndarray, y: np.ndarray, kernel: tuple[int, int], stride: tuple[int, int], pad: tuple[int, int],
             ridge: float = 1e-3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(W, b) of the conv that best maps ``x`` (N × C_in × H × W) to ``y`` (N × C_out × oh × ow), see above."""
    _, c_out, oh, ow = y.shape
    rows = patches(x, kernel, stride, pad, (oh, ow))
    targets = y.astype(np.float64).transpose(0, 2, 3, 1).reshape(-1, c_out)
    if len(rows) > MAX_ROWS:
        keep = np.random.default_rng(seed).choice(len(rows), MAX_ROWS, replace=False)
        rows, targets = rows[keep], targets[keep]
    design = np.hstack([rows, np.ones((len(rows), 1))])
    gram = design.T @ design
    strength = ridge * float(np.trace(gram[:-1, :-1])) / max(rows.shape[1], 1)
    penalty = np.full(design.shape[1], strength)
    penalty[-1] = 0.0  # the bias is not shrunk
    solution = np.linalg.solve(gram + np.diag(penalty), design.T @ targets)
    weights = solution[:-1].T.reshape(c_out, x.shape[1], *kernel)
    return weights.astype(np.float32), solution[-1].astype(np.float32)
