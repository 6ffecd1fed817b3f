"""Fine-tuning a slimmed net against its original: the schedules, the budget, resume, the report.

Schedules (``schedule``):

* ``whole`` (the default, chosen by measurement: see README "Fine-tuning: what the defaults are and why"): one
  phase over the whole slim net, every layer learning, distilled from the original: in ``label`` mode
  ``(1 - kd_weight) · CE(labels) + kd_weight · KD``, in ``mimic`` mode (no labels) ``KD`` alone, where KD is the
  soft-target cross-entropy at ``temperature`` (see ``deeprebirth.finetune.losses``).
* ``layerwise`` (the paper's): one step per merge of the rewrite report, in network order, the step's new layers at
  ``new_lr_mult`` x the rate, then the same whole-net phase. A step's loss: in label mode the labels + KD on the
  net with merges 1..k applied (the slim prefix, then the original's layers); in mimic mode ``mimic_at`` says where
  it looks: ``local`` (the merged blob itself, EuclideanLoss), ``next`` (the next merge's blob, through the
  original's layers between, which adapt), ``logits`` (KD on the net's output).

The budget (``deeprebirth.finetune.budget``) covers the run; each phase searches its learning rate, trains with a
decaying rate and keeps its best held-out checkpoint (``deeprebirth.finetune.phase``). After each phase: a
snapshot (the slim net's caffemodel with every phase so far) and ``state.json`` in a work folder next to the output;
``resume`` continues from there without redoing finished phases.

Runs pycaffe in this process (generated nets are shape-checked in the IR first, so the usual mistakes become
one-line errors, not aborts); the library never prints: progress goes to a callback.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from deeprebirth import caffe_io
from deeprebirth import caffe_pb2 as pb
from deeprebirth.caffe_runtime import import_caffe, on_device
from deeprebirth.data import Batches, DataSet, PathLike, Transform, open_data, split_holdout
from deeprebirth.errors import DeepRebirthError
from deeprebirth.evaluate import NetIO, predict, set_input, top_k
from deeprebirth.finetune.budget import (
    Budget,
    Clock,
    phase_weights,
    share_iterations,
    share_time,
)
from deeprebirth.finetune.losses import (
    add_distillation,
    add_label_loss,
    add_mimic_loss,
    embed_teacher,
    logits_of,
    teacher_name,
)
from deeprebirth.finetune.phase import (
    Allotment,
    PhaseData,
    PhaseOutcome,
    PhaseSpec,
    run_phase,
)
from deeprebirth.finetune.steps import (
    Step,
    StepNet,
    build_step_net,
    final_step,
    final_writer,
    plan_steps,
)
from deeprebirth.fingerprint import fingerprint
from deeprebirth.graph import Graph, GraphError
from deeprebirth.model import load_model, same_file
from deeprebirth.rewrite import RewriteReport
from deeprebirth.train import SOLVER_TYPES, SolverOptions, training_net, write_text

MODES = ("label", "mimic")
SCHEDULES = ("whole", "layerwise")
MIMIC_TARGETS = ("local", "next", "logits")
EVAL_COST = 0.01  # share of a time budget one held-out evaluation may cost
MIN_HELD_OUT = 64
STATE_VERSION = 2
Weights = dict[str, list[np.ndarray]]


# ---------------------------------------------------------------------------------------------------------------
# options, progress and results


@dataclass
class FinetuneOptions:
    mode: str = "label"  # "label" (labels + distillation) or "mimic" (the original's outputs only, no labels)
    schedule: str = "whole"  # "whole" or "layerwise" (the paper's steps, then the whole net)
    mimic_at: str = "logits"  # layer-wise steps in mimic mode: "local", "next" or "logits"
    budget: str = "10m"  # time (90s, 10m, 1.5h), solver iterations (3000it) or epochs (5ep) for the whole run
    kd_weight: float = 0.5  # label mode: share of the distillation loss (the labels get the rest)
    temperature: float = 4.0
    batch: int = 32  # on a CPU images per second hardly depend on the batch: smaller batches, more updates
    solver: SolverOptions = field(default_factory=lambda: SolverOptions(solver="sgd", lr=None))  # lr None: search
    new_lr_mult: float = 10.0  # layer-wise steps: the step's new layers learn this much faster than the rest
    freeze_rest: bool = False  # only the new layers learn
    resume: bool = False  # continue a run that was interrupted (state.json in the work folder)
    transform: Transform = field(default_factory=lambda: Transform(mirror=True))  # training preprocessing
    val: PathLike | None = None  # held-out data; default: ``holdout`` of --data
    holdout: float = 0.1  # fraction of --data held out when ``val`` is not given (0: no held-out metrics)
    val_limit: int | None = 2000  # held-out images per evaluation
    seed: int = 0
    patience: int = 3  # stop a phase when this many held-out checkpoints in a row did not improve (0: never)
    max_steps: int | None = None  # stop after this many phases in this run (resume later)
    cache_mb: float = 1024.0  # memory for the original's held-out outputs
    work_dir: PathLike | None = None  # default: <out without suffix>.finetune next to --out
    report: PathLike | None = None  # default: <out without suffix>.finetune.json
    gpu: int | None = None  # run pycaffe on this GPU (a CUDA build of Caffe)
    shuffle: bool = True  # False: every phase reads the training images in their order (as an unshuffled LMDB)


@dataclass
class StepResult:
    index: int
    name: str
    rules: list[str]
    relearn: list[str]
    reproduces: str
    target: str  # what the loss looked at: "labels+kd", "kd", "local", "next:<blob>"
    learned: int  # layers that learned
    frozen: int  # layers with lr_mult 0 (the frozen teacher not counted)
    iterations: int
    best_iteration: int  # the kept checkpoint (0: the starting weights)
    stopped_early: bool
    lr: float
    lr_search: dict[str, float]  # candidate rate -> held-out loss after a short run
    solver: str
    loss_start: float  # mean of the first tenth of the iterations
    loss_end: float  # mean of the last tenth
    accuracy_before: float | None  # held-out top-1 of the net with steps 1..k merged, before / after this step
    accuracy_after: float | None
    error_before: float | None  # held-out relative squared error at the step's blob
    error_after: float | None
    output_error_before: float | None  # ... at the net's logits
    output_error_after: float | None
    agreement_before: float | None  # held-out top-1 agreement with the original
    agreement_after: float | None
    seconds: float
    checkpoints: list[dict[str, float]] = field(default_factory=list)  # held-out metrics during the phase


@dataclass
class Progress:
    """One thing that happened; ``event`` is "baseline", "step", "search", "iteration", "evaluate", "finished" or
    "skipped" (a step finished by an earlier run, with ``resume``)."""

    event: str
    step: int = 0
    steps: int = 0
    name: str = ""
    iteration: int = 0
    iterations: int = 0
    loss: float | None = None
    result: StepResult | None = None
    seconds_left: float | None = None  # of the whole run's time budget
    lr: float | None = None  # "search": the candidate rate, with its held-out ``loss``
    solver: str | None = None  # "search": the candidate's solver
    metrics: dict[str, float] | None = None  # "evaluate"


ProgressCallback = Callable[[Progress], None]


@dataclass
class FinetuneResult:
    mode: str
    schedule: str
    budget: str
    steps: list[StepResult]
    planned: list[str]  # every phase's name, in order
    complete: bool  # False when stopped by ``max_steps``
    resumed: int  # phases taken over from an earlier run
    held_out: int  # held-out images per evaluation
    original_accuracy: float | None
    slim_accuracy: float | None  # the slim net as rewritten, before fine-tuning
    final_accuracy: float | None  # the slim net after fine-tuning (None until complete)
    out: str | None
    report: str | None
    work_dir: str
    seconds: float  # this run's wall time

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------------------------------------------
# the original net as a reference


class Teacher:
    """The original net in pycaffe (TEST phase), run only as far as the blobs asked for."""

    def __init__(self, graph: Graph, prototxt: Path, weights: PathLike, input_name: str) -> None:
        caffe = import_caffe()
        self.net = caffe.Net(str(prototxt), caffe.TEST, weights=str(weights))
        self.input = input_name
        self.graph = graph
        self.order = {name: k for k, name in enumerate(self.net._layer_names)}
        self.ends: dict[str, str] = {}

    def end_of(self, blob: str) -> str:
        if blob not in self.ends:
            found = final_writer(self.graph, blob)
            if found is None:
                raise DeepRebirthError(f"the original net has no blob '{blob}'")
            self.ends[blob] = found[1]
        return self.ends[blob]

    def outputs(self, x: np.ndarray, blobs: Sequence[str]) -> dict[str, np.ndarray]:
        set_input(self.net, self.input, x)
        end = max((self.end_of(b) for b in blobs), key=lambda name: self.order[name])
        self.net.forward(end=end)
        return {b: np.array(self.net.blobs[b].data, dtype=np.float32) for b in blobs}


# ---------------------------------------------------------------------------------------------------------------
# the driver


@dataclass
class _Context:
    """Everything a phase needs, loaded and checked once."""

    original: Graph
    slim: Graph
    original_proto: Path  # the original, normalised, as Caffe reads it
    original_weights: Weights
    steps: list[Step]  # the phases: layer-wise steps (if any), then the whole net
    logits: str  # the original's (and slim net's) logits blob
    shared: set[str]
    io: NetIO
    train: Batches
    train_indices: np.ndarray
    val: Batches | None
    val_indices: np.ndarray
    work: Path


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
    budget = _check_options(options)
    clock = Clock(budget.amount if budget.timed else None)  # loading the nets and data counts too
    ctx, store, state, fingerprint = _prepare(original_prototxt, original_weights, slim_prototxt, slim_weights,
                                              report_path, data, out, options)
    teacher = Teacher(ctx.original, ctx.original_proto, original_weights, NetIO.of(ctx.original).input)
    if budget.timed:
        ctx.val_indices = _affordable_held_out(ctx, teacher, budget.amount, options.batch)
    finished = {r["index"]: StepResult(**r) for r in state.get("finished", [])}
    resumed = len(finished)
    clock.start -= float(state.get("seconds", 0.0))  # what earlier runs of a resumed one spent
    if "baseline" not in state:
        notify(Progress("baseline", steps=len(ctx.steps)))
        state["baseline"], state["final_eval_seconds"] = _baseline(ctx, teacher, slim_weights)
        _save_state(ctx.work, state)
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
        step_result = _run_step(ctx, step, store, teacher, options, allot, clock, notify)
        finished[step.index] = step_result
        done_now += 1
        state["seconds"] = float(state.get("seconds", 0.0)) + time.monotonic() - phase_started
        _snapshot(ctx, store, state, step_result)
    complete = len(finished) == len(ctx.steps)
    final_accuracy = None
    report = None
    if complete:
        caffe_io.write_caffemodel(out, ctx.slim.to_net(), store)
        if ctx.val is not None and ctx.val.data.labels is not None:
            final_accuracy = _accuracy(_slim_net(ctx, out), ctx.io, ctx.val, ctx.val_indices)
        report = str(options.report or _default_report(out))
    result = FinetuneResult(options.mode, options.schedule, str(budget), [finished[i] for i in sorted(finished)],
                            [s.name for s in ctx.steps], complete, resumed, len(ctx.val_indices),
                            state["baseline"].get("original"), state["baseline"].get("slim"), final_accuracy,
                            str(out) if complete else None, report, str(ctx.work), time.perf_counter() - started)
    if report is not None:
        payload = result.to_json()
        payload["options"] = _options_json(options)
        payload["fingerprint"] = fingerprint
        write_text(Path(report), json.dumps(payload, indent=2))
    notify(Progress("finished", len(finished), len(ctx.steps)))
    return result


def phase_iterations(ctx: _Context, options: FinetuneOptions, budget: Budget) -> list[int]:
    """Each phase's share of an iteration or epoch budget."""
    epoch = max(1, len(ctx.train_indices) // options.batch)
    weights = phase_weights(len(ctx.steps) - 1, options.schedule == "layerwise")
    return share_iterations(budget.iterations(epoch), weights)


def _affordable_held_out(ctx: _Context, teacher: Teacher, seconds: float, batch: int) -> np.ndarray:
    """The held-out images one evaluation can afford under a time budget: at most ``EVAL_COST`` of it (a phase
    evaluates up to 8 times, plus the measurements before and after), at least ``MIN_HELD_OUT`` images. The cost
    per image is timed on one batch of the original (the slim net is cheaper)."""
    if ctx.val is None or not len(ctx.val_indices):
        return ctx.val_indices
    chunk = ctx.val_indices[:batch]
    x = ctx.val.batch(chunk)
    teacher.outputs(x, [ctx.logits])  # warm-up: the first pass allocates
    started = time.monotonic()
    teacher.outputs(x, [ctx.logits])
    per_image = 2 * (time.monotonic() - started) / len(chunk)  # the student's pass and the original's
    affordable = int(EVAL_COST * seconds / max(per_image, 1e-9))
    return ctx.val_indices[:max(min(MIN_HELD_OUT, len(ctx.val_indices)), affordable)]


def _check_options(options: FinetuneOptions) -> Budget:
    if options.mode not in MODES:
        raise DeepRebirthError(f"unknown mode {options.mode!r} ({', '.join(MODES)})")
    if options.schedule not in SCHEDULES:
        raise DeepRebirthError(f"unknown schedule {options.schedule!r} ({', '.join(SCHEDULES)})")
    if options.mimic_at not in MIMIC_TARGETS:
        raise DeepRebirthError(f"unknown mimic target {options.mimic_at!r} ({', '.join(MIMIC_TARGETS)})")
    if options.batch < 1:
        raise DeepRebirthError("the batch size must be at least 1")
    if not 0.0 <= options.kd_weight <= 1.0:
        raise DeepRebirthError(f"the distillation weight must be in [0, 1], got {options.kd_weight}")
    if options.temperature <= 0:
        raise DeepRebirthError(f"the temperature must be positive, got {options.temperature}")
    if options.solver.solver not in SOLVER_TYPES:
        raise DeepRebirthError(f"unknown solver {options.solver.solver!r} (known: {', '.join(SOLVER_TYPES)})")
    return Budget.parse(options.budget)


def _default_report(out: PathLike) -> Path:
    out = Path(out)
    return out.with_name(out.stem + ".finetune.json")


def default_work_dir(out: PathLike) -> Path:
    out = Path(out)
    return out.with_name(out.stem + ".finetune")


def _options_json(options: FinetuneOptions) -> dict[str, Any]:
    payload = asdict(options)
    for key in ("val", "work_dir", "report"):
        payload[key] = None if payload[key] is None else str(payload[key])
    return payload


def _prepare(original_prototxt: PathLike, original_weights: PathLike, slim_prototxt: PathLike,
             slim_weights: PathLike, report_path: PathLike, data: PathLike, out: PathLike,
             options: FinetuneOptions) -> tuple[_Context, Weights, dict[str, Any], str]:
    """Check every input, plan the phases, open and validate the data, set up the work folder (or resume)."""
    inputs = [original_prototxt, original_weights, slim_prototxt, slim_weights, report_path]
    for path in inputs:
        if not Path(path).is_file():
            raise DeepRebirthError("no such file", file=str(path))
    for path in inputs:
        if same_file(path, out):
            raise DeepRebirthError("the output would overwrite an input; choose another path", file=str(out))
    if not Path(out).parent.is_dir() and str(Path(out).parent):
        raise DeepRebirthError("output folder does not exist", file=str(out))
    original = load_model(original_prototxt, original_weights)
    slim = load_model(slim_prototxt, slim_weights)
    try:
        report = RewriteReport.from_json(json.loads(Path(report_path).read_text()))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DeepRebirthError(f"not a JSON report ({type(err).__name__})", file=str(report_path)) from None
    except DeepRebirthError as err:
        raise DeepRebirthError(err.message, file=str(report_path)) from None
    try:
        steps = plan_steps(report, original, slim)
    except DeepRebirthError as err:
        raise DeepRebirthError(err.message, file=str(report_path)) from None
    whole = final_step(steps, original, slim)
    phases = [*steps, whole] if options.schedule == "layerwise" else [whole]
    whole.index = len(phases)
    shared = _shared_layers(original, slim)
    if options.mode == "label":  # can every step's net be spliced together? Say so before training starts
        for step in phases:
            build_step_net(step, slim, original, True, shared, options.new_lr_mult, options.freeze_rest)
    io = NetIO.of(slim, str(slim_prototxt))
    o_io = NetIO.of(original, str(original_prototxt))
    if (o_io.channels, o_io.size, o_io.classes) != (io.channels, io.size, io.classes):
        raise DeepRebirthError("the original and the slim net differ in input or number of classes",
                               file=str(slim_prototxt))
    dataset = open_data(data, channels=io.channels, input_size=io.size, transform=options.transform,
                        classes=io.classes, need_labels=options.mode == "label")
    train_indices = np.arange(len(dataset))
    val_set: DataSet | None = None
    if options.val is not None:
        val_set = open_data(options.val, channels=io.channels, input_size=io.size,
                            transform=options.transform.for_evaluation(), classes=io.classes)
    elif options.holdout > 0 and len(dataset) >= 20:
        train_indices, held = split_holdout(len(dataset), options.holdout, options.seed)
        val_set = dataset.subset(held)
    val_indices = np.arange(0 if val_set is None else len(val_set))
    if options.val_limit is not None:
        val_indices = val_indices[:options.val_limit]
    train = Batches(dataset, options.transform, io.size)
    val = Batches(val_set, options.transform.for_evaluation(), io.size) if val_set is not None else None
    work = Path(options.work_dir) if options.work_dir is not None else default_work_dir(out)
    work.mkdir(parents=True, exist_ok=True)
    original_proto = work / "original.prototxt"
    caffe_io.write_prototxt(original_proto, original.to_net())
    fingerprint = _fingerprint([*inputs, data, *([options.val] if options.val else [])], options)
    state: dict[str, Any] = {"version": STATE_VERSION, "fingerprint": fingerprint,
                             "steps": [s.name for s in phases], "finished": []}
    store = {layer.name: [np.array(b, dtype=np.float32) for b in layer.blobs] for layer in slim.layers()
             if layer.blobs}
    state_path = work / "state.json"
    if options.resume and state_path.is_file():
        try:
            previous = json.loads(state_path.read_text())
        except (OSError, json.JSONDecodeError):
            raise DeepRebirthError("cannot read the state of the earlier run", file=str(state_path)) from None
        if previous.get("fingerprint") != fingerprint or previous.get("version") != STATE_VERSION:
            raise DeepRebirthError("the earlier run used other files or options; start over without resuming",
                                   file=str(state_path))
        state = previous
        if state.get("snapshot"):
            snapshot = work / state["snapshot"]
            if not snapshot.is_file():
                raise DeepRebirthError("the snapshot of the earlier run is missing", file=str(snapshot))
            for name, blobs in caffe_io.read_weights(snapshot).items():
                if name in store:
                    store[name] = [np.array(b, dtype=np.float32).reshape(store[name][i].shape)
                                   for i, b in enumerate(blobs)]
    else:
        for old in work.glob("snapshot_step*.caffemodel"):
            old.unlink()
        _save_state(work, state)
    ctx = _Context(original, slim, original_proto, original.weights(), phases, whole.reproduces, shared, io, train,
                   train_indices, val, val_indices, work)
    return ctx, store, state, fingerprint


def _shared_layers(original: Graph, slim: Graph) -> set[str]:
    """Layers with weights that the rewrite left untouched: same name, type, settings and weights in both nets."""
    shared = set()
    for layer in slim.layers():
        if not layer.blobs or layer.name not in original:
            continue
        other = original.layer(layer.name)
        if other.type != layer.type or other.blobs is None or len(other.blobs) != len(layer.blobs):
            continue
        if other.proto.SerializeToString() != layer.proto.SerializeToString():
            continue
        if all(a.shape == b.shape and np.array_equal(a, b) for a, b in zip(other.blobs, layer.blobs)):
            shared.add(layer.name)
    return shared


def _fingerprint(paths: Sequence[PathLike], options: FinetuneOptions) -> str:
    relevant = _options_json(options)
    for key in ("resume", "max_steps", "work_dir", "report", "cache_mb", "gpu"):
        relevant.pop(key)
    return fingerprint(paths, relevant)


def _save_state(work: Path, state: dict[str, Any]) -> None:
    write_text(work / "state.json", json.dumps(state, indent=2))


def _snapshot(ctx: _Context, store: Weights, state: dict[str, Any], result: StepResult) -> None:
    """Weights first, then the state that points at them, then the previous snapshot goes: an interruption at
    any moment leaves a state whose snapshot matches its list of finished steps."""
    name = f"snapshot_step{result.index}.caffemodel"
    caffe_io.write_caffemodel(ctx.work / name, ctx.slim.to_net(), store)
    previous = state.get("snapshot")
    state["snapshot"] = name
    state["finished"] = [r for r in state.get("finished", []) if r["index"] != result.index] + [asdict(result)]
    _save_state(ctx.work, state)
    if previous and previous != name:
        (ctx.work / previous).unlink(missing_ok=True)


def _accuracy(net: Any, io: NetIO, val: Batches, indices: np.ndarray) -> float | None:
    if val.data.labels is None or not len(indices):
        return None
    scores = predict(net, io, val, indices)
    return top_k(scores, val.labels(indices), 1)


def _slim_net(ctx: _Context, caffemodel: PathLike) -> Any:
    caffe = import_caffe()
    path = ctx.work / "slim.prototxt"
    caffe_io.write_prototxt(path, ctx.slim.to_net())
    return caffe.Net(str(path), caffe.TEST, weights=str(caffemodel))


def _baseline(ctx: _Context, teacher: Teacher, slim_weights: PathLike) -> tuple[dict[str, Any], float]:
    """Held-out top-1 of the original and of the slim net as rewritten (before any fine-tuning), and the seconds
    the slim net's measurement took (what the closing one will cost)."""
    if ctx.val is None:
        return {"original": None, "slim": None}, 0.0
    original = _accuracy(teacher.net, NetIO.of(ctx.original), ctx.val, ctx.val_indices)
    started = time.monotonic()
    slim = _accuracy(_slim_net(ctx, slim_weights), ctx.io, ctx.val, ctx.val_indices)
    return {"original": original, "slim": slim}, time.monotonic() - started


# ---------------------------------------------------------------------------------------------------------------
# one phase: its nets and losses


def _lookup(ctx: _Context, nets: Sequence[StepNet], store: Weights) -> Callable[[str], list[np.ndarray]]:
    """Parameters by layer name of a phase's nets: the students' (current store or original), the teacher's."""
    source = {name: where for net in nets for name, where in net.source.items()}

    def lookup(name: str) -> list[np.ndarray]:
        if name in source:
            where, layer = source[name]
            return store[layer] if where == "slim" or layer in ctx.shared else ctx.original_weights[layer]
        if name.startswith(teacher_name("")):
            return ctx.original_weights[name[len(teacher_name("")):]]
        raise GraphError(f"no parameters known for layer {name!r}")

    return lookup


def _blob_counts(ctx: _Context, step_net: StepNet, store: Weights) -> dict[str, int]:
    counts = {}
    for name, (where, layer) in step_net.source.items():
        found = store.get(layer) if where == "slim" or layer in ctx.shared else ctx.original_weights.get(layer)
        if found:
            counts[name] = len(found)
    return counts


def _next_blob(ctx: _Context, step: Step) -> str:
    """The blob the step after ``step`` reproduces (the logits after the last)."""
    later = [s for s in ctx.steps if s.index > step.index and not s.final]
    return later[0].reproduces if later else ctx.logits


def _student(ctx: _Context, step: Step, options: FinetuneOptions) -> tuple[StepNet, StepNet, str]:
    """(the net that trains, the net that is measured, the loss's target) of a phase."""
    mult = 1.0 if step.final else options.new_lr_mult

    def build(with_suffix: bool, until: str | None = None) -> StepNet:
        return build_step_net(step, ctx.slim, ctx.original, with_suffix, ctx.shared, mult, options.freeze_rest,
                              until)

    if step.final:
        whole = build(False)
        return whole, whole, "labels+kd" if options.mode == "label" else "kd"
    try:
        hybrid: StepNet | None = build(True)
    except DeepRebirthError:
        hybrid = None
    if options.mode == "label":
        assert hybrid is not None  # checked before training started
        return hybrid, hybrid, "labels+kd"
    if hybrid is None or options.mimic_at == "local":
        local = build(False)
        return local, hybrid or local, "local"
    if options.mimic_at == "logits":
        return hybrid, hybrid, "kd"
    until = _next_blob(ctx, step)
    if until == ctx.logits:
        return hybrid, hybrid, "kd"
    return build(True, until), hybrid, f"next:{until}"


def _phase_spec(ctx: _Context, step: Step, store: Weights, teacher: Teacher,
                options: FinetuneOptions) -> tuple[PhaseSpec, StepNet, str]:
    train_student, eval_student, target = _student(ctx, step, options)
    counts = _blob_counts(ctx, train_student, store)
    net = training_net(train_student.net, train_student.factor, counts, options.batch, "none", "")
    original_counts = {name: len(blobs) for name, blobs in ctx.original_weights.items()}
    losses: dict[str, float] = {}
    compare: dict[str, tuple[str, str]] = {}
    if not step.final:
        compare["blob"] = (eval_student.blob, step.reproduces)
    if target in ("labels+kd", "kd"):
        assert train_student.output is not None or step.final
        output = train_student.blob if step.final else train_student.output
        logits = logits_of(net, output)  # type: ignore[arg-type]
        embed_teacher(net, ctx.original, ctx.io.input, [ctx.logits], original_counts)
        kd_weight = options.kd_weight if target == "labels+kd" else 1.0
        if kd_weight > 0:
            top = add_distillation(net, logits, teacher_name(ctx.logits), options.temperature, kd_weight,
                                   options.batch)
            losses[top] = kd_weight / options.batch
        if target == "labels+kd" and kd_weight < 1:
            top = add_label_loss(net, logits, 1.0 - kd_weight, options.batch)
            losses[top] = 1.0 - kd_weight
        objective = "label" if target == "labels+kd" else "kd"
    else:
        if target == "local":
            student_blob, original_blob = train_student.blob, step.reproduces
            objective = "blob"
        else:
            student_blob, original_blob = train_student.until or "", target.split(":", 1)[1]
            compare["until"] = (student_blob, original_blob)
            objective = "until"
        embed_teacher(net, ctx.original, ctx.io.input, [original_blob], original_counts)
        sample = teacher.outputs(ctx.train.batch(ctx.train_indices[:options.batch]), [original_blob])[original_blob]
        top = add_mimic_loss(net, student_blob, teacher_name(original_blob), int(np.prod(sample.shape[1:])),
                             float(np.var(sample)))
        losses[top] = net.layer[-1].loss_weight[0]
    eval_net = pb.NetParameter()
    eval_net.CopyFrom(eval_student.net)
    for param in eval_net.layer:
        if param.type == "Input":
            for shape in param.input_param.shape:
                shape.dim[0] = options.batch
    eval_logits: str | None = None
    if step.final:
        eval_logits = eval_student.blob
    elif eval_student.output is not None:
        eval_logits = logits_of(eval_net, eval_student.output)
    # the student's layers learn; the teacher's and the suffix's frozen ones do not
    learned = [name for name, f in train_student.factor.items() if f > 0 and counts.get(name)]
    spec = PhaseSpec(step.index, step.name, net, losses, _lookup(ctx, [train_student, eval_student], store), learned, eval_net,
                     eval_logits, ctx.logits, compare, objective, options.mode == "label" and "label" in
                     [p.name for p in net.layer], options.temperature, options.kd_weight)
    return spec, train_student, target


def _run_step(ctx: _Context, step: Step, store: Weights, teacher: Teacher, options: FinetuneOptions,
              allot: Allotment, clock: Clock, notify: ProgressCallback) -> StepResult:
    total = len(ctx.steps)
    notify(Progress("step", step.index, total, step.name))
    spec, student, target = _phase_spec(ctx, step, store, teacher, options)
    data = PhaseData(ctx.work, ctx.io.input, ctx.train, ctx.train_indices, ctx.val, ctx.val_indices, teacher,
                     options.batch, options.seed, options.cache_mb * 2**20, options.patience, options.shuffle)

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

    outcome: PhaseOutcome = run_phase(spec, data, options.solver, allot, relay)
    for name, blobs in outcome.weights.items():
        where, layer = student.source[name]
        if where == "slim" or layer in ctx.shared:
            store[layer] = [b.reshape(store[layer][i].shape) for i, b in enumerate(blobs)]
    learned = len(spec.learned)
    frozen = sum(1 for name, f in student.factor.items() if f == 0 and name in _blob_counts(ctx, student, store))
    b, a = outcome.before, outcome.after
    return StepResult(step.index, step.name, step.rules, step.relearn, step.reproduces, target, learned, frozen,
                      outcome.iterations, outcome.best_iteration, outcome.stopped_early, outcome.lr,
                      outcome.lr_search, outcome.solver, outcome.loss_start, outcome.loss_end, b.get("accuracy"), a.get("accuracy"),
                      b.get("blob_error"), a.get("blob_error"), b.get("output_error"), a.get("output_error"),
                      b.get("agreement"), a.get("agreement"), outcome.seconds, outcome.evaluations)
