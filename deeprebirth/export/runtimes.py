"""The runtimes, one entry each in ``RUNTIMES`` (what adding a runtime takes), and running an exported model in a
deployment runtime (ONNX Runtime, MNN, ncnn), one thread, fp32.

The runtime packages are optional extras (``pip install 'deeprebirth[runtimes]'`` and ``pip install --no-deps pnnx``);
a missing one is a one-line error naming the package. Every session here takes feeds keyed by the Caffe input names
and returns outputs keyed by the Caffe output names, shaped as in Caffe.

Settings that matter for agreement with Caffe: MNN sessions run with ``precision: high`` (fp32); ncnn's defaults
store and compute in fp16 where the CPU supports it (x86 with F16C included), which costs about 1e-3 relative on
logits, so the ncnn session turns ``use_fp16_storage/packed/arithmetic`` and ``use_bf16_storage`` off.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from deeprebirth.aliases import Feed, Shape
from deeprebirth.errors import DeepRebirthError

INSTALL_HINT = "pip install 'deeprebirth[runtimes]'"


def require(module: str, package: str | None = None) -> ModuleType:
    """Import an optional runtime package, or a one-line error that says how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise DeepRebirthError(f"the {package or module} package is not installed ({err}): {INSTALL_HINT}") from None


def require_installed(module: str, package: str | None = None) -> None:
    """Like ``require`` without importing (cheap up-front check before any work is done)."""
    if importlib.util.find_spec(module) is None:
        raise DeepRebirthError(f"the {package or module} package is not installed: {INSTALL_HINT}")


OpTimes = list[tuple[str, str, float]]  # (runtime op name, op type, ms) in execution order


class Session:
    """One loaded model; ``run`` takes Caffe-named feeds and returns Caffe-named outputs. Where the runtime times
    its own ops: MNN's ``run_ops(feed, clock)`` runs once and returns every op's time by ``clock`` (s); ONNX Runtime opened with ``profile``
    records a trace of every run, and ``end_profiling`` writes it and returns its path; OpenCV dnn times every
    run anyway, and ``last_ops()`` reads the last one's."""

    def __init__(self, run: Callable[[Feed], dict[str, np.ndarray]], run_ops: Callable[[Feed, Callable[[], float]], OpTimes] | None = None,
                 end_profiling: Callable[[], str] | None = None, last_ops: Callable[[], OpTimes] | None = None) -> None:
        self.run = run
        self.run_ops = run_ops
        self.end_profiling = end_profiling
        self.last_ops = last_ops


def open_session(runtime: str, path: str | os.PathLike[str], outputs: Mapping[str, Shape | None], threads: int = 1,
                 profile: str | None = None) -> Session:
    """Load ``path`` (a .onnx, a .mnn, or the prefix of an ncnn .param/.bin pair) in ``runtime``; ``profile``:
    ONNX Runtime's trace file prefix (the other runtimes ignore it)."""
    found = RUNTIMES.get(runtime)
    if found is None or found.open is None:
        raise DeepRebirthError(f"unknown runtime {runtime!r} ({', '.join(EXPORTED)})")
    return found.open(str(path), outputs, threads, profile)


def _onnxruntime(path: str, outputs: Mapping[str, Shape | None], threads: int, profile: str | None) -> Session:
    ort = require("onnxruntime")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    if profile is not None:
        options.enable_profiling = True
        options.profile_file_prefix = profile
    try:
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    except Exception as err:  # noqa: BLE001 - ORT raises its own exception types for models it refuses
        raise DeepRebirthError(f"ONNX Runtime refused the model: {_first_line(err)}", file=path) from None
    names = list(outputs)

    def run(feed: Feed) -> dict[str, np.ndarray]:
        return dict(zip(names, session.run(names, feed)))

    return Session(run, end_profiling=session.end_profiling if profile is not None else None)


def _mnn(path: str, outputs: Mapping[str, Shape | None], threads: int, _profile: str | None) -> Session:
    mnn = require("MNN")
    interpreter = mnn.Interpreter(path)
    # saveTensors keeps intermediate outputs (e.g. the logits under a Softmax) readable after the run
    session = interpreter.createSession({"numThread": threads, "precision": "high", "saveTensors": tuple(outputs)})
    if session is None:
        raise DeepRebirthError("MNN could not create a session for the model", file=path)
    shapes: dict[str, Shape] = {}

    def put(feed: Feed) -> None:
        for name, array in feed.items():
            tensor = interpreter.getSessionInput(session, name)
            if shapes.get(name) != array.shape:
                interpreter.resizeTensor(tensor, array.shape)
                interpreter.resizeSession(session)
                shapes[name] = array.shape
            data = np.ascontiguousarray(array, dtype=np.float32)
            tensor.copyFrom(mnn.Tensor(array.shape, mnn.Halide_Type_Float, data, mnn.Tensor_DimensionType_Caffe))

    def run(feed: Feed) -> dict[str, np.ndarray]:
        put(feed)
        interpreter.runSession(session)
        found = {}
        for name in outputs:
            try:
                out = interpreter.getSessionOutput(session, name)
            except Exception as err:  # noqa: BLE001 - pymnn raises a bare Exception
                raise DeepRebirthError(f"MNN has no output {name!r} ({err})", file=path) from None
            shape = tuple(out.getShape())
            host = mnn.Tensor(shape, mnn.Halide_Type_Float, np.zeros(shape, np.float32),
                              mnn.Tensor_DimensionType_Caffe)
            out.copyToHostTensor(host)
            found[name] = np.array(host.getNumpyData(), dtype=np.float32).reshape(shape)
        return found

    def run_ops(feed: Feed, clock: Callable[[], float] = time.perf_counter) -> OpTimes:
        # the clock starts as the begin callback returns and stops as the end callback is entered, so each op's
        # time holds only the pybind11 crossing (about a microsecond) besides the op itself
        put(feed)
        times: OpTimes = []
        started = [0.0]

        def begin(_tensors: Any, _info: Any) -> bool:
            started[0] = clock()
            return True

        def end(_tensors: Any, info: Any) -> bool:
            elapsed = clock() - started[0]
            times.append((info.getName(), info.getType(), elapsed * 1e3))
            return True

        interpreter.runSessionWithCallBackInfo(session, begin, end)
        return times

    return Session(run, run_ops)


def _ncnn(path: str, outputs: Mapping[str, Shape | None], threads: int, _profile: str | None) -> Session:
    ncnn = require("ncnn")
    net = ncnn.Net()
    net.opt.num_threads = threads
    for flag in ("use_fp16_storage", "use_fp16_packed", "use_fp16_arithmetic", "use_bf16_storage"):
        setattr(net.opt, flag, False)
    param, weights = ncnn_files(path)
    if net.load_param(param) != 0 or net.load_model(weights) != 0:
        raise DeepRebirthError("ncnn could not load the model", file=param)

    def run(feed: Feed) -> dict[str, np.ndarray]:
        extractor = net.create_extractor()
        for name, array in feed.items():
            if array.shape[0] != 1:
                raise DeepRebirthError(f"ncnn runs one image at a time; input {name!r} has batch {array.shape[0]}")
            extractor.input(name, ncnn.Mat(np.ascontiguousarray(array[0], dtype=np.float32)).clone())
        found = {}
        for name, shape in outputs.items():
            status, mat = extractor.extract(name)
            if status != 0:
                raise DeepRebirthError(f"ncnn could not compute output {name!r}", file=param)
            array = np.array(mat, dtype=np.float32)
            found[name] = array.reshape(shape) if shape is not None else array[None]
        return found

    return Session(run)


def ncnn_files(prefix: str | os.PathLike[str]) -> tuple[str, str]:
    """The .param/.bin pair of an ncnn model given its prefix (or either file)."""
    text = str(prefix)
    for suffix in (".param", ".bin"):
        text = text.removesuffix(suffix)
    return f"{text}.param", f"{text}.bin"


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def model_files(runtime: str, path: str | os.PathLike[str]) -> list[str]:
    """The files that make up a model of ``runtime``'s format at ``path``."""
    return list(ncnn_files(path)) if RUNTIMES[runtime].format == "ncnn" else [str(Path(path))]


# ---------------------------------------------------------------------------------------------------------------
# the registry

Opener = Callable[[str, Mapping[str, Shape | None], int, "str | None"], Session]


@dataclass(frozen=True)
class Runtime:
    """What the project knows of one runtime. The reference runtimes (``format`` "caffe") run the Caffe files
    themselves (``deeprebirth.caffe``); the others run what ``deeprebirth export`` writes for them."""

    name: str  # as the command line names it (--runtime)
    format: str  # the model format it runs: "caffe", or what export writes (export --to)
    suffix: str  # the exported file's suffix, which names the format to export (ncnn: the .param of the pair)
    module: str  # the Python module that runs it
    package: str  # the pip package that provides the module
    tolerance: float  # export --check: the default largest max|a-b|/max|a| per output (export/check.py says why)
    layer_times: str  # "" where each layer can be timed inside the runtime, else why not
    open: Opener | None = None  # loads an exported model as a Session (None: a reference runtime)

    @property
    def exported(self) -> bool:
        return self.format != "caffe"


RUNTIMES: dict[str, Runtime] = {runtime.name: runtime for runtime in (
    Runtime("caffe", "caffe", "", "caffe", "pycaffe (make install)", 1e-4, ""),
    Runtime("opencv", "caffe", "", "cv2", "opencv-python-headless", 1e-4, ""),
    Runtime("onnxruntime", "onnx", ".onnx", "onnxruntime", "onnxruntime", 1e-4, "", _onnxruntime),
    Runtime("mnn", "mnn", ".mnn", "MNN", "MNN", 1e-3, "", _mnn),
    Runtime("ncnn", "ncnn", ".param", "ncnn", "ncnn", 1e-4,
            "ncnn's Python wheel exposes no per-layer timing (only a C++ build with NCNN_BENCHMARK prints it) and "
            "pnnx renames the layers", _ncnn),
)}
EXPORTED = tuple(name for name, runtime in RUNTIMES.items() if runtime.exported)  # what export targets run in
FORMATS: dict[str, Runtime] = {}  # export --to: each format once, checked in the first runtime that runs it
for _runtime in RUNTIMES.values():
    if _runtime.exported:
        FORMATS.setdefault(_runtime.format, _runtime)
