"""Training nets from pycaffe: a train prototxt made from a deploy net (learning-rate multipliers per layer, a
loss layer), a generated solver prototxt, and a loop that writes each batch into the nets' Input blobs and takes one
solver step (this Caffe build has no data layers that could read files, see deeprebirth.caffe.data).

Generated nets are shape-checked in the IR before Caffe sees them, so a mistake is a one-line error instead of a
glog abort. Learning rates decay linearly to 0 over a run (Caffe's "poly" policy, power 1) unless "fixed" is asked.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from deeprebirth import caffe_pb2 as pb
from deeprebirth.aliases import Weights
from deeprebirth.caffe.data import Batches, DataSet, PathLike, Transform, open_data
from deeprebirth.caffe.evaluate import NetIO, predict, top_k
from deeprebirth.caffe.runtime import import_caffe
from deeprebirth.errors import DeepRebirthError
from deeprebirth.io import caffe_io
from deeprebirth.io.caffe_io import set_batch
from deeprebirth.ir.graph import Graph, GraphError
from deeprebirth.ir.model import load_model
from deeprebirth.ir.shapes import expected_param_shapes, infer_shapes

SOLVER_TYPES = {"sgd": "SGD", "nesterov": "Nesterov", "adam": "Adam", "rmsprop": "RMSProp", "adagrad": "AdaGrad",
                "adadelta": "AdaDelta"}
DEFAULT_LR = {"sgd": 1e-3, "nesterov": 1e-3, "adam": 1e-4, "rmsprop": 1e-4, "adagrad": 1e-3, "adadelta": 1.0}


@dataclass
class SolverOptions:
    """What goes into the generated solver prototxt. The rate decays linearly to 0 over a step ("poly", power 1)."""

    solver: str = "adam"
    lr: float | None = None  # base rate; None: DEFAULT_LR[solver]
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lr_policy: str = "poly"  # "poly" (linear decay to 0 over the run) or "fixed"

    def base_lr(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.solver]


def training_net(deploy: pb.NetParameter, factor: dict[str, float], blobs: dict[str, int], batch: int, loss: str,
                 target: str) -> pb.NetParameter:
    """The train prototxt of a deploy net: batch size set, lr_mult = ``factor[layer]`` x the layer's own (for its
    ``blobs[layer]`` parameter blobs; 0 freezes it), BatchNorm on its global statistics, and a loss layer named
    "loss": with ``loss`` "label", SoftmaxWithLoss on the prediction blob ``target`` (the Softmax that makes it is
    replaced) and an Input "label"; with "none", no loss layer (fine-tuning adds its own: finetune/losses.py)."""
    net = pb.NetParameter()
    net.CopyFrom(deploy)
    set_batch(net, batch)
    for param in net.layer:
        count = blobs.get(param.name, 0)
        if param.type == "BatchNorm":
            param.batch_norm_param.use_global_stats = True
            continue
        while len(param.param) < count:
            param.param.add()
        for spec in param.param[:count]:
            base = spec.lr_mult if spec.HasField("lr_mult") else 1.0
            spec.lr_mult = factor.get(param.name, 1.0) * base
    if loss == "label":
        label = net.layer.add(name="label", type="Input", top=["label"])
        label.input_param.shape.add(dim=[batch])
        last = next((p for p in net.layer if target in p.top), None)
        logits = target
        if last is not None and last.type == "Softmax" and len(last.top) == 1:
            logits = last.bottom[0]
            net.layer.remove(last)
        net.layer.add(name="loss", type="SoftmaxWithLoss", bottom=[logits, "label"], top=["loss"])
    return net


def restore_dropout(net: pb.NetParameter, original: pb.NetParameter) -> list[str]:
    """Put the original's Dropout layers back into a training net made from the slim deploy net, and return their
    names. The rewrite removes Dropout (the identity at inference), but the original's weights were learned with it,
    and fine-tuning on a few hundred images without it lets the wide fully connected layers memorise them.

    Each Dropout (its ``dropout_param`` as in the original) goes in place on the blob it read, right after the last
    layer of ``net`` that writes that blob; a blob ``net`` does not make, or one a Dropout already reads, gets none.
    The deploy net, the net that is measured and the weights written are unchanged."""
    taken = {param.name for param in net.layer}
    read = {param.bottom[0] for param in net.layer if param.type == "Dropout" and param.bottom}
    restored = []
    for drop in (param for param in original.layer if param.type == "Dropout" and len(param.bottom) == 1):
        blob = drop.bottom[0]
        writers = [i for i, param in enumerate(net.layer) if blob in param.top]
        if blob in read or not writers:
            continue
        name = drop.name
        while name in taken:
            name += "/restored"
        layer = pb.LayerParameter(name=name, type="Dropout", bottom=[blob], top=[blob])
        layer.dropout_param.CopyFrom(drop.dropout_param)
        net.layer.insert(writers[-1] + 1, layer)
        taken.add(name)
        read.add(blob)
        restored.append(name)
    return restored


def validate_net(net: pb.NetParameter, what: str) -> None:
    """Shape-check a generated net in the IR first: a mistake becomes an error here, not a Caffe abort."""
    try:
        infer_shapes(Graph.from_net(caffe_io.normalize_net(net, phase="TRAIN"), source=what))
    except (DeepRebirthError, GraphError) as err:
        raise GraphError(f"generated {what} is not valid: {err}") from err


def solver_text(net_path: Path | str, options: SolverOptions, iters: int, seed: int, display: int = 0,
                snapshot_prefix: str | None = None) -> str:
    """A solver prototxt; ``net_path`` as given when a str (relative paths are relative to where Caffe runs), else
    made absolute. ``solver_mode: CPU``, which `caffe train -gpu` overrides (Caffe's default would be GPU 0)."""
    if options.solver not in SOLVER_TYPES:
        raise DeepRebirthError(f"unknown solver {options.solver!r} (known: {', '.join(SOLVER_TYPES)})")
    net = str(net_path.resolve()) if isinstance(net_path, Path) else net_path
    lines = [f'net: "{net}"', f'type: "{SOLVER_TYPES[options.solver]}"',
             f"base_lr: {options.base_lr():g}", f"weight_decay: {options.weight_decay:g}", f"max_iter: {iters}",
             f"display: {display}", "solver_mode: CPU", f"random_seed: {seed}"]
    if snapshot_prefix is not None:
        lines += ["snapshot: 0", f'snapshot_prefix: "{snapshot_prefix}"']
    if options.lr_policy == "poly":
        lines += ['lr_policy: "poly"', "power: 1"]
    elif options.lr_policy == "fixed":
        lines += ['lr_policy: "fixed"']
    else:
        raise DeepRebirthError(f"unknown lr policy {options.lr_policy!r} (poly, fixed)")
    if options.solver in ("sgd", "nesterov", "adam"):
        lines.append(f"momentum: {options.momentum:g}")
    if options.solver == "adam":
        lines += ["momentum2: 0.999", "delta: 1e-8"]
    return "\n".join(lines) + "\n"


def load_params(net: Any, weights: Callable[[str], list[np.ndarray]]) -> None:
    for name, blobs in net.params.items():
        arrays = weights(name)
        if len(arrays) != len(blobs):
            raise GraphError(f"layer {name!r}: {len(blobs)} parameter blobs in Caffe, {len(arrays)} known")
        for blob, array in zip(blobs, arrays):
            blob.data[...] = array.reshape(blob.data.shape)


def read_params(net: Any, names: Sequence[str]) -> Weights:
    return {name: [np.array(b.data, dtype=np.float32) for b in net.params[name]] for name in names
            if name in net.params}


PER_WEIGHT_STEP_SOLVERS = ("adam", "rmsprop", "adagrad", "adadelta")  # steps of about the rate per weight


def relative_steps(train_net: pb.NetParameter, learned: list[str], init: Callable[[str], list[np.ndarray]],
                   solver: str = "adam") -> pb.NetParameter:
    """``train_net`` as ``solver`` trains it: for ``PER_WEIGHT_STEP_SOLVERS``, with each learned layer's lr_mult
    scaled by its weights' RMS over the median layer's (other solvers: as it is). Adam and
    its kin step each weight by about the rate, whatever its scale; where layers' weights differ by orders of
    magnitude (a stem reading raw 0-255 pixels: 5e-4 against 0.05 on a ResNet-50 with its BatchNorm folded in), a
    rate that moves most layers gently moves the smallest by a fifth per step. Scaled, every layer moves by about
    the same share of its weights."""
    if solver not in PER_WEIGHT_STEP_SOLVERS:
        return train_net
    rms = {}
    for name in learned:
        blobs = init(name)
        if blobs and blobs[0].size:
            rms[name] = float(np.sqrt(np.mean(np.square(blobs[0], dtype=np.float64))))
    positive = [v for v in rms.values() if v > 0]
    if not positive:
        return train_net
    median = float(np.median(positive))
    scaled = pb.NetParameter()
    scaled.CopyFrom(train_net)
    for param in scaled.layer:
        if rms.get(param.name, 0) > 0:
            for spec in param.param:
                spec.lr_mult *= rms[param.name] / median
    return scaled


def make_solver(work: Path, tag: str, train_net: pb.NetParameter, options: SolverOptions, iters: int,
                seed: int) -> Any:
    """Write ``<tag>_train.prototxt`` + ``<tag>_solver.prototxt`` (shape-checked first) and create the solver."""
    caffe = import_caffe()
    validate_net(train_net, f"{tag} train net")
    net_path, solver_path = work / f"{tag}_train.prototxt", work / f"{tag}_solver.prototxt"
    caffe_io.write_prototxt(net_path, train_net)
    caffe_io.atomic_write_bytes(solver_path, solver_text(net_path, options, iters, seed, snapshot_prefix=str((work / tag).resolve())))
    caffe.set_random_seed(seed)
    return caffe.get_solver(str(solver_path))


def run_solver(work: Path, tag: str, train_net: pb.NetParameter, options: SolverOptions, iters: int, seed: int,
               init: Callable[[str], list[np.ndarray]] | None, feed: Callable[[int], dict[str, np.ndarray]],
               on_iteration: Callable[[int, float], None]) -> Any:
    """``make_solver``, load ``init`` weights (else the fillers), then ``iters`` times: write ``feed(i)`` into the
    input blobs and take one solver step."""
    solver = make_solver(work, tag, train_net, options, iters, seed)
    net = solver.net
    loss_layer = next(p for p in train_net.layer if p.name == "loss")
    scale = loss_layer.loss_weight[0] if loss_layer.loss_weight else 1.0  # Caffe's top holds the unweighted loss
    if init is not None:
        load_params(net, init)
    for i in range(iters):
        for name, array in feed(i).items():
            net.blobs[name].data[...] = array
        solver.step(1)
        on_iteration(i, float(net.blobs["loss"].data) * scale)
    return net


# ---------------------------------------------------------------------------------------------------------------
# training a classifier (all layers), e.g. the original net of an example


@dataclass
class TrainResult:
    iterations: int
    loss_start: float
    loss_end: float
    accuracy: float | None  # on the held-out data, when given
    seconds: float


def train_classifier(prototxt: PathLike, data: PathLike | DataSet, out: PathLike, *, iters: int, batch: int = 64,
                     solver: SolverOptions | None = None, transform: Transform | None = None,
                     weights: PathLike | None = None, val: PathLike | DataSet | None = None, seed: int = 0,
                     work_dir: PathLike | None = None,
                     progress: Callable[[int, int, float], None] | None = None) -> TrainResult:
    """Train every layer of the deploy net ``prototxt`` with SoftmaxWithLoss on labelled ``data`` (from its
    fillers, or from ``weights``) and write ``out``. ``progress(iteration, iterations, loss)``."""
    started = time.perf_counter()
    solver = solver or SolverOptions(solver="sgd", lr=0.01)
    transform = transform or Transform()
    graph = load_model(prototxt)
    io = NetIO.of(graph, str(prototxt))
    dataset = data if isinstance(data, DataSet) else open_data(data, channels=io.channels, input_size=io.size,
                                                               transform=transform, classes=io.classes,
                                                               need_labels=True)
    val_set = val if isinstance(val, DataSet) or val is None else open_data(
        val, channels=io.channels, input_size=io.size, transform=transform.for_evaluation(), classes=io.classes,
        need_labels=True)
    work = Path(work_dir) if work_dir is not None else Path(out).with_name(Path(out).stem + ".train")
    work.mkdir(parents=True, exist_ok=True)
    net_param = graph.to_net()
    counts = {name: len(shapes) for name, shapes in expected_param_shapes(graph).items() if shapes}
    train_form = training_net(net_param, {}, counts, batch, "label", io.output)
    init: Callable[[str], list[np.ndarray]] | None = None
    if weights is not None:
        init = load_model(prototxt, weights).weights().__getitem__

    batches = Batches(dataset, transform, io.size)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(dataset))
    losses: list[float] = []

    def feed(i: int) -> dict[str, np.ndarray]:
        start = (i * batch) % len(order)
        idx = np.take(order, np.arange(start, start + batch), mode="wrap")
        return {io.input: batches.batch(idx, np.random.default_rng([seed, i])),
                "label": batches.labels(idx).astype(np.float32)}

    def on_iteration(i: int, loss: float) -> None:
        losses.append(loss)
        if progress is not None:
            progress(i + 1, iters, loss)

    net = run_solver(work, "train", train_form, solver, iters, seed, init, feed, on_iteration)
    learned = read_params(net, list(net.params.keys()))
    caffe_io.write_caffemodel(out, net_param, learned)
    accuracy = None
    if val_set is not None:
        caffe = import_caffe()
        deploy = caffe.Net(str(prototxt), caffe.TEST, weights=str(out))
        indices = np.arange(len(val_set))
        val_batches = Batches(val_set, transform.for_evaluation(), io.size)
        assert val_set.labels is not None
        accuracy = top_k(predict(deploy, io, val_batches, indices), val_set.labels, 1)
    tenth = max(1, len(losses) // 10)
    return TrainResult(iters, float(np.mean(losses[:tenth])), float(np.mean(losses[-tenth:])), accuracy,
                       time.perf_counter() - started)
