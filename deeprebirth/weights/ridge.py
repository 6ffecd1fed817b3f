"""Ridge regression of one layer's weights onto target outputs: the least-squares refit's math
(``deeprebirth.finetune.refit`` runs it layer by layer on the two nets).

    [W b] = argmin ‖X W + b − T‖² + λ ‖W − W₀‖²,   λ = α · tr(XᵀX) / columns

X: the layer's input rows (a convolution's input patches, ``conv_rows``), W₀: its weights before, T: the targets.
Where T is post-ReLU it is made ReLU-aware in ``RELU_ROUNDS`` rounds: T = Y where Y > 0, else min(XW + b, −m), m
``RELU_MARGIN`` x the channel's std (aimed at 0 the units sit on the ReLU's kink and the first SGD steps flip them).
α is chosen from ``ALPHAS`` on the rows of images left out of the fit (``choose_alpha``).

A Tucker chain's core and expand (no non-linearity between them) are one linear map of rank R2: fitted as one layer,
then brought back to rank R2 by reduced-rank regression (``reduced_rank``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

ALPHAS = (0.01, 0.1, 1.0)  # ridge strengths tried per layer, relative to the mean diagonal of XᵀX
RELU_ROUNDS = 3  # ReLU-aware rounds after the plain fit
RELU_MARGIN = 0.5  # an output the original's ReLU zeroes is aimed this many of its channel's std below zero
VALIDATION_SHARE = 0.2  # of the sampled images, left out to choose α


def conv_rows(x: np.ndarray, kernel: tuple[int, int], stride: tuple[int, int], pad: tuple[int, int],
              image: np.ndarray, oy: np.ndarray, ox: np.ndarray) -> np.ndarray:
    """Rows of X for a convolution (no groups, no dilation) over ``x`` (N x C x H x W): the input patches of the
    output positions (``image``, ``oy``, ``ox``), columns in Caffe's weight order (channel, kernel row, kernel
    column)."""
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, pad
    padded = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw))) if ph or pw else x
    columns = [padded[image, :, oy * sh + ky, ox * sw + kx] for ky in range(kh) for kx in range(kw)]
    return np.stack(columns, axis=2).reshape(len(image), -1).astype(np.float64)


def ridge_toward(x1: np.ndarray, gram: np.ndarray, t: np.ndarray, w0: np.ndarray, b0: np.ndarray,
                 alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """``argmin ‖x W + b − t‖² + λ ‖W − w0‖²`` with ``λ = alpha · tr(xᵀx) / columns`` (the bias is not pulled);
    ``x1``: x with a column of ones, ``gram``: x1ᵀx1 (computed once per sample), ``w0``: (outputs, columns).
    Returns (W as outputs x columns, b)."""
    columns = gram.shape[0] - 1
    lam = alpha * float(np.trace(gram[:columns, :columns])) / max(columns, 1)
    pull = np.full(columns + 1, lam)
    pull[-1] = 0.0
    prior = np.vstack([w0.T, b0[None, :]])
    theta = np.linalg.solve(gram + np.diag(pull) + 1e-9 * np.eye(columns + 1), x1.T @ t + pull[:, None] * prior)
    return theta[:-1].T, theta[-1]


def fit_layer(x: np.ndarray, y: np.ndarray, w0: np.ndarray, b0: np.ndarray, relu: bool,
              alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """The layer's weights for rows ``x`` and the original's values ``y`` (see the module docstring); ``relu``:
    ``y`` is post-ReLU, fitted ReLU-aware."""
    return fit_layer_alphas(x, y, w0, b0, relu, [alpha])[0]


def fit_layer_alphas(x: np.ndarray, y: np.ndarray, w0: np.ndarray, b0: np.ndarray, relu: bool,
                     alphas: Sequence[float]) -> list[tuple[np.ndarray, np.ndarray]]:
    """``fit_layer`` at each of ``alphas``, sharing the Gram matrix."""
    x1 = np.hstack([x, np.ones((len(x), 1))])
    gram = x1.T @ x1
    off = -RELU_MARGIN * y.std(axis=0, keepdims=True)
    fits = []
    for alpha in alphas:
        w, b = ridge_toward(x1, gram, y, w0, b0, alpha)
        if relu:
            for _ in range(RELU_ROUNDS):
                w, b = ridge_toward(x1, gram, np.where(y > 0, y, np.minimum(x @ w.T + b, off)), w0, b0, alpha)
        fits.append((w, b))
    return fits


def reduced_rank(x: np.ndarray, w: np.ndarray, b: np.ndarray,
                 rank: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The rank-``rank`` map nearest to (``w``, ``b``) in its outputs on the rows ``x`` (reduced-rank regression,
    Izenman 1975: for a least-squares ``w`` it is the least-squares fit of that rank). With Z = x Wᵀ, μ its mean
    and V (outputs x rank) the top principal directions of Z − μ:

        x Wᵀ + b  ≈  x (V Vᵀ W)ᵀ + b + (I − V Vᵀ) μ

    Returns (inner = Vᵀ W: rank x columns, outer = V, the bias)."""
    z = x @ w.T
    mean = z.mean(axis=0)
    centred = z - mean
    _, vectors = np.linalg.eigh(centred.T @ centred)
    outer = vectors[:, ::-1][:, :rank]
    return outer.T @ w, outer, b + mean - outer @ (outer.T @ mean)


def relative_error(z: np.ndarray, y: np.ndarray, relu: bool) -> float:
    """Squared error of ``z`` (ReLU applied where ``y`` is post-ReLU) relative to the variance of ``y``."""
    if relu:
        z = np.maximum(z, 0.0)
    return float(np.mean((z - y) ** 2) / max(float(np.var(y)), 1e-12))


def choose_alpha(x: np.ndarray, y: np.ndarray, groups: np.ndarray, w0: np.ndarray, b0: np.ndarray,
                 relu: bool) -> float:
    """The ``ALPHAS`` entry whose fit on the rows of most images best predicts the rows of the images left out
    (``groups``: each row's image; a ``VALIDATION_SHARE`` of them validate)."""
    images = np.unique(groups)
    held = images[:max(1, round(VALIDATION_SHARE * len(images)))]
    test = np.isin(groups, held)
    if test.all() or not test.any():
        return ALPHAS[len(ALPHAS) // 2]
    fits = fit_layer_alphas(x[~test], y[~test], w0, b0, relu, ALPHAS)
    errors = [relative_error(x[test] @ w.T + b, y[test], relu) for w, b in fits]
    return ALPHAS[int(np.argmin(errors))]
