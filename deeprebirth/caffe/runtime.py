"""Everything that runs a net in real Caffe (pycaffe) or OpenCV dnn: forward passes and their inputs.

Caffe aborts the whole process on a fatal check (glog ``LOG(FATAL)``), so runs that may abort go isolated
(``deeprebirth.caffe.isolation``): a net Caffe refuses becomes a one-line error here instead of a dead interpreter.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from deeprebirth.aliases import Feed
from deeprebirth.caffe.isolation import quiet_glog, run_isolated
from deeprebirth.errors import DeepRebirthError

CAFFE_HINT = ("`make install` builds it, or put your own Caffe's python/ folder on PYTHONPATH; rewrite --check, "
              "export --check, plan and profile run without it (OpenCV dnn reference)")
IMAGENET_MEAN_BGR = (104.0, 117.0, 123.0)
_SCOPED_GPU: ContextVar[int | None] = ContextVar("deeprebirth_scoped_gpu", default=None)


def import_caffe(gpu: int | None = None) -> ModuleType:
    """pycaffe, quiet, in CPU mode or (``gpu``: a device id) in GPU mode on that device; a clear error when it is
    not installed, or when a GPU is asked of a CPU-only build or of a machine without that GPU (Caffe itself would
    abort the process). Inside ``on_device(ID)``, no ``gpu`` means that device, already checked."""
    quiet_glog()
    try:
        import caffe
    except ImportError as err:
        raise DeepRebirthError(f"pycaffe is not importable ({err}): {CAFFE_HINT}") from None
    if gpu is None:
        scoped = _SCOPED_GPU.get()
        if scoped is None:
            caffe.set_mode_cpu()
        else:
            caffe.set_device(scoped)
            caffe.set_mode_gpu()
        return caffe
    problem = gpu_problem(gpu)
    if problem:
        raise DeepRebirthError(f"GPU {gpu}: {problem}", options=("gpu",))
    caffe.set_device(gpu)
    caffe.set_mode_gpu()
    return caffe


def caffe_openblas() -> Any | None:
    """The OpenBLAS that Caffe loaded into this process (``ctypes``; numpy's own copy has renamed symbols), or None
    where Caffe is not loaded or not linked against OpenBLAS."""
    try:
        with open("/proc/self/maps") as maps:
            libs = sorted({line.split()[-1] for line in maps if "openblas" in line and "/" in line})
    except OSError:
        return None
    for path in libs:
        try:
            lib = ctypes.CDLL(path)
            lib.openblas_get_num_threads()
            return lib
        except (OSError, AttributeError):
            continue
    return None


@contextmanager
def on_device(gpu: int | None) -> Iterator[None]:
    """Run everything inside on GPU ``gpu`` (None: the CPU). Fine-tuning creates solvers and nets in many places;
    this puts them all on the device without a device argument on each, and checks the device once, here."""
    if gpu is not None:
        import_caffe(gpu)
    token = _SCOPED_GPU.set(gpu)
    try:
        yield
    finally:
        _SCOPED_GPU.reset(token)
        if gpu is not None:
            import_caffe()  # back to the mode outside


def caffe_has_cuda() -> bool:
    """Whether the pycaffe loaded in this process was built with CUDA (it then links the CUDA runtime)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return False
    return "libcudart" in maps


def gpu_count() -> int:
    """GPUs that ``nvidia-smi -L`` lists (0 without a driver)."""
    try:
        done = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(line.startswith("GPU ") for line in done.stdout.splitlines()) if done.returncode == 0 else 0


def gpu_problem(gpu: int) -> str:
    """Why Caffe cannot run on GPU ``gpu`` here ('' if it can); pycaffe must be imported first."""
    if gpu < 0:
        return "a device id is 0 or more"
    if not caffe_has_cuda():
        return "this Caffe was built without CUDA (rebuild it with `DEEPREBIRTH_CUDA=1 make install`)"
    count = gpu_count()
    if gpu >= count:
        return f"nvidia-smi lists {count} GPU(s)"
    return ""


def open_net(prototxt: str | os.PathLike[str], caffemodel: str | os.PathLike[str] | None = None,
             gpu: int | None = None) -> Any:
    caffe = import_caffe(gpu)
    if caffemodel is None:
        return caffe.Net(str(prototxt), caffe.TEST)
    return caffe.Net(str(prototxt), caffe.TEST, weights=str(caffemodel))


def forward(net: Any, feed: Feed, blobs: Sequence[str]) -> dict[str, np.ndarray]:
    """One forward pass; copies of the named blobs."""
    for name, array in feed.items():
        if net.blobs[name].data.shape != array.shape:
            net.blobs[name].reshape(*array.shape)
        net.blobs[name].data[...] = array
    net.forward()
    return {name: np.array(net.blobs[name].data, dtype=np.float32) for name in blobs}


def random_feeds(input_shapes: dict[str, tuple[int, ...]], count: int, seed: int = 0) -> list[Feed]:
    """``count`` feeds of N(0, 1) values, the same for every call with the same seed."""
    rng = np.random.default_rng(seed)
    return [{name: rng.standard_normal(shape).astype(np.float32) for name, shape in input_shapes.items()}
            for _ in range(count)]


def image_feeds(paths: Sequence[str | os.PathLike[str]], input_name: str, shape: tuple[int, ...],
                mean: Sequence[float] = IMAGENET_MEAN_BGR, scale: float = 1.0) -> list[Feed]:
    """Real photos read as everywhere else (``data.read_image``: BGR, resized as Caffe's ImageData layer does),
    0-255 minus ``mean``, times ``scale``."""
    from deeprebirth.caffe.data import read_image

    n, c, h, w = shape
    feeds = []
    for path in paths:
        chw = read_image(os.fspath(path), c, (h, w), rgb=False)
        chw = (chw - np.asarray(mean[:c], dtype=np.float32).reshape(c, 1, 1)) * scale
        feeds.append({input_name: np.repeat(chw[None], n, axis=0)})
    return feeds


def _caffe_outputs(prototxt: str, caffemodel: str, feeds: list[Feed], blobs: list[str]) -> list[dict[str, np.ndarray]]:
    net = open_net(prototxt, caffemodel)
    return [forward(net, feed, blobs) for feed in feeds]


def caffe_outputs(prototxt: str | os.PathLike[str], caffemodel: str | os.PathLike[str], feeds: list[Feed],
                  blobs: Sequence[str]) -> list[dict[str, np.ndarray]]:
    """The named blobs after a forward pass of real Caffe on each feed (isolated: an abort is one line)."""
    outputs: list[dict[str, np.ndarray]] = run_isolated(_caffe_outputs, str(prototxt), str(caffemodel), feeds,
                                                        list(blobs), what=Path(prototxt).name)
    return outputs


def opencv_forward(prototxt: str | os.PathLike[str], caffemodel: str | os.PathLike[str], feed: Feed,
                   layer: str | None = None) -> np.ndarray:
    """One forward pass in OpenCV dnn (its Caffe importer); returns the output of ``layer`` (default: last)."""
    import cv2

    net = cv2.dnn.readNetFromCaffe(str(prototxt), str(caffemodel))
    for name, array in feed.items():
        net.setInput(array, name)
    return np.asarray(net.forward(layer) if layer else net.forward(), dtype=np.float32)
