"""Fine-tuning a slimmed net against its original: the schedules, the budget, resume, the report.

Schedules (``schedule``):

* ``whole`` (the default, chosen by measurement: docs/decisions/schedule.md): one
  phase over the whole slim net, every layer learning, distilled from the original: in ``label`` mode
  ``(1 - kd_weight) · CE(labels) + kd_weight · KD``, in ``mimic`` mode (no labels) ``KD`` alone, where KD is the
  soft-target cross-entropy at ``temperature`` (see ``deeprebirth.finetune.losses``).
* ``layerwise`` (the paper's): one step per merge of the rewrite report, in network order, the step's new layers at
  ``new_lr_mult`` x the rate, then the same whole-net phase. A step's loss: in label mode the labels + KD on the
  net with merges 1..k applied (the slim prefix, then the original's layers); in mimic mode ``mimic_at`` says where
  it looks: ``local`` (the merged blob itself, EuclideanLoss), ``next`` (the next merge's blob, through the
  original's layers between, which adapt), ``logits`` (KD on the net's output).

The budget (``deeprebirth.finetune.budget``) covers the run; each phase searches its learning rate, trains with a
decaying rate and keeps its latest held-out checkpoint that is not worse than the best beyond the noise
(``deeprebirth.finetune.phase``). After each phase: a
snapshot (the slim net's caffemodel with every phase so far) and ``state.json`` in a work folder next to the output;
``resume`` continues from there without redoing finished phases.

Runs pycaffe in this process (generated nets are shape-checked in the IR first, so the usual mistakes become
one-line errors, not aborts); the library never prints: progress goes to a callback.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from deeprebirth.caffe.data import CROP_BANK, Batches, PathLike
from deeprebirth.caffe.evaluate import NetIO, labels_are_its_classes, paired_change_error, predict, set_input, top1_hits
from deeprebirth.caffe.runtime import import_caffe, on_device
from deeprebirth.errors import DeepRebirthError
from deeprebirth.finetune.budget import EVAL_SHARE, Budget, Clock, phase_weights, share_time
from deeprebirth.finetune.context import MIN_HELD_OUT, Context, Teacher, phase_iterations, prepare
from deeprebirth.finetune.options import (
    DEFAULT_BATCH,
    FinetuneOptions,
    FinetuneResult,
    Progress,
    ProgressCallback,
    StepResult,
    check_options,
    default_report,
    options_json,
)
from deeprebirth.finetune.phase import Allotment, PhaseData, PhaseOutcome, PhaseSpec, run_phase
from deeprebirth.finetune.refit import refit_rounds
from deeprebirth.finetune.search import SEARCH_SHARE
from deeprebirth.finetune.spec import blob_counts, phase_spec, uses_hints
from deeprebirth.finetune.state import Weights, save_state, snapshot
from deeprebirth.finetune.steps import Step
from deeprebirth.finetune.teacher_cache import (
    TeacherCache,
    choose_blends,
    choose_crop_bank,
    training_seconds_per_image,
)
from deeprebirth.finetune.teacher_process import start_teacher_process
from deeprebirth.io import caffe_io
from deeprebirth.io.atomic import atomic_write_bytes as write_text

EVAL_COST = 0.01  # share of a time budget one held-out evaluation may cost
BATCHES = (DEFAULT_BATCH, 16, 8)  # the batch sizes the pace rule picks from, largest first
MIN_UPDATES = 400  # the pace rule halves the batch while the budget buys fewer updates than this
TRAIN_COST = 4.0  # a training iteration per image: ~3 forwards of the student (forward, backward) and the
# original's forward where its outputs are not cached yet, priced at the original's forward (an upper bound)


def finetune_files(original_prototxt: PathLike, original_weights: PathLike, slim_prototxt: PathLike,
                   slim_weights: PathLike, report_path: PathLike, data: PathLike, out: PathLike,
                   options: FinetuneOptions | None = None,
                   progress: ProgressCallback | None = None) -> FinetuneResult:
    """Fine-tune the slim net (see the module docstring); writes ``out`` and a JSON report."""
    options = options or FinetuneOptions()
    with on_device(options.gpu):
        return _finetune(original_prototxt, original_weights, slim_prototxt, slim_weights, report_path, data, out,
                         options, progress)


def _finetune(original_prototxt: PathLike, original_weights: PathLike, slim_prototxt: PathLike,
              slim_weights: PathLike, report_path: PathLike, data: PathLike, out: PathLike,
              options: FinetuneOptions, progress: ProgressCallback | None) -> FinetuneResult:
    started = time.perf_counter()
    notify = progress or (lambda event: None)
    budget = check_options(options)
    clock = Clock(budget.amount if budget.timed else None)  # loading the nets and data counts too
    ctx, store, state, fingerprint = prepare(original_prototxt, original_weights, slim_prototxt, slim_weights,
                                              report_path, data, out, options)
    if not ctx.steps[-1].relearn:
        return _nothing_to_relearn(ctx, store, out, options, budget, fingerprint, started)
    teacher = Teacher(ctx.original, ctx.original_proto, original_weights, NetIO.of(ctx.original).input)
    seconds_per_image = _forward_seconds_per_image(ctx, lambda x: teacher.outputs(x, [ctx.logits]))
    if "batch" not in state:  # a resumed run keeps the batch it started with
        state["batch"], state["batch_rule"] = choose_batch(options.batch, budget, len(ctx.train_indices),
                                                           seconds_per_image)
    if "hints" not in state:
        state["hints"] = resolve_auto(options.hints, budget, len(ctx.train_indices), seconds_per_image)
    if "refit" not in state:
        state["refit"] = resolve_refit(options.refit, options.schedule, budget, len(ctx.train_indices),
                                       seconds_per_image)
    batch = int(state["batch"])
    options = replace(options, batch=batch, hints=str(state["hints"]), refit=str(state["refit"]))
    wanted = options.teacher_process and options.cache_teacher and options.gpu is None and \
        not all(uses_hints(step, options) for step in ctx.steps)
    process = start_teacher_process(ctx.original_proto, Path(original_weights), teacher.input, ctx.logits,
                                    teacher.end_of(ctx.logits)) if wanted else None
    ahead = process is not None
    if "crop_bank" not in state:
        def bank(student_seconds_per_image: float) -> tuple[int, str]:
            pace = training_seconds_per_image(student_seconds_per_image, seconds_per_image, ahead)
            return choose_crop_bank(ctx.train, budget, len(ctx.train_indices), pace, int(state["batch"]))

        state["crop_bank"], state["views_rule"] = bank(0.0)  # the most passes the budget could buy ...
        if budget.timed and state["crop_bank"] > CROP_BANK:  # ... and where that grows the bank, at the real pace
            slim_forward = _net_forward(_slim_net(ctx, slim_weights), ctx.io.input)
            state["crop_bank"], state["views_rule"] = bank(_forward_seconds_per_image(ctx, slim_forward))
        blends = choose_blends(options.mixup)[1]
        state["views_rule"] = "; ".join(words for words in (str(state["views_rule"]), blends) if words)
    ctx.train.set_crop_bank(int(state["crop_bank"]))
    if budget.timed:
        ctx.val_indices = _affordable_held_out(ctx, budget.amount, seconds_per_image)
    cache = TeacherCache(teacher, ctx.logits, options.cache_mb * 2**20 / 4, process)
    finished = {r["index"]: StepResult(**r) for r in state.get("finished", [])}
    resumed = len(finished)
    clock.start -= float(state.get("seconds", 0.0))  # what earlier runs of a resumed one spent
    if "baseline" not in state:
        notify(Progress("baseline", steps=len(ctx.steps)))
        state["baseline"], state["final_eval_seconds"] = _baseline(ctx, teacher, slim_weights, batch)
        save_state(ctx.work, state)
    with process or nullcontext():
        _run_steps(ctx, store, state, finished, teacher, cache, options, budget, clock, notify, original_weights,
                   seconds_per_image)
    complete = len(finished) == len(ctx.steps)
    final_accuracy = change_error = None
    report = None
    if complete:
        for name, blobs in store.items():  # a NaN caffemodel loads in Caffe and silently outputs NaN on the phone
            bad = next((i for i, blob in enumerate(blobs) if not np.isfinite(blob).all()), None)
            if bad is not None:
                raise DeepRebirthError(f"fine-tuning left NaN or Inf in weight blob {bad}; nothing written (the "
                                       "snapshots in the work folder hold the earlier phases)", file=str(out),
                                       layer=name)
        caffe_io.write_caffemodel(out, ctx.slim.to_net(), store)
        if ctx.val is not None and ctx.val.data.labels is not None:
            final = _hits(_slim_net(ctx, out), ctx.io, ctx.val, ctx.val_indices, batch)
            final_accuracy, original_hits = _mean(final), state["baseline"].get("original_hits")
            if final is not None and original_hits is not None and len(original_hits) == len(final):
                change_error = paired_change_error(final, np.asarray(original_hits, dtype=bool))
        report = str(options.report or default_report(out))
    result = FinetuneResult(options.mode, options.schedule, str(budget), [finished[i] for i in sorted(finished)],
                            [s.name for s in ctx.steps], complete, resumed, len(ctx.val_indices),
                            state["baseline"].get("original"), state["baseline"].get("slim"), final_accuracy,
                            str(out) if complete else None, report, str(ctx.work), time.perf_counter() - started,
                            batch, state["batch_rule"], str(state.get("views_rule", "")), change_error=change_error,
                            labels_ignored=state["baseline"].get("original") is not None and not labels_are_its_classes(
                                state["baseline"]["original"], len(ctx.val_indices), ctx.io.classes))
    if report is not None:
        _write_report(result, options, fingerprint)
    notify(Progress("finished", len(finished), len(ctx.steps)))
    return result


def _write_report(result: FinetuneResult, options: FinetuneOptions, fingerprint: str) -> None:
    """The JSON report at ``result.report``: the result, the options it ran with and the inputs' fingerprint."""
    assert result.report is not None
    payload = result.to_json()
    payload["options"] = options_json(options)
    payload["fingerprint"] = fingerprint
    write_text(Path(result.report), json.dumps(payload, indent=2))


def _run_steps(ctx: Context, store: Weights, state: dict[str, Any], finished: dict[int, StepResult],
               teacher: Teacher, cache: TeacherCache, options: FinetuneOptions, budget: Budget, clock: Clock,
               notify: ProgressCallback, original_weights: PathLike, seconds_per_image: float) -> None:
    """The steps not yet ``finished``, each with its share of the budget, snapshotted after each (resumable).
    Before the whole-net phase, where ``--refit`` resolved on, the least-squares start (``finetune.refit``;
    ``seconds_per_image``: the original's forward pass, which sizes its sample under a time budget)."""
    weights = phase_weights(len(ctx.steps) - 1, options.schedule == "layerwise")
    iterations = None if budget.timed else phase_iterations(ctx, options, budget)
    done_now = 0
    for k, step in enumerate(ctx.steps):
        if step.index in finished:
            notify(Progress("skipped", step.index, len(ctx.steps), step.name, result=finished[step.index]))
            continue
        if options.max_steps is not None and done_now >= options.max_steps:
            break
        if iterations is not None:
            allot = Allotment(iterations=iterations[k])
        else:
            left = (clock.left() or 0.0) - float(state.get("final_eval_seconds", 0.0))
            allot = Allotment(seconds=share_time(left, weights, k), last=k == len(ctx.steps) - 1)
        phase_started = time.monotonic()
        rounds = []
        if step.final and options.refit == "on":
            told = partial(_refit_progress, notify, step.index, len(ctx.steps))
            rounds = refit_rounds(ctx, store, original_weights, options.seed, options.freeze_rest, allot.seconds,
                                  told, seconds_per_image)
            if allot.seconds is not None:
                allot = replace(allot, seconds=max(0.0, allot.seconds - (time.monotonic() - phase_started)))
        step_result = _run_step(ctx, step, store, teacher, cache, options, allot, clock, notify,
                                any(r.kept for r in rounds))
        step_result.refit = [r.to_json() for r in rounds] or None
        finished[step.index] = step_result
        done_now += 1
        state["seconds"] = float(state.get("seconds", 0.0)) + time.monotonic() - phase_started
        snapshot(ctx.work, ctx.slim, store, state, step_result)


def _refit_progress(notify: ProgressCallback, step: int, steps: int, done: int, total: int, layer: str) -> None:
    notify(Progress("refit", step, steps, layer, done, total))


def choose_batch(given: int | None, budget: Budget, images: int, seconds_per_image: float) -> tuple[int, str]:
    """The batch size and the rule's words. Given: kept. An iteration budget: ``DEFAULT_BATCH``. Otherwise the
    largest of ``BATCHES`` whose updates over the training part of the budget reach ``MIN_UPDATES`` (the smallest
    when none does): a time budget buys ``seconds x (1 - search and evaluation shares) / (batch x TRAIN_COST x the
    original's forward per image)`` updates, an epoch budget ``epochs x images / batch``. On a CPU the images per
    second hardly depend on the batch, so where iterations are expensive a smaller batch buys more updates."""
    if given is not None:
        return given, "given"
    if budget.unit == "it":
        return DEFAULT_BATCH, "an iteration budget keeps the default batch"
    if budget.timed:
        unit = f"{budget} at {TRAIN_COST * seconds_per_image * 1000:.1f} ms per training image"
    else:
        unit = f"{budget} of {images} images"
    bought = {b: updates_bought(budget, images, seconds_per_image, b) for b in BATCHES}
    batch = next((b for b in BATCHES if bought[b] >= MIN_UPDATES), BATCHES[-1])
    return batch, f"{batch}: about {bought[batch]:.0f} updates in {unit} (at least {MIN_UPDATES} wanted)"


def updates_bought(budget: Budget, images: int, seconds_per_image: float, batch: int) -> float:
    """Updates of ``batch`` the budget buys: its iterations; for time, ``seconds x (1 - search and evaluation
    shares) / (batch x TRAIN_COST x the original's forward per image)``; for epochs, ``epochs x images / batch``."""
    if budget.unit == "it":
        return budget.amount
    if budget.timed:
        return budget.amount * (1 - SEARCH_SHARE - EVAL_SHARE) / (batch * TRAIN_COST * seconds_per_image)
    return budget.amount * images / batch


def resolve_auto(setting: str, budget: Budget, images: int, seconds_per_image: float,
                 batch: int = DEFAULT_BATCH) -> str:
    """``--hints auto``: "on" where the budget buys fewer than ``MIN_UPDATES`` updates of ``batch``
    (docs/decisions/hints.md); "on"/"off" as given."""
    if setting != "auto":
        return setting
    few = updates_bought(budget, images, seconds_per_image, batch) < MIN_UPDATES
    return "on" if few else "off"


def resolve_refit(setting: str, schedule: str, budget: Budget, images: int, seconds_per_image: float) -> str:
    """``--refit auto``: "on" with the whole schedule where the pace rule (``choose_batch``) comes down to its
    smallest batch (the budget, in time or epochs, buys fewer than ``MIN_UPDATES`` updates of the next larger one):
    an ImageNet-size net on a CPU. Where updates are more plentiful, SGD from the rewrite's weights ended better than
    fine-tuning from the refit start (docs/decisions/refit.md). "on"/"off" as given."""
    if schedule != "whole":
        return "off"
    if setting == "auto" and budget.unit == "it":  # an iteration budget keeps the default batch: no pace rule
        return "off"
    return resolve_auto(setting, budget, images, seconds_per_image, BATCHES[-2])


NOTHING_TO_RELEARN = ("nothing to re-learn: the rewrite report lists no lossy change (exact folds only, e.g. every "
                      "merge left out by --max-drop), so the slim net already computes the original's outputs; its "
                      "weights were written unchanged")


def _nothing_to_relearn(ctx: Context, store: Weights, out: PathLike, options: FinetuneOptions, budget: Budget,
                        fingerprint: str, started: float) -> FinetuneResult:
    """Writes the slim net's weights as they are: distilling a net that already matches its teacher could only move
    it away (and would spend the whole budget doing so)."""
    caffe_io.write_caffemodel(out, ctx.slim.to_net(), store)
    result = FinetuneResult(options.mode, options.schedule, str(budget), [], [], True, 0, 0, None, None, None,
                            str(out), str(options.report or default_report(out)), str(ctx.work),
                            time.perf_counter() - started, options.batch or DEFAULT_BATCH, "nothing trained",
                            note=NOTHING_TO_RELEARN)
    _write_report(result, options, fingerprint)
    return result


def _forward_seconds_per_image(ctx: Context, forward: Callable[[np.ndarray], object]) -> float:
    """A forward pass per image, timed on a few training images (the second pass: the first allocates)."""
    x = ctx.train.batch(ctx.train_indices[:8])
    forward(x)
    started = time.monotonic()
    forward(x)
    return (time.monotonic() - started) / len(x)


def _net_forward(net: Any, input_name: str) -> Callable[[np.ndarray], object]:
    def forward(x: np.ndarray) -> object:
        set_input(net, input_name, x)
        return net.forward()
    return forward


def _affordable_held_out(ctx: Context, seconds: float, seconds_per_image: float) -> np.ndarray:
    """The held-out images one evaluation can afford under a time budget: at most ``EVAL_COST`` of it (a phase
    evaluates up to 8 times, plus the measurements before and after), at least ``MIN_HELD_OUT`` images. An
    evaluation runs the student (the original's outputs are computed once): priced at the original's forward."""
    if ctx.val is None or not len(ctx.val_indices):
        return ctx.val_indices
    affordable = int(EVAL_COST * seconds / max(seconds_per_image, 1e-9))
    return ctx.val_indices[:max(min(MIN_HELD_OUT, len(ctx.val_indices)), affordable)]


def _hits(net: Any, io: NetIO, val: Batches, indices: np.ndarray, batch: int) -> np.ndarray | None:
    """Per held-out image, whether the net's top-1 is its label; forwarded ``batch`` images at a time: a Caffe blob
    keeps the largest size it was given, so a bigger chunk would hold the original's activations at that size for
    the whole run (about 13 GB at 100 images for a ResNet-50 at 224x224)."""
    if val.data.labels is None or not len(indices):
        return None
    return top1_hits(predict(net, io, val, indices, batch), val.labels(indices))


def _mean(hits: np.ndarray | None) -> float | None:
    return None if hits is None else float(np.mean(hits))


def _slim_net(ctx: Context, caffemodel: PathLike) -> Any:
    caffe = import_caffe()
    path = ctx.work / "slim.prototxt"
    caffe_io.write_prototxt(path, ctx.slim.to_net())
    return caffe.Net(str(path), caffe.TEST, weights=str(caffemodel))


def _baseline(ctx: Context, teacher: Teacher, slim_weights: PathLike, batch: int) -> tuple[dict[str, Any], float]:
    """Held-out top-1 of the original and of the slim net as rewritten (before any fine-tuning), and the seconds
    the slim net's measurement took (what the closing one will cost)."""
    if ctx.val is None:
        return {"original": None, "slim": None}, 0.0
    original = _hits(teacher.net, NetIO.of(ctx.original), ctx.val, ctx.val_indices, batch)
    started = time.monotonic()
    slim = _hits(_slim_net(ctx, slim_weights), ctx.io, ctx.val, ctx.val_indices, batch)
    hits = None if original is None else original.astype(int).tolist()  # for the paired error of the final change
    return {"original": _mean(original), "slim": _mean(slim), "original_hits": hits}, time.monotonic() - started


def _run_step(ctx: Context, step: Step, store: Weights, teacher: Teacher, cache: TeacherCache,
              options: FinetuneOptions, allot: Allotment, clock: Clock, notify: ProgressCallback,
              refit_start: bool = False) -> StepResult:
    total = len(ctx.steps)
    notify(Progress("step", step.index, total, step.name))
    assert options.batch is not None
    fixed = "regression" if options.loss == "regression" else "kd"
    # hints need the original's forward pass in the train net anyway: its logits then come from there too
    cached = options.cache_teacher and not uses_hints(step, options)
    spec, student, target = phase_spec(ctx, step, store, teacher, options, loss=fixed, cached_teacher=cached)

    def variant(loss: str) -> PhaseSpec:
        return phase_spec(ctx, step, store, teacher, options, loss=loss, cached_teacher=cached)[0]

    data = PhaseData(ctx.work, ctx.io.input, ctx.train, ctx.train_indices, ctx.val, ctx.val_indices, teacher,
                     options.batch, options.seed, options.cache_mb * 2**20 / 4, options.patience, options.shuffle,
                     cache, choose_blends(options.mixup)[0])
    computed, reused = cache.computed, cache.reused

    def relay(event: str, fields: dict[str, Any]) -> None:
        left = clock.left()
        if event == "iteration":
            notify(Progress("iteration", step.index, total, step.name, fields["iteration"], fields["iterations"],
                            fields["loss"], seconds_left=None if left is None else max(0.0, left)))
        elif event == "search":
            notify(Progress("search", step.index, total, step.name, loss=fields["loss"], lr=fields["lr"],
                            solver=fields["solver"]))
        elif event == "evaluate":
            notify(Progress("evaluate", step.index, total, step.name, fields["iteration"],
                            metrics=fields["metrics"]))

    with cache.ahead() if cached else nullcontext():
        outcome: PhaseOutcome = run_phase(spec, data, options.solver, allot, relay, variant if options.loss == "auto"
                                          and target in ("labels+kd", "kd") else None, refit_start)
    served = cache.computed - computed + cache.reused - reused
    for name, blobs in outcome.weights.items():
        where, layer = student.source[name]
        if where == "slim" or layer in ctx.shared:
            store[layer] = [b.reshape(store[layer][i].shape) for i, b in enumerate(blobs)]
    learned = len(spec.learned)
    frozen = sum(1 for name, f in student.factor.items() if f == 0 and name in blob_counts(ctx, student, store))
    b, a = outcome.before, outcome.after
    return StepResult(step.index, step.name, step.rules, step.relearn, step.reproduces, target, learned, frozen,
                      outcome.iterations, outcome.best_iteration, outcome.stopped_early, outcome.lr,
                      outcome.lr_search, outcome.solver, outcome.loss_start, outcome.loss_end, b.get("accuracy"), a.get("accuracy"),
                      b.get("blob_error"), a.get("blob_error"), b.get("output_error"), a.get("output_error"),
                      b.get("agreement"), a.get("agreement"), outcome.seconds, outcome.evaluations, outcome.loss,
                      outcome.backoffs, outcome.search_note, outcome.images_per_second,
                      (cache.reused - reused) / served if served else None, dropout=spec.dropout)
