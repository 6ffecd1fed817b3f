"""What every phase of a fine-tuning run shares, loaded and checked once (``prepare``): both nets, the phases,
the data and its held-out part, the work folder; and the original net in pycaffe as the reference (``Teacher``)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from deeprebirth.caffe.data import Batches, DataSet, PathLike, open_data, split_holdout
from deeprebirth.caffe.evaluate import NetIO, set_input
from deeprebirth.caffe.runtime import import_caffe
from deeprebirth.errors import DeepRebirthError
from deeprebirth.finetune.budget import Budget, phase_weights, share_iterations
from deeprebirth.finetune.options import DEFAULT_BATCH, FinetuneOptions, default_work_dir
from deeprebirth.finetune.state import Weights, open_state, run_fingerprint
from deeprebirth.finetune.steps import Step, build_step_net, final_step, final_writer, plan_steps
from deeprebirth.io import caffe_io
from deeprebirth.ir.graph import Graph
from deeprebirth.ir.model import load_model, same_file
from deeprebirth.rewrite import RewriteReport


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


@dataclass
class Context:
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


def prepare(original_prototxt: PathLike, original_weights: PathLike, slim_prototxt: PathLike,
            slim_weights: PathLike, report_path: PathLike, data: PathLike, out: PathLike,
            options: FinetuneOptions) -> tuple[Context, Weights, dict[str, Any], str]:
    """Check every input, plan the phases, open and validate the data, set up the work folder (or resume)."""
    inputs = [original_prototxt, original_weights, slim_prototxt, slim_weights, report_path]
    _check_paths(inputs, out)
    original = load_model(original_prototxt, original_weights)
    slim = load_model(slim_prototxt, slim_weights)
    steps = _plan_from_report(report_path, original, slim)
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
    train, train_indices, val, val_indices = _open_data(data, io, options)
    work = Path(options.work_dir) if options.work_dir is not None else default_work_dir(out)
    work.mkdir(parents=True, exist_ok=True)
    original_proto = work / "original.prototxt"
    caffe_io.write_prototxt(original_proto, original.to_net())
    fingerprint = run_fingerprint([*inputs, data, *([options.val] if options.val else [])], options)
    store = {layer.name: [np.array(b, dtype=np.float32) for b in layer.blobs] for layer in slim.layers()
             if layer.blobs}
    state = open_state(work, fingerprint, [s.name for s in phases], store, options.resume)
    ctx = Context(original, slim, original_proto, original.weights(), phases, whole.reproduces, shared, io, train,
                   train_indices, val, val_indices, work)
    return ctx, store, state, fingerprint


def _check_paths(inputs: list[PathLike], out: PathLike) -> None:
    for path in inputs:
        if not Path(path).is_file():
            raise DeepRebirthError("no such file", file=str(path))
    for path in inputs:
        if same_file(path, out):
            raise DeepRebirthError("the output would overwrite an input; choose another path", file=str(out))
    if not Path(out).parent.is_dir() and str(Path(out).parent):
        raise DeepRebirthError("output folder does not exist", file=str(out))


def _plan_from_report(report_path: PathLike, original: Graph, slim: Graph) -> list[Step]:
    """The layer-wise steps of the rewrite's report; its problems are named with the report's file."""
    try:
        report = RewriteReport.from_json(json.loads(Path(report_path).read_text()))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DeepRebirthError(f"not a JSON report ({type(err).__name__})", file=str(report_path)) from None
    except DeepRebirthError as err:
        raise DeepRebirthError(err.message, file=str(report_path)) from None
    try:
        return plan_steps(report, original, slim)
    except DeepRebirthError as err:
        raise DeepRebirthError(err.message, file=str(report_path)) from None


def _open_data(data: PathLike, io: NetIO,
               options: FinetuneOptions) -> tuple[Batches, np.ndarray, Batches | None, np.ndarray]:
    """The training batches and indices, and the held-out ones: ``--val``, else a share of ``data`` set aside."""
    dataset = open_data(data, channels=io.channels, input_size=io.size, transform=options.transform,
                        classes=io.classes, need_labels=options.mode == "label")
    train_indices = np.arange(len(dataset))
    val_set: DataSet | None = None
    if options.val is not None:
        val_set = open_data(options.val, channels=io.channels, input_size=io.size,
                            transform=options.transform.for_evaluation(), classes=io.classes)
    elif options.holdout > 0 and len(dataset) >= 20:
        train_indices, held = split_holdout(len(dataset), held_out_share(options.holdout, len(dataset)), options.seed)
        val_set = dataset.subset(held)
    val_indices = np.arange(0 if val_set is None else len(val_set))
    if options.val_limit is not None:
        val_indices = val_indices[:options.val_limit]
    train = Batches(dataset, options.transform, io.size, options.cache_mb * 2**20 / 2, options.seed)
    val = Batches(val_set, options.transform.for_evaluation(), io.size) if val_set is not None else None
    return train, train_indices, val, val_indices


MIN_HELD_OUT = 200  # fewer held-out images decide nothing (one image is half a point of top-1) ...
MAX_HELD_OUT_SHARE = 0.25  # ... but small data keeps at least three quarters for training


def held_out_share(asked: float, images: int) -> float:
    """The share of ``images`` held out: ``asked``, raised towards ``MIN_HELD_OUT`` images (at most
    ``MAX_HELD_OUT_SHARE``) where ``asked`` would hold out fewer: 500 images give 125, not 50."""
    return max(asked, min(MIN_HELD_OUT / images, MAX_HELD_OUT_SHARE))


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


def phase_iterations(ctx: Context, options: FinetuneOptions, budget: Budget) -> list[int]:
    """Each phase's share of an iteration or epoch budget."""
    epoch = max(1, len(ctx.train_indices) // (options.batch or DEFAULT_BATCH))
    weights = phase_weights(len(ctx.steps) - 1, options.schedule == "layerwise")
    return share_iterations(budget.iterations(epoch), weights)
