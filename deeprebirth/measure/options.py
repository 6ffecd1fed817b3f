"""The options of the commands that time nets (``profile``, ``plan``), each declared once
(``deeprebirth.option``)."""

from __future__ import annotations

from deeprebirth.caffe.options import GPU_OPTION
from deeprebirth.export.runtimes import RUNTIMES
from deeprebirth.measure.worker import CLOCKS
from deeprebirth.option import Option

TIMING_OPTIONS: tuple[Option, ...] = (
    Option("weights", str, None, path="file", help="the caffemodel (default: random weights)"),
    Option("batch", int, None, minimum=1, help="reshape the inputs to this batch size"),
    Option("threads", int, 1, minimum=1, help="OpenBLAS threads"),
    Option("rounds", int, 10, minimum=1, help="timed rounds"),
    Option("clock", str, "wall", choices=tuple(CLOCKS),
           help="wall time, or process CPU time (steadier on a busy machine; with 1 thread only)"),
    Option("seed", int, 0, help="seed for random inputs and weights"),
)

PROFILE_OPTIONS: tuple[Option, ...] = (
    *TIMING_OPTIONS,
    Option("warmup", int, 2, minimum=0, help="untimed rounds first"),
    Option("compare_prototxt", str, None, flag="compare", path="file",
           help="a second net (e.g. the rewritten one) to profile side by side"),
    Option("compare_weights", str, None, path="file", help="the second net's caffemodel"),
    Option("plot_path", str, None, flag="plot", path="file", help="write the per-type bar chart (PNG)"),
    Option("json_path", str, None, flag="json", path="file", help="write the measurements as JSON"),
    Option("top", int, 10, minimum=0, help="list the N slowest layers (0: all)"),
    Option("runtime", str, None, choices=tuple(RUNTIMES),
           help="where to time: real Caffe, OpenCV dnn, or the exported model (ONNX Runtime, MNN, ncnn); per "
                "layer except in ncnn (whole forward passes)  [default: caffe where pycaffe imports, else opencv]"),
    GPU_OPTION,
)
