"""Tucker-2 weight math and rank selection (deeprebirth.weights.tucker), in numpy alone."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import planted

from deeprebirth.weights.tucker import (
    ConvSize,
    RankMethod,
    _tau_bar,
    choose_ranks,
    energy_rank,
    energy_ranks,
    evbmf_rank,
    parse_rank_method,
    speedup_ranks,
    squared_singular_values,
    tucker2,
    tucker2_compose,
    unfold,
    vbmf_ranks,
)


def test_tau_bar_matches_the_papers_approximation() -> None:
    for alpha in (1.0, 0.5, 0.25):
        assert _tau_bar(alpha) == pytest.approx(2.5129 * np.sqrt(alpha), rel=0.02)
    assert _tau_bar(1.0) == pytest.approx(2.5129, abs=1e-3)


@pytest.mark.parametrize("noise", [1e-3, 1e-2, 0.1])
def test_vbmf_recovers_planted_ranks(noise: float) -> None:
    assert vbmf_ranks(planted(noise=noise)) == (4, 6)


def test_vbmf_recovers_planted_ranks_on_a_rectangular_wide_kernel() -> None:
    w = planted(n=64, c=16, ranks=(5, 9), kernel=(1, 5), noise=0.02, seed=3)
    assert vbmf_ranks(w) == (5, 9)


def test_energy_recovers_planted_ranks() -> None:
    r1, r2 = energy_ranks(planted(noise=1e-3), 0.99)
    assert abs(r1 - 4) <= 1 and abs(r2 - 6) <= 1
    assert energy_ranks(planted(noise=1e-3), 1.0)[0] >= 4


def test_vbmf_finds_no_signal_in_noise() -> None:
    rng = np.random.default_rng(1)
    assert evbmf_rank(rng.standard_normal((64, 288))) == 0
    assert evbmf_rank(rng.standard_normal((288, 64))) == 0  # taller than wide: transposed
    assert evbmf_rank(np.zeros((8, 9))) == 0


def test_energy_rank_thresholds() -> None:
    m = np.diag([3.0, 2.0, 1.0, 0.0])  # squared: 9, 4, 1, 0 of 14
    assert energy_rank(m, 9 / 14) == 1
    assert energy_rank(m, 9 / 14 + 1e-6) == 2
    assert energy_rank(m, 13 / 14) == 2
    assert energy_rank(m, 1.0) == 3
    assert energy_rank(np.zeros((3, 3)), 0.9) == 0


@pytest.mark.parametrize("shape", [(6, 4, 3, 3), (5, 7, 3, 5), (3, 9, 1, 3)])
def test_full_ranks_reconstruct_exactly(shape: tuple[int, ...]) -> None:
    w = np.random.default_rng(2).standard_normal(shape)
    reduce, core, expand = tucker2(w, shape[1], shape[0])
    assert reduce.shape == (shape[1], shape[1], 1, 1) and core.shape == (shape[0], shape[1], *shape[2:])
    assert expand.shape == (shape[0], shape[0], 1, 1)
    assert np.abs(tucker2_compose(reduce, core, expand) - w).max() < 1e-5 * np.abs(w).max()


def test_reduced_ranks_approximate_and_hooi_improves_on_hosvd() -> None:
    w = planted(noise=0.2, seed=4)
    errors = {}
    for rounds in (0, 10):
        reduce, core, expand = tucker2(w, 4, 6, rounds=rounds)
        assert (reduce.shape, core.shape, expand.shape) == ((4, 24, 1, 1), (6, 4, 3, 3), (32, 6, 1, 1))
        errors[rounds] = np.linalg.norm(tucker2_compose(reduce, core, expand) - w)
    assert errors[10] <= errors[0] * (1 + 1e-6)
    clean = planted(noise=0.0, seed=4)
    assert np.linalg.norm(tucker2_compose(*tucker2(clean, 4, 6)) - clean) < 1e-4 * np.linalg.norm(clean)
    with pytest.raises(ValueError):
        tucker2(w, 25, 6)


def test_factors_are_orthonormal() -> None:
    reduce, _, expand = tucker2(planted(), 4, 6)
    u_in, u_out = reduce[:, :, 0, 0].T, expand[:, :, 0, 0]
    np.testing.assert_allclose(u_in.T @ u_in, np.eye(4), atol=1e-5)
    np.testing.assert_allclose(u_out.T @ u_out, np.eye(6), atol=1e-5)


def test_the_factors_do_not_depend_on_the_eigensolvers_signs(monkeypatch: pytest.MonkeyPatch) -> None:
    """An eigensolver that returns some eigenvectors negated (as another CPU's LAPACK may) gives the same weights."""
    w = planted()
    expected = tucker2(w, 4, 6)
    eigh = np.linalg.eigh
    rng = np.random.default_rng(1)

    def flipping(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        values, vectors = eigh(matrix)
        return values, vectors * rng.choice([-1.0, 1.0], size=vectors.shape[1])

    monkeypatch.setattr(np.linalg, "eigh", flipping)
    for got, want in zip(tucker2(w, 4, 6), expected):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


def test_macs_formula() -> None:
    size = ConvSize(c=16, n=32, kernel=(3, 3), in_pixels=2 * 20 * 20, out_pixels=2 * 10 * 10)
    assert size.macs() == 200 * 32 * 16 * 9
    assert size.tucker_macs(4, 8) == 800 * 16 * 4 + 200 * 8 * 4 * 9 + 200 * 32 * 8
    assert size.tucker_macs(16, 8, reduce=False) == 200 * 8 * 16 * 9 + 200 * 32 * 8
    assert size.tucker_macs(4, 32, expand=False) == 800 * 16 * 4 + 200 * 32 * 4 * 9


@pytest.mark.parametrize("factor", [1.5, 2.0, 4.0])
def test_speedup_ranks_meet_the_budget_in_proportion(factor: float) -> None:
    size = ConvSize(c=64, n=192, kernel=(3, 3), in_pixels=56 * 56, out_pixels=56 * 56)
    ranks = speedup_ranks(size, factor)
    assert ranks is not None
    r1, r2 = ranks
    assert size.tucker_macs(r1, r2) <= size.macs() / factor
    assert abs(r1 / r2 - 64 / 192) < 0.05
    bigger = min(64, round((r2 + 1) * 64 / 192))
    assert size.tucker_macs(bigger, r2 + 1) > size.macs() / factor  # the largest that fits


def test_speedup_out_of_reach() -> None:
    size = ConvSize(c=2, n=2, kernel=(2, 1), in_pixels=100, out_pixels=100)
    assert speedup_ranks(size, 10.0) is None


def test_choose_ranks_clips_and_needs_signal() -> None:
    size = ConvSize(c=8, n=12, kernel=(3, 3), in_pixels=100, out_pixels=100)
    assert choose_ranks(RankMethod("full"), None, size) == (8, 12)
    assert choose_ranks(parse_rank_method("ranks:100,5"), None, size) == (8, 5)
    noise = np.random.default_rng(0).standard_normal((12, 8, 3, 3))
    assert choose_ranks(RankMethod("vbmf"), noise, size) is None


def test_the_energy_floor_raises_vbmf_only_on_flat_spectra() -> None:
    """A flat spectrum (isotropic kernel): pure VBMF calls it all noise, the floor keeps half its energy. A kernel
    with clear low-rank structure over weak noise: VBMF's ranks already keep more than half, the floor changes
    nothing."""
    rng = np.random.default_rng(1)
    size = ConvSize(c=32, n=80, kernel=(3, 3), in_pixels=64, out_pixels=64)
    flat = rng.standard_normal((80, 32, 3, 3))
    assert choose_ranks(RankMethod("vbmf"), flat, size) is None
    floored = choose_ranks(RankMethod("vbmf", 0.5), flat, size)
    assert floored == energy_ranks(flat, 0.5)
    assert floored is not None and 8 <= floored[0] < 32 and 8 <= floored[1] < 80
    core = rng.standard_normal((6, 5, 3, 3))
    structured = np.einsum("srhw,ns,cr->nchw", core, rng.standard_normal((80, 6)), rng.standard_normal((32, 5)))
    structured += 0.01 * rng.standard_normal(structured.shape)
    pure = choose_ranks(RankMethod("vbmf"), structured, size)
    assert pure == (5, 6)
    assert choose_ranks(RankMethod("vbmf", 0.5), structured, size) == pure


@pytest.mark.parametrize("text, expected", [
    ("vbmf", RankMethod("vbmf")), ("vbmf:0.5", RankMethod("vbmf", 0.5)), ("vbmf:0", RankMethod("vbmf")),
    ("full", RankMethod("full")), ("energy:0.9", RankMethod("energy", 0.9)),
    ("speedup:2", RankMethod("speedup", 2.0)), ("ranks:16,32", RankMethod("ranks", ranks=(16, 32))),
])
def test_parse_rank_method(text: str, expected: RankMethod) -> None:
    assert parse_rank_method(text) == expected


@pytest.mark.parametrize("text", ["", "svd", "energy", "energy:1.5", "energy:0", "speedup:1", "speedup:inf",
                                  "ranks:4", "ranks:0,3", "ranks:a,b", "vbmf:2", "vbmf:-0.1"])
def test_parse_rank_method_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="unknown rank method"):
        parse_rank_method(text)


def test_vbmf_on_trained_kernels_keeps_some_but_not_all(assets: dict[str, str]) -> None:
    """On real trained weights (the open_nsfw ResNet-50) VBMF finds structure: ranks between 1 and full."""
    from deeprebirth.ir.model import load_model

    graph = load_model(assets["open_nsfw.prototxt"], assets["open_nsfw.caffemodel"])
    convs = [layer for layer in graph.layers() if layer.type == "Convolution" and layer.blobs is not None
             and layer.blobs[0].shape[2:] == (3, 3)][:6]
    assert convs
    for conv in convs:
        assert conv.blobs is not None
        n, c = conv.blobs[0].shape[:2]
        r1, r2 = vbmf_ranks(conv.blobs[0])
        assert 1 <= r1 < c and 1 <= r2 < n, (conv.name, r1, r2, c, n)


def test_importing_tucker_needs_no_caffe_or_scipy() -> None:
    code = ("import sys, deeprebirth.weights.tucker; "
            "print(json.dumps(sorted(m for m in ('caffe', 'scipy') if m in sys.modules)))")
    out = subprocess.check_output([sys.executable, "-c", "import json; " + code], cwd=Path(__file__).parents[2])
    assert json.loads(out) == []


def test_a_colour_stem_keeps_its_input_channels() -> None:
    """An RGB stem whose three input directions carry about a third of the energy each (flowers17's: 0.37, 0.33,
    0.31): the energy floor alone would cut it to two colour channels; where the conv reads the net's input, vbmf
    and energy keep all three (Tucker-1) and still cut the output mode. Elsewhere, and with explicit ranks, nothing
    changes."""
    rng = np.random.default_rng(2)
    size = ConvSize(c=3, n=32, kernel=(5, 5), in_pixels=1024, out_pixels=256)
    stem = rng.standard_normal((32, 3, 5, 5))
    share = squared_singular_values(unfold(stem, 1))
    assert share.min() / share.sum() > 0.25
    floor = energy_ranks(stem, 0.5)
    assert floor[0] == 2 and floor[1] < 32
    for method in (RankMethod("vbmf", 0.5), RankMethod("energy", 0.5)):
        assert choose_ranks(method, stem, size, reads_image=True) == (3, floor[1])
        assert choose_ranks(method, stem, size) == floor
    assert choose_ranks(parse_rank_method("ranks:2,8"), stem, size, reads_image=True) == (2, 8)
