"""The reference runtime: what runs a Caffe net to check a rewrite or an export, and to time it for a plan.

Real Caffe (pycaffe) where it imports, OpenCV dnn otherwise. OpenCV's dnn module reads the Caffe files themselves
(``readNetFromCaffe``: the prototxt and the caffemodel, weights matched by layer name as Caffe does), ships as a
wheel on every platform, and is what many Android apps run, so ``pip install deeprebirth`` checks rewrites on any
machine; building Caffe is needed only for fine-tuning.

What a check against OpenCV proves and what it does not:

* Both nets run in the same OpenCV build, so an exact rewrite that changed the function (a wrong fold, a lost
  bias, a permuted channel) shows as a difference, as it would in Caffe.
* OpenCV is not Caffe: it fuses BatchNorm, Scale and activations into the convolution itself at load time, so
  the original it runs is already "folded" by OpenCV's own arithmetic. Agreement says our fold computes what
  OpenCV's computes, and that OpenCV runs the output; that stock Caffe loads the output is a separate guarantee
  (standard BVLC layer types only, checked by the writer and, with pycaffe, by ``--reference caffe``).
* A layer OpenCV cannot run (Bias, ArgMax, some fork layers) stops the check with one line naming it.

A Caffe blob is read in OpenCV as the output of the layer that wrote it last (an in-place ReLU's blob is the ReLU
layer's output): OpenCV names its outputs by layer, and does not fuse a layer whose output was asked for.
"""

from __future__ import annotations

import importlib.util
import os
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from deeprebirth.aliases import Feed
from deeprebirth.caffe.runtime import CAFFE_HINT, caffe_outputs
from deeprebirth.errors import DeepRebirthError
from deeprebirth.ir.graph import Graph

REFERENCES = ("caffe", "opencv")
LABELS = {"caffe": "real Caffe", "opencv": "OpenCV dnn"}
_CANNOT_CREATE = re.compile(r"Can't create layer \"([^\"]+)\" of type \"([^\"]+)\"")
_OPENCV_ERROR = re.compile(r"error: \([^)]*\) (.*)")  # "OpenCV(4.x) file.cpp:12: error: (-2:...) what"


def pycaffe_available() -> bool:
    """Whether ``import caffe`` would find pycaffe (found, not loaded: loading Caffe is the isolated workers' job)."""
    try:
        return importlib.util.find_spec("caffe") is not None
    except (ImportError, ValueError):
        return False


def pick_reference(asked: str | None = None) -> str:
    """``asked`` ("caffe", "opencv"), or by default real Caffe where pycaffe imports and OpenCV dnn otherwise."""
    if asked is None:
        return "caffe" if pycaffe_available() else "opencv"
    if asked not in REFERENCES:
        raise DeepRebirthError(f"unknown reference {asked!r} ({', '.join(REFERENCES)})", options=("reference",))
    if asked == "caffe" and not pycaffe_available():
        raise DeepRebirthError(f"real Caffe needs pycaffe, which is not importable: {CAFFE_HINT}",
                               options=("reference",))
    return asked


def require_pycaffe(command: str) -> None:
    """One line, before any work, for the commands that only real Caffe can run (training, Caffe's accuracy)."""
    if not pycaffe_available():
        raise DeepRebirthError(f"{command} needs pycaffe (real Caffe), which is not importable: {CAFFE_HINT}")


def describe(reference: str) -> str:
    """'real Caffe' or 'OpenCV dnn 4.x' for reports and printed checks."""
    if reference != "opencv":
        return LABELS[reference]
    import cv2

    return f"OpenCV dnn {cv2.__version__}"


def _writers(graph: Graph) -> dict[str, tuple[str, int]]:
    """Caffe blob name -> (the layer that writes it last, which of its tops): where OpenCV has that blob's value."""
    writers: dict[str, tuple[str, int]] = {}
    for layer in graph.layers():
        for index, top in enumerate(layer.tops):
            writers[graph.caffe_name(top)] = (layer.name, index)
    return writers


def reference_outputs(reference: str, prototxt: str | os.PathLike[str], caffemodel: str | os.PathLike[str],
                      feeds: Sequence[Feed], blobs: Sequence[str]) -> list[dict[str, np.ndarray]]:
    """The named Caffe blobs after a forward pass of the reference runtime on each feed."""
    if reference == "opencv":
        return opencv_outputs(prototxt, caffemodel, feeds, blobs)
    return caffe_outputs(prototxt, caffemodel, list(feeds), list(blobs))


def opencv_outputs(prototxt: str | os.PathLike[str], caffemodel: str | os.PathLike[str], feeds: Sequence[Feed],
                   blobs: Sequence[str], phase: str = "TEST") -> list[dict[str, np.ndarray]]:
    """The named Caffe blobs after an OpenCV dnn forward pass on each feed (1 thread, fp32, CPU). OpenCV reads the
    net as our reader normalised it (V1 upgraded, net-level inputs as an Input layer, ``phase`` filtered), so it
    runs the net the rules saw."""
    import cv2

    from deeprebirth.io import caffe_io
    from deeprebirth.ir.model import load_model

    graph = load_model(prototxt, phase=phase)
    writers = _writers(graph)
    layers: list[str] = []
    for blob in blobs:
        if blob not in writers:
            raise DeepRebirthError(f"no layer writes blob '{blob}'", file=str(prototxt))
        layer, index = writers[blob]
        if index != 0:
            raise DeepRebirthError(f"OpenCV dnn names outputs by layer and cannot read blob '{blob}' (top {index + 1} "
                                   f"of layer '{layer}'): check with --reference caffe", file=str(prototxt))
        layers.append(layer)
    with tempfile.TemporaryDirectory(prefix="deeprebirth-opencv-") as tmp:
        normalised = Path(tmp) / Path(prototxt).name
        caffe_io.write_prototxt(normalised, graph.to_net())
        net = _read_opencv(normalised, caffemodel, shown=prototxt)
    cv2.setNumThreads(1)
    results = []
    for feed in feeds:
        for name, array in feed.items():
            net.setInput(np.ascontiguousarray(array, dtype=np.float32), name)
        try:
            values = net.forward(layers)
        except cv2.error as err:
            raise _unsupported(net, feed, prototxt, err) from None
        results.append({blob: np.array(value, dtype=np.float32) for blob, value in zip(blobs, values)})
    return results


def _read_opencv(prototxt: str | os.PathLike[str], caffemodel: str | os.PathLike[str],
                 shown: str | os.PathLike[str]) -> Any:
    """The net in OpenCV dnn, CPU; an error names ``shown`` (the user's file) and the layer OpenCV refused."""
    import cv2

    try:
        net = cv2.dnn.readNetFromCaffe(str(prototxt), str(caffemodel))
    except cv2.error as err:
        raise _refused(err, shown) or DeepRebirthError(f"OpenCV dnn cannot read the net: {_message(err)}",
                                                       file=str(shown)) from None
    net.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
    net.setPreferableTarget(cv2.dnn.DNN_TARGET_CPU)
    return net


def _refused(err: BaseException, prototxt: str | os.PathLike[str]) -> DeepRebirthError | None:
    """OpenCV's "Can't create layer" (a type it does not implement; it creates layers on the first forward) as
    one line naming the layer, or None for any other failure."""
    found = _CANNOT_CREATE.search(str(err))
    if found is None:
        return None
    return DeepRebirthError(f"OpenCV dnn cannot run layer '{found[1]}' ({found[2]}), which Caffe can: check with "
                            "--reference caffe (needs pycaffe)", file=str(prototxt))


def _unsupported(net: Any, feed: Feed, prototxt: str | os.PathLike[str], err: BaseException) -> DeepRebirthError:
    """The error for a forward pass OpenCV failed: the layer it refused to create, else the first layer (in
    OpenCV's order) whose own forward fails, found by bisection (a layer fails once it, or one before it, cannot
    run)."""
    import cv2

    refused = _refused(err, prototxt)
    if refused is not None:
        return refused

    def failure(layer: str) -> BaseException | None:
        for name, array in feed.items():
            net.setInput(np.ascontiguousarray(array, dtype=np.float32), name)
        try:
            net.forward(layer)
        except cv2.error as failed:
            return failed
        return None

    names = list(net.getLayerNames())
    last = failure(names[-1]) if names else None
    if last is None:  # the failure is off the path to the last layer: nothing to bisect
        return DeepRebirthError(f"OpenCV dnn failed: {_message(err)}", file=str(prototxt))
    low, high = 0, len(names) - 1  # invariant: names[high] fails (with ``last``); every layer before names[low] runs
    while low < high:
        middle = (low + high) // 2
        failed = failure(names[middle])
        if failed is not None:
            high, last = middle, failed
        else:
            low = middle + 1
    layer = names[high]
    kind = net.getLayer(layer).type
    return DeepRebirthError(f"OpenCV dnn cannot run layer '{layer}' ({kind}), which Caffe can: {_message(last)}; "
                            "check with --reference caffe (needs pycaffe)", file=str(prototxt))


def _message(err: BaseException) -> str:
    """OpenCV's message without its source path: what failed, on one line."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    text = lines[-1] if lines else type(err).__name__
    found = _OPENCV_ERROR.search(text)
    return (found[1] if found else text)[:200]
