"""Everything that runs a net in real Caffe (pycaffe) or OpenCV dnn: forward passes, equivalence checks.

Caffe aborts the whole process on a fatal check (glog ``LOG(FATAL)``), so comparisons run isolated
(``deeprebirth.isolation``): a net Caffe refuses becomes a one-line error here instead of a dead interpreter.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from deeprebirth.errors import DeepRebirthError
from deeprebirth.isolation import quiet_glog, run_isolated

Feed = dict[str, np.ndarray]
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
        from deeprebirth.reference import CAFFE_HINT

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
    from deeprebirth.data import read_image

    n, c, h, w = shape
    feeds = []
    for path in paths:
        chw = read_image(os.fspath(path), c, (h, w), rgb=False)
        chw = (chw - np.asarray(mean[:c], dtype=np.float32).reshape(c, 1, 1)) * scale
        feeds.append({input_name: np.repeat(chw[None], n, axis=0)})
    return feeds


@dataclass
class BlobDiff:
    blob: str
    max_abs: float
    max_rel: float  # max |a - b| / max |a|: the error relative to the blob's own range


@dataclass
class CheckResult:
    inputs: int
    tolerance: float
    diffs: list[BlobDiff] = field(default_factory=list)
    predictions_changed: int = 0
    lossy: bool = False  # a lossy rewrite is only held to equal output shapes until it is fine-tuned
    reference: str = "caffe"  # the runtime both nets ran in (deeprebirth.reference): "caffe" or "opencv"

    @property
    def passed(self) -> bool:
        if self.lossy:
            return True  # shapes were compared in compare_outputs; a mismatch raises there
        return all(d.max_rel <= self.tolerance for d in self.diffs) and self.predictions_changed == 0

    @property
    def worst(self) -> BlobDiff:
        return max(self.diffs, key=lambda d: d.max_rel)


def compare_outputs(outputs_a: Sequence[dict[str, np.ndarray]], outputs_b: Sequence[dict[str, np.ndarray]],
                    blobs: list[str], tolerance: float, lossy: bool, reference: str = "caffe") -> CheckResult:
    """Per blob over every feed: max |a - b| and that over max |a|; predictions changed on the first blob."""
    result = CheckResult(len(outputs_a), tolerance, lossy=lossy, reference=reference)
    worst = {name: [0.0, 0.0] for name in blobs}  # per blob: max |a - b|, max |a|
    for out_a, out_b in zip(outputs_a, outputs_b):
        for name in blobs:
            if out_a[name].shape != out_b[name].shape:
                raise DeepRebirthError(f"blob '{name}' has shape {out_a[name].shape} in the original and "
                                       f"{out_b[name].shape} in the rewritten net")
            worst[name][0] = max(worst[name][0], float(np.max(np.abs(out_a[name] - out_b[name]), initial=0.0)))
            worst[name][1] = max(worst[name][1], float(np.max(np.abs(out_a[name]), initial=0.0)))
        final = out_a[blobs[0]]
        if final.ndim >= 2 and final.shape[1] > 1:
            result.predictions_changed += int(np.sum(final.argmax(axis=1) != out_b[blobs[0]].argmax(axis=1)))
    for name, (max_abs, scale) in worst.items():
        result.diffs.append(BlobDiff(name, max_abs, max_abs / scale if scale > 0 else max_abs))
    return result


def _compare_in_process(a: tuple[str, str], b: tuple[str, str], feeds: list[Feed], blobs: list[str],
                        tolerance: float, lossy: bool) -> CheckResult:
    net_a, net_b = open_net(*a), open_net(*b)
    outputs_a = [forward(net_a, feed, blobs) for feed in feeds]
    outputs_b = [forward(net_b, feed, blobs) for feed in feeds]
    return compare_outputs(outputs_a, outputs_b, blobs, tolerance, lossy)


def compare_nets(original: tuple[str, str], rewritten: tuple[str, str], feeds: list[Feed], blobs: list[str],
                 tolerance: float = 1e-4, lossy: bool = False, reference: str = "caffe") -> CheckResult:
    """Run both (prototxt, caffemodel) pairs in the reference runtime (``deeprebirth.reference``: real Caffe, or
    OpenCV dnn) on every feed and compare the named blobs (values for an exact rewrite; shapes only for a lossy
    one, whose new layers are not learned yet).

    Caffe runs isolated (``deeprebirth.isolation``) so a Caffe abort cannot take the caller down; OpenCV raises
    exceptions instead of aborting, so it runs here.
    """
    if reference == "opencv":
        from deeprebirth.reference import opencv_outputs

        return compare_outputs(opencv_outputs(*original, feeds, blobs), opencv_outputs(*rewritten, feeds, blobs),
                               blobs, tolerance, lossy, reference)
    what = f"{Path(original[0]).name} or {Path(rewritten[0]).name}"
    result: CheckResult = run_isolated(_compare_in_process, original, rewritten, feeds, blobs, tolerance, lossy,
                                       what=what)
    return result


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
