"""Branch-merging weight math (deeprebirth.weights.branches): which branch takes freed channels, the channel layout
and its permutation, widening a conv's outputs, and permuting a reader's input channels, checked on arrays."""

from __future__ import annotations

import numpy as np
import pytest

from deeprebirth.weights.branches import (
    assign_freed,
    channel_layout,
    embed_permutation,
    own_channels,
    permute_input_channels,
    widen_output_channels,
)

GOOGLENET_3A = (64, 96, 128, 16, 32, 32)  # (1x1, 3x3_reduce, 3x3, 5x5_reduce, 5x5, pool_proj)


def test_googlenet_layout_balanced_keeps_every_position() -> None:
    c1, _, c3, _, c5, cp = GOOGLENET_3A
    widths = [c1, c3, c5, cp]
    target = assign_freed(widths, [0, 3], [1, 2], {1: 9, 2: 25}, "balanced")
    assert target == {0: 1, 3: 2}
    kept, sources, perm = channel_layout(widths, target)
    assert kept == [1, 2] and np.array_equal(perm, np.arange(256))
    assert list(own_channels(sources[1], c1, c3)) == [-1] * c1 + list(range(c3))
    assert list(own_channels(sources[2], c1 + c3, c5)) == list(range(c5)) + [-1] * cp


@pytest.mark.parametrize(("widen", "target"), [("3x3", 1), ("5x5", 2)])
def test_googlenet_layout_one_side_is_a_permutation(widen: str, target: int) -> None:
    widths = [64, 128, 32, 32]
    assigned = assign_freed(widths, [0, 3], [1, 2], {1: 9, 2: 25}, widen)
    assert assigned == {0: target, 3: target}
    _, sources, perm = channel_layout(widths, assigned)
    assert sorted(perm) == list(range(256)) and not np.array_equal(perm, np.arange(256))
    assert len(sources[target]) == widths[target] + 96


def test_permuted_reader_sees_the_same_input() -> None:
    rng = np.random.default_rng(0)
    perm = rng.permutation(6)
    x = rng.standard_normal((6, 4))  # channels x inner (2 x 2 spatial) features
    weight = rng.standard_normal((3, 24))
    x_new = x[perm]
    np.testing.assert_allclose(permute_input_channels(weight, perm, 1, 4) @ x_new.ravel(), weight @ x.ravel())
    conv = rng.standard_normal((5, 6, 3, 3))
    np.testing.assert_array_equal(permute_input_channels(conv, perm, 1)[:, 2], conv[:, perm[2]])


def test_widen_output_channels_copies_own_and_takes_fresh() -> None:
    weight, bias = np.arange(2 * 3 * 1 * 1, dtype=np.float32).reshape(2, 3, 1, 1), np.array([7, 8], np.float32)
    fresh = [np.full((4, 3, 1, 1), -1, np.float32), np.full(4, -2, np.float32)]
    own = np.array([-1, 0, 1, -1])
    new_weight, new_bias = widen_output_channels([weight, bias], own, fresh)
    np.testing.assert_array_equal(new_weight[1:3], weight)
    assert (new_weight[[0, 3]] == -1).all() and list(new_bias) == [-2, 7, 8, -2]


def test_layout_then_permuted_reader_equals_the_original_concat_read() -> None:
    """The whole contract in numbers: branch outputs widened by channel_layout and concatenated, then read by a
    conv whose input channels are permuted, give what the original Concat gave the original reader (freed
    channels zero on both sides)."""
    rng = np.random.default_rng(5)
    widths = [3, 4, 2, 5]
    for widen in ("3x3", "5x5", "balanced"):
        target = assign_freed(widths, [0, 3], [1, 2], {1: 9, 2: 25}, widen)
        kept, sources, perm = channel_layout(widths, target)
        offsets = np.cumsum([0, *widths])
        branches = [rng.standard_normal((w, 6)) for w in widths]
        original = np.concatenate([b if i in kept else np.zeros_like(b) for i, b in enumerate(branches)])
        widened = [np.where((own := own_channels(sources[k], offsets[k], widths[k]))[:, None] >= 0,
                            branches[k][np.maximum(own, 0)], 0.0) for k in kept]
        reader = rng.standard_normal((7, sum(widths)))
        np.testing.assert_allclose(permute_input_channels(reader, perm, 1) @ np.concatenate(widened),
                                   reader @ original, atol=1e-12)


def test_embed_permutation_moves_only_its_own_range() -> None:
    full = embed_permutation(np.array([2, 0, 1]), 4, 9)
    assert list(full) == [0, 1, 2, 3, 6, 4, 5, 7, 8]


def test_unknown_widen_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown widen mode"):
        assign_freed([1, 2], [0], [1], {1: 9}, "7x7")
