"""Where the time goes: run a net in real Caffe and time every layer (the paper's Table 1), plus its memory.

Each measurement runs in a fresh worker process (``deeprebirth.measure.worker``, which says why); it reports the
thread count OpenBLAS actually uses (it caps it at the cores).

Timing: pycaffe's ``net._forward(i, i)`` runs layer ``i`` alone; a few warm-up rounds, then the median of the timed
rounds per layer. Every round also times one whole forward pass. Inputs are N(0, 1); a net without weights gets
plausible random weights (zero weights make max pooling look ~2x cheaper than it is on real data). The clock is wall
time by default; ``clock="cpu"`` uses the process's CPU time instead, which on a shared, busy machine still gives
the 1-thread latency (time slices lost to other processes do not count), but with several threads it is the summed
work of all threads, not latency.

Memory: Caffe's blob memory is the bytes of every distinct top blob (in-place tops and Split tops share their
bottom's memory and count once) plus the parameter bytes; the worker's peak RSS is the kernel's ``VmHWM``.

Kept as one module: the caller's side and the worker's side of each job speak one request/result protocol (plain
dicts through ``deeprebirth.measure.worker``), which stays correct only while both halves change together.
"""

from __future__ import annotations

import ctypes
import functools
import io
import resource
import statistics
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from deeprebirth.caffe.runtime import caffe_openblas, open_net
from deeprebirth.errors import DeepRebirthError
from deeprebirth.io import caffe_io
from deeprebirth.io.caffe_io import set_batch
from deeprebirth.ir.classify import type_class
from deeprebirth.ir.initializers import random_weights
from deeprebirth.ir.model import PathLike, load_model
from deeprebirth.ir.shapes import infer_shapes
from deeprebirth.measure.worker import CLOCKS, check_timing, run_job


@dataclass
class LayerTime:
    name: str
    type: str
    ms: float  # median over the timed rounds


@dataclass
class TypeTime:
    type: str
    layers: int
    ms: float
    share: float  # of the summed per-layer time


def by_type(layers: Sequence[LayerTime]) -> list[TypeTime]:
    """Per layer type, slowest first; shares of the summed per-layer time."""
    sums: dict[str, list[float]] = {}
    for layer in layers:
        sums.setdefault(layer.type, []).append(layer.ms)
    total = sum(layer.ms for layer in layers)
    rows = [TypeTime(t, len(v), sum(v), sum(v) / total if total > 0 else 0.0) for t, v in sums.items()]
    return sorted(rows, key=lambda row: (-row.ms, row.type))


@dataclass
class NetProfile:
    """One net measured in real Caffe in its own process."""

    prototxt: str
    weights: str | None  # None: random weights were generated for the run
    batch: int
    input_shapes: dict[str, list[int]]
    threads: int  # requested (OPENBLAS_NUM_THREADS)
    blas_threads: int | None  # what OpenBLAS reported inside the worker (None: could not ask it)
    rounds: int
    warmup: int
    layers: list[LayerTime]
    forward_ms: float  # median of whole forward passes
    clock: str  # "wall" or "cpu" (process CPU time)
    blob_bytes: int
    param_bytes: int
    base_rss_bytes: int  # peak RSS of the worker before the net was built (Python, numpy, pycaffe)
    peak_rss_bytes: int
    forward_times_ms: list[float] = field(default_factory=list)
    runtime: str = "caffe"  # where it was timed: "caffe", or "opencv" (profile_reference without pycaffe)

    @property
    def total_ms(self) -> float:
        """Sum of the per-layer medians (slightly above ``forward_ms``: per-call overhead)."""
        return sum(layer.ms for layer in self.layers)

    @property
    def memory_bytes(self) -> int:
        return self.blob_bytes + self.param_bytes

    def class_ms(self, cls: str) -> float:
        return sum(layer.ms for layer in self.layers if type_class(layer.type) == cls)

    @property
    def non_tensor_share(self) -> float:
        """Non-tensor time over tensor + non-tensor time (Input layers left out), in [0, 1]."""
        tensor, non_tensor = self.class_ms("tensor"), self.class_ms("non-tensor")
        return non_tensor / (tensor + non_tensor) if tensor + non_tensor > 0 else 0.0

    def by_type(self) -> list[TypeTime]:
        return by_type(self.layers)

    def times(self) -> dict[str, float]:
        return {layer.name: layer.ms for layer in self.layers}

    def to_json(self) -> dict[str, Any]:
        payload = asdict(self)
        payload["total_ms"] = self.total_ms
        payload["non_tensor_share"] = self.non_tensor_share
        payload["by_type"] = [asdict(t) for t in self.by_type()]
        return payload

    @classmethod
    def from_json(cls, payload: dict[str, Any]) -> NetProfile:
        names = set(cls.__dataclass_fields__)
        values = {k: v for k, v in payload.items() if k in names}
        values["layers"] = [LayerTime(**layer) for layer in payload["layers"]]
        return cls(**values)


# ---------------------------------------------------------------------------------------------------------------
# the caller's side


def random_caffemodel(prototxt: PathLike, out: PathLike, seed: int = 0) -> None:
    """Write a caffemodel of plausible random weights for ``prototxt`` (validating the prototxt on the way)."""
    graph = load_model(prototxt)
    random_weights(graph, seed)
    caffe_io.write_caffemodel(out, graph.to_net(), graph.weights())


def _check_files(prototxt: PathLike, weights: PathLike | None) -> None:
    for path in (prototxt, weights):
        if path is not None and not Path(path).is_file():
            raise DeepRebirthError("no such file", file=str(path))


def run_worker(request: dict[str, Any], threads: int) -> dict[str, Any]:
    """Run ``request`` in a fresh isolated process (``deeprebirth.caffe.isolation``) with OpenBLAS limited to
    ``threads``."""
    return run_job(_work, request, threads=threads, what=", ".join(Path(net[0]).name for net in request["nets"]))


def profile_net(prototxt: PathLike, weights: PathLike | None = None, *, batch: int | None = None,
                threads: int = 1, rounds: int = 10, warmup: int = 2, seed: int = 0, clock: str = "wall",
                gpu: int | None = None) -> NetProfile:
    """Time every layer of ``prototxt`` in real Caffe (see the module docstring); ``batch`` reshapes the inputs;
    ``gpu``: run on that GPU (a CUDA build; per-layer times then include waiting for the GPU to finish)."""
    _check_files(prototxt, weights)
    check_timing(threads=threads, rounds=rounds, warmup=warmup, clock=clock, batch=batch)
    graph = load_model(prototxt, weights)  # clear one-line errors here rather than a Caffe abort later
    with tempfile.TemporaryDirectory(prefix="deeprebirth-weights-") as tmp:
        model = str(weights) if weights is not None else str(Path(tmp) / "random.caffemodel")
        if weights is None:
            random_weights(graph, seed)
            caffe_io.write_caffemodel(model, graph.to_net(), graph.weights())
        request = {"job": "profile", "nets": [[str(prototxt), model]], "batch": batch, "rounds": rounds,
                   "warmup": warmup, "seed": seed, "clock": clock, "gpu": gpu}
        result = run_worker(request, threads)
    result.update(prototxt=str(prototxt), weights=None if weights is None else str(weights), threads=threads)
    return NetProfile.from_json(result)


def interleaved_latency(nets: Sequence[tuple[PathLike, PathLike]], *, runtime: str = "caffe",
                        batch: int | None = None, threads: int = 1, rounds: int = 10, warmup: int = 2,
                        seed: int = 0, fusion: bool = True, clock: str = "wall",
                        gpu: int | None = None) -> list[list[float]]:
    """Whole-forward times (ms) of several (prototxt, caffemodel) nets loaded in one worker and run in turn
    (A B A B ...), so slow drift of a shared machine hits every net alike. ``runtime``: "caffe" or "opencv"
    (OpenCV dnn, with ``fusion`` passed to ``enableFusion``). Returns one list of ``rounds`` times per net."""
    check_timing(threads=threads, rounds=rounds, warmup=warmup, clock=clock, batch=batch)
    for prototxt, weights in nets:
        _check_files(prototxt, weights)
    if runtime not in ("caffe", "opencv"):
        raise DeepRebirthError(f"unknown runtime {runtime!r} (caffe, opencv)")
    request: dict[str, Any] = {"job": "latency", "runtime": runtime, "nets": [[str(p), str(w)] for p, w in nets],
                               "batch": batch, "rounds": rounds, "warmup": warmup, "seed": seed, "fusion": fusion,
                               "threads": threads, "clock": clock, "gpu": gpu}
    if runtime == "opencv":
        request["inputs"] = [input_shapes(p, batch) for p, _ in nets]
    times: list[list[float]] = run_worker(request, threads)["times_ms"]
    return times


def input_shapes(prototxt: PathLike, batch: int | None) -> dict[str, list[int]]:
    """Input blob name -> shape, from our own shape inference (OpenCV cannot tell us)."""
    graph = load_model(prototxt)
    if batch is not None:
        set_batch(graph, batch)
    shapes = infer_shapes(graph)
    found = {graph.caffe_name(b): list(shapes[b] or ()) for b in graph.inputs()}
    if not found or any(not s for s in found.values()):
        raise DeepRebirthError("needs a net with Input layers of known shape", file=str(prototxt))
    return found


# ---------------------------------------------------------------------------------------------------------------
# plots


def plot_by_type(profiles: Sequence[NetProfile], labels: Sequence[str], path: PathLike, title: str = "") -> None:
    """Per-type bar chart of forward time, one bar per net side by side; written atomically as PNG (or by
    extension, whatever matplotlib supports). Uses the Agg canvas directly: no pyplot, no global backend."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not profiles or len(profiles) != len(labels):
        raise ValueError("one label per profile")
    fmt = Path(path).suffix.lstrip(".").lower() or "png"
    if fmt not in ("png", "svg", "pdf", "jpg", "jpeg"):
        raise DeepRebirthError("unsupported plot format (use .png, .svg or .pdf)", file=str(path))
    order: list[str] = []
    for profile in profiles:
        for row in profile.by_type():
            if row.type not in order:
                order.append(row.type)
    fig = Figure(figsize=(max(6.0, 0.9 * len(order) + 2.5), 4.8), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / len(profiles)
    colors = ("#4c72b0", "#dd8452", "#55a868", "#c44e52")
    x = np.arange(len(order))
    for k, (profile, label) in enumerate(zip(profiles, labels)):
        per_type = {row.type: row.ms for row in profile.by_type()}
        values = [per_type.get(t, 0.0) for t in order]
        bars = ax.bar(x + (k - (len(profiles) - 1) / 2) * width, values, width, color=colors[k % len(colors)],
                      label=f"{label}: {profile.total_ms:.1f} ms, non-tensor {100 * profile.non_tensor_share:.0f}%")
        ax.bar_label(bars, fmt="%.1f", fontsize=7, padding=1)
    ax.set_xticks(x, order, rotation=30, ha="right")
    first = profiles[0]
    ax.set_ylabel(f"{'CPU time' if first.clock == 'cpu' else 'time'} per forward pass (ms, sum of per-layer medians)")
    clock = ", CPU time" if first.clock == "cpu" else ""
    ax.set_title(title or f"Caffe time per layer type (batch {first.batch}, {first.threads} thread"
                          f"{'s' if first.threads > 1 else ''}{clock})")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format=fmt)
    caffe_io.atomic_write_bytes(path, buffer.getvalue())


# ---------------------------------------------------------------------------------------------------------------
# the worker's side (runs in the spawned process)


def _blas_threads() -> int | None:
    """How many threads the OpenBLAS that Caffe loaded uses."""
    lib = caffe_openblas()
    return None if lib is None else int(lib.openblas_get_num_threads())


def _peak_rss() -> int:
    """This process's peak RSS in bytes. Linux's ``VmHWM`` belongs to the current memory image; ``ru_maxrss`` does
    not do here: exec keeps the high-water mark of the image it replaces, which after (v)fork is the parent's, so a
    worker started by a big parent would report the parent's peak."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _feed_caffe(net: Any, batch: int | None, rng: np.random.Generator) -> dict[str, list[int]]:
    if batch is not None:
        if not net.inputs:
            raise DeepRebirthError("a batch size needs a net with Input layers", options=("batch",))
        for name in net.inputs:
            shape = net.blobs[name].data.shape
            net.blobs[name].reshape(batch, *shape[1:])
        net.reshape()
    shapes = {}
    for name in net.inputs:
        blob = net.blobs[name]
        blob.data[...] = rng.standard_normal(blob.data.shape).astype(np.float32)
        shapes[name] = list(blob.data.shape)
    return shapes


def _distinct_bytes(arrays: Sequence[np.ndarray]) -> int:
    """Bytes of arrays counted once per distinct memory (shared blobs point to the same data)."""
    seen: dict[int, int] = {}
    for array in arrays:
        if array.size:
            address = array.__array_interface__["data"][0]
            seen[address] = max(seen.get(address, 0), array.nbytes)
    return sum(seen.values())


def _work_profile(request: dict[str, Any]) -> dict[str, Any]:
    base_rss = _peak_rss()
    prototxt, model = request["nets"][0]
    gpu = request.get("gpu")
    net = open_net(prototxt, model, gpu)
    sync = _gpu_sync() if gpu is not None else _nothing
    rng = np.random.default_rng(request["seed"])
    shapes = _feed_caffe(net, request["batch"], rng)
    count = len(net.layers)
    per_layer: list[list[float]] = [[] for _ in range(count)]
    forward: list[float] = []
    clock = CLOCKS[request["clock"]]
    for round_index in range(request["warmup"] + request["rounds"]):
        timed = round_index >= request["warmup"]
        for i in range(count):
            start = clock()
            net._forward(i, i)
            sync()
            elapsed = clock() - start
            if timed:
                per_layer[i].append(elapsed * 1e3)
        start = clock()
        net._forward(0, count - 1)
        sync()
        if timed:
            forward.append((clock() - start) * 1e3)
    layers = [{"name": name, "type": layer.type, "ms": statistics.median(per_layer[i])}
              for i, (name, layer) in enumerate(zip(net._layer_names, net.layers))]
    blob_bytes = _distinct_bytes([blob.data for blob in net.blobs.values()])
    param_bytes = _distinct_bytes([blob.data for blobs in net.params.values() for blob in blobs])
    return {"batch": next(iter(shapes.values()))[0] if shapes else 0, "input_shapes": shapes,
            "blas_threads": _blas_threads(), "rounds": request["rounds"], "warmup": request["warmup"],
            "layers": layers, "forward_ms": statistics.median(forward), "forward_times_ms": forward,
            "clock": request["clock"],
            "blob_bytes": blob_bytes, "param_bytes": param_bytes, "base_rss_bytes": base_rss,
            "peak_rss_bytes": _peak_rss()}


def _work_latency(request: dict[str, Any]) -> dict[str, Any]:
    clock = CLOCKS[request["clock"]]
    runs: list[Callable[[], Any]] = []
    if request["runtime"] == "caffe":
        gpu = request.get("gpu")
        for prototxt, model in request["nets"]:
            net = open_net(prototxt, model, gpu)
            _feed_caffe(net, request["batch"], np.random.default_rng(request["seed"]))
            last = len(net.layers) - 1
            runs.append(_synced(functools.partial(net._forward, 0, last), _gpu_sync() if gpu is not None else _nothing))
    else:
        import cv2

        cv2.setNumThreads(request["threads"])
        for (prototxt, model), inputs in zip(request["nets"], request["inputs"]):
            net = cv2.dnn.readNetFromCaffe(prototxt, model)
            net.enableFusion(bool(request["fusion"]))
            rng = np.random.default_rng(request["seed"])
            for name, shape in inputs.items():
                net.setInput(rng.standard_normal(shape).astype(np.float32), name)
            runs.append(net.forward)
    for _ in range(request["warmup"]):
        for run in runs:
            run()
    times: list[list[float]] = [[] for _ in runs]
    for _ in range(request["rounds"]):
        for k, run in enumerate(runs):
            start = clock()
            run()
            times[k].append((clock() - start) * 1e3)
    return {"times_ms": times, "blas_threads": _blas_threads()}


def _nothing() -> None:
    pass


def _gpu_sync() -> Callable[[], None]:
    """cudaDeviceSynchronize of the CUDA runtime Caffe loaded: Caffe's GPU layers return before their kernels end."""
    path = next(line.split()[-1] for line in Path("/proc/self/maps").read_text().splitlines() if "libcudart" in line)
    runtime = ctypes.CDLL(path)

    def sync() -> None:
        runtime.cudaDeviceSynchronize()

    return sync


def _synced(run: Callable[[], Any], sync: Callable[[], None]) -> Callable[[], None]:
    def both() -> None:
        run()
        sync()

    return both


def _work(request: dict[str, Any]) -> dict[str, Any]:
    """The child's side: do the request; any failure but a user error becomes one line naming the net."""
    try:
        return _work_profile(request) if request["job"] == "profile" else _work_latency(request)
    except DeepRebirthError:
        raise
    except Exception as err:  # noqa: BLE001 - any failure becomes one line for the caller
        raise DeepRebirthError(f"{type(err).__name__}: {err}", file=request["nets"][0][0]) from None
