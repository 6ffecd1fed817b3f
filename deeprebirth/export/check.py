"""Does the exported model compute what Caffe computes? Run both on the same inputs and compare each output.

The original (prototxt, caffemodel) runs in the reference runtime (``deeprebirth.reference``): real Caffe in a
spawned worker (a Caffe abort becomes an error, not a dead caller) where pycaffe imports, else OpenCV dnn, which
reads the same Caffe files. The export runs in its runtime, one thread, fp32. Per output: max |a - b| / max |a| (``a`` the reference's),
plus the number of inputs whose argmax over axis 1 changed.

Default tolerances (relative, as above), from what each runtime's fp32 path does differently from Caffe:

* onnxruntime 1e-4: the same operators in fp32; only summation order differs (measured ~1e-6 on GoogLeNet logits).
* ncnn 1e-4: fp32 with fp16 storage/arithmetic turned off (see runtimes.py) and fp32 weights (pnnx ``fp16=0``).
* mnn 1e-3: MNN converts 3x3 convolutions to Winograd and re-associates sums even at ``precision: high``
  (measured up to ~3e-4 on deep nets' logits).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from deeprebirth.caffe_runtime import BlobDiff, Feed
from deeprebirth.errors import DeepRebirthError
from deeprebirth.export.runtimes import Shape, open_session
from deeprebirth.graph import Graph
from deeprebirth.reference import pick_reference, reference_outputs

TOLERANCES = {"onnxruntime": 1e-4, "ncnn": 1e-4, "mnn": 1e-3}


@dataclass
class RuntimeCheck:
    runtime: str
    inputs: int
    tolerance: float
    diffs: list[BlobDiff] = field(default_factory=list)
    predictions_changed: int = 0
    reference: str = "caffe"  # what ran the original: real Caffe or OpenCV dnn (deeprebirth.reference)

    @property
    def passed(self) -> bool:
        return all(d.max_rel <= self.tolerance for d in self.diffs) and self.predictions_changed == 0

    @property
    def worst(self) -> BlobDiff:
        return max(self.diffs, key=lambda d: d.max_rel)


def logits_and_outputs(graph: Graph) -> list[str]:
    """The net's outputs, each Softmax output preceded by the logits it reads: what an export is compared on."""
    names = []
    for blob in graph.outputs():
        producer = graph.producer(blob)
        if producer.type == "Softmax":
            names.append(graph.caffe_name(producer.bottoms[0]))
        names.append(graph.caffe_name(blob))
    return names


def check_export(prototxt: str | os.PathLike[str], caffemodel: str | os.PathLike[str], runtime: str,
                 model: str | os.PathLike[str], outputs: Mapping[str, Shape | None], feeds: list[Feed],
                 tolerance: float | None = None, reference: str | None = None) -> RuntimeCheck:
    """Compare the reference (real Caffe, or OpenCV dnn: ``deeprebirth.reference``; None: Caffe where pycaffe
    imports) running the Caffe files and ``runtime`` running ``model`` on every feed, output by output (Caffe
    names)."""
    if not feeds:
        raise DeepRebirthError("nothing to check on: no random inputs and no images asked for", options=("check", "images"))
    reference = pick_reference(reference)
    expected = reference_outputs(reference, prototxt, caffemodel, feeds, list(outputs))
    session = open_session(runtime, model, outputs)
    result = RuntimeCheck(runtime, len(feeds), TOLERANCES[runtime] if tolerance is None else tolerance,
                          reference=reference)
    worst = {name: [0.0, 0.0] for name in outputs}  # max |a - b|, max |a|
    for feed, want in zip(feeds, expected):
        got = session.run(feed)
        for name in outputs:
            a, b = want[name], got[name]
            if a.shape != b.shape:
                raise DeepRebirthError(f"output '{name}' has shape {a.shape} in Caffe and {b.shape} in {runtime}")
            worst[name][0] = max(worst[name][0], float(np.max(np.abs(a - b), initial=0.0)))
            worst[name][1] = max(worst[name][1], float(np.max(np.abs(a), initial=0.0)))
        first = next(iter(outputs))
        if want[first].ndim >= 2 and want[first].shape[1] > 1:
            result.predictions_changed += int(np.sum(want[first].argmax(axis=1) != got[first].argmax(axis=1)))
    for name, (max_abs, scale) in worst.items():
        result.diffs.append(BlobDiff(name, max_abs, max_abs / scale if scale > 0 else max_abs))
    return result
