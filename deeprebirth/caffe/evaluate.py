"""Accuracy of a classification net on labelled data in real Caffe: top-1, top-5, and how often its top-1 agrees
with a reference net (the original, for a slimmed net: agreement says how faithfully it replaces it, labels aside).

The net's prediction is its first output blob (a Softmax's probabilities or raw logits: the ranking is the same),
flattened per image. Batches are written into the net's single Input blob (see deeprebirth.caffe.data).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from deeprebirth.caffe.data import Batches, DataSet, PathLike, Transform, open_data
from deeprebirth.caffe.isolation import run_isolated
from deeprebirth.caffe.runtime import open_net
from deeprebirth.errors import DeepRebirthError
from deeprebirth.ir.graph import Graph
from deeprebirth.ir.model import load_model
from deeprebirth.ir.shapes import infer_shapes

NET_BYTES_PER_ACTIVATION = 8  # measured: a pycaffe TEST net held twice its activations' float32 bytes (ResNet-50)
EVALUATION_BYTES = 2**30  # a net at the evaluation batch, by default
MAX_EVALUATION_BATCH = 100


def activations_per_image(graph: Graph) -> float:
    """The activations of one image in a pycaffe net: each Caffe blob once (in-place layers share it), at its
    largest."""
    names = graph.caffe_blob_names()
    largest: dict[str, int] = {}
    for blob, shape in infer_shapes(graph).items():
        if shape is not None:
            largest[names[blob]] = max(largest.get(names[blob], 0), int(np.prod(shape[1:])))
    return float(sum(largest.values()))


def images_within(budget_bytes: float, activations: float,
                  bytes_per_activation: float = NET_BYTES_PER_ACTIVATION) -> int:
    """How many images of ``activations`` each fit in ``budget_bytes`` (by default as a pycaffe net holds them;
    4 for float32 numpy); may be 0."""
    return int(budget_bytes // max(bytes_per_activation * activations, 1.0))


def evaluation_batch(graph: Graph) -> int:
    """Images per forward pass where none is given: as many as ``EVALUATION_BYTES`` of the net holds, at most
    ``MAX_EVALUATION_BATCH`` (a ResNet-50 at 224x224, 8.8 M activations an image: 15; at 100 it held 7 GB)."""
    return max(1, min(MAX_EVALUATION_BATCH, images_within(EVALUATION_BYTES, activations_per_image(graph))))


@dataclass(frozen=True)
class NetIO:
    """Where data goes in and predictions come out of a net."""

    input: str  # Caffe blob name of the single Input
    channels: int
    size: tuple[int, int]  # (height, width)
    output: str  # Caffe blob name of the prediction
    classes: int

    @classmethod
    def of(cls, graph: Graph, source: str | None = None) -> NetIO:
        shapes = infer_shapes(graph)
        inputs = graph.inputs()
        if len(inputs) != 1:
            raise DeepRebirthError(f"needs a net with exactly one Input blob, found {len(inputs)}", file=source)
        shape = shapes[inputs[0]]
        if shape is None or len(shape) != 4:
            raise DeepRebirthError(f"the Input blob must be N×C×H×W, got {shape}", file=source)
        outputs = graph.outputs()
        if not outputs or shapes[outputs[0]] is None:
            raise DeepRebirthError("the net has no output of known shape", file=source)
        out_shape = shapes[outputs[0]]
        assert out_shape is not None
        return cls(graph.caffe_name(inputs[0]), shape[1], (shape[2], shape[3]), graph.caffe_name(outputs[0]),
                   math.prod(out_shape[1:]))


def set_input(net: Any, name: str, array: np.ndarray) -> None:
    """Write ``array`` into blob ``name``, reshaping the net when the batch size changes."""
    blob = net.blobs[name]
    if blob.data.shape != array.shape:
        blob.reshape(*array.shape)
        net.reshape()
    blob.data[...] = array


def predict(net: Any, io: NetIO, batches: Batches, indices: np.ndarray, batch: int = 100,
            extra: Callable[[Any, np.ndarray], None] | None = None) -> np.ndarray:
    """Scores (N × classes) for ``indices``; ``extra(net, chunk)`` runs after each forward (to read other blobs)."""
    scores = np.empty((len(indices), io.classes), dtype=np.float32)
    for start in range(0, len(indices), batch):
        chunk = indices[start:start + batch]
        set_input(net, io.input, batches.batch(chunk))
        net.forward()
        scores[start:start + len(chunk)] = net.blobs[io.output].data.reshape(len(chunk), -1)
        if extra is not None:
            extra(net, chunk)
    return scores


def top1_hits(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per row, whether the highest score (the first, on a tie) is the label: what ``paired_change_error`` pairs."""
    return scores.argmax(axis=1) == labels  # type: ignore[no-any-return]


def top_k(scores: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Fraction of rows whose label is among the ``k`` highest scores (ties broken by position)."""
    if len(labels) == 0:
        return float("nan")
    k = min(k, scores.shape[1])
    best = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return float(np.mean(np.any(best == labels[:, None], axis=1)))


@dataclass
class Evaluation:
    images: int
    top1: float
    top5: float | None  # None when the net has fewer than 6 classes (top-5 would be trivially 1)
    classes: int
    agreement: float | None = None  # fraction of images where the top-1 equals the reference's
    reference_top1: float | None = None
    reference_top5: float | None = None
    top1_change_error: float | None = None  # standard error of top1 - reference_top1 (``paired_change_error``)
    seconds: float = 0.0


def paired_change_error(net_correct: np.ndarray, reference_correct: np.ndarray) -> float:
    """The standard error of a top-1 change measured on one set of images: ``std(d) / sqrt(n)`` of the per-image
    differences ``d = net right - reference right`` (each -1, 0 or 1). Both nets see the same images, so the images
    both get right or both get wrong add no noise; only the ones they disagree on do. On a few hundred images a
    change of a point or two is often within twice this, i.e. not shown by the data. NaN below two images."""
    d = np.asarray(net_correct, dtype=np.float64) - np.asarray(reference_correct, dtype=np.float64)
    return float(np.std(d, ddof=1) / np.sqrt(len(d))) if len(d) > 1 else float("nan")


def _predict_files(prototxt: PathLike, caffemodel: PathLike, gpu: int | None, io: NetIO, batches: Batches,
                   indices: np.ndarray, batch: int) -> np.ndarray:
    return predict(open_net(prototxt, caffemodel, gpu), io, batches, indices, batch)


def _isolated_predict(prototxt: PathLike, caffemodel: PathLike, gpu: int | None, io: NetIO, batches: Batches,
                      indices: np.ndarray, batch: int) -> np.ndarray:
    """``predict`` in an isolated child (``deeprebirth.caffe.isolation``): a net Caffe refuses is a one-line error."""
    scores: np.ndarray = run_isolated(_predict_files, prototxt, caffemodel, gpu, io, batches, indices, batch,
                                      what=Path(prototxt).name)
    return scores


def evaluate_files(prototxt: PathLike, caffemodel: PathLike, data: PathLike | DataSet, *,
                   reference: tuple[PathLike, PathLike] | None = None, transform: Transform | None = None,
                   batch: int | None = None, limit: int | None = None, gpu: int | None = None) -> Evaluation:
    """Top-1/top-5 of the net on ``data`` (validated before any forward pass), and agreement with ``reference``;
    on GPU ``gpu`` when given (a CUDA build of Caffe), else on the CPU; ``batch`` images per forward pass (default:
    ``evaluation_batch`` of each net)."""
    start = time.perf_counter()
    graph = load_model(prototxt, caffemodel)
    io = NetIO.of(graph, str(prototxt))
    ref_io, ref_graph = None, None
    if reference is not None:
        ref_graph = load_model(*reference)
        ref_io = NetIO.of(ref_graph, str(reference[0]))
        if (ref_io.channels, ref_io.size, ref_io.classes) != (io.channels, io.size, io.classes):
            raise DeepRebirthError(f"the reference takes {ref_io.channels}x{ref_io.size} and predicts "
                                   f"{ref_io.classes} classes; the net {io.channels}x{io.size}, {io.classes}",
                                   file=str(reference[0]))
    transform = (transform or Transform()).for_evaluation()
    dataset = data if isinstance(data, DataSet) else open_data(data, channels=io.channels, input_size=io.size,
                                                               transform=transform, classes=io.classes,
                                                               need_labels=True)
    if dataset.labels is None:
        raise DeepRebirthError("evaluation needs labelled data", file=dataset.source)
    indices = np.arange(len(dataset) if limit is None else min(limit, len(dataset)))
    batches = Batches(dataset, transform, io.size)
    labels = dataset.labels[indices]
    scores = _isolated_predict(prototxt, caffemodel, gpu, io, batches, indices, batch or evaluation_batch(graph))
    five = io.classes > 5
    result = Evaluation(len(indices), top_k(scores, labels, 1), top_k(scores, labels, 5) if five else None,
                        io.classes)
    if reference is not None and ref_io is not None and ref_graph is not None:
        ref_scores = _isolated_predict(*reference, gpu, ref_io, batches, indices, batch or evaluation_batch(ref_graph))
        result.agreement = float(np.mean(scores.argmax(axis=1) == ref_scores.argmax(axis=1)))
        result.reference_top1 = top_k(ref_scores, labels, 1)
        result.reference_top5 = top_k(ref_scores, labels, 5) if five else None
        result.top1_change_error = paired_change_error(top1_hits(scores, labels), top1_hits(ref_scores, labels))
    result.seconds = time.perf_counter() - start
    return result


CHANCE_Z = 3.0  # binomial standard deviations above a guess that make labels the net's own classes


def labels_are_its_classes(accuracy: float | None, images: int, classes: int) -> bool:
    """Whether held-out labels are the net's classes: the original's top-1 against them (``accuracy`` over
    ``images``) beats a guess among ``classes`` by more than ``CHANCE_Z`` standard deviations. On 125 images that is
    2 hits of 1,000 classes, 12% of 17 and 64% of 2."""
    if accuracy is None or images == 0:
        return False
    guess = 1 / max(classes, 1)
    return accuracy * images > images * guess + CHANCE_Z * math.sqrt(images * guess * (1 - guess))
