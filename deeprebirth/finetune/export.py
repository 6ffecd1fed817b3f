"""``finetune --export DIR``: the fine-tuning plan written as plain Caffe files, for ``caffe train`` on any machine
(one GPU, ``-gpu all``, or the CPU) instead of the in-process run.

The step nets are the in-process ones (``spec.phase_spec`` builds both); only the ``Input`` layers the
in-process run feeds from numpy are replaced by a ``Data`` layer: the user's own (``--train-val``) or one reading an
LMDB of Caffe Datums that the export writes from ``--data`` (raw pixels; the same transform as ``transform_param``).
For each phase ``step_K/`` holds ``train_val.prototxt``, ``solver.prototxt`` and ``init.caffemodel``; ``run.sh``
chains them::

    caffe train -solver step_K/solver.prototxt -weights step_{K-1}/snapshot_iter_N.caffemodel,step_K/init.caffemodel

Caffe copies weights by layer name, a later file over an earlier one. ``init.caffemodel`` holds every layer of the
step's net that no earlier step learns (the frozen teacher, the original's layers after the step's blob, merged
layers not learned yet); the layers earlier steps learned come from the previous snapshot, under the same names
(checked here, when exporting). The deploy caffemodel at the end: pycaffe's ``Net.save`` of ``deploy.prototxt``
with the last snapshot (only the slim net's layers), or, without pycaffe, the last snapshot copied (it also holds
the frozen teacher, which Caffe skips when it loads ``deploy.prototxt``).

What a plain solver cannot do: search the learning rate (``--lr``, else the search's reference rate, which is
what it picked for the Fashion-MNIST whole-net run: SGD 0.01), follow a time budget (refused: give iterations or
epochs), keep the best held-out checkpoint and stop early (the last iteration's weights are kept).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from deeprebirth import caffe_pb2 as pb
from deeprebirth.caffe.data import PathLike, Transform, write_lmdb
from deeprebirth.caffe.evaluate import NetIO
from deeprebirth.errors import DeepRebirthError
from deeprebirth.finetune.context import Context, Teacher, phase_iterations, prepare
from deeprebirth.finetune.driver import resolve_auto, resolve_refit
from deeprebirth.finetune.losses import TEACHER
from deeprebirth.finetune.options import DEFAULT_BATCH, FinetuneOptions, check_options
from deeprebirth.finetune.refit import refit_rounds
from deeprebirth.finetune.search import REFERENCE_BATCH, REFERENCE_GRADIENT, reference_rate
from deeprebirth.finetune.spec import blob_counts, phase_spec
from deeprebirth.finetune.steps import StepNet
from deeprebirth.finetune.train import relative_steps, solver_text, validate_net
from deeprebirth.io import caffe_io
from deeprebirth.io.atomic import atomic_write_bytes as write_text
from deeprebirth.io.atomic import umask

USER_DATA_LAYERS = ("Data", "ImageData")
LABEL = "label"
Identity = tuple[str, str]  # ("slim" | "original", layer): where a train-net layer's weights come from


@dataclass
class ExportedStep:
    index: int
    name: str
    target: str  # what the loss looks at, as in the in-process report
    iterations: int
    learns: list[str]  # layers with lr_mult > 0
    weights: str  # the -weights argument of its `caffe train`
    snapshot: str  # the caffemodel Caffe leaves at the end


@dataclass
class ExportResult:
    folder: str
    steps: list[ExportedStep]
    solver: str
    lr: float
    lr_note: str
    batch: int
    data: str  # what the Data layer reads
    images: int | None  # records written to train_lmdb (None: the user's data layer)

    def describe(self) -> list[str]:
        lines = [(f"wrote {self.folder}: {len(self.steps)} phase(s), {self.solver} at {self.lr:g} ({self.lr_note}), "
                  f"batch {self.batch} per GPU, data: {self.data}")]
        lines += [f"  step_{s.index}: {s.name}, {s.iterations} iterations, loss on {s.target}" for s in self.steps]
        lines.append(f"run it: {self.folder}/run.sh [-gpu all]   (CAFFE=/path/to/caffe to pick the binary); "
                     "it writes final.caffemodel for deploy.prototxt")
        return lines


def export_plan(original_prototxt: PathLike, original_weights: PathLike, slim_prototxt: PathLike,
                slim_weights: PathLike, report_path: PathLike, data: PathLike, folder: PathLike,
                options: FinetuneOptions | None = None, train_val: PathLike | None = None,
                display: int | None = None) -> ExportResult:
    """Write the plan (see the module docstring) into the new folder ``folder``; nothing is trained. ``display``:
    Caffe's loss log interval (default: about 20 lines per phase)."""
    options = options or FinetuneOptions()
    options = replace(options, batch=options.batch or DEFAULT_BATCH)
    budget = check_options(options)
    if options.mixup == "on":
        raise DeepRebirthError("--mixup on blends images in-process; an exported plan reads Caffe's own data layers "
                               "(leave --mixup off with --export)")
    if budget.timed:
        raise DeepRebirthError(f"budget {options.budget}: a time budget cannot be exported (how many iterations "
                               "fit depends on the machine that runs them); give iterations (e.g. 3000it) or "
                               "epochs (e.g. 5ep)", options=("budget",))
    target = Path(folder)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise DeepRebirthError("the export folder exists and is not empty; choose a new one", file=str(target))
    parent = target.resolve().parent
    if not parent.is_dir():
        raise DeepRebirthError("the export folder's parent does not exist", file=str(target))
    if train_val is not None and not Path(train_val).is_file():
        raise DeepRebirthError("no such file", file=str(train_val))
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=parent))
    try:
        with tempfile.TemporaryDirectory(prefix="deeprebirth-export-") as work:
            opts = replace(options, work_dir=work, resume=False, report=None, max_steps=None)
            ctx, store, _, _ = prepare(original_prototxt, original_weights, slim_prototxt, slim_weights,
                                       report_path, data, staging / "final.caffemodel", opts)
            teacher = Teacher(ctx.original, ctx.original_proto, original_weights, NetIO.of(ctx.original).input)
            # an exported budget counts iterations or epochs: the pace does not enter the hints' rule
            opts = replace(opts, hints=resolve_auto(opts.hints, budget, len(ctx.train_indices), 0.0))
            # the whole phase's start, as in process: the exported init.caffemodel holds it
            if resolve_refit(opts.refit, opts.schedule, budget, len(ctx.train_indices), 0.0) == "on":
                refit_rounds(ctx, store, original_weights, opts.seed, opts.freeze_rest)
            result = _write(ctx, store, teacher, opts, budget, staging, train_val, display)
        os.chmod(staging, 0o777 & ~umask())
        if target.exists():
            target.rmdir()
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    result.folder = str(target)
    return result


def _write(ctx: Context, store: dict[str, list[np.ndarray]], teacher: Teacher, options: FinetuneOptions,
           budget: Any, out: Path, train_val: PathLike | None, display: int | None) -> ExportResult:
    iterations = phase_iterations(ctx, options, budget)
    batch = options.batch or DEFAULT_BATCH
    # the search's reference for the reference batch and loss: a plain solver has no search to scale or move it
    lr = (options.solver.lr if options.solver.lr is not None else
          reference_rate(options.solver.solver, REFERENCE_BATCH, REFERENCE_GRADIENT, options.mode == "mimic"))
    lr_note = "as given" if options.solver.lr is not None else "the search's reference rate; give a rate to choose"
    solver = replace(options.solver, lr=lr)
    data_layer, described, images = _training_data(ctx, options, batch, out, train_val)
    caffe_io.write_prototxt(out / "deploy.prototxt", ctx.slim.to_net())

    steps: list[ExportedStep] = []
    learned_before: set[Identity] = set()
    previous: dict[str, tuple[Identity, list[tuple[int, ...]]]] = {}
    for k, step in enumerate(ctx.steps):
        spec, student, target = phase_spec(ctx, step, store, teacher, options)
        validate_net(spec.train_net, f"step {step.index} train net")
        train_net = relative_steps(spec.train_net, spec.learned, spec.init, solver.solver)  # as the Trainer does
        net = with_data_layer(train_net, data_layer, ctx.io.input, spec.labels)
        params = _train_net_params(ctx, spec, student, store)
        init = _step_init(step.index, params, previous, learned_before)
        folder = out / f"step_{step.index}"
        folder.mkdir()
        caffe_io.write_prototxt(folder / "train_val.prototxt", net)
        init_net = pb.NetParameter(name=net.name)
        for layer in net.layer:
            if layer.name in init:
                init_net.layer.add(name=layer.name, type=layer.type)
        caffe_io.write_caffemodel(folder / "init.caffemodel", init_net, init)
        every = display if display is not None else max(1, iterations[k] // 20)
        write_text(folder / "solver.prototxt",
                   solver_text(f"step_{step.index}/train_val.prototxt", solver, iterations[k], options.seed, every,
                               f"step_{step.index}/snapshot"))
        start = f"step_{step.index}/init.caffemodel"
        weights = f"{steps[-1].snapshot},{start}" if steps else start
        steps.append(ExportedStep(step.index, step.name, target, iterations[k], spec.learned, weights,
                                  f"step_{step.index}/snapshot_iter_{iterations[k]}.caffemodel"))
        learned_before |= {params[name][0] for name in spec.learned if name in params}
        previous = {name: (identity, [a.shape for a in arrays]) for name, (identity, arrays) in params.items()}

    result = ExportResult(str(out), steps, solver.solver, float(lr), lr_note, batch, described, images)
    write_text(out / "run.sh", run_script(steps))
    os.chmod(out / "run.sh", 0o755)
    plan = asdict(result)
    plan.pop("folder")
    plan.update(mode=options.mode, schedule=options.schedule, budget=str(budget), seed=options.seed,
                deploy="deploy.prototxt", final="final.caffemodel")
    write_text(out / "plan.json", json.dumps(plan, indent=2))
    return result


def _training_data(ctx: Context, options: FinetuneOptions, batch: int, out: Path,
                   train_val: PathLike | None) -> tuple[pb.LayerParameter, str, int | None]:
    """The exported nets' data layer, its description, and the images written (None: the user's train_val's)."""
    if train_val is not None:
        return user_data_layer(train_val, batch), f"the TRAIN data layer of {train_val}", None
    order = ctx.train_indices
    if options.shuffle:  # Caffe's Data layer reads in key order
        order = order[np.random.default_rng(options.seed).permutation(len(order))]
    images = write_lmdb(ctx.train.data, order, out / "train_lmdb")
    data_layer = lmdb_data_layer("train_lmdb", options.transform, batch, out)
    return data_layer, f"train_lmdb ({images} images{', shuffled' if options.shuffle else ''})", images


def _step_init(index: int, params: dict[str, tuple[Identity, list[np.ndarray]]],
               previous: dict[str, tuple[Identity, list[tuple[int, ...]]]],
               learned_before: set[Identity]) -> dict[str, list[np.ndarray]]:
    """A step's starting weights: those no earlier step learned (the learned ones come from the previous step's
    snapshot, which Caffe loads first, so they must be there under the same name and shapes)."""
    init: dict[str, list[np.ndarray]] = {}
    for name, (identity, arrays) in params.items():
        shapes = [a.shape for a in arrays]
        if name in previous and previous[name][1] != shapes:
            raise DeepRebirthError(f"step {index}: layer '{name}' has other parameter shapes in step {index - 1}'s "
                                   "net, whose snapshot Caffe would load into it")
        if identity not in learned_before:
            init[name] = arrays
        elif previous.get(name, (None,))[0] != identity:
            raise DeepRebirthError(f"step {index}: layer '{name}', learned in an earlier step, is not in step "
                                   f"{index - 1}'s net under that name: this plan cannot be chained with "
                                   "`caffe train -weights`")
    return init


def _train_net_params(ctx: Context, spec: Any, student: StepNet,
                      store: dict[str, list[np.ndarray]]) -> dict[str, tuple[Identity, list[np.ndarray]]]:
    """Every train-net layer with parameters: where its weights come from, and their values at the step's start
    as the in-process run would have them if no earlier step had learned anything."""
    counts = blob_counts(ctx, student, store)
    found: dict[str, tuple[Identity, list[np.ndarray]]] = {}
    for layer in spec.train_net.layer:
        name = layer.name
        if name in student.source and counts.get(name):
            where, source = student.source[name]
            identity = ("slim", source) if where == "slim" or source in ctx.shared else ("original", source)
            found[name] = (identity, spec.init(name))
        elif name.startswith(TEACHER) and ctx.original_weights.get(name[len(TEACHER):]):
            found[name] = (("original", name[len(TEACHER):]), spec.init(name))
    return found


def with_data_layer(net: pb.NetParameter, data_layer: pb.LayerParameter, input_blob: str,
                    labels: bool) -> pb.NetParameter:
    """``net`` with its Input layers (the student's input, and the labels in label mode: what the in-process run
    feeds from numpy) replaced by ``data_layer``, whose tops become the input blob and ``label``. A label top the
    layer must have (ImageData) but the net does not read goes into a Silence layer."""
    out = pb.NetParameter()
    out.CopyFrom(net)
    del out.layer[:]
    layer = out.layer.add()
    layer.CopyFrom(data_layer)
    tops = [input_blob] + ([LABEL] if labels or data_layer.type == "ImageData" else [])
    del layer.top[:]
    layer.top.extend(tops)
    if len(tops) > 1 and not labels:
        out.layer.add(name="label_unused", type="Silence", bottom=[LABEL])
    for param in net.layer:
        if param.type == "Input":
            unknown = [t for t in param.top if t not in (input_blob, LABEL)]
            if unknown:
                raise DeepRebirthError(f"the step net has an input '{unknown[0]}' besides the data and the labels: "
                                       "a single data layer cannot feed it")
            continue
        out.layer.add().CopyFrom(param)
    return out


def lmdb_data_layer(source: str, transform: Transform, batch: int, out: Path) -> pb.LayerParameter:
    """A TRAIN ``Data`` layer over the exported LMDB, with the run's transform as ``transform_param`` (the resize
    and the channel order are already in the stored pixels); a mean file is copied next to it."""
    layer = pb.LayerParameter(name="data", type="Data")
    layer.include.add(phase=pb.TRAIN)
    layer.data_param.source = source
    layer.data_param.batch_size = batch
    layer.data_param.backend = pb.DataParameter.LMDB
    t = layer.transform_param
    if transform.scale != 1.0:
        t.scale = transform.scale
    t.mean_value.extend(transform.mean)
    if transform.mean_file:
        shutil.copyfile(transform.mean_file, out / "mean.binaryproto")
        t.mean_file = "mean.binaryproto"
    if transform.crop:
        t.crop_size = transform.crop
    t.mirror = transform.mirror
    return layer


def user_data_layer(train_val: PathLike, batch: int) -> pb.LayerParameter:
    """The TRAIN-phase Data or ImageData layer of a train_val, its batch size set to ``batch`` (the losses' weights
    are per batch) and its relative paths made absolute where they exist next to the train_val (Caffe reads them
    relative to where it runs)."""
    net = caffe_io.read_prototxt(train_val)
    if net.layers:
        raise DeepRebirthError("a V1 train_val (layers { }): upgrade it first with upgrade_net_proto_text",
                               file=str(train_val))

    def in_train(layer: pb.LayerParameter) -> bool:
        phases = [rule.phase for rule in layer.include if rule.HasField("phase")]
        excluded = [rule.phase for rule in layer.exclude if rule.HasField("phase")]
        return (not phases or pb.TRAIN in phases) and pb.TRAIN not in excluded

    found = [layer for layer in net.layer if layer.type in USER_DATA_LAYERS and in_train(layer)]
    if not found:
        raise DeepRebirthError("no TRAIN-phase Data or ImageData layer to read the training images with",
                               file=str(train_val))
    layer = pb.LayerParameter()
    layer.CopyFrom(found[0])
    folder = Path(train_val).resolve().parent

    def absolute(path: str) -> str:
        return str(folder / path) if path and not os.path.isabs(path) and (folder / path).exists() else path

    if layer.type == "Data":
        layer.data_param.batch_size = batch
        layer.data_param.source = absolute(layer.data_param.source)
    else:
        layer.image_data_param.batch_size = batch
        layer.image_data_param.source = absolute(layer.image_data_param.source)
    if layer.transform_param.HasField("mean_file"):
        layer.transform_param.mean_file = absolute(layer.transform_param.mean_file)
    return layer


def run_script(steps: list[ExportedStep]) -> str:
    last = steps[-1].snapshot
    lines = ["#!/bin/sh",
             "# deeprebirth finetune --export: one `caffe train` per phase, each starting from the one before (see",
             "# plan.json). Arguments go to every `caffe train`, e.g. ./run.sh -gpu all. CAFFE names the caffe binary",
             "# (default: caffe on PATH), PYTHON the interpreter that writes final.caffemodel (default: python3).",
             "set -e",
             'cd "$(dirname "$0")"',
             'CAFFE="${CAFFE:-caffe}"',
             'PYTHON="${PYTHON:-python3}"']
    for step in steps:
        lines += [f'echo "deeprebirth: phase {step.index}/{len(steps)}: {step.name} ({step.iterations} iterations)" >&2',
                  f'"$CAFFE" train -solver step_{step.index}/solver.prototxt -weights {step.weights} "$@"']
    lines += ["# the deploy caffemodel: the slim net's layers of the last snapshot (pycaffe), else the snapshot itself",
              "# (it also holds the frozen teacher, which Caffe skips when it loads deploy.prototxt)",
              'if "$PYTHON" -c "import caffe" 2>/dev/null; then',
              (f"    GLOG_minloglevel=2 \"$PYTHON\" -c \"import caffe; caffe.Net('deploy.prototxt', caffe.TEST, "
               f"weights='{last}').save('final.caffemodel.tmp')\""),
              "else",
              f"    cp {last} final.caffemodel.tmp",
              "fi",
              "mv final.caffemodel.tmp final.caffemodel",
              'echo "deeprebirth: wrote $(pwd)/final.caffemodel (for deploy.prototxt)" >&2']
    return "\n".join(lines) + "\n"
