"""Layer-wise fine-tuning of a slimmed net with pycaffe solvers (DeepRebirth's "layer-wise fine-tuning").

The rewrite report lists the lossy changes and, for each, the new layers to re-learn (``relearn``) and the blob of
the ORIGINAL net whose activation they should reproduce (``reproduces``). Changes that share a new layer (GoogLeNet
conv1: pooling merged, then LRN merged into the same ``conv1_merge``) form one *step*; steps run one at a time in
network order (by the position of their blob in the original net), as in the paper: merge one layer or module,
fine-tune, go on.

Step k trains a net built from the slim net's layers up to the step's blob B (the "prefix": already fine-tuned
steps 1..k-1, this step's new layers, and the layers between, all with their current weights):

* ``label`` mode (the paper's): prefix + the ORIGINAL net's layers after B (original weights), i.e. the net with
  merges 1..k applied and k+1.. not yet, with the final Softmax replaced by SoftmaxWithLoss on labelled data.
* ``mimic`` mode (label-free; our addition): the prefix alone, with EuclideanLoss between its B and the original
  net's activation at B, fed as an extra Input; the teacher is the original net run in pycaffe up to B. The loss
  is weighted by 2 / (elements × variance of the teacher's B), so it reads as a relative mean squared error.
  Teacher activations are cached per image in memory (up to ``cache_mb``) when the inputs are deterministic (no
  random crop or mirror), so each image's teacher pass runs once per step.

With ``final_iters`` a closing step (our addition; the paper stops after the last merge) trains the whole slim
net at 1x: on the labels, or, in mimic mode, to reproduce the original's logits (the input of its final Softmax),
which corrects the small errors the earlier steps left and that add up along the net.

Design choice: the prefix is trained end to end from the data rather than fed precomputed prefix activations, so a
step's inputs always come from the already-slimmed prefix and nothing needs to know where the prefix ends; the
earlier layers cost a forward pass only when frozen (Caffe skips backward below the lowest learning layer).

Learning rates: the step's new layers get ``new_lr_mult`` (10x) the base rate; the other layers of the slim net
get 1x, or 0 with ``freeze_rest`` (then they are checked to stay bit-identical). In label mode the original's
layers after B learn only when the slim net has the very same layer (same name, settings and weights: untouched by
the rewrite), so that what they learn carries into the final net; the others stay as trained (frozen). BatchNorm
uses its global statistics throughout.

After each step: held-out top-1 of the step's net and the relative error at B (before and after training), a
snapshot (the slim net's caffemodel with every step so far) and ``state.json`` listing the finished steps, in a
work folder next to the output. ``resume`` continues from there without redoing finished steps.

Runs pycaffe in this process (a net Caffe would refuse is first built and shape-checked in the IR, so the usual
mistakes become one-line errors, not aborts); the library never prints: progress goes to a callback.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import networkx as nx
import numpy as np

from deeprebirth import caffe_io
from deeprebirth import caffe_pb2 as pb
from deeprebirth.caffe_runtime import import_caffe
from deeprebirth.data import (
    Batches,
    DataSet,
    PathLike,
    Transform,
    open_data,
    split_holdout,
)
from deeprebirth.errors import DeepRebirthError
from deeprebirth.evaluate import NetIO, predict, set_input, top_k
from deeprebirth.graph import Graph, GraphError
from deeprebirth.model import load_model, same_file
from deeprebirth.shapes import infer_shapes
from deeprebirth.train import (
    SOLVER_TYPES,
    SolverOptions,
    Weights,
    load_params,
    read_params,
    run_solver,
    training_net,
    write_text,
)

MODES = ("label", "mimic")
STATE_VERSION = 1


# ---------------------------------------------------------------------------------------------------------------
# options, progress and results


@dataclass
class FinetuneOptions:
    mode: str = "label"  # "label" (SoftmaxWithLoss on labels) or "mimic" (EuclideanLoss to the original's blob)
    iters: int = 300  # solver iterations per step
    final_iters: int = 0  # then this many over the whole slim net (label: the labels; mimic: the original's logits)
    final_lr: float | None = None  # the closing step's base rate (default: the solver's)
    batch: int = 64
    solver: SolverOptions = field(default_factory=SolverOptions)
    new_lr_mult: float = 10.0  # the step's new layers learn this much faster than the rest
    freeze_rest: bool = False  # only the step's new layers learn
    resume: bool = False  # continue a run that was interrupted (state.json in the work folder)
    transform: Transform = field(default_factory=Transform)  # training preprocessing (crop random, mirror)
    val: PathLike | None = None  # held-out data; default: ``holdout`` of --data
    holdout: float = 0.1  # fraction of --data held out when ``val`` is not given (0: no held-out metrics)
    val_limit: int | None = 2000  # held-out images per evaluation
    seed: int = 0
    max_steps: int | None = None  # stop after this many steps in this run (resume later)
    cache_mb: float = 1024.0  # memory for cached teacher activations (mimic mode)
    work_dir: PathLike | None = None  # default: <out without suffix>.finetune next to --out
    report: PathLike | None = None  # default: <out without suffix>.finetune.json


@dataclass
class Step:
    """One layer-wise step: the changes whose new layers are learned together."""

    index: int  # 1-based, in network order
    relearn: list[str]  # new layers (slim net)
    rules: list[str]
    changes: list[int]  # positions in the report's "changes"
    reproduces: str  # Caffe blob of the original net
    blob: str  # Caffe blob of the slim net at the same position
    final: bool = False  # the closing step over the whole net (``final_iters``): every layer learns at 1x

    @property
    def name(self) -> str:
        return "whole net" if self.final else ", ".join(self.relearn)


@dataclass
class StepResult:
    index: int
    name: str
    rules: list[str]
    relearn: list[str]
    reproduces: str
    learned: int  # layers that learned
    frozen: int  # layers with lr_mult 0
    iterations: int
    loss_start: float  # mean of the first tenth of the iterations
    loss_end: float  # mean of the last tenth
    accuracy_before: float | None  # held-out top-1 of the net with steps 1..k merged, before / after this step
    accuracy_after: float | None
    error_before: float | None  # held-out relative squared error at the step's blob (see mimic mode)
    error_after: float | None
    seconds: float
    teacher_cached: bool | None = None  # mimic mode: teacher activations cached


@dataclass
class Progress:
    """One thing that happened; ``event`` is "baseline", "step", "iteration", "evaluate", "finished" or
    "skipped" (a step finished by an earlier run, with ``resume``)."""

    event: str
    step: int = 0
    steps: int = 0
    name: str = ""
    iteration: int = 0
    iterations: int = 0
    loss: float | None = None
    result: StepResult | None = None


ProgressCallback = Callable[[Progress], None]


@dataclass
class FinetuneResult:
    mode: str
    steps: list[StepResult]
    planned: list[str]  # every step's name, in order
    complete: bool  # False when stopped by ``max_steps``
    resumed: int  # steps taken over from an earlier run
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
# planning steps from the report


def plan_steps(report: dict[str, Any], original: Graph, slim: Graph) -> list[Step]:
    """Group the report's lossy changes into steps and locate each step's blob in both nets.

    Changes join one step when they share a new layer (conv1 + pool1, then + norm1: one ``conv1_merge``), when a
    later change removed a layer an earlier one made (a merged conv that decompose_conv_tucker split: the merge is
    learned through the pieces), or when they reproduce the same blob (the branches of one inception module)."""
    changes = report.get("changes")
    if not isinstance(changes, list):
        raise DeepRebirthError("not a rewrite report (no 'changes' list)")
    lossy = [i for i, c in enumerate(changes) if isinstance(c, dict) and c.get("relearn")]
    parent = {i: i for i in lossy}

    def root(i: int) -> int:
        while parent[i] != i:
            i = parent[i]
        return i

    def join(a: int, b: int) -> None:
        parent[root(a)] = root(b)

    made: dict[str, int] = {}  # new layer -> the latest change that made it
    for i in lossy:
        change = changes[i]
        for name in change.get("removed") or []:
            if name in made:
                join(made.pop(name), i)
        for name in change["relearn"]:
            if name in made:
                join(made[name], i)
            made[name] = i
        if change.get("rule") == "merge_inception_branches" and change.get("changed"):
            raise DeepRebirthError(f"change {i + 1} ({change.get('summary')}) reorders the channels of "
                                   f"'{change.get('reproduces')}', which layer-wise fine-tuning compares with the "
                                   "original's channel by channel; rewrite with a --widen mode that keeps the channel "
                                   "order (balanced, on GoogLeNet-ordered blocks)")
    missing = sorted(name for name in made if name not in slim)
    if missing:
        raise DeepRebirthError(f"the report's change {made[missing[0]] + 1} re-learns '{missing[0]}', which the slim "
                               "net does not have: report and nets do not match")
    by_blob: dict[str, int] = {}
    for i in lossy:
        blob = changes[i].get("reproduces")
        if not blob or _final_writer(original, blob) is None:
            raise DeepRebirthError(f"change {i + 1} ({changes[i].get('rule')}) reproduces blob {blob!r}, which the "
                                   "original net does not have: report and nets do not match")
        if blob in by_blob:
            join(i, by_blob[blob])
        by_blob[blob] = i
    order = {layer.name: k for k, layer in enumerate(original.layers())}

    def position(blob: str) -> int:
        return order[_final_writer(original, blob)[1]]  # type: ignore[index]

    groups: dict[int, list[int]] = {}
    for i in lossy:
        groups.setdefault(root(i), []).append(i)
    steps = []
    for members in groups.values():
        names = {name for i in members for name in changes[i]["relearn"] if made.get(name) is not None}
        relearn = [layer.name for layer in slim.layers() if layer.name in names]
        if not relearn:
            continue
        reproduces = max((changes[i]["reproduces"] for i in members), key=position)
        if _final_writer(slim, reproduces) is None:
            raise DeepRebirthError(f"the slim net has no blob '{reproduces}' (the rules keep the name of the blob a "
                                   "merge reproduces): report and nets do not match")
        rules = list(dict.fromkeys(changes[i].get("rule", "?") for i in members))
        steps.append(Step(0, relearn, rules, members, reproduces, reproduces))
    steps.sort(key=lambda step: position(step.reproduces))
    o_shapes, s_shapes = infer_shapes(original), infer_shapes(slim)
    for k, step in enumerate(steps, 1):
        step.index = k
        a = o_shapes[_final_writer(original, step.reproduces)[0]]  # type: ignore[index]
        b = s_shapes[_final_writer(slim, step.blob)[0]]  # type: ignore[index]
        if a != b:
            raise DeepRebirthError(f"blob '{step.reproduces}' has shape {a} in the original net but {b} in the slim "
                                   "net: report and nets do not match")
    return steps


def final_step(steps: list[Step], original: Graph, slim: Graph) -> Step:
    """The closing step: the whole slim net, up to its logits (the input of a final Softmax, else its output).
    Its ``relearn`` lists every step's new layers (the only ones that learn with ``freeze_rest``)."""
    output = NetIO.of(slim).output
    _, last = _final_writer(slim, output)  # type: ignore[misc]
    producer = slim.layer(last)
    logits = slim.caffe_name(producer.bottoms[0]) if producer.type == "Softmax" else output
    if _final_writer(original, logits) is None:
        raise DeepRebirthError(f"the original net has no blob '{logits}' (the slim net's logits) to compare with")
    relearn = [name for step in steps for name in step.relearn]
    return Step(len(steps) + 1, relearn, ["final"], [], logits, logits, final=True)


def _final_writer(graph: Graph, blob: str) -> tuple[str, str] | None:
    """(SSA blob, layer) of the last layer that writes Caffe blob ``blob`` (in-place layers included)."""
    names = graph.caffe_blob_names()
    found = None
    for layer in graph.layers():
        for top in layer.tops:
            if names[top] == blob:
                found = (top, layer.name)
    return found


def _prefix(graph: Graph, layer: str) -> set[str]:
    return set(nx.ancestors(graph.dag(), layer)) | {layer}


# ---------------------------------------------------------------------------------------------------------------
# building the nets of a step


@dataclass
class StepNet:
    """A net for one step: layers in Caffe form, where each layer's weights come from, and how fast it learns."""

    net: pb.NetParameter
    source: dict[str, tuple[str, str]]  # layer name here -> ("slim" | "original", layer name there)
    factor: dict[str, float]  # layer name -> lr multiplier (0: frozen)
    blob: str  # the step's blob, as named in this net
    output: str | None  # the prediction blob (None for a mimic prefix)


def build_step_net(step: Step, slim: Graph, original: Graph, with_suffix: bool, shared: set[str],
                   new_lr_mult: float, freeze_rest: bool) -> StepNet:
    """The slim prefix up to the step's blob, and (``with_suffix``) the original's layers after it."""
    s_blob, s_last = _final_writer(slim, step.blob)  # type: ignore[misc]
    o_blob, o_last = _final_writer(original, step.reproduces)  # type: ignore[misc]
    keep = _prefix(slim, s_last)
    s_names = slim.caffe_blob_names()
    net = pb.NetParameter(name=f"{slim.name or 'net'}_step{step.index}")
    source: dict[str, tuple[str, str]] = {}
    factor: dict[str, float] = {}
    new = set(step.relearn)
    for param in slim.to_net().layer:
        if param.name in keep:
            net.layer.add().CopyFrom(param)
            source[param.name] = ("slim", param.name)
            factor[param.name] = new_lr_mult if param.name in new else (0.0 if freeze_rest else 1.0)
    output = None
    if with_suffix:
        taken_blobs = {s_names[b] for layer in slim.layers() if layer.name in keep for b in layer.tops}
        taken_layers = set(keep)
        before = _prefix(original, o_last)
        o_names = original.caffe_blob_names()
        o_params = {p.name: p for p in original.to_net().layer}

        def rename(blob: str) -> str:
            name = o_names[blob]
            return name + "/original" if name in taken_blobs else name

        for layer in original.layers():
            if layer.name in before or layer.type == "Input":
                continue
            bottoms = []
            for blob in layer.bottoms:
                if original.producer(blob).name in before:
                    if blob != o_blob:
                        raise DeepRebirthError(f"layer '{layer.name}' of the original net reads "
                                               f"'{o_names[blob]}', from before the step's blob "
                                               f"'{step.reproduces}': label mode cannot splice the nets there; "
                                               "use --mode mimic")
                    bottoms.append(s_names[s_blob])
                else:
                    bottoms.append(rename(blob))
            param = net.layer.add()
            param.CopyFrom(o_params[layer.name])
            name = layer.name + "/original" if layer.name in taken_layers else layer.name
            param.name = name
            del param.bottom[:]
            del param.top[:]
            param.bottom.extend(bottoms)
            param.top.extend(rename(t) for t in layer.tops)
            source[name] = ("original", layer.name)
            factor[name] = (0.0 if freeze_rest else 1.0) if layer.name in shared else 0.0
        hybrid = Graph.from_net(net, source="<step net>")
        outputs = hybrid.outputs()
        output = hybrid.caffe_name(outputs[0]) if outputs else None
    return StepNet(net, source, factor, s_names[s_blob], output)


def _deploy_net(step_net: StepNet, work: Path, tag: str, weights: Callable[[str], list[np.ndarray]]) -> Any:
    caffe = import_caffe()
    path = work / f"{tag}_deploy.prototxt"
    caffe_io.write_prototxt(path, step_net.net)
    net = caffe.Net(str(path), caffe.TEST)
    load_params(net, weights)
    return net


class Teacher:
    """The original net in pycaffe (TEST phase), run up to the last layer that writes a blob."""

    def __init__(self, prototxt: Path, weights: PathLike, input_name: str) -> None:
        caffe = import_caffe()
        self.net = caffe.Net(str(prototxt), caffe.TEST, weights=str(weights))
        self.input = input_name

    def run(self, x: np.ndarray, blob: str, end: str) -> np.ndarray:
        set_input(self.net, self.input, x)
        self.net.forward(end=end)
        return np.array(self.net.blobs[blob].data, dtype=np.float32)


class TeacherCache:
    """The teacher's activations at one blob per training image, computed on first use and kept when they fit in
    ``budget_bytes`` and the inputs are deterministic (``enabled``); else the teacher runs on every batch."""

    def __init__(self, teacher: Teacher, blob: str, end: str, count: int, shape: Sequence[int],
                 budget_bytes: float, enabled: bool) -> None:
        self.teacher, self.blob, self.end = teacher, blob, end
        size = count * int(np.prod(shape)) * 4
        self.values = np.empty((count, *shape), dtype=np.float32) if enabled and size <= budget_bytes else None
        self.filled = np.zeros(count, dtype=bool)

    @property
    def cached(self) -> bool:
        return self.values is not None

    def get(self, indices: np.ndarray, x: np.ndarray) -> np.ndarray:
        if self.values is None:
            return self.teacher.run(x, self.blob, self.end)
        missing = ~self.filled[indices]
        if missing.any():
            todo = np.unique(indices[missing])
            first = {int(i): k for k, i in reversed(list(enumerate(indices)))}
            rows = [first[int(i)] for i in todo]
            self.values[todo] = self.teacher.run(x[rows], self.blob, self.end)
            self.filled[todo] = True
        return self.values[indices]


# ---------------------------------------------------------------------------------------------------------------
# the driver


@dataclass
class _Context:
    """Everything a step needs, loaded and checked once."""

    original: Graph
    slim: Graph
    original_proto: Path  # the original, normalised, as Caffe reads it
    original_weights: Weights
    steps: list[Step]
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
    """Fine-tune the slim net step by step (see the module docstring); writes ``out`` and a JSON report."""
    options = options or FinetuneOptions()
    started = time.perf_counter()
    notify = progress or (lambda event: None)
    ctx, store, state, fingerprint = _prepare(original_prototxt, original_weights, slim_prototxt, slim_weights,
                                              report_path, data, out, options)
    teacher = Teacher(ctx.original_proto, original_weights, NetIO.of(ctx.original).input)
    finished = {r["index"]: StepResult(**r) for r in state.get("finished", [])}
    resumed = len(finished)
    if "baseline" not in state:
        notify(Progress("baseline", steps=len(ctx.steps)))
        state["baseline"] = _baseline(ctx, teacher, slim_prototxt, slim_weights)
        _save_state(ctx.work, state)
    done_now = 0
    for step in ctx.steps:
        if step.index in finished:
            notify(Progress("skipped", step.index, len(ctx.steps), step.name, result=finished[step.index]))
            continue
        if options.max_steps is not None and done_now >= options.max_steps:
            break
        step_result = _run_step(ctx, step, store, teacher, options, notify)
        finished[step.index] = step_result
        done_now += 1
        _snapshot(ctx, store, state, step_result)
    complete = len(finished) == len(ctx.steps)
    final_accuracy = None
    report = None
    if complete:
        caffe_io.write_caffemodel(out, ctx.slim.to_net(), store)
        if ctx.val is not None and ctx.val.data.labels is not None:
            final_accuracy = _accuracy(_slim_net(ctx, out), ctx.io, ctx.val, ctx.val_indices)
        report = str(options.report or _default_report(out))
    result = FinetuneResult(options.mode, [finished[i] for i in sorted(finished)], [s.name for s in ctx.steps],
                            complete, resumed, len(ctx.val_indices), state["baseline"].get("original"),
                            state["baseline"].get("slim"), final_accuracy, str(out) if complete else None, report,
                            str(ctx.work), time.perf_counter() - started)
    if report is not None:
        payload = result.to_json()
        payload["options"] = _options_json(options)
        payload["fingerprint"] = fingerprint
        write_text(Path(report), json.dumps(payload, indent=2))
    notify(Progress("finished", len(finished), len(ctx.steps)))
    return result


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
    """Check every input, plan the steps, open and validate the data, set up the work folder (or resume)."""
    if options.mode not in MODES:
        raise DeepRebirthError(f"unknown mode {options.mode!r} (label, mimic)")
    if options.iters < 1 or options.batch < 1 or options.final_iters < 0:
        raise DeepRebirthError("iterations and batch size must be at least 1 (final iterations at least 0)")
    if options.solver.solver not in SOLVER_TYPES:
        raise DeepRebirthError(f"unknown solver {options.solver.solver!r} (known: {', '.join(SOLVER_TYPES)})")
    inputs = [original_prototxt, original_weights, slim_prototxt, slim_weights, report_path]
    for path in inputs:
        if not Path(path).is_file():
            raise DeepRebirthError("no such file", file=str(path))
    for path in inputs:
        if same_file(path, out):
            raise DeepRebirthError("--out would overwrite an input; choose another path", file=str(out))
    if not Path(out).parent.is_dir() and str(Path(out).parent):
        raise DeepRebirthError("output folder does not exist", file=str(out))
    original = load_model(original_prototxt, original_weights)
    slim = load_model(slim_prototxt, slim_weights)
    try:
        report = json.loads(Path(report_path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DeepRebirthError(f"not a JSON report ({type(err).__name__})", file=str(report_path)) from None
    if not isinstance(report, dict):
        raise DeepRebirthError("not a rewrite report", file=str(report_path))
    try:
        steps = plan_steps(report, original, slim)
    except DeepRebirthError as err:
        raise DeepRebirthError(err.message, file=str(report_path)) from None
    if options.final_iters > 0:
        steps.append(final_step(steps, original, slim))
    shared = _shared_layers(original, slim)
    if options.mode == "label":  # can every step's net be spliced together? Say so before training starts
        for step in steps:
            build_step_net(step, slim, original, True, shared, options.new_lr_mult, options.freeze_rest)
    io = NetIO.of(slim, str(slim_prototxt))
    o_io = NetIO.of(original, str(original_prototxt))
    if (o_io.channels, o_io.size, o_io.classes) != (io.channels, io.size, io.classes):
        raise DeepRebirthError("the original and the slim net differ in input or number of classes",
                               file=str(slim_prototxt))
    need_labels = options.mode == "label"
    dataset = open_data(data, channels=io.channels, input_size=io.size, transform=options.transform,
                        classes=io.classes, need_labels=need_labels)
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
                             "steps": [s.name for s in steps], "finished": []}
    store = {layer.name: [np.array(b, dtype=np.float32) for b in layer.blobs] for layer in slim.layers()
             if layer.blobs}
    state_path = work / "state.json"
    if options.resume and state_path.is_file():
        try:
            previous = json.loads(state_path.read_text())
        except (OSError, json.JSONDecodeError):
            raise DeepRebirthError("cannot read the state of the earlier run", file=str(state_path)) from None
        if previous.get("fingerprint") != fingerprint or previous.get("version") != STATE_VERSION:
            raise DeepRebirthError("the earlier run used other files or options; run without --resume to start "
                                   "over", file=str(state_path))
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
    ctx = _Context(original, slim, original_proto, original.weights(), steps, shared, io, train, train_indices,
                   val, val_indices, work)
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
    digest = hashlib.sha256()
    for path in paths:
        p = Path(path)
        if p.is_file():
            with open(p, "rb") as handle:
                for chunk in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(chunk)
        else:
            digest.update(str(p.resolve()).encode())
    relevant = _options_json(options)
    for key in ("resume", "max_steps", "work_dir", "report", "cache_mb"):
        relevant.pop(key)
    digest.update(json.dumps(relevant, sort_keys=True, default=str).encode())
    return digest.hexdigest()


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


def _baseline(ctx: _Context, teacher: Teacher, slim_prototxt: PathLike, slim_weights: PathLike) -> dict[str, Any]:
    """Held-out top-1 of the original and of the slim net as rewritten (before any fine-tuning)."""
    if ctx.val is None:
        return {"original": None, "slim": None}
    original = _accuracy(teacher.net, NetIO.of(ctx.original), ctx.val, ctx.val_indices)
    slim = _accuracy(_slim_net(ctx, slim_weights), ctx.io, ctx.val, ctx.val_indices)
    return {"original": original, "slim": slim}


def _weights_for(ctx: _Context, step_net: StepNet, store: Weights) -> Callable[[str], list[np.ndarray]]:
    def lookup(name: str) -> list[np.ndarray]:
        where, layer = step_net.source[name]
        if where == "slim" or layer in ctx.shared:
            return store[layer]
        return ctx.original_weights[layer]

    return lookup


def _blob_counts(ctx: _Context, step_net: StepNet, store: Weights) -> dict[str, int]:
    counts = {}
    for name, (where, layer) in step_net.source.items():
        found = store.get(layer) if where == "slim" or layer in ctx.shared else ctx.original_weights.get(layer)
        if found:
            counts[name] = len(found)
    return counts


def _evaluate_step(ctx: _Context, step: Step, step_net: StepNet, store: Weights, teacher: Teacher,
                   tag: str) -> tuple[float | None, float | None]:
    """(held-out top-1 of the step's net, relative squared error at the step's blob)."""
    if ctx.val is None or not len(ctx.val_indices):
        return None, None
    net = _deploy_net(step_net, ctx.work, tag, _weights_for(ctx, step_net, store))
    _, end = _final_writer(ctx.original, step.reproduces)  # type: ignore[misc]
    sums = np.zeros(3)  # squared error, sum of teacher, sum of teacher squared
    count = [0]
    val = ctx.val

    def compare(net: Any, chunk: np.ndarray) -> None:
        student = np.asarray(net.blobs[step_net.blob].data, dtype=np.float64)
        target = teacher.run(val.batch(chunk), step.reproduces, end).astype(np.float64)
        sums[0] += float(np.sum((student - target) ** 2))
        sums[1] += float(np.sum(target))
        sums[2] += float(np.sum(target ** 2))
        count[0] += target.size

    if step_net.output is not None:
        io = NetIO(ctx.io.input, ctx.io.channels, ctx.io.size, step_net.output, ctx.io.classes)
        scores = predict(net, io, val, ctx.val_indices, extra=compare)
        accuracy = top_k(scores, val.labels(ctx.val_indices), 1) if val.data.labels is not None else None
    else:
        accuracy = None
        for start in range(0, len(ctx.val_indices), 100):
            chunk = ctx.val_indices[start:start + 100]
            set_input(net, ctx.io.input, val.batch(chunk))
            net.forward()
            compare(net, chunk)
    mean = sums[1] / count[0]
    variance = max(sums[2] / count[0] - mean ** 2, 1e-12)
    return accuracy, float(sums[0] / count[0] / variance)


def _run_step(ctx: _Context, step: Step, store: Weights, teacher: Teacher, options: FinetuneOptions,
              notify: ProgressCallback) -> StepResult:
    started = time.perf_counter()
    label = options.mode == "label"
    total = len(ctx.steps)
    iters = options.final_iters if step.final else options.iters
    mult = 1.0 if step.final else options.new_lr_mult
    notify(Progress("step", step.index, total, step.name, iterations=iters))
    if label:
        step_net = build_step_net(step, ctx.slim, ctx.original, True, ctx.shared, mult, options.freeze_rest)
        train_net = step_net
    else:  # mimic trains the prefix alone; the original's rest is joined on for held-out accuracy, if it can be
        train_net = build_step_net(step, ctx.slim, ctx.original, False, ctx.shared, mult, options.freeze_rest)
        step_net = train_net
        if ctx.val is not None and ctx.val.data.labels is not None:
            try:
                step_net = build_step_net(step, ctx.slim, ctx.original, True, ctx.shared, mult, options.freeze_rest)
            except DeepRebirthError:
                pass
    weights = _weights_for(ctx, train_net, store)
    tag = f"step{step.index}"
    notify(Progress("evaluate", step.index, total, step.name))
    accuracy_before, error_before = _evaluate_step(ctx, step, step_net, store, teacher, tag)
    counts = _blob_counts(ctx, train_net, store)
    rng = np.random.default_rng([options.seed, step.index])
    order = ctx.train_indices[rng.permutation(len(ctx.train_indices))]

    def batch_indices(i: int) -> np.ndarray:
        start = (i * options.batch) % len(order)
        return np.take(order, np.arange(start, start + options.batch), mode="wrap")

    cache: TeacherCache | None = None
    if label:
        assert train_net.output is not None
        train_form = training_net(train_net.net, train_net.factor, counts, options.batch, "label", train_net.output)
    else:
        _, end = _final_writer(ctx.original, step.reproduces)  # type: ignore[misc]
        shape = infer_shapes(ctx.original)[_final_writer(ctx.original, step.reproduces)[0]]  # type: ignore[index]
        assert shape is not None
        cache = TeacherCache(teacher, step.reproduces, end, len(ctx.train.data), shape[1:],
                             options.cache_mb * 2**20, enabled=not ctx.train.random)
        first = batch_indices(0)
        sample = cache.get(first, ctx.train.batch(first, np.random.default_rng([options.seed, step.index, 0])))
        variance = max(float(np.var(sample)), 1e-8)
        train_form = training_net(train_net.net, train_net.factor, counts, options.batch, "mimic", train_net.blob,
                                  shape[1:], loss_weight=2.0 / (int(np.prod(shape[1:])) * variance))

    def feed(i: int) -> dict[str, np.ndarray]:
        idx = batch_indices(i)
        x = ctx.train.batch(idx, np.random.default_rng([options.seed, step.index, i]))
        if label:
            return {ctx.io.input: x, "label": ctx.train.labels(idx).astype(np.float32)}
        assert cache is not None
        return {ctx.io.input: x, "mimic_target": cache.get(idx, x)}

    losses: list[float] = []

    def on_iteration(i: int, loss: float) -> None:
        losses.append(loss)
        notify(Progress("iteration", step.index, total, step.name, i + 1, iters, loss))

    solver = options.solver
    if step.final and options.final_lr is not None:
        solver = replace(solver, lr=options.final_lr)
    net = run_solver(ctx.work, tag, train_form, solver, iters, options.seed + step.index, weights, feed, on_iteration)
    learned = [name for name, f in train_net.factor.items() if f > 0 and name in net.params]
    frozen = [name for name, f in train_net.factor.items() if f == 0 and name in net.params]
    for name in frozen:
        if not all(np.array_equal(b.data, a.reshape(b.data.shape)) for b, a in zip(net.params[name], weights(name))):
            raise GraphError(f"layer {name!r} had lr_mult 0 but its weights changed")
    for name, blobs in read_params(net, learned).items():
        where, layer = train_net.source[name]
        if where == "slim" or layer in ctx.shared:
            store[layer] = [b.reshape(store[layer][i].shape) for i, b in enumerate(blobs)]
    notify(Progress("evaluate", step.index, total, step.name))
    accuracy_after, error_after = _evaluate_step(ctx, step, step_net, store, teacher, tag)
    tenth = max(1, len(losses) // 10)
    return StepResult(step.index, step.name, step.rules, step.relearn, step.reproduces, len(learned), len(frozen),
                      iters, float(np.mean(losses[:tenth])), float(np.mean(losses[-tenth:])),
                      accuracy_before, accuracy_after, error_before, error_after, time.perf_counter() - started,
                      None if cache is None else cache.cached)
