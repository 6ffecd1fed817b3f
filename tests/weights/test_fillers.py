"""Fillers (deeprebirth.weights.fillers): Caffe's distributions measured on large draws, seeding, and plausible
random blobs per layer type."""

from __future__ import annotations

import math

import numpy as np
import pytest

from deeprebirth.weights.fillers import Filler, fill, layer_rng, plausible_blobs

SHAPE = (256, 64, 3, 3)  # fan_in = 64 * 9, fan_out = 256 * 9


@pytest.mark.parametrize(("filler", "std"), [
    (Filler("msra"), math.sqrt(2 / (64 * 9))),
    (Filler("msra", variance_norm="FAN_OUT"), math.sqrt(2 / (256 * 9))),
    (Filler("xavier"), math.sqrt(3 / (64 * 9)) / math.sqrt(3)),  # uniform(-l, l) has std l / sqrt(3)
    (Filler("xavier", variance_norm="AVERAGE"), math.sqrt(3 / (160 * 9)) / math.sqrt(3)),
    (Filler("gaussian", mean=0.5, std=0.1), 0.1),
])
def test_filler_spread_matches_caffes_formula(filler: Filler, std: float) -> None:
    values = fill(filler, SHAPE, np.random.default_rng(0))
    assert values.dtype == np.float32 and values.shape == SHAPE
    assert abs(values.std() / std - 1) < 0.02
    assert abs(values.mean() - filler.mean) < 0.01 * max(std, 1e-3) * 10


def test_constant_and_uniform() -> None:
    rng = np.random.default_rng(0)
    assert (fill(Filler("constant", value=0.1), (3,), rng) == np.float32(0.1)).all()
    values = fill(Filler("uniform", min=-2, max=-1), (10_000,), rng)
    assert values.min() >= -2 and values.max() <= -1 and abs(values.mean() + 1.5) < 0.02


def test_layer_rng_depends_on_seed_and_name_only() -> None:
    draw = lambda seed, name: layer_rng(seed, name).standard_normal(4)
    np.testing.assert_array_equal(draw(0, "conv_merge"), draw(0, "conv_merge"))
    assert not np.array_equal(draw(0, "conv_merge"), draw(1, "conv_merge"))
    assert not np.array_equal(draw(0, "conv_merge"), draw(0, "conv2_merge"))


def test_plausible_blobs_keep_activations_in_range() -> None:
    """He-normal weights keep the second moment of a ReLU net's activations about constant layer to layer."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((512, 256))
    for _ in range(4):
        w = plausible_blobs("InnerProduct", [(256, 256)], rng)[0]
        x = np.maximum(x @ w.T.astype(np.float64), 0)
    assert 0.3 < (x ** 2).mean() < 3


def test_plausible_batchnorm_is_near_identity_with_spread() -> None:
    mean, var, factor = plausible_blobs("BatchNorm", [(64,), (64,), (1,)], np.random.default_rng(2))
    assert mean.shape == var.shape == (64,) and factor.shape == (1,)
    assert 0.5 <= factor[0] <= 2 and ((var / factor[0] >= 0.5) & (var / factor[0] <= 2)).all()
    assert mean.std() > 0.1
