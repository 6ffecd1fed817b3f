"""Tucker-2 decomposition of convolution kernels and the choice of its ranks: pure numpy, no graph, no protobuf.

Kim et al. 2016 ("Compression of deep convolutional neural networks for fast and low power mobile applications")
decompose a kernel ``W`` (N, C, kh, kw) on its two channel modes only:

    W[n, c, :, :] ~= sum_{s, r} U_out[n, s] * G[s, r, :, :] * U_in[c, r]        U_in (C, R1), U_out (N, R2)

which is three convolutions: 1x1 C -> R1 (weights ``U_in^T``), kh x kw R1 -> R2 (weights ``G``, the original
stride, pad and dilation), 1x1 R2 -> N (weights ``U_out``, the original bias). Zero padding commutes with the first
1x1 (it has no bias), so with R1 = C and R2 = N the three reproduce the original exactly.

``G`` and the factors start from the HOSVD (leading left singular vectors of the mode-1 and mode-2 unfoldings) and
are refined by a few rounds of HOOI (Tucker ALS), each of which can only lower ``||W - W_hat||``.

Ranks (``RankMethod``):
    vbmf        Kim et al.'s choice: empirical variational Bayesian matrix factorisation (Nakajima, Tomioka,
                Sugiyama, Babacan 2013, "Global analytic solution of fully-observed variational Bayesian matrix
                factorization", JMLR 14) on each unfolding; the noise variance is estimated too, so the rank is the
                number of singular values above the noise's analytic threshold. Untrained (random) kernels are
                all noise: rank 0.
    vbmf:F      VBMF's ranks, raised on each unfolding to keep at least a fraction F of its squared singular values
                (the default, F = 0.5): VBMF reads the flat spectrum of a kernel trained on little data as noise
                and can leave a rank-1 bottleneck fine-tuning does not recover. Measured in
                docs/decisions/tucker-ranks.md.
    energy:F    the smallest rank on each unfolding keeping a fraction F of its squared singular values.
                With vbmf and energy a conv that reads the net's input keeps all its input channels (Kim et al.'s
                Tucker-1 for the first layer): a 3-row unfolding gives VBMF no noise to estimate, the colour
                channels of a photo net's stem carry about a third of the energy each (flowers17: 0.37, 0.33,
                0.31), and cutting one saves at most a third of the core's MACs on one layer.
    speedup:X   the largest R1, R2 with R1 / R2 ~= C / N whose three convolutions need at most 1/X of the MACs.
    ranks:R1,R2 the same ranks everywhere (clipped to C and N).
    full        R1 = C, R2 = N: exact, and more MACs than the original; for verifying the decomposition.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

HOOI_ROUNDS = 10


# ---------------------------------------------------------------------------------------------------------------
# rank methods


@dataclass(frozen=True)
class RankMethod:
    kind: str  # "vbmf", "energy", "speedup", "ranks", "full"
    value: float = 0.0  # energy: the fraction kept; vbmf: the fraction kept at least (0: pure VBMF); speedup: factor
    ranks: tuple[int, int] = (0, 0)  # ranks: (R1, R2)

    @property
    def needs_weights(self) -> bool:
        """vbmf and energy read the ranks off the trained kernel; the others only need the shapes."""
        return self.kind in ("vbmf", "energy")


RANK_METHODS = "vbmf, vbmf:F (0 <= F <= 1), energy:F (0 < F <= 1), speedup:X (X > 1), ranks:R1,R2, full"
DEFAULT_RANK_METHOD = "vbmf:0.5"


def parse_rank_method(text: str) -> RankMethod:
    """``"vbmf"``, ``"vbmf:0.5"``, ``"energy:0.9"``, ``"speedup:2"``, ``"ranks:16,32"``, ``"full"``; ValueError when malformed."""
    kind, _, arg = text.strip().partition(":")
    try:
        if kind in ("vbmf", "full") and not arg:
            return RankMethod(kind)
        if kind == "vbmf" and 0.0 <= float(arg) <= 1.0:
            return RankMethod(kind, float(arg))
        if kind == "energy" and 0.0 < float(arg) <= 1.0:
            return RankMethod(kind, float(arg))
        if kind == "speedup" and float(arg) > 1.0 and math.isfinite(float(arg)):
            return RankMethod(kind, float(arg))
        if kind == "ranks":
            r1, r2 = (int(part) for part in arg.split(","))
            if r1 > 0 and r2 > 0:
                return RankMethod(kind, ranks=(r1, r2))
    except ValueError:
        pass
    raise ValueError(f"unknown rank method {text!r} (known: {RANK_METHODS})")


# ---------------------------------------------------------------------------------------------------------------
# costs


@dataclass(frozen=True)
class ConvSize:
    """What the MACs of a convolution and of its decomposition depend on."""

    c: int  # input channels
    n: int  # output channels
    kernel: tuple[int, int]
    in_pixels: int  # batch x input height x input width
    out_pixels: int  # batch x output height x output width

    def macs(self) -> int:
        return self.out_pixels * self.n * self.c * self.kernel[0] * self.kernel[1]

    def tucker_macs(self, r1: int, r2: int, reduce: bool = True, expand: bool = True) -> int:
        """MACs of [1x1 C->R1 at the input's resolution] -> kh x kw -> [1x1 R2->N]; a piece left out (its factor
        folded into the core) drops its term and the core reads C or writes N channels instead."""
        core_in, core_out = (r1 if reduce else self.c), (r2 if expand else self.n)
        total = self.out_pixels * core_out * core_in * self.kernel[0] * self.kernel[1]
        if reduce:
            total += self.in_pixels * r1 * self.c
        if expand:
            total += self.out_pixels * self.n * r2
        return total


# ---------------------------------------------------------------------------------------------------------------
# rank selection


def unfold(tensor: np.ndarray, mode: int) -> np.ndarray:
    """Mode-``mode`` unfolding: (tensor.shape[mode], product of the other sizes)."""
    return np.moveaxis(tensor, mode, 0).reshape(tensor.shape[mode], -1)


def squared_singular_values(matrix: np.ndarray) -> np.ndarray:
    """min(rows, cols) squared singular values, largest first (eigenvalues of the smaller Gram matrix)."""
    y = np.asarray(matrix, dtype=np.float64)
    gram = y @ y.T if y.shape[0] <= y.shape[1] else y.T @ y
    return np.maximum(np.linalg.eigvalsh(gram)[::-1], 0.0)


def energy_rank(matrix: np.ndarray, fraction: float) -> int:
    """The smallest rank whose leading squared singular values hold ``fraction`` of the total."""
    s2 = squared_singular_values(matrix)
    total = float(s2.sum())
    if total == 0.0:
        return 0
    kept = np.cumsum(s2) / total
    return min(int(np.searchsorted(kept, fraction - 1e-12)) + 1, int(s2.size))


def _tau_bar(alpha: float) -> float:
    """EVBMF's threshold constant: the zero of the decreasing ``Phi(t) + Phi(t / alpha)``, Phi(x) = log(1+x)/x - 1/2
    (about 2.5129 sqrt(alpha))."""

    def xi(t: float) -> float:
        return math.log1p(t) / t + math.log1p(t / alpha) / (t / alpha) - 1.0

    lo, hi = 1e-9, 1e9
    for _ in range(200):
        mid = math.sqrt(lo * hi)
        if xi(mid) > 0:
            lo = mid
        else:
            hi = mid
    return math.sqrt(lo * hi)


def _evbmf_objective(sigma2: np.ndarray, s2: np.ndarray, m: int, alpha: float, x_bar: float) -> np.ndarray:
    """Twice the EVBMF free energy as a function of the noise variance, up to constants (L = H, no residual):
    sum_h psi(gamma_h^2 / (M sigma2)), psi(x) = x - log x + [x > x_bar] (log(tau+1) + alpha log(tau/alpha+1) - tau)."""
    x = s2[None, :] / (m * sigma2[:, None])
    big = x > x_bar
    xb = np.where(big, x, x_bar + 1.0)
    b = xb - (1.0 + alpha)
    tau = 0.5 * (b + np.sqrt(np.maximum(b * b - 4.0 * alpha, 0.0)))
    psi1 = np.log(tau + 1.0) + alpha * np.log(tau / alpha + 1.0) - tau
    return np.sum(x - np.log(x) + np.where(big, psi1, 0.0), axis=1)


def evbmf_rank(matrix: np.ndarray) -> int:
    """The rank empirical VBMF (noise variance estimated) keeps for ``matrix``: the number of singular values
    above ``sqrt(M sigma2 x_bar)``, with sigma2 minimising the free energy on Nakajima et al.'s bounds."""
    y = np.asarray(matrix, dtype=np.float64)
    if y.shape[0] > y.shape[1]:
        y = y.T
    big_l, m = y.shape
    s2 = squared_singular_values(y)
    if s2[0] <= 0.0:
        return 0
    alpha = big_l / m
    tau_bar = _tau_bar(alpha)
    x_bar = (1.0 + tau_bar) * (1.0 + alpha / tau_bar)
    upper = float(s2.sum()) / (big_l * m)
    xi = min(math.ceil(big_l / (1.0 + alpha)) - 1, big_l)  # the most components EVBMF can keep
    lower = upper * 1e-12
    if xi < big_l:
        lower = max(float(s2[xi]) / (m * x_bar), float(np.mean(s2[xi:])) / m, lower)
    lower = min(lower, upper)
    # the objective is not convex: a dense grid in log sigma2, then golden-section search around the best point
    grid = np.geomspace(lower, upper, 512)
    values = _evbmf_objective(grid, s2, m, alpha, x_bar)
    best = int(np.argmin(values))
    a, b = grid[max(best - 1, 0)], grid[min(best + 1, grid.size - 1)]
    ratio = (math.sqrt(5.0) - 1.0) / 2.0
    for _ in range(60):
        c, d = b - ratio * (b - a), a + ratio * (b - a)
        fc, fd = _evbmf_objective(np.array([c, d]), s2, m, alpha, x_bar)
        if fc < fd:
            b = d
        else:
            a = c
    sigma2 = (a + b) / 2.0
    if _evbmf_objective(np.array([sigma2]), s2, m, alpha, x_bar)[0] > values[best]:
        sigma2 = float(grid[best])
    return int(np.sum(s2 > m * sigma2 * x_bar))


def vbmf_ranks(weight: np.ndarray) -> tuple[int, int]:
    """(R1, R2): EVBMF on the input-channel (mode 1) and output-channel (mode 0) unfoldings of (N, C, kh, kw)."""
    return evbmf_rank(unfold(weight, 1)), evbmf_rank(unfold(weight, 0))


def energy_ranks(weight: np.ndarray, fraction: float) -> tuple[int, int]:
    return energy_rank(unfold(weight, 1), fraction), energy_rank(unfold(weight, 0), fraction)


def speedup_ranks(size: ConvSize, factor: float) -> tuple[int, int] | None:
    """The largest (R1, R2), R1 ~= R2 * C / N, whose decomposition needs at most ``macs / factor``; None if even
    rank 1 does not."""
    budget = size.macs() / factor
    for r2 in range(size.n, 0, -1):
        r1 = min(size.c, max(1, round(r2 * size.c / size.n)))
        if size.tucker_macs(r1, r2) <= budget:
            return r1, r2
    return None


def choose_ranks(method: RankMethod, weight: np.ndarray | None, size: ConvSize,
                 reads_image: bool = False) -> tuple[int, int] | None:
    """(R1, R2) clipped to (C, N), by ``method``; None when the method finds nothing to keep or cannot be met.
    ``weight`` may be None only for methods that do not need it. ``reads_image``: the conv reads the net's input,
    whose channels vbmf and energy keep whole (R1 = C)."""
    if method.kind == "full":
        return size.c, size.n
    if method.kind == "ranks":
        return min(method.ranks[0], size.c), min(method.ranks[1], size.n)
    if method.kind == "speedup":
        return speedup_ranks(size, method.value)
    assert weight is not None, "vbmf and energy need the kernel"
    if method.kind == "vbmf":
        r1, r2 = vbmf_ranks(weight)
        if method.value > 0.0:
            floor = energy_ranks(weight, method.value)
            r1, r2 = max(r1, floor[0]), max(r2, floor[1])
    else:
        r1, r2 = energy_ranks(weight, method.value)
    if r1 <= 0 or r2 <= 0:
        return None
    return (size.c if reads_image else min(r1, size.c)), min(r2, size.n)


# ---------------------------------------------------------------------------------------------------------------
# the decomposition


def _leading(matrix: np.ndarray, rank: int) -> np.ndarray:
    """The ``rank`` leading left singular vectors of ``matrix`` (rows x rank, orthonormal columns): eigenvectors of
    its Gram matrix, a complete orthonormal basis even where ``matrix`` has fewer columns than rows. Each one's sign
    is fixed (its entry of largest magnitude positive): LAPACK returns either sign, as its CPU kernels have it, and
    a written caffemodel should not depend on the machine that wrote it."""
    _, vectors = np.linalg.eigh(matrix @ matrix.T)
    leading = vectors[:, ::-1][:, :rank]
    signs = np.sign(leading[np.argmax(np.abs(leading), axis=0), np.arange(leading.shape[1])])
    return leading * np.where(signs == 0, 1.0, signs)  # type: ignore[no-any-return]


def tucker2(weight: np.ndarray, r1: int, r2: int,
            rounds: int = HOOI_ROUNDS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tucker-2 of a kernel (N, C, kh, kw) with ranks (R1 <= C, R2 <= N): HOSVD, then ``rounds`` of HOOI.

    Returns float32 ``(reduce (R1, C, 1, 1), core (R2, R1, kh, kw), expand (N, R2, 1, 1))``: the weights of the
    three convolutions.
    """
    w = np.asarray(weight, dtype=np.float64)
    n, c = w.shape[:2]
    if not (1 <= r1 <= c and 1 <= r2 <= n):
        raise ValueError(f"ranks ({r1}, {r2}) outside 1..({c}, {n})")
    u_in = _leading(unfold(w, 1), r1)
    u_out = _leading(unfold(w, 0), r2)
    for _ in range(rounds if (r1 < c or r2 < n) else 0):
        u_out = _leading(unfold(np.einsum("nchw,cr->nrhw", w, u_in, optimize=True), 0), r2)
        u_in = _leading(unfold(np.einsum("nchw,ns->schw", w, u_out, optimize=True), 1), r1)
    core = np.einsum("nchw,cr,ns->srhw", w, u_in, u_out, optimize=True)
    return (u_in.T[:, :, None, None].astype(np.float32), core.astype(np.float32),
            u_out[:, :, None, None].astype(np.float32))


def tucker2_compose(reduce: np.ndarray | None, core: np.ndarray, expand: np.ndarray | None) -> np.ndarray:
    """The single kernel (N, C, kh, kw) the three convolutions compute (a missing piece is the identity)."""
    w = np.asarray(core, dtype=np.float64)
    if reduce is not None:
        w = np.einsum("srhw,rc->schw", w, np.asarray(reduce, dtype=np.float64)[:, :, 0, 0], optimize=True)
    if expand is not None:
        w = np.einsum("schw,ns->nchw", w, np.asarray(expand, dtype=np.float64)[:, :, 0, 0], optimize=True)
    return w
