"""Do two runs of a net compute the same thing? One comparison for every check: which blobs to compare
(``compared_blobs``), the largest error per blob over every input (``MaxError``), and the verdict (``Comparison``),
whether the second run is the rewritten net in Caffe (``rewrite --check``) or an export in its runtime
(``export --check``).

The error of a blob is max |a - b| / max |a| over every input (``a`` the reference's): relative to the blob's own
range, so a logit layer and a probability layer are judged alike. A classifier's first compared blob also counts
the inputs whose top class (argmax over axis 1) changed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from deeprebirth.aliases import Feed, Outputs
from deeprebirth.caffe.isolation import run_isolated
from deeprebirth.caffe.reference import opencv_outputs
from deeprebirth.caffe.runtime import forward, open_net
from deeprebirth.errors import DeepRebirthError
from deeprebirth.ir.graph import Graph


@dataclass
class BlobDiff:
    blob: str
    max_abs: float
    max_rel: float  # max |a - b| / max |a|: the error relative to the blob's own range


@dataclass
class Comparison:
    inputs: int
    tolerance: float
    diffs: list[BlobDiff] = field(default_factory=list)
    predictions_changed: int = 0
    reference: str = "caffe"  # what ran the original (deeprebirth.caffe.reference): real Caffe or OpenCV dnn

    @property
    def passed(self) -> bool:
        return all(d.max_rel <= self.tolerance for d in self.diffs) and self.predictions_changed == 0

    @property
    def worst(self) -> BlobDiff:
        return max(self.diffs, key=lambda d: d.max_rel)


@dataclass
class CheckResult(Comparison):
    """The original and the rewritten net, both in the reference runtime."""

    lossy: bool = False  # a lossy rewrite is only held to equal output shapes until it is fine-tuned

    @property
    def passed(self) -> bool:
        return True if self.lossy else super().passed  # shapes were compared on the way; a mismatch raised


class MaxError:
    """Per blob, the largest |a - b| and |a| over every input added, and how many inputs' top class changed.
    ``kind``, ``where_a`` and ``where_b`` only word the error raised on a shape mismatch."""

    def __init__(self, blobs: Sequence[str], kind: str = "blob", where_a: str = "the original",
                 where_b: str = "the rewritten net") -> None:
        self.blobs = list(blobs)
        self.inputs = 0
        self.predictions_changed = 0
        self._labels = kind, where_a, where_b
        self._worst = {name: [0.0, 0.0] for name in self.blobs}

    def add(self, a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> None:
        """One input's blobs from both runs."""
        kind, where_a, where_b = self._labels
        for name in self.blobs:
            if a[name].shape != b[name].shape:
                raise DeepRebirthError(f"{kind} '{name}' has shape {a[name].shape} in {where_a} and "
                                       f"{b[name].shape} in {where_b}")
            worst = self._worst[name]
            worst[0] = max(worst[0], float(np.max(np.abs(a[name] - b[name]), initial=0.0)))
            worst[1] = max(worst[1], float(np.max(np.abs(a[name]), initial=0.0)))
        first = a[self.blobs[0]]
        if first.ndim >= 2 and first.shape[1] > 1:
            self.predictions_changed += int(np.sum(first.argmax(axis=1) != b[self.blobs[0]].argmax(axis=1)))
        self.inputs += 1

    def diffs(self) -> list[BlobDiff]:
        return [BlobDiff(name, max_abs, max_abs / scale if scale > 0 else max_abs)
                for name, (max_abs, scale) in self._worst.items()]


def compared_blobs(graph: Graph, original: Graph | None = None, lossy: bool = False) -> list[str]:
    """What a check compares (Caffe names): each output of ``graph``, followed by the input of a Softmax output
    (logits say more than saturated probabilities). With ``original``, only names both nets have. A lossy rewrite
    changes values, so a DetectionOutput (how many rows it has depends on the values) is judged by its inputs'
    shapes instead."""
    known = set(original.caffe_blob_names().values()) if original is not None else None
    names = graph.caffe_blob_names()
    blobs: list[str] = []
    for blob in graph.outputs():
        producer = graph.producer(blob)
        candidates = [names[blob]]
        if producer.type == "Softmax":
            candidates.append(names[producer.bottoms[0]])
        if producer.type == "DetectionOutput" and lossy:
            candidates = [names[b] for b in producer.bottoms]
        blobs += [c for c in candidates if (known is None or c in known) and c not in blobs]
    if not blobs:
        raise DeepRebirthError("the rewritten net shares no output blob with the original")
    return blobs


def compare_outputs(outputs_a: Sequence[Outputs], outputs_b: Sequence[Outputs], blobs: list[str], tolerance: float,
                    lossy: bool, reference: str = "caffe") -> CheckResult:
    """Per blob over every feed: max |a - b| and that over max |a|; predictions changed on the first blob."""
    error = MaxError(blobs)
    for out_a, out_b in zip(outputs_a, outputs_b):
        error.add(out_a, out_b)
    return CheckResult(len(outputs_a), tolerance, error.diffs(), error.predictions_changed, reference, lossy=lossy)


def _compare_in_process(a: tuple[str, str], b: tuple[str, str], feeds: list[Feed], blobs: list[str],
                        tolerance: float, lossy: bool) -> CheckResult:
    net_a, net_b = open_net(*a), open_net(*b)
    outputs_a = [forward(net_a, feed, blobs) for feed in feeds]
    outputs_b = [forward(net_b, feed, blobs) for feed in feeds]
    return compare_outputs(outputs_a, outputs_b, blobs, tolerance, lossy)


def compare_nets(original: tuple[str, str], rewritten: tuple[str, str], feeds: list[Feed], blobs: list[str],
                 tolerance: float = 1e-4, lossy: bool = False, reference: str = "caffe") -> CheckResult:
    """Run both (prototxt, caffemodel) pairs in the reference runtime (``deeprebirth.caffe.reference``: real Caffe,
    or OpenCV dnn) on every feed and compare the named blobs (values for an exact rewrite; shapes only for a lossy
    one, whose new layers are not learned yet).

    Caffe runs isolated (``deeprebirth.caffe.isolation``) so a Caffe abort cannot take the caller down; OpenCV raises
    exceptions instead of aborting, so it runs here.
    """
    if reference == "opencv":
        return compare_outputs(opencv_outputs(*original, feeds, blobs), opencv_outputs(*rewritten, feeds, blobs),
                               blobs, tolerance, lossy, reference)
    what = f"{Path(original[0]).name} or {Path(rewritten[0]).name}"
    result: CheckResult = run_isolated(_compare_in_process, original, rewritten, feeds, blobs, tolerance, lossy,
                                       what=what)
    return result
