"""One layer's weights refit onto target outputs (deeprebirth.weights.ridge): the ridge solves least squares and is
pulled to the start, the ReLU-aware fit beats plain least squares on post-ReLU targets, the pull is chosen on
left-out images. (Its rows against Caffe's own convolution: tests/test_finetune_refit.py.)"""

from __future__ import annotations

import numpy as np

from deeprebirth.weights.ridge import ALPHAS, choose_alpha, fit_layer, reduced_rank, relative_error


def test_the_ridge_solves_least_squares_and_pulls_towards_the_start() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((500, 12))
    w_true, b_true = rng.standard_normal((3, 12)), rng.standard_normal(3)
    w0, b0 = np.zeros((3, 12)), np.zeros(3)
    w, b = fit_layer(x, x @ w_true.T + b_true, w0, b0, relu=False, alpha=1e-9)
    assert np.max(np.abs(w - w_true)) < 1e-6 and np.max(np.abs(b - b_true)) < 1e-6
    w_start = rng.standard_normal((3, 12))
    w, _ = fit_layer(x, x @ w_true.T + b_true, w_start, b0, relu=False, alpha=1e6)
    assert np.max(np.abs(w - w_start)) < 1e-3  # λ huge: the start wins


def test_relu_aware_fit_beats_plain_least_squares_on_post_relu_targets() -> None:
    """Where the original's blob is post-ReLU, fitting it as if it were linear lets the negative side leak in."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2000, 10))
    w_true, b_true = rng.standard_normal((6, 10)), rng.standard_normal(6) - 0.5
    y = np.maximum(x @ w_true.T + b_true, 0)
    w0, b0 = np.zeros((6, 10)), np.zeros(6)
    plain = fit_layer(x, y, w0, b0, relu=False, alpha=1e-6)
    aware = fit_layer(x, y, w0, b0, relu=True, alpha=1e-6)
    e_plain = relative_error(x @ plain[0].T + plain[1], y, relu=True)
    e_aware = relative_error(x @ aware[0].T + aware[1], y, relu=True)
    assert e_aware < 0.5 * e_plain, (e_aware, e_plain)  # measured: 0.050 against 0.24


def test_the_pull_is_chosen_on_left_out_images() -> None:
    """Few rows and noisy targets: the strongest pull towards the start predicts the left-out rows best; many
    clean rows: the weakest."""
    rng = np.random.default_rng(2)
    w_true = rng.standard_normal((4, 40))
    w0, b0 = w_true + 0.1 * rng.standard_normal((4, 40)), np.zeros(4)
    few = rng.standard_normal((50, 40))
    noisy = few @ w_true.T + 3.0 * rng.standard_normal((50, 4))
    assert choose_alpha(few, noisy, np.arange(50), w0, b0, relu=False) == max(ALPHAS)
    many = rng.standard_normal((5000, 40))
    w0 = np.zeros((4, 40))
    assert choose_alpha(many, many @ w_true.T, np.arange(5000) // 50, w0, b0, relu=False) == min(ALPHAS)


def test_reduced_rank_is_the_best_fit_of_that_rank_on_the_rows() -> None:
    """A map of rank 3 in 8 outputs, fitted in full on noisy rows: brought back to rank 3 along the fitted outputs'
    principal directions it predicts better than the truncated SVD of its weights (which ignores where the rows
    lie), and a map already of rank 3 comes back unchanged."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((300, 20)) * np.geomspace(0.03, 3.0, 20)  # the inputs' scales differ, as features do
    w_true = rng.standard_normal((8, 3)) @ rng.standard_normal((3, 20))
    b_true = rng.standard_normal(8)
    y = x @ w_true.T + b_true + 2.0 * rng.standard_normal((300, 8))
    w, b = fit_layer(x, y, np.zeros((8, 20)), np.zeros(8), relu=False, alpha=1e-9)
    inner, outer, bias = reduced_rank(x, w, b, 3)
    assert inner.shape == (3, 20) and outer.shape == (8, 3)
    u, s, vt = np.linalg.svd(w, full_matrices=False)
    truncated = (u[:, :3] * s[:3]) @ vt[:3]
    ours = relative_error(x @ (outer @ inner).T + bias, y, relu=False)
    svd = relative_error(x @ truncated.T + b, y, relu=False)
    full = relative_error(x @ w.T + b, y, relu=False)
    assert ours < 1.1 * full and svd > 2 * ours, (full, ours, svd)  # measured: 0.048, 0.050, 0.27
    inner, outer, bias = reduced_rank(x, w_true, b_true, 3)
    assert np.max(np.abs(outer @ inner - w_true)) < 1e-9 and np.max(np.abs(bias - b_true)) < 1e-9
