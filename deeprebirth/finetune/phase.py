"""One fine-tuning phase in pycaffe: learning-rate search, training under a budget, held-out checkpoints.

A phase gets a train net (the student, the frozen teacher, the losses: see ``deeprebirth.finetune.losses``) and an
allotment of seconds or iterations, and:

1. **searches the learning rate** unless one is given: from the phase's starting weights, each candidate
   (``LR_FACTORS`` x the solver's reference rate) trains a few iterations at a constant rate; the one with the
   lowest held-out loss afterwards wins (at most ``SEARCH_SHARE`` of the allotment; where that buys fewer than
   ``MIN_PROBE`` iterations per candidate, or there is no held-out data, the lowest rate is used). With
   SGD (the default) there is a rescue: when every rate leaves the held-out loss worse than at the start (seen on
   a BatchNorm-folded ResNet-50 whose merged first conv, reading raw pixels, has gradients 40,000x its weights:
   SGD diverged at every rate, Adam did not), or when there is no search, Adam at 1e-4 is used instead;
2. **trains** with the winner, decaying linearly to 0 over the iterations that fit in what is left (Caffe's "poly",
   power 1), on augmented batches (the transform's random crop and mirror); under a time budget it measures its
   pace ``REPLANS`` times on the way and moves the end of the decay to where the deadline really falls;
3. **evaluates on held-out data** a few times (about ``EVAL_SHARE`` of the allotment) and keeps the best
   checkpoint; it stops early when the held-out score has not improved for ``patience`` evaluations in a row;
4. stops at its deadline whatever the schedule says, so the run ends on time.

Held-out metrics, from a TEST-phase copy of the student that shares the train net's weights (``share_with``) and the
original net run beside it: top-1 (with labels), top-1 agreement with the original, the distillation loss, the
relative squared error of the logits ("error at the output") and at the blobs the phase compares.

Kept as one module: the search, the training and the evaluations share one trainer, one clock and one allotment, and
their interplay (replanning the decay, early stopping) is the phase.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from deeprebirth import caffe_io
from deeprebirth import caffe_pb2 as pb
from deeprebirth.caffe_runtime import import_caffe
from deeprebirth.data import Batches
from deeprebirth.evaluate import set_input
from deeprebirth.finetune.budget import EVAL_SHARE, SEARCH_SHARE
from deeprebirth.finetune.losses import distillation_loss, softmax
from deeprebirth.train import SolverOptions, load_params, make_solver

LR_FACTORS = (0.1, 0.3, 1.0, 3.0)
REFERENCE_LR = {"sgd": 1e-2, "nesterov": 1e-2, "adam": 3e-4, "rmsprop": 3e-4, "adagrad": 1e-2, "adadelta": 1.0}
MOMENTUM_SOLVERS = ("sgd", "nesterov")
RESCUE = ("adam", 1e-4)  # for SGD's users: without a search, or when every SGD rate diverges
MIN_PROBE = 3  # fewer iterations per candidate than this say nothing: then no search
PATIENCE = 3
LAST_PHASE_PACE = 0.97  # the last phase plans ~3% more iterations than fit: its deadline, not its plan, ends the run
REPLANS = 8  # times a timed phase checks its pace against the deadline ...
REPLAN_TOLERANCE = 0.03  # ... and re-plans when the iterations that fit differ from the plan by more than this
MAX_EVALUATIONS = 8
SEARCH_IMAGES = 256  # held-out images that judge the learning-rate candidates
Weights = dict[str, list[np.ndarray]]


@dataclass
class PhaseSpec:
    """Everything a phase trains and measures; layer names are the train net's."""

    index: int
    name: str
    train_net: pb.NetParameter
    losses: dict[str, float]  # loss top -> loss weight (Caffe's top holds the unweighted value)
    init: Callable[[str], list[np.ndarray]]  # parameters of any layer of the train or eval net
    learned: list[str]  # layers that learn (read back at the end)
    eval_net: pb.NetParameter  # the student alone, TEST phase, no losses
    logits: str | None  # the student's logits in eval_net (None: the phase does not reach them)
    teacher_logits: str  # the original's logits (Caffe blob of the original)
    compare: dict[str, tuple[str, str]]  # metric -> (blob in eval_net, blob of the original)
    objective: str  # "label" (labels + distillation), "kd", or a key of ``compare``
    labels: bool  # the train net reads labels
    temperature: float
    kd_weight: float


@dataclass
class Allotment:
    seconds: float | None = None  # a time budget's share (then iterations is None)
    iterations: int | None = None
    last: bool = False  # the run's last phase: time it leaves over is lost, so it plans to run into its deadline


@dataclass
class PhaseOutcome:
    weights: Weights  # the learned layers' parameters at the best checkpoint
    before: dict[str, float]  # held-out metrics at the start and at the kept checkpoint
    after: dict[str, float]
    lr: float
    lr_search: dict[str, float]  # candidate rate -> held-out loss after the short run
    iterations: int
    solver: str  # the solver that trained (SGD's users may get the Adam rescue)
    best_iteration: int
    stopped_early: bool
    loss_start: float
    loss_end: float
    seconds: float
    evaluations: list[dict[str, float]] = field(default_factory=list)


@dataclass
class PhaseData:
    work: Path
    input: str  # the student's input blob
    train: Batches
    train_indices: np.ndarray
    val: Batches | None
    val_indices: np.ndarray
    teacher: Any  # deeprebirth.finetune.context.Teacher
    batch: int
    seed: int
    cache_bytes: float
    patience: int = PATIENCE  # 0: never stop early
    shuffle: bool = True  # False: the training images in their order (as Caffe reads an LMDB)


class Evaluator:
    """Held-out metrics of a student net against the original, on a fixed set of images. The original's outputs
    are computed once (kept in memory within ``cache_bytes``)."""

    def __init__(self, spec: PhaseSpec, data: PhaseData, indices: np.ndarray) -> None:
        self.spec, self.data, self.indices = spec, data, indices
        assert data.val is not None
        self.val = data.val
        self.labels = self.val.labels(indices) if self.val.data.labels is not None else None
        blobs = [spec.teacher_logits] + [original for _, original in spec.compare.values()]
        self.teacher_blobs = list(dict.fromkeys(blobs))
        self.chunks = [indices[i:i + data.batch] for i in range(0, len(indices), data.batch)]
        self.cached: list[dict[str, np.ndarray]] | None = None
        self.cache_ok = True
        self.teacher_seconds = 0.0  # spent running the original (once, while its outputs fit the cache)

    def _teacher(self, k: int, x: np.ndarray) -> dict[str, np.ndarray]:
        if self.cached is not None and k < len(self.cached):
            return self.cached[k]
        started = time.monotonic()
        out = self.data.teacher.outputs(x, self.teacher_blobs)
        self.teacher_seconds += time.monotonic() - started
        if self.cache_ok:
            self.cached = self.cached or []
            self.cached.append(out)
            size = sum(a.nbytes for chunk in self.cached for a in chunk.values())
            if size > self.data.cache_bytes:
                self.cached, self.cache_ok = None, False
        return out

    def __call__(self, net: Any) -> dict[str, float]:
        spec = self.spec
        logits, teacher_logits = [], []
        sums = {name: np.zeros(3) for name in spec.compare}  # squared error, sum and sum of squares of the target
        counts = dict.fromkeys(spec.compare, 0)
        for k, chunk in enumerate(self.chunks):
            x = self.val.batch(chunk)
            set_input(net, self.data.input, x)
            net.forward()
            target = self._teacher(k, x)
            if spec.logits is not None:
                logits.append(np.array(net.blobs[spec.logits].data, dtype=np.float64).reshape(len(chunk), -1))
            teacher_logits.append(target[spec.teacher_logits].astype(np.float64).reshape(len(chunk), -1))
            for name, (blob, original) in spec.compare.items():
                a = np.asarray(net.blobs[blob].data, dtype=np.float64)
                b = target[original].astype(np.float64)
                sums[name] += (float(np.sum((a - b) ** 2)), float(np.sum(b)), float(np.sum(b * b)))
                counts[name] += b.size
        metrics: dict[str, float] = {}
        for name, (error, total, squares) in sums.items():
            mean = total / counts[name]
            metrics[f"{name}_error"] = float(error / counts[name] / max(squares / counts[name] - mean ** 2, 1e-12))
        if spec.logits is not None:
            z, t = np.concatenate(logits), np.concatenate(teacher_logits)
            metrics["kd"] = distillation_loss(z, t, spec.temperature)
            metrics["agreement"] = float(np.mean(z.argmax(1) == t.argmax(1)))
            metrics["output_error"] = float(np.mean((z - t) ** 2) / max(float(np.var(t)), 1e-12))
            if self.labels is not None:
                metrics["accuracy"] = float(np.mean(z.argmax(1) == self.labels))
                metrics["ce"] = float(-np.mean(np.log(softmax(z)[np.arange(len(z)), self.labels] + 1e-12)))
        metrics["loss"] = self.loss(metrics)
        return metrics

    def loss(self, metrics: dict[str, float]) -> float:
        """The phase's objective on held-out data (lower is better)."""
        spec = self.spec
        if spec.objective == "label" and "ce" in metrics:
            return (1 - spec.kd_weight) * metrics["ce"] + spec.kd_weight * metrics["kd"]
        if spec.objective in ("label", "kd") and "kd" in metrics:
            return metrics["kd"]
        return metrics.get(f"{spec.objective}_error", float("nan"))

    def score(self, metrics: dict[str, float]) -> float:
        """What picks the kept checkpoint (lower is better): top-1 where labels train, else the objective."""
        if self.spec.objective == "label" and "accuracy" in metrics:
            return -metrics["accuracy"] + 1e-6 * metrics["loss"]
        return metrics["loss"]


class _Trainer:
    """A solver over the phase's train net, fed with augmented batches."""

    def __init__(self, spec: PhaseSpec, data: PhaseData, options: SolverOptions, iterations: int, tag: str,
                 seed: int) -> None:
        self.spec, self.data = spec, data
        # Caffe's own seed (Dropout, the fillers) is the run's --seed for the phase's training (``seed`` 0), as in
        # the phase's exported solver
        self.options, self.tag, self.seed = options, tag, data.seed + seed
        self.solver = make_solver(data.work, tag, spec.train_net, options, iterations, self.seed)
        self.net = self.solver.net
        load_params(self.net, spec.init)
        rng = np.random.default_rng([data.seed, spec.index, seed])
        self.order = (data.train_indices[rng.permutation(len(data.train_indices))] if data.shuffle
                      else data.train_indices)
        self.rng = rng
        self.done = 0

    def step(self) -> float:
        data = self.data
        start = (self.done * data.batch) % len(self.order)
        idx = np.take(self.order, np.arange(start, start + data.batch), mode="wrap")
        self.net.blobs[data.input].data[...] = data.train.batch(idx, self.rng)
        if self.spec.labels:
            self.net.blobs["label"].data[...] = data.train.labels(idx).astype(np.float32)
        self.solver.step(1)
        self.done += 1
        return sum(float(self.net.blobs[top].data) * w for top, w in self.spec.losses.items())

    def read(self) -> Weights:
        return {name: [np.array(b.data, dtype=np.float32) for b in self.net.params[name]]
                for name in self.spec.learned if name in self.net.params}

    def replan(self, iterations: int) -> None:
        """Go on towards a new horizon of ``iterations``. Caffe fixes ``max_iter`` when a solver is made, so the
        solver is snapshotted and restored into one with the new horizon: the iteration count, the momentum (Adam's
        moments too) and the weights carry over, and the poly rate goes on decaying to 0 at the new end."""
        work = self.data.work
        self.solver.snapshot()
        done = self.solver.iter
        state, model = (work / f"{self.tag}_iter_{done}.{suffix}" for suffix in ("solverstate", "caffemodel"))
        self.solver = make_solver(work, self.tag, self.spec.train_net, self.options, iterations, self.seed)
        self.solver.restore(str(state))
        self.net = self.solver.net
        state.unlink()
        model.unlink()


def _time_iterations(trainer: _Trainer) -> float:
    """Seconds per iteration, for planning a time budget: the first iteration (allocations) is not timed, and the
    estimate leans low (the fastest of three), so that a phase plans rather too many iterations, which its deadline
    cuts short, than too few, which would leave the budget unused."""
    trainer.step()
    times = []
    for _ in range(3):
        started = time.monotonic()
        trainer.step()
        times.append(time.monotonic() - started)
    return min(times)


def _eval_net(spec: PhaseSpec, work: Path, tag: str, trainer: _Trainer | None) -> Any:
    caffe = import_caffe()
    path = work / f"{tag}_eval.prototxt"
    caffe_io.write_prototxt(path, spec.eval_net)
    net = caffe.Net(str(path), caffe.TEST)
    load_params(net, spec.init)
    if trainer is not None:
        net.share_with(trainer.net)
    return net


def run_phase(spec: PhaseSpec, data: PhaseData, options: SolverOptions, allot: Allotment,
              notify: Callable[[str, dict[str, Any]], None]) -> PhaseOutcome:
    """Run one phase (see the module docstring). ``notify(event, fields)`` reports "search", "iteration" and
    "evaluate" events; iteration events carry ``seconds_left`` for time budgets."""
    started = time.monotonic()
    deadline = None if allot.seconds is None else started + allot.seconds
    tag = f"phase{spec.index}"
    has_val = data.val is not None and len(data.val_indices) > 0
    evaluate = Evaluator(spec, data, data.val_indices) if has_val else None
    probe_eval = Evaluator(spec, data, data.val_indices[:SEARCH_IMAGES]) if has_val else None

    # starting point, and the cost of one full evaluation
    before: dict[str, float] = {}
    eval_seconds = 0.0
    if evaluate is not None:
        t0 = time.monotonic()
        before = evaluate(_eval_net(spec, data.work, tag, None))
        eval_seconds = time.monotonic() - t0
        if evaluate.cached is not None:  # later evaluations reuse the original's outputs
            eval_seconds -= evaluate.teacher_seconds
        notify("evaluate", {"iteration": 0, "metrics": before})

    # the learning rate (and, for plain SGD, whether it trains at all)
    search: dict[str, float] = {}
    lr = options.lr
    seconds_per_iter: float | None = None
    budget_iters = allot.iterations
    if lr is None:
        rescue = options.solver in MOMENTUM_SOLVERS
        candidates = [(options.solver, REFERENCE_LR.get(options.solver, 1e-3) * f) for f in LR_FACTORS]
        # without a search: Adam's per-parameter steps are the safe choice for SGD's users
        options, lr = (replace(options, solver=RESCUE[0]), RESCUE[1]) if rescue else (options, candidates[0][1])
        if probe_eval is not None:
            results: dict[tuple[str, float], float] = {}
            probe = 0

            def try_candidate(k: int, solver: str, rate: float) -> bool:
                """Probe one (solver, rate); False when iterations are too slow for a search at all."""
                nonlocal probe, seconds_per_iter
                trainer = _Trainer(spec, data, replace(options, solver=solver, lr=rate, lr_policy="fixed"), 10**6,
                                   f"{tag}_lr{k}", k)
                if budget_iters is not None:
                    probe = int(np.clip(SEARCH_SHARE * budget_iters / len(candidates), 3, 50))
                elif seconds_per_iter is None:
                    seconds_per_iter = _time_iterations(trainer)
                    assert allot.seconds is not None
                    probe = int(min(SEARCH_SHARE * allot.seconds / (len(candidates) * seconds_per_iter), 50))
                    if probe < MIN_PROBE:
                        return False
                while trainer.done < probe:
                    if not np.isfinite(trainer.step()):
                        break
                metrics = probe_eval(_eval_net(spec, data.work, f"{tag}_lr{k}", trainer))
                results[(solver, rate)] = metrics["loss"] if np.isfinite(metrics["loss"]) else float("inf")
                notify("search", {"lr": rate, "solver": solver, "loss": results[(solver, rate)]})
                return True

            for k, (solver, rate) in enumerate(candidates):
                if not try_candidate(k, solver, rate):
                    break
            if results and rescue:
                # every SGD rate made the held-out loss worse than at the start (a raw-pixel first layer with
                # large gradients diverges at any of them): try Adam
                start = probe_eval(_eval_net(spec, data.work, f"{tag}_start", None))["loss"]
                if min(results.values()) >= start:
                    try_candidate(len(candidates), *RESCUE)
            if results:
                chosen = min(results, key=lambda c: results[c])
                options, lr = replace(options, solver=chosen[0]), chosen[1]
                search = {(f"{r:g}" if s == candidates[0][0] else f"{s} {r:g}"): v for (s, r), v in results.items()}
                if budget_iters is not None:
                    budget_iters = max(1, budget_iters - probe * len(results))

    # how many iterations fit
    evaluations = 0 if evaluate is None else MAX_EVALUATIONS
    if deadline is not None:
        left = deadline - time.monotonic()
        if seconds_per_iter is None:  # time a couple of iterations on a throw-away solver
            trainer = _Trainer(spec, data, replace(options, lr=lr), 10**6, f"{tag}_timing", 99)
            seconds_per_iter = _time_iterations(trainer)
            del trainer
            left = deadline - time.monotonic()
        if evaluate is not None:
            evaluations = int(np.clip(EVAL_SHARE * left / max(eval_seconds, 1e-3), 1, MAX_EVALUATIONS))
        planned = (left - evaluations * eval_seconds) / seconds_per_iter
        iterations = max(1, int(planned / LAST_PHASE_PACE if allot.last else planned))
    else:
        assert budget_iters is not None
        iterations = budget_iters
    every = max(1, iterations // max(evaluations, 1))

    trainer = _Trainer(spec, data, replace(options, lr=lr), iterations, tag, 0)
    eval_net = _eval_net(spec, data.work, tag, trainer) if evaluate is not None else None
    losses: list[float] = []
    history: list[dict[str, float]] = []
    best: tuple[float, int, Weights] | None = None
    if evaluate is not None and before:
        best = (evaluate.score(before), 0, trainer.read())
    since_best = 0
    stopped_early = False
    reserve = eval_seconds  # the last evaluation must fit before the deadline
    checks = max(evaluations, REPLANS)
    check_every = max(1, iterations // checks)
    training_seconds = 0.0
    i = 0
    while i < iterations:
        if deadline is not None and time.monotonic() + reserve > deadline:
            break
        t0 = time.monotonic()
        losses.append(trainer.step())
        training_seconds += time.monotonic() - t0
        i += 1
        seconds_left = None if deadline is None else max(0.0, deadline - time.monotonic())
        notify("iteration", {"iteration": i, "iterations": iterations, "loss": losses[-1],
                             "seconds_left": seconds_left})
        last = i == iterations or (deadline is not None and seconds_per_iter is not None
                                   and time.monotonic() + reserve + seconds_per_iter > deadline)
        if evaluate is not None and eval_net is not None and (i % every == 0 or last):
            t0 = time.monotonic()
            metrics = evaluate(eval_net)
            reserve = time.monotonic() - t0  # later evaluations cost what this one did (the first built a net)
            metrics["iteration"] = i
            history.append(metrics)
            notify("evaluate", {"iteration": i, "metrics": metrics})
            score = evaluate.score(metrics)
            if best is None or score < best[0]:
                best = (score, i, trainer.read())
                since_best = 0
            else:
                since_best += 1
                if data.patience and since_best >= data.patience:
                    stopped_early = True
                    break
        if deadline is not None and not last and i % check_every == 0:
            # the plan came from a few timed iterations; the run so far says how many really fit
            seconds_per_iter = training_seconds / i
            evaluations_left = max(0, (iterations - i) // every) if evaluate is not None else 0
            fit = i + (deadline - time.monotonic() - (evaluations_left + 1) * reserve) / seconds_per_iter
            target = int(fit / LAST_PHASE_PACE if allot.last else fit)
            if target > i + 1 and abs(target - iterations) > REPLAN_TOLERANCE * iterations:
                trainer.replan(target)
                if eval_net is not None:
                    eval_net.share_with(trainer.net)
                every = max(1, every * target // iterations)
                check_every = max(1, check_every * target // iterations)
                iterations = target
    if best is not None:
        weights, best_iteration = best[2], best[1]
        after = before if best_iteration == 0 else next(m for m in history if m["iteration"] == best_iteration)
    else:
        weights, best_iteration, after = trainer.read(), trainer.done, {}
    tenth = max(1, len(losses) // 10)
    return PhaseOutcome(weights, before, after, float(lr), search, trainer.done, options.solver, best_iteration,
                        stopped_early,
                        float(np.mean(losses[:tenth])) if losses else float("nan"),
                        float(np.mean(losses[-tenth:])) if losses else float("nan"),
                        time.monotonic() - started, history)
