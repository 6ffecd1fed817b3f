"""One fine-tuning phase in pycaffe: learning-rate (and loss) search, training under a budget, held-out
checkpoints, and a back-off when training never improves on the start.

A phase gets a train net (the student, the original's outputs, the losses: see ``deeprebirth.finetune.losses``) and
an allotment of seconds or iterations, and:

1. **measures the start** on held-out data (``deeprebirth.finetune.evaluator``);
2. **searches the learning rate** unless one is given (``deeprebirth.finetune.search``: decayed probes compared
   image by image, the reference rate kept unless another is better beyond the noise; fewer candidates or none
   where iterations are expensive; where the slim net starts far from the original, the loss too); training then
   goes on from the winning probe's weights;
3. **trains** with the winner, decaying linearly to 0 over the iterations that fit in what is left (Caffe's "poly",
   power 1); under a time budget it measures its pace ``REPLANS`` times on the way and moves the end of the decay
   to where the deadline really falls (``Trainer.replan``: the solver's state carries over);
4. **evaluates on held-out data** a few times (about ``EVAL_SHARE`` of the allotment) and keeps the latest
   checkpoint that beats the start and is not worse than the best one beyond the noise (their per-image values
   compared as the search compares probes: picking the best of a few noisy means would keep an early checkpoint
   on a lucky draw and throw away the rest of the decay); after ``patience`` evaluations in a row worse than that
   beyond the noise, in the second half of the run
   (``STOP_AFTER``: a plateau while the rate is still high often ends as it decays) it stops early; when it has
   never improved on its start: then it **backs off** (``back_off``: from the start weights, SGD at a third of its
   rate, then Adam at 1e-4; other solvers a tenth of the rate) and goes on within the budget, at most
   ``MAX_BACKOFFS`` times; the outcome says so;
5. stops at its deadline whatever the schedule says, so the run ends on time.
"""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np

from deeprebirth.finetune.budget import EVAL_SHARE
from deeprebirth.finetune.evaluator import Evaluator
from deeprebirth.finetune.phase_types import (
    PATIENCE,
    Allotment,
    PhaseData,
    PhaseOutcome,
    PhaseSpec,
    Weights,
)
from deeprebirth.finetune.probes import Choice, Notify, Variant, search
from deeprebirth.finetune.search import MOMENTUM_SOLVERS, RESCUE, significantly_worse, slower_rate
from deeprebirth.finetune.train import SolverOptions
from deeprebirth.finetune.trainer import Trainer, eval_net, overlay, time_iterations

__all__ = ["PATIENCE", "Allotment", "PhaseData", "PhaseOutcome", "PhaseSpec", "run_phase"]

LAST_PHASE_PACE = 0.97  # the last phase plans ~3% more iterations than fit: its deadline, not its plan, ends the run
REPLANS = 8  # times a timed phase checks its pace against the deadline ...
REPLAN_TOLERANCE = 0.03  # ... and re-plans when the iterations that fit differ from the plan by more than this
MAX_EVALUATIONS = 8
MAX_BACKOFFS = 2
STOP_AFTER = 0.5  # early stopping only in the second half of a run: the decaying rate's later part often improves


def keeps(score: float, values: np.ndarray, kept: tuple[float, int] | None,
          leader: tuple[float, np.ndarray] | None) -> tuple[bool, tuple[float, np.ndarray] | None]:
    """Does a new checkpoint (its score and per-image values) replace the one ``kept`` (score, iteration; 0: the
    start)? And the new leader, the lowest-scoring checkpoint so far. The start is left only for a better mean (a
    run that stays flat must back off); after that the latest checkpoint wins unless it is worse than the leader
    beyond the noise (``search.significantly_worse``)."""
    if not np.isfinite(score) or (kept is not None and kept[1] == 0 and score >= kept[0]):
        return False, leader  # a diverged checkpoint (NaN) compares False with everything: say no outright
    if leader is None or score < leader[0]:
        leader = (score, values)
    if kept is not None and kept[1] != 0 and significantly_worse(values, leader[1]):
        return False, leader
    return True, leader


class Deadline:
    def __init__(self, seconds: float | None) -> None:
        self.end = None if seconds is None else time.monotonic() + seconds

    def left(self) -> float | None:
        return None if self.end is None else self.end - time.monotonic()


def run_phase(spec: PhaseSpec, data: PhaseData, options: SolverOptions, allot: Allotment, notify: Notify,
              variant: Variant | None = None, refit_start: bool = False) -> PhaseOutcome:
    """Run one phase (see the module docstring). ``notify(event, fields)`` reports "search", "iteration" and
    "evaluate" events. ``variant(loss)`` builds the phase with another loss, for the loss search.
    ``refit_start``: the phase starts from a kept least-squares refit (the search's fallback rate is lower)."""
    started = time.monotonic()
    deadline = Deadline(allot.seconds)
    tag = f"phase{spec.index}"
    has_val = data.val is not None and len(data.val_indices) > 0
    evaluate = Evaluator(spec, data, data.val_indices) if has_val else None
    before: dict[str, float] = {}
    eval_seconds = 0.0
    if evaluate is not None:
        t0 = time.monotonic()
        before = evaluate(eval_net(spec, data.work, tag, None))
        eval_seconds = time.monotonic() - t0
        if evaluate.cached is not None:  # later evaluations reuse the original's outputs
            eval_seconds -= evaluate.teacher_seconds
        notify("evaluate", {"iteration": 0, "metrics": before})
    choice = search(spec, data, options, allot, evaluate, before, eval_seconds, tag, notify, variant, refit_start)
    run = _TrainingRun(choice, data, allot, deadline, evaluate, before, eval_seconds, tag, notify)
    run.train()
    return run.outcome(time.monotonic() - started)


class _TrainingRun:
    """Training from the search's choice to the deadline: evaluations, the kept checkpoint, re-planning, back-off."""

    def __init__(self, choice: Choice, data: PhaseData, allot: Allotment, deadline: Deadline,
                 evaluate: Evaluator | None, before: dict[str, float], eval_seconds: float, tag: str,
                 notify: Notify) -> None:
        self.choice, self.data, self.allot, self.deadline = choice, data, allot, deadline
        self.evaluate, self.before, self.tag, self.notify = evaluate, before, tag, notify
        self.spec, self.options = choice.spec, choice.options
        self.eval_seconds = eval_seconds
        self.reserve = eval_seconds  # the last evaluation must fit before the deadline
        self.seconds_per_iteration = choice.seconds_per_iteration
        self.losses: list[float] = []
        self.history: list[dict[str, float]] = []
        self.backoffs: list[str] = []
        self.stopped_early = False
        self.count = 0  # iterations of this run (all trainers), the checkpoints' clock
        self.images_seconds = 0.0
        self.best: tuple[float, int, Weights] | None = None  # score, count, weights: the checkpoint kept
        self.leader: tuple[float, np.ndarray] | None = None  # the lowest-scoring checkpoint: score, per-image values

    # -- planning
    def _plan(self, evaluations_wanted: int) -> tuple[int, int]:
        """(iterations, evaluations) that fit in what is left of the allotment."""
        evaluations = 0 if self.evaluate is None else evaluations_wanted
        left = self.deadline.left()
        if left is None:
            assert self.allot.iterations is not None
            return max(1, self.allot.iterations - self.choice.spent - self.count), evaluations
        if self.seconds_per_iteration is None:
            self.seconds_per_iteration = time_iterations(self.spec, self.data, self.options, self.tag)
            left = self.deadline.left() or 0.0
        if self.evaluate is not None:
            evaluations = int(np.clip(EVAL_SHARE * left / max(self.eval_seconds, 1e-3), 1, evaluations_wanted))
        planned = (left - evaluations * self.eval_seconds) / self.seconds_per_iteration
        return max(1, int(planned / LAST_PHASE_PACE if self.allot.last else planned)), evaluations

    def _start_trainer(self, options: SolverOptions, iterations: int, init: Weights | None, start: int,
                       tag: str) -> None:
        self.trainer = Trainer(self.spec, self.data, options, iterations, tag,
                               init=None if init is None else overlay(self.spec.init, init), start=start)
        self.net = eval_net(self.spec, self.data.work, tag, self.trainer) if self.evaluate is not None else None

    # -- the loop
    def train(self) -> None:
        iterations, evaluations = self._plan(MAX_EVALUATIONS)
        self._start_trainer(self.options, iterations, self.choice.weights, self.choice.done, self.tag)
        if self.evaluate is not None and self.before:  # the phase's start (not the probe training went on from)
            start = {name: [np.array(b, dtype=np.float32) for b in self.spec.init(name)] for name in self.spec.learned
                     if name in self.trainer.net.params}
            self.best = (self.evaluate.score(self.before), 0, start)
        self._schedule(iterations, evaluations)
        while self.i < self.iterations:
            if self.deadline.end is not None and time.monotonic() + self.reserve > self.deadline.end:
                break
            last = self._step()
            if self.evaluate is not None and (self.i % self.every == 0 or last):
                verdict = self._checkpoint()
                if verdict == "restarted":
                    continue
                if verdict == "stop":
                    self.stopped_early = True
                    break
            if self.deadline.end is not None and not last and self.i % self.check_every == 0:
                self._follow_pace()
        self.images_seconds += self.trainer.images_seconds

    def _schedule(self, iterations: int, evaluations: int) -> None:
        """A fresh schedule for the current trainer: its length, and how often it evaluates and checks its pace."""
        self.iterations = iterations
        self.every = max(1, iterations // max(evaluations, 1))
        self.check_every = max(1, iterations // max(evaluations, REPLANS))
        self.since_best = 0
        self.i = 0  # iterations of the current trainer

    def _step(self) -> bool:
        """One solver update; True when it is the schedule's last (by count, or by what is left of the time)."""
        self.losses.append(self.trainer.step())
        self.i += 1
        self.count += 1
        left = self.deadline.left()
        self.notify("iteration", {"iteration": self.i, "iterations": self.iterations, "loss": self.losses[-1],
                                  "seconds_left": None if left is None else max(0.0, left)})
        return self.i == self.iterations or (left is not None and self.seconds_per_iteration is not None
                                             and left < self.reserve + self.seconds_per_iteration)

    def _checkpoint(self) -> str:
        """A held-out evaluation and what follows from it: "go" on, "restarted" after a back-off, or "stop"."""
        if self._evaluate():
            self.since_best = 0
            return "go"
        self.since_best += 1
        if not self.data.patience or self.since_best < self.data.patience:
            return "go"
        assert self.best is not None
        never_improved = self.best[1] == 0
        if never_improved and len(self.backoffs) < MAX_BACKOFFS and self.back_off(self.i):
            iterations, evaluations = self._plan(max(2, MAX_EVALUATIONS // 2))
            self._restart_after_backoff(iterations)
            self._schedule(iterations, evaluations)
            return "restarted"
        return "stop" if never_improved or self.i >= STOP_AFTER * self.iterations else "go"

    def _follow_pace(self) -> None:
        """Move the end of the rate's decay to where the deadline really falls."""
        target = self._refit(self.i, self.iterations, self.every)
        if target is None:
            return
        self.trainer.replan(target)
        if self.net is not None:
            self.net.share_with(self.trainer.net)
        self.every = max(1, self.every * target // self.iterations)
        self.check_every = max(1, self.check_every * target // self.iterations)
        self.iterations = target

    def _evaluate(self) -> bool:
        """One held-out evaluation; True when it is the best so far (then kept)."""
        assert self.evaluate is not None and self.net is not None
        t0 = time.monotonic()
        metrics = self.evaluate(self.net)
        self.reserve = time.monotonic() - t0  # later evaluations cost what this one did (the first built a net)
        metrics["iteration"] = self.count
        self.history.append(metrics)
        self.notify("evaluate", {"iteration": self.count, "metrics": metrics})
        score, values = self.evaluate.score(metrics), self.evaluate.values.copy()
        kept, self.leader = keeps(score, values, None if self.best is None else self.best[:2], self.leader)
        if kept:
            self.best = (score, self.count, self.trainer.read())
        return kept

    def _refit(self, i: int, iterations: int, every: int) -> int | None:
        """The plan came from a few timed iterations; the run so far says how many really fit."""
        assert self.deadline.end is not None
        self.seconds_per_iteration = self.trainer.images_seconds / max(self.trainer.done, 1) * 1.02
        evaluations_left = max(0, (iterations - i) // every) if self.evaluate is not None else 0
        fit = i + (self.deadline.end - time.monotonic() - (evaluations_left + 1) * self.reserve) / \
            self.seconds_per_iteration
        target = int(fit / LAST_PHASE_PACE if self.allot.last else fit)
        if target > i + 1 and abs(target - iterations) > REPLAN_TOLERANCE * iterations:
            return target
        return None

    def back_off(self, i: int) -> bool:
        """Never better than the start after ``patience`` evaluations: restart from the start with a safer
        solver or rate, when enough of the allotment is left for it to mean something."""
        options = self.options
        if options.solver in MOMENTUM_SOLVERS and self.backoffs:
            safer = replace(options, solver=RESCUE[0], lr=RESCUE[1])
        else:
            safer = replace(options, lr=options.base_lr() * slower_rate(options.solver))
        left = self.deadline.left()
        if left is not None and self.seconds_per_iteration is not None and \
                left < 2 * self.reserve + 8 * self.seconds_per_iteration:
            return False
        if left is None and (self.allot.iterations or 0) - self.choice.spent - self.count < 8:
            return False
        self.backoffs.append(f"no held-out improvement on the start after {i} iterations at {options.solver} "
                             f"{options.base_lr():g}: restarted from the start at {safer.solver} {safer.base_lr():g}")
        self.images_seconds += self.trainer.images_seconds
        self.options = safer
        return True

    def _restart_after_backoff(self, iterations: int) -> None:
        start = self.trainer.start + self.trainer.done
        self._start_trainer(self.options, iterations, None, start, f"{self.tag}_backoff{len(self.backoffs)}")

    def outcome(self, seconds: float) -> PhaseOutcome:
        if self.best is not None:
            weights, best_iteration = self.best[2], self.best[1]
            after = self.before if best_iteration == 0 else next(m for m in self.history
                                                                 if m["iteration"] == best_iteration)
        else:
            weights, best_iteration, after = self.trainer.read(), self.count, {}
        tenth = max(1, len(self.losses) // 10)
        images = self.count * self.data.batch
        return PhaseOutcome(weights, self.before, after, float(self.options.base_lr()), self.choice.scores,
                            self.count + self.choice.done,
                            self.options.solver, best_iteration, self.stopped_early,
                            float(np.mean(self.losses[:tenth])) if self.losses else float("nan"),
                            float(np.mean(self.losses[-tenth:])) if self.losses else float("nan"),
                            seconds, self.history, self.spec.loss, self.backoffs,
                            images / self.images_seconds if self.images_seconds > 0 else 0.0, self.choice.note)
