"""Choosing a phase's learning rate, and where the slim net starts far from the original, its loss.

Each candidate (solver, rate, loss) trains a **probe**: ``n`` iterations from the phase's starting weights with the
rate decaying linearly to 0 (a miniature of the real run, so a probe ends settled instead of wherever a constant
rate left it), every probe on the same images in the same order and augmentations. Each probe is then scored per
held-out image (``Evaluator.scores``: one scale for every loss) and the candidates are compared image by image:

    d = scores(a) - scores(b);   a is worse than b when mean(d) > SIGNIFICANCE · std(d) / sqrt(len(d))

The **rate** (``pick_rate``) starts from the phase's reference rate (``reference_rate``: ``REFERENCE_LR`` scaled to
the batch and to the loss's gradient scale; the candidates are ``LR_FACTORS`` x it). The evidence is read one way
only: the reference stays while its probe improves the held-out score on the start; a higher rate replaces it only
when it beats it beyond the noise; a lower rate only when the reference itself made things worse than the start
(then the highest lower rate that improved). So noise picks nothing. A lower rate that merely wins its probe does
not replace the reference: taken (half a step down) without labels, it made the slim net follow the original more
closely but cost top-1 (docs/decisions/removed.md, "Half a step down"). The probes run in the order that
rule reads them (``next_rate``): the reference first, then the higher rates while it improved, else the lower ones
down to the first that improves. A probe whose result could not change the choice is not run: the choice is the
full grid's, at about half its cost where the reference holds (two probes of four; one of two).

**Cost** (``plan_probes``): the probes share ``SEARCH_SHARE`` of the phase's allotment, their training and their
evaluations (on up to ``SEARCH_IMAGES`` held-out images, each costing what the phase's first evaluation cost per
image), sized for the whole grid. Four rates when each probe still gets ``MIN_PROBE`` iterations, else two
(``FEW_FACTORS``), else no search: SGD's users then get Adam at 1e-4 (``RESCUE``), whose per-parameter steps need
no tuning to be safe, or a tenth of it where the phase starts from a kept least-squares refit (already close to the
original: at 1e-4 every evaluation of the 1000-way ImageNet-size stand-in was worse than its start, and where a
search fits after a refit it comes down to that tenth too; docs/decisions/adam-rescue.md). The winner is not
started over: training goes on from its probe's weights.

**Rescue**: when every SGD rate leaves the held-out score worse than at the start, Adam at 1e-4 is probed too
(why, measured: docs/decisions/adam-rescue.md). When no probe at all improved on the start (a least-squares refit
start on an ImageNet-size net), training does not go on from one: it starts from the phase's start at the chosen
rate times ``slower_rate`` (a tenth for Adam), as a back-off would after three evaluations, and no loss is probed.
**Solver without labels** (``pick_solver``): in mimic mode SGD's chosen rate is probed against Adam, its steps
relative to each layer's weights (``ADAPTIVE``): first at 3e-3; where that beats SGD beyond the noise, at 1e-2
too, which replaces it only beyond the noise again; where it does not, at 1e-3, which replaces SGD only beyond the
noise. Distilling the original's outputs, Adam at its best rate came closer to them than SGD at its best on all
four small nets measured, and the best rate differed from net to net (docs/decisions/adam-without-labels.md);
where SGD holds, its two probes cost two shares of the search.
**Losses**: where the slim net's top-1 agreement with the original starts below ``LOW_AGREEMENT``, KD at T=1
(unless the phase distils at T=1 already: ``--temperature 1``) and regression on the logits (``spec.LOSSES``) are
probed beside KD at the run's temperature, at the chosen rate moved by the loss's gradient scale
(``probes.loss_rate``), compared on per-image top-1 misses (the smooth search score is KL at T=1, itself one of the
losses, and would favour it): another loss replaces KD only when it misses fewer images beyond the noise.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

LR_FACTORS = (0.1, 0.3, 1.0, 3.0)
FEW_FACTORS = (0.3, 1.0)
REFERENCE_LR = {"sgd": 1e-2, "nesterov": 1e-2, "adam": 3e-4, "rmsprop": 3e-4, "adagrad": 1e-2, "adadelta": 1.0}
REFERENCE_LR_DISTILLING = {"adam": 1e-3}  # mimic mode: the lowest of Adam's best fixed rates on four nets
MOMENTUM_SOLVERS = ("sgd", "nesterov")
REFERENCE_BATCH = 32  # the batch REFERENCE_LR is for ...
REFERENCE_GRADIENT = 2.5  # ... and the loss's gradient scale: label mode's w·T + (1 - w) at w = 0.5, T = 4
RESCUE = ("adam", 1e-4)  # for SGD's users: without a search, or when every SGD rate diverges
ADAPTIVE = ("adam", 3e-3, (1e-3, 1e-2))  # without labels, probed against SGD's choice: solver, first rate, then
# the higher one after the first won, or the lower one after it lost
SEARCH_SHARE = 0.15  # of the phase's allotment (the winner's probe is not lost: training goes on from it)
MIN_PROBE = 8  # iterations per probe; fewer say nothing
MAX_PROBE = 200
SEARCH_IMAGES = 512  # held-out images that judge the probes, at most ...
MIN_SEARCH_IMAGES = 64  # ... and at least (else no search)
SIGNIFICANCE = 2.0  # z of a paired difference that counts as real (about 2.3% one-sided by chance)
LOW_AGREEMENT = 0.5  # below this starting agreement with the original, the loss is searched too


@dataclass(frozen=True)
class Candidate:
    solver: str
    lr: float
    loss: str = "kd"

    def describe(self, default_solver: str, default_loss: str = "kd") -> str:
        words = [] if self.solver == default_solver else [self.solver]
        words.append(f"{self.lr:g}")
        if self.loss != default_loss:
            words.append(self.loss)
        return " ".join(words)


@dataclass(frozen=True)
class ProbePlan:
    candidates: tuple[Candidate, ...]  # empty: no search
    iterations: int  # per probe
    images: int  # held-out images per probe evaluation
    reason: str  # why this many candidates (or none)


def reference_rate(solver: str, batch: int, gradient_scale: float, distilling: bool = False) -> float:
    """The solver's reference rate for a phase. SGD-type rates follow the batch (the linear scaling rule: a batch
    of 8 takes a quarter of a batch of 32's rate: the same step per image) and the loss's gradient scale
    (``w·T + (1 - w)`` for KD weight w at temperature T: distillation alone at T=4 pulls 4 / 2.5 times as hard as
    label mode's half-and-half mix, so it takes 2.5 / 4 of the rate). Adaptive solvers (Adam, ...) normalise their
    steps: their reference stands, except Adam's when ``distilling`` (mimic mode), ``REFERENCE_LR_DISTILLING``:
    its best fixed rate there was 1e-3 to 1e-2, and the grid reads upward from the reference only on evidence
    (docs/decisions/adam-without-labels.md)."""
    rates = {**REFERENCE_LR, **REFERENCE_LR_DISTILLING} if distilling else REFERENCE_LR
    rate = rates.get(solver, 1e-3)
    if solver in MOMENTUM_SOLVERS:
        rate *= batch / REFERENCE_BATCH * REFERENCE_GRADIENT / gradient_scale
    return rate


def rate_candidates(solver: str, reference: float, factors: Sequence[float]) -> tuple[Candidate, ...]:
    return tuple(Candidate(solver, float(f"{reference * f:.3g}")) for f in factors)


def plan_probes(solver: str, fit_iterations: float, seconds_per_iteration: float | None,
                seconds_per_image: float, held_out: int, reference: float) -> ProbePlan:
    """How many candidates, probe iterations and probe images the search can afford (see the module docstring).
    ``fit_iterations``: the phase's allotment in iterations; ``seconds_per_iteration`` None for iteration budgets
    (then evaluations cost no iterations)."""
    for factors in (LR_FACTORS, FEW_FACTORS):
        k = len(factors)
        images = min(SEARCH_IMAGES, held_out)
        if seconds_per_iteration is None:
            iterations = SEARCH_SHARE * fit_iterations / k
        else:
            share = SEARCH_SHARE * fit_iterations * seconds_per_iteration
            # evaluations take at most half of the search's time; the rest trains
            images = min(images, int(share / 2 / (k * max(seconds_per_image, 1e-9))))
            iterations = (share - k * images * seconds_per_image) / (k * seconds_per_iteration)
        if iterations >= MIN_PROBE and images >= min(MIN_SEARCH_IMAGES, held_out) and images > 0:
            return ProbePlan(rate_candidates(solver, reference, factors), int(min(iterations, MAX_PROBE)), images,
                             f"up to {k} rates x {int(min(iterations, MAX_PROBE))} iterations, judged on {images} "
                             "held-out images")
    why = ("no held-out data" if held_out == 0 else
           f"too few iterations fit for a search ({fit_iterations:.0f} in the phase)")
    return ProbePlan((), 0, 0, why)


def significantly_worse(a: np.ndarray, b: np.ndarray, z: float = SIGNIFICANCE) -> bool:
    """Is candidate ``a`` worse than ``b`` beyond the noise of their paired per-image scores?"""
    if not np.all(np.isfinite(a)):
        return bool(np.all(np.isfinite(b)))
    if not np.all(np.isfinite(b)):
        return False
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    if len(d) < 2:
        return bool(np.mean(d) > 0)
    spread = float(np.std(d, ddof=1)) / math.sqrt(len(d))
    return bool(np.mean(d) > z * spread)


def choose(scores: dict[Candidate, np.ndarray], preference: Callable[[Candidate], tuple[float, ...]]) -> Candidate:
    """The contender (no worse than the best beyond the noise) that ``preference`` ranks first."""
    finite = {c: s for c, s in scores.items() if np.all(np.isfinite(s))} or scores
    best = min(finite, key=lambda c: float(np.mean(finite[c])))
    contenders = [c for c in finite if not significantly_worse(finite[c], finite[best])]
    return min(contenders, key=preference)


def improves(probe: np.ndarray, start: np.ndarray) -> bool:
    """Did a probe end (finite and) below the start's mean held-out score?"""
    return bool(np.all(np.isfinite(probe)) and float(np.mean(probe)) < float(np.mean(start)))


def pick_rate(scores: dict[Candidate, np.ndarray], start: np.ndarray, reference: float) -> Candidate | None:
    """The rate rule (see the module docstring): the reference while its probe improves on the start; a higher rate
    only when it beats the reference beyond the noise; a lower one only when the reference does not improve on the
    start (then the highest lower rate that does). None: nothing improved on the start."""
    improved = sorted((c for c, s in scores.items() if improves(s, start)), key=lambda c: c.lr)
    at_reference = [c for c in improved if math.isclose(c.lr, reference, rel_tol=1e-2)]
    if not at_reference:
        lower = [c for c in improved if c.lr < reference]
        return lower[-1] if lower else None
    chosen = at_reference[0]
    for higher in (c for c in improved if c.lr > chosen.lr):
        if significantly_worse(scores[chosen], scores[higher]):
            chosen = higher
    return chosen


def next_rate(candidates: Sequence[Candidate], scores: dict[Candidate, np.ndarray], start: np.ndarray,
              reference: float) -> Candidate | None:
    """The next candidate whose probe ``pick_rate`` would read, given the probes run so far; None once the choice is
    settled (``pick_rate`` over the probes run then equals ``pick_rate`` over the whole grid)."""
    def improved(c: Candidate) -> bool:
        return improves(scores[c], start)

    at_reference = [c for c in candidates if math.isclose(c.lr, reference, rel_tol=1e-2)]
    if not at_reference:  # no reference in the grid: nothing to read outward from
        return next((c for c in candidates if c not in scores), None)
    if at_reference[0] not in scores:
        return at_reference[0]
    if improved(at_reference[0]):
        higher = sorted((c for c in candidates if c.lr > at_reference[0].lr), key=lambda c: c.lr)
        return next((c for c in higher if c not in scores), None)
    lower = sorted((c for c in candidates if c.lr < at_reference[0].lr), key=lambda c: -c.lr)
    for c in lower:
        if c not in scores:
            return c
        if improved(c):
            return None
    return None


def adaptive_order(scores: dict[Candidate, np.ndarray], chosen: Candidate) -> tuple[list[Candidate], Candidate]:
    """Adam's probes in the order ``pick_solver`` reads them, and what they are measured against: the first rate
    against SGD's ``chosen``; after it won, the higher rate against it; after it lost, the lower against SGD's."""
    solver, first, others = ADAPTIVE
    head = Candidate(solver, first)
    if head not in scores or not significantly_worse(scores[chosen], scores[head]):
        return [head, *(Candidate(solver, lr) for lr in sorted(others, reverse=True) if lr < first)], chosen
    return [head, *(Candidate(solver, lr) for lr in sorted(others) if lr > first)], head


def pick_solver(scores: dict[Candidate, np.ndarray], chosen: Candidate) -> Candidate:
    """Without labels: SGD's ``chosen`` rate, or the Adam probe that beats it beyond the noise (``ADAPTIVE``): the
    first rate, the higher one where that beats the first too, the lower one where the first lost."""
    order, best = adaptive_order(scores, chosen)
    for candidate in order[1:]:
        if candidate not in scores or not significantly_worse(scores[best], scores[candidate]):
            break
        best = candidate
    return best


def next_solver(scores: dict[Candidate, np.ndarray], chosen: Candidate) -> Candidate | None:
    """The next of Adam's probes ``pick_solver`` would read; None once its choice is settled."""
    order, best = adaptive_order(scores, chosen)
    for candidate in order:
        if candidate not in scores:
            return candidate
        if candidate != order[0]:
            if not significantly_worse(scores[best], scores[candidate]):
                return None
            best = candidate
    return None


def slower_rate(solver: str) -> float:
    """The factor a rate comes down by when training from it never improved on the start (``phase.back_off``) or
    when no probe did: a third for SGD and its kin, a tenth for adaptive solvers, whose per-parameter steps
    do not shrink as the gradients do."""
    return 1 / 3 if solver in MOMENTUM_SOLVERS else 1 / 10


def default_loss_first(candidate: Candidate) -> tuple[float, ...]:
    """Loss preference among contenders: the default (KD at ``--temperature``) first."""
    return (0.0 if candidate.loss == "kd" else 1.0,)
