"""Does the exported model compute what Caffe computes? Run both on the same inputs and compare each output.

The original (prototxt, caffemodel) runs in the reference runtime (``deeprebirth.caffe.reference``): real Caffe in a
spawned worker (a Caffe abort becomes an error, not a dead caller) where pycaffe imports, else OpenCV dnn, which
reads the same Caffe files. The export runs in its runtime, one thread, fp32. Per output: max |a - b| / max |a| (``a`` the reference's),
plus the number of inputs whose argmax over axis 1 changed.

Default tolerances (relative, as above; ``runtimes.RUNTIMES`` holds them), from what each runtime's fp32 path does differently from Caffe:

* onnxruntime 1e-4: the same operators in fp32; only summation order differs (measured ~1e-6 on GoogLeNet logits).
* ncnn 1e-4: fp32 with fp16 storage/arithmetic turned off (see runtimes.py) and fp32 weights (pnnx ``fp16=0``).
* mnn 1e-3: MNN converts 3x3 convolutions to Winograd and re-associates sums even at ``precision: high``
  (measured up to ~3e-4 on deep nets' logits).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from deeprebirth.aliases import Feed, Shape
from deeprebirth.caffe.compare import Comparison, MaxError
from deeprebirth.caffe.reference import pick_reference, reference_outputs
from deeprebirth.errors import DeepRebirthError
from deeprebirth.export.runtimes import RUNTIMES, open_session


@dataclass
class RuntimeCheck(Comparison):
    """The Caffe files in the reference runtime and their export in ``runtime``."""

    runtime: str = ""


def check_export(prototxt: str | os.PathLike[str], caffemodel: str | os.PathLike[str], runtime: str,
                 model: str | os.PathLike[str], outputs: Mapping[str, Shape | None], feeds: list[Feed],
                 tolerance: float | None = None, reference: str | None = None) -> RuntimeCheck:
    """Compare the reference (real Caffe, or OpenCV dnn: ``deeprebirth.caffe.reference``; None: Caffe where pycaffe
    imports) running the Caffe files and ``runtime`` running ``model`` on every feed, output by output (Caffe
    names)."""
    if not feeds:
        raise DeepRebirthError("nothing to check on: no random inputs and no images asked for", options=("check", "images"))
    reference = pick_reference(reference)
    expected = reference_outputs(reference, prototxt, caffemodel, feeds, list(outputs))
    session = open_session(runtime, model, outputs)
    error = MaxError(list(outputs), "output", "Caffe", runtime)
    for feed, want in zip(feeds, expected):
        error.add(want, session.run(feed))
    return RuntimeCheck(len(feeds), RUNTIMES[runtime].tolerance if tolerance is None else tolerance, error.diffs(),
                        error.predictions_changed, reference, runtime=runtime)
