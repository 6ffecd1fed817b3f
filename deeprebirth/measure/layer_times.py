"""Per-layer times inside a deployment runtime, mapped back to the Caffe layers, where the runtime times its ops.

- OpenCV dnn: runs the Caffe files themselves (``readNetFromCaffe`` keeps the layer names) and times every layer
  of every forward on its tick counter (wall time); ``Net.getPerfProfile()`` returns the last forward's, one entry
  per ``getLayerNames()`` name (layer ids from 1: id 0 is the input, left out of both). Layers OpenCV fused into
  a neighbour (an activation or BatchNorm into its conv, a Concat whose inputs are written in place) tick 0 in
  every round and are listed as having no op of their own. The per-layer ticks add up to OpenCV's own total, so
  what the forward has beyond them is the Python binding's input and output copies.

- ONNX Runtime: ``SessionOptions.enable_profiling`` writes a JSON trace with one ``<node>_kernel_time`` event per
  node and run (whole microseconds). The exporter names every node ``<layer>:<Op>``; the nodes ORT's graph
  optimizations rewrite are renamed after their output value (``conv1@1_1_nchwc``: the Conv fused with its ReLU, in
  the NCHWc layout), and the exporter's value names are the IR's blob names, so both lead back to a layer. A fused
  node's time goes to the layer that created the blob (the Conv); the in-place layers it swallowed are listed as
  having no op of their own. Ops ORT adds itself (``ReorderInput``/``ReorderOutput``: NCHWc layout changes) are
  rows of type ``runtime:<op>``: real time that no Caffe layer asked for.
- MNN: ``Interpreter.runSessionWithCallBackInfo`` calls Python before and after every op with its name and type.
  The Caffe converter keeps layer names; the Raster ops a layer is split into (``norm1_raster_3``: LRN becomes
  unary, pooling and binary ops) map back to it. A Concat has no op: its copies are Rasters named after the layer
  that reads it, so their time shows under that reader. The callbacks cost a few microseconds per op, which is why
  the worker times whole forward passes separately, without them.
- ncnn: no per-layer times. The Python wheel exposes none (ncnn times layers only when built with
  ``NCNN_BENCHMARK``, printing from C++; ``ncnn.Extractor`` offers ``input``/``extract`` only), and pnnx renames
  the layers on the way, so nothing would map back either.

Per op: the median over the timed rounds (as Caffe's per-layer profile); a layer's time is the sum of its ops'
medians. How much of a pass the ops account for is taken round by round (summed op times over that round's forward
time, median over rounds), so a time slice lost to another process skews one round, not the whole ratio. The rest is
the runtime's per-run overhead (input and output copies, the Python binding): large on a tiny net, small on a real
one. The forward time is the median of whole passes timed around the runtime's run call in the same worker (MNN:
separate passes without the callbacks, interleaved with the timed ones; OpenCV: the very passes whose layers it
timed), by the chosen clock; MNN's ops use that clock too, ONNX Runtime's trace and OpenCV's ticks are always wall
time (so those two time the forward on the wall clock whatever the chosen one).
"""

from __future__ import annotations

import json
import re
import statistics
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from deeprebirth.caffe.reference import pick_reference
from deeprebirth.errors import DeepRebirthError
from deeprebirth.export.api import ExportOptions, export_files
from deeprebirth.export.runtimes import RUNTIMES, Session, open_session
from deeprebirth.ir.classify import RUNTIME_OP, type_class
from deeprebirth.ir.graph import Graph
from deeprebirth.ir.model import PathLike, load_model
from deeprebirth.measure.profile import (
    LayerTime,
    NetProfile,
    TypeTime,
    by_type,
    input_shapes,
    profile_net,
    random_caffemodel,
)
from deeprebirth.measure.worker import CLOCKS, check_timing, run_job

# Caffe's own per-layer times are deeprebirth.measure.profile's
LAYER_TIMED = tuple(name for name, runtime in RUNTIMES.items() if not runtime.layer_times and name != "caffe")
NOT_LAYER_TIMED = {name: runtime.layer_times for name, runtime in RUNTIMES.items() if runtime.layer_times}
# What runtimes append to a layer's or blob's name when they rewrite or split a node, tried from the end.
_SUFFIXES = tuple(re.compile(p) for p in (r"_kernel_time$", r":[A-Za-z]\w*$", r"_nchwc$", r"_token_\d+$",
                                         r"_raster_\d+$", r"_\d+$", r"@\d+$"))


@dataclass
class RuntimeProfile:
    """One exported net timed op by op in ``runtime``; ``layers`` holds Caffe layers and runtime-added ops."""

    prototxt: str
    weights: str | None
    runtime: str
    input_shapes: dict[str, list[int]]
    threads: int
    rounds: int
    warmup: int
    clock: str
    forward_ms: float
    layers: list[LayerTime]
    no_op: list[LayerTime] = field(default_factory=list)  # Caffe layers with no op of their own (ms 0)
    op_share: float = 0.0  # median over rounds of (that round's summed op times / its forward time)

    @property
    def total_ms(self) -> float:
        return sum(layer.ms for layer in self.layers)

    def class_ms(self, cls: str) -> float:
        return sum(layer.ms for layer in self.layers if type_class(layer.type) == cls)

    def runtime_ms(self) -> float:
        return sum(layer.ms for layer in self.layers if layer.type.startswith(RUNTIME_OP))

    def by_type(self) -> list[TypeTime]:
        return by_type(self.layers)

    def types(self) -> set[str]:
        """Every Caffe layer type of the net that did work or was folded away (Input layers left out)."""
        return {layer.type for layer in [*self.layers, *self.no_op] if not layer.type.startswith(RUNTIME_OP)}

    def describe(self) -> list[str]:
        shapes = ", ".join(f"{name} {'x'.join(map(str, s))}" for name, s in self.input_shapes.items())
        share = f" (per round {100 * self.op_share:.0f}% of the forward)"
        lines = [(f"{self.runtime}: {self.prototxt} ({self.weights or 'random weights'}): input {shapes}, "
                  f"{self.threads} thread(s), median of {self.rounds} rounds after {self.warmup} warm-up"),
                 (f"  forward {self.forward_ms:.2f} ms (whole pass, {self.clock} clock); per-op sum "
                  f"{self.total_ms:.2f} ms{share}: tensor {self.class_ms('tensor'):.2f} ms, non-tensor "
                  f"{self.class_ms('non-tensor'):.2f} ms, added by {self.runtime} {self.runtime_ms():.2f} ms "
                  f"{self._op_clock()}")]
        if self.no_op:
            counts: dict[str, int] = {}
            for layer in self.no_op:
                counts[layer.type] = counts.get(layer.type, 0) + 1
            lines.append(f"  no op of their own in {self.runtime} (fused into a neighbour, copied by their reader, "
                         f"or identities): " + ", ".join(f"{t} x{n}" for t, n in sorted(counts.items())))
        return lines

    def _op_clock(self) -> str:
        if self.runtime == "onnxruntime":
            return "(per-op times: ONNX Runtime's trace, whole microseconds of wall time: no CPU clock there)"
        if self.runtime == "opencv":
            return "(per-op times: OpenCV's per-layer tick counters, wall time: no CPU clock there)"
        return f"(per-op times: between {self.runtime}'s callbacks, {self.clock} clock)"

    def to_json(self) -> dict[str, Any]:
        payload = asdict(self)
        payload["total_ms"] = self.total_ms
        payload["by_type"] = [asdict(t) for t in self.by_type()]
        return payload


def layer_owners(graph: Graph) -> dict[str, str]:
    """Name a runtime may give an op -> the Caffe layer whose work it is: layer names first, then blob names (IR
    and Caffe), each blob to the layer that created it (an in-place ReLU's output belongs to the Conv before it:
    runtimes fuse the activation into the op that made the blob)."""
    owners = {layer.name: layer.name for layer in graph.layers()}
    creator: dict[str, str] = {}
    for layer in graph.layers():
        if layer.type == "Input":
            continue
        for top in layer.tops:
            first = creator.setdefault(graph.caffe_name(top), layer.name)
            owners.setdefault(top, first)
            owners.setdefault(graph.caffe_name(top), first)
    return owners


def owner_of(op_name: str, owners: dict[str, str]) -> str | None:
    """The Caffe layer an op named ``op_name`` belongs to, stripping runtime suffixes one at a time; None: an op
    the runtime added on its own."""
    name = op_name
    while name not in owners:
        for pattern in _SUFFIXES:
            shorter = pattern.sub("", name)
            if shorter != name and shorter:
                name = shorter
                break
        else:
            return None
    return owners[name]


def attribute(graph: Graph, ops: Sequence[tuple[str, str, float]]) -> tuple[list[LayerTime], list[LayerTime]]:
    """(per Caffe layer and per runtime-added op, the Caffe layers that got no op) from (op name, op type, ms)."""
    owners = layer_owners(graph)
    per_layer: dict[str, float] = {}
    added: list[LayerTime] = []
    for name, op, ms in ops:
        layer = owner_of(name, owners)
        if layer is None:
            added.append(LayerTime(name, f"{RUNTIME_OP}{op}", ms))
        else:
            per_layer[layer] = per_layer.get(layer, 0.0) + ms
    layers = [layer for layer in graph.layers() if layer.type != "Input"]
    timed = [LayerTime(layer.name, layer.type, per_layer[layer.name]) for layer in layers if layer.name in per_layer]
    missing = [LayerTime(layer.name, layer.type, 0.0) for layer in layers if layer.name not in per_layer]
    return timed + added, missing


def profile_on_runtime(prototxt: PathLike, weights: PathLike | None, runtime: str, *, batch: int | None = None,
                       threads: int = 1, rounds: int = 10, warmup: int = 2, seed: int = 0,
                       clock: str = "wall") -> RuntimeProfile:
    """Export ``prototxt`` to ``runtime`` (OpenCV: the Caffe files as they are; random weights when none), run it
    in a fresh worker, time every op."""
    if runtime not in LAYER_TIMED:
        why = NOT_LAYER_TIMED.get(runtime, f"unknown runtime {runtime!r}")
        raise DeepRebirthError(f"no per-layer times in {runtime}: {why}")
    check_timing(threads=threads, rounds=rounds, warmup=warmup, clock=clock, batch=batch)
    for path in (prototxt, weights):
        if path is not None and not Path(path).is_file():
            raise DeepRebirthError("no such file", file=str(path))
    if runtime in ("onnxruntime", "opencv"):
        clock = "wall"  # their op times know no CPU clock, and a pass and its ops must be timed alike to compare
    graph = load_model(prototxt)
    with tempfile.TemporaryDirectory(prefix="deeprebirth-layer-times-") as tmp:
        folder = Path(tmp)
        model = weights if weights is not None else folder / "random.caffemodel"
        if weights is None:
            random_caffemodel(prototxt, model, seed)
        inputs: Mapping[str, Sequence[int]]
        outputs: dict[str, Any]
        if runtime == "opencv":
            inputs, outputs, path = input_shapes(prototxt, batch), {}, str(prototxt)
        else:
            out = folder / f"net{RUNTIMES[runtime].suffix}"
            result = export_files(prototxt, model, out, ExportOptions(to=RUNTIMES[runtime].format, batch=batch))
            inputs, outputs, path = result.inputs, result.outputs, str(out)
        request = {"job": "layers", "runtime": runtime, "path": path, "weights": str(model), "inputs": inputs,
                   "outputs": outputs, "threads": threads, "rounds": rounds, "warmup": warmup, "seed": seed,
                   "clock": clock, "trace": str(folder / "ort")}
        found = run_job(work_layers, request, threads=threads, what=Path(prototxt).name, runner=runtime)
    ops = [(name, op, statistics.median(times)) for name, op, times in found["ops"]]
    layers, no_op = attribute(graph, ops)
    return RuntimeProfile(str(prototxt), None if weights is None else str(weights), runtime,
                          {k: list(v) for k, v in inputs.items()}, threads, rounds, warmup, clock,
                          statistics.median(found["forward_ms"]), layers, no_op,
                          statistics.median(found["op_share"]) if found["op_share"] else 0.0)


def profile_reference(prototxt: PathLike, weights: PathLike | None = None, *, reference: str | None = None,
                      batch: int | None = None, threads: int = 1, rounds: int = 10, warmup: int = 2, seed: int = 0,
                      clock: str = "wall") -> NetProfile:
    """Every layer's time in the reference runtime (``deeprebirth.caffe.reference``: real Caffe where pycaffe imports,
    else OpenCV dnn). OpenCV's per-layer tick counters (``profile_on_runtime``, wall clock) become a NetProfile:
    the layers OpenCV fused into a neighbour (BatchNorm, Scale, activations into the conv) count 0 ms, which is
    what they cost there; memory is not measured (0) since OpenCV reports none."""
    if pick_reference(reference) == "caffe":
        return profile_net(prototxt, weights, batch=batch, threads=threads, rounds=rounds, warmup=warmup, seed=seed,
                           clock=clock)
    timed = profile_on_runtime(prototxt, weights, "opencv", batch=batch, threads=threads, rounds=rounds,
                               warmup=warmup, seed=seed, clock=clock)
    first = next(iter(timed.input_shapes.values()), [0])
    return NetProfile(str(prototxt), timed.weights, first[0], timed.input_shapes, threads, None, rounds, warmup,
                      [*timed.layers, *timed.no_op], timed.forward_ms, timed.clock, 0, 0, 0, 0, runtime="opencv")



# ---------------------------------------------------------------------------------------------------------------
# the worker's side (in a deeprebirth.measure.worker process)


def work_layers(request: dict[str, Any]) -> dict[str, Any]:
    """Time ``rounds`` whole passes (after ``warmup``) and every op of each; ops as [name, type, [ms per round]]."""
    runtime, warmup, rounds = request["runtime"], request["warmup"], request["rounds"]
    clock = CLOCKS[request["clock"]]
    outputs = {name: tuple(shape) if shape else None for name, shape in request["outputs"].items()}
    trace = request["trace"] if runtime == "onnxruntime" else None
    if runtime == "opencv":
        session = _opencv_session(request["path"], request["weights"], request["threads"])
    else:
        session = open_session(runtime, request["path"], outputs, request["threads"], profile=trace)
    rng = np.random.default_rng(request["seed"])
    feed = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in request["inputs"].items()}
    forward: list[float] = []
    per_round: list[list[tuple[str, str, float]]] = []
    for i in range(warmup + rounds):
        start = clock()
        session.run(feed)
        if i >= warmup:
            forward.append((clock() - start) * 1e3)
            if session.last_ops is not None:
                per_round.append(session.last_ops())
        if session.run_ops is not None:
            ops = session.run_ops(feed, clock)
            if i >= warmup:
                per_round.append(ops)
    if session.end_profiling is not None:
        per_round = _ort_trace_ops(Path(session.end_profiling()), warmup)
    if len(per_round) != rounds:
        raise DeepRebirthError(f"{runtime} reported ops for {len(per_round)} of {rounds} timed runs")
    sums = [sum(ms for _, _, ms in ops) for ops in per_round]
    return {"forward_ms": forward, "ops": _per_op(per_round), "op_share": [s / f for s, f in zip(sums, forward) if f]}


def _opencv_session(prototxt: str, weights: str, threads: int) -> Session:
    import cv2

    cv2.setNumThreads(threads)
    try:
        net = cv2.dnn.readNetFromCaffe(prototxt, weights)
    except cv2.error as err:  # its message holds the C++ source line and a newline: keep OpenCV's reason only
        raise DeepRebirthError(f"OpenCV dnn cannot load the net: {err.err}", file=prototxt) from None
    names = list(net.getLayerNames())
    types = [net.getLayer(net.getLayerId(name)).type for name in names]
    tick_ms = 1e3 / cv2.getTickFrequency()

    def run(feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        for name, array in feed.items():
            net.setInput(array, name)
        return {names[-1]: net.forward()}

    def last_ops() -> list[tuple[str, str, float]]:
        ticks = np.asarray(net.getPerfProfile()[1], dtype=np.float64).ravel()
        if len(ticks) != len(names):  # the alignment everything here rests on: refuse rather than misattribute
            raise DeepRebirthError(f"OpenCV timed {len(ticks)} layers but names {len(names)}", file=prototxt)
        return [(name, op, t * tick_ms) for name, op, t in zip(names, types, ticks) if t > 0]

    return Session(run, last_ops=last_ops)


def _ort_trace_ops(path: Path, skip: int) -> list[list[tuple[str, str, float]]]:
    """ONNX Runtime's trace as ops per run: kernel events fall inside their run's ``model_run`` span."""
    events = json.loads(path.read_text())
    runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("cat") == "Session"
                  and e.get("name") == "model_run")[skip:]
    per_run: list[list[tuple[str, str, float]]] = [[] for _ in runs]
    for event in events:
        if event.get("cat") != "Node" or not event.get("name", "").endswith("_kernel_time"):
            continue
        for k, (begin, end) in enumerate(runs):
            if begin <= event["ts"] <= end:
                name = event["name"].removesuffix("_kernel_time")
                per_run[k].append((name, event.get("args", {}).get("op_name", "?"), event["dur"] / 1e3))
                break
    return per_run


def _per_op(per_round: Sequence[Sequence[tuple[str, str, float]]]) -> list[list[Any]]:
    """[name, type, [ms in each round]] in first-seen order (an op missing from a round counts 0 there)."""
    order: dict[str, str] = {}
    sums: list[dict[str, float]] = []
    for ops in per_round:
        found: dict[str, float] = {}
        for name, op, ms in ops:
            order.setdefault(name, op)
            found[name] = found.get(name, 0.0) + ms
        sums.append(found)
    return [[name, op, [found.get(name, 0.0) for found in sums]] for name, op in order.items()]
