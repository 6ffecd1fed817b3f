"""The learning-rate (and loss) search of a phase, run in pycaffe: the probes behind ``search``'s decisions.

``search`` holds the rules (how many candidates, which rate wins, which loss); this module trains each candidate's
probe from the phase's start, scores it on the same held-out images, and hands the winner's weights on, so that
training goes on from its probe instead of starting over.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from deeprebirth.finetune.evaluator import Evaluator
from deeprebirth.finetune.options import DEFAULT_TEMPERATURE
from deeprebirth.finetune.phase_types import Allotment, PhaseData, PhaseSpec, Weights
from deeprebirth.finetune.search import (
    ADAPTIVE,
    LOW_AGREEMENT,
    LR_FACTORS,
    MOMENTUM_SOLVERS,
    REFERENCE_GRADIENT,
    RESCUE,
    Candidate,
    ProbePlan,
    choose,
    default_loss_first,
    improves,
    next_rate,
    next_solver,
    pick_rate,
    pick_solver,
    plan_probes,
    reference_rate,
    slower_rate,
)
from deeprebirth.finetune.train import SolverOptions
from deeprebirth.finetune.trainer import Trainer, eval_net, time_iterations

Notify = Callable[[str, dict[str, Any]], None]
Variant = Callable[[str], PhaseSpec]  # the phase's spec with another loss (``spec.LOSSES``)


@dataclass
class Choice:
    """What the search settled on, and the probe training goes on from."""

    spec: PhaseSpec
    options: SolverOptions  # solver and rate
    weights: Weights | None = None  # the winning probe's weights (None: start from the phase's start)
    done: int = 0  # the winning probe's iterations
    spent: int = 0  # iterations all probes took (an iteration budget pays for them)
    scores: dict[str, float] = field(default_factory=dict)  # candidate -> mean held-out search score
    note: str = ""
    seconds_per_iteration: float | None = None


def gradient_scale(spec: PhaseSpec) -> float:
    """``w·T + (1 - w)`` of the phase's loss (KD weight w at temperature T; see ``search.reference_rate``). KD at
    T=1 has T = 1; regression on the logits has no temperature and is rated as KD at ``DEFAULT_TEMPERATURE``, whose
    rates it was measured at: a run given ``--temperature 1`` probes it at a quarter of its rate in mimic mode (at
    that rate itself it diverged on both colour nets), and ``--loss regression`` starts from the same rate whatever
    ``--temperature`` says."""
    temperature = {"kd1": 1.0, "regression": DEFAULT_TEMPERATURE}.get(spec.output_loss, spec.temperature)
    if spec.objective == "kd":
        return temperature
    if spec.objective == "label":
        return spec.kd_weight * temperature + 1 - spec.kd_weight
    return REFERENCE_GRADIENT


def loss_rate(spec: PhaseSpec, loss: str, chosen: Candidate) -> float:
    """The rate another loss is probed at: the chosen rate times the ratio of the two losses' gradient scales
    (``gradient_scale``: KD at T=1 pulls less hard than KD at T=4, ``w + (1 - w)`` against ``w·T + (1 - w)``), the
    rate a run given that loss would start from (``search.reference_rate``), for SGD-type solvers. Probed at KD
    at T=4's rate, KD at T=1 lost on a rate too low for it, not on the loss."""
    if chosen.solver not in MOMENTUM_SOLVERS:
        return chosen.lr
    return float(f"{chosen.lr * gradient_scale(spec) / gradient_scale(replace(spec, output_loss=loss)):.3g}")


class Probes:
    """Trains candidates' probes from the phase's start and keeps their per-image held-out scores and weights."""

    def __init__(self, spec: PhaseSpec, data: PhaseData, options: SolverOptions, plan: ProbePlan, judge: Evaluator,
                 tag: str, notify: Notify, variant: Variant | None) -> None:
        self.spec, self.data, self.options, self.plan = spec, data, options, plan
        self.judge, self.tag, self.notify, self.variant = judge, tag, notify, variant
        judge(eval_net(spec, data.work, f"{tag}_start", None))
        self.start = judge.scores.copy()
        self.scores: dict[Candidate, np.ndarray] = {}
        self.misses: dict[Candidate, np.ndarray] = {}
        self.weights: dict[Candidate, Weights] = {}

    def spec_for(self, candidate: Candidate) -> PhaseSpec:
        return self.spec if candidate.loss == "kd" or self.variant is None else self.variant(candidate.loss)

    def run(self, candidate: Candidate) -> None:
        trial = self.spec_for(candidate)
        k = len(self.scores)
        options = replace(self.options, solver=candidate.solver, lr=candidate.lr, lr_policy="poly")
        trainer = Trainer(trial, self.data, options, self.plan.iterations, f"{self.tag}_lr{k}")
        finite = True
        while trainer.done < self.plan.iterations and finite:
            finite = bool(np.isfinite(trainer.step()))
        self.judge(eval_net(trial, self.data.work, f"{self.tag}_lr{k}", trainer))
        n = len(self.start)
        self.scores[candidate] = self.judge.scores.copy() if finite else np.full(n, np.inf)
        self.misses[candidate] = self.judge.misses.copy() if finite else np.ones(n)
        self.weights[candidate] = trainer.read()
        self.notify("search", {"lr": candidate.lr, "solver": candidate.solver,
                               "loss": float(np.mean(self.scores[candidate])), "objective": candidate.loss})

    def described(self, solver: str) -> dict[str, float]:
        """Each probe's mean held-out search score, by its description (for the report)."""
        return {c.describe(solver): float(np.mean(s)) for c, s in self.scores.items()}

    def pick_rate(self, reference: float, rescue: bool) -> Candidate:
        """``search.pick_rate`` over the probes run; Adam's rescue probe when no SGD rate improved on the start."""
        picked = pick_rate(self.scores, self.start, reference)
        if picked is None and rescue:
            adam = Candidate(*RESCUE)
            self.run(adam)
            picked = pick_rate({adam: self.scores[adam]}, self.start, RESCUE[1])
        return picked or min(self.scores, key=lambda c: c.lr)

    def other_losses(self) -> tuple[str, ...]:
        """The losses probed beside the phase's KD: KD at T=1 only where the phase does not distil at T=1 already
        (``--temperature 1``)."""
        return ("kd1", "regression") if self.spec.temperature != 1.0 else ("regression",)

    def pick_loss(self, chosen: Candidate) -> Candidate:
        """The other losses (``other_losses``) probed at the chosen rate, moved by their gradient scale
        (``loss_rate``), compared on top-1 misses: a smooth score would favour the loss it is made of."""
        contenders = [chosen]
        for loss in self.other_losses():
            contenders.append(Candidate(chosen.solver, loss_rate(self.spec, loss, chosen), loss))
            self.run(contenders[-1])
        return choose({c: self.misses[c] for c in contenders}, default_loss_first)


def search(spec: PhaseSpec, data: PhaseData, options: SolverOptions, allot: Allotment, evaluate: Evaluator | None,
           before: dict[str, float], eval_seconds: float, tag: str, notify: Notify,
           variant: Variant | None, refit_start: bool = False) -> Choice:
    """The phase's solver, rate and loss (see ``deeprebirth.finetune.search``), and the probe to go on from.
    ``refit_start``: the phase starts from a kept least-squares refit."""
    if options.lr is not None:
        return Choice(spec, options, note="rate given")
    rescue = options.solver in MOMENTUM_SOLVERS
    reference = reference_rate(options.solver, data.batch, gradient_scale(spec), spec.objective == "kd")
    # without a search: Adam's per-parameter steps are the safe choice for SGD's users; a refit start is close to
    # the original already, and the rescue rate stepped away from it (docs/decisions/adam-rescue.md). Users of
    # another solver get the lowest rate of its grid, from the label-mode reference (no search to back a higher one)
    rescue_from_refit = rescue and refit_start
    fallback = (replace(options, solver=RESCUE[0], lr=RESCUE[1] * (slower_rate(RESCUE[0]) if rescue_from_refit else 1))
                if rescue else
                replace(options, lr=reference_rate(options.solver, data.batch, gradient_scale(spec)) * LR_FACTORS[0]))
    seconds_per_iteration = None
    if allot.seconds is not None:
        seconds_per_iteration = time_iterations(spec, data, replace(options, lr=reference, lr_policy="fixed"), tag)
    if evaluate is None:
        return Choice(spec, fallback, note="no held-out data: no search",
                      seconds_per_iteration=seconds_per_iteration)
    if allot.seconds is not None:
        assert seconds_per_iteration is not None
        fit = allot.seconds / seconds_per_iteration
    else:
        fit = float(allot.iterations or 0)
    plan = plan_probes(options.solver, fit, seconds_per_iteration, eval_seconds / len(evaluate.indices),
                       len(evaluate.indices), reference)
    if not plan.candidates:
        why = " (a tenth of the rescue rate: the phase starts from a least-squares refit)" if rescue_from_refit else ""
        return Choice(spec, fallback, note=f"no search ({plan.reason}): {fallback.solver} {fallback.lr:g}{why}",
                      seconds_per_iteration=seconds_per_iteration)
    probes = Probes(spec, data, options, plan, Evaluator(spec, data, evaluate.indices[:plan.images]), tag, notify,
                    variant)
    while (candidate := next_rate(plan.candidates, probes.scores, probes.start, reference)) is not None:
        probes.run(candidate)
    chosen = probes.pick_rate(reference, rescue)
    note = f"{plan.reason}; reference rate {reference:.3g}"
    if not improves(probes.scores[chosen], probes.start):
        # every probe left the net worse than its start: going on from one would begin the run behind it
        slower = replace(options, solver=chosen.solver, lr=float(f"{chosen.lr * slower_rate(chosen.solver):.3g}"))
        note += (f"; no probe improved on the start: training starts from it at {slower.solver} {slower.lr:g} "
                 f"({1 / slower_rate(chosen.solver):g} times below {chosen.describe(options.solver)})")
        return Choice(spec, slower, None, 0, plan.iterations * len(probes.scores), probes.described(options.solver),
                      note, seconds_per_iteration)
    if spec.objective == "kd" and chosen.solver in MOMENTUM_SOLVERS:  # distillation without labels, SGD kept
        sgd = chosen
        while (candidate := next_solver(probes.scores, sgd)) is not None:
            probes.run(candidate)
        chosen = pick_solver(probes.scores, sgd)
        note += (f"; {chosen.describe(options.solver)} beat {sgd.describe(options.solver)} beyond the noise"
                 if chosen != sgd else f"; {ADAPTIVE[0]} probed, {sgd.describe(options.solver)} kept")
    if variant is not None and before.get("agreement", 1.0) < LOW_AGREEMENT:
        chosen = probes.pick_loss(chosen)
        against = ("KD at T=1 at the rate scaled to its pull" if "kd1" in probes.other_losses() else
                   "logit regression beside KD at T=1")
        note += f"; agreement at the start {before['agreement']:.0%}: losses compared ({against})"
    return Choice(probes.spec_for(chosen), replace(options, solver=chosen.solver, lr=chosen.lr),
                  probes.weights[chosen], plan.iterations, plan.iterations * len(probes.scores),
                  probes.described(options.solver), note, seconds_per_iteration)
