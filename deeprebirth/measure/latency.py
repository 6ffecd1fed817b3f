"""Whole-forward latency of a net in a deployment runtime: the same measurement ``deeprebirth.measure.profile`` makes in
Caffe and OpenCV (warm-up, then interleaved rounds A B A B ..., medians), for ONNX Runtime, MNN and ncnn.

Each net is exported to the runtime's format first (``export.api``; random weights when none are given), then all
nets are loaded in one fresh worker process (``deeprebirth.measure.worker``) and run in turn, so slow drift of a shared machine hits every net alike and a runtime crash kills only the worker. Sessions
are the ones ``--check`` uses: ``threads`` intra-op threads, fp32 (MNN ``precision: high``; ncnn fp16 off).
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from deeprebirth.aliases import PathLike
from deeprebirth.errors import DeepRebirthError
from deeprebirth.export.api import ExportOptions, export_files
from deeprebirth.export.runtimes import RUNTIMES, open_session
from deeprebirth.measure.profile import interleaved_latency, random_caffemodel
from deeprebirth.measure.worker import CLOCKS, check_timing, run_job


def latency(nets: Sequence[tuple[PathLike, PathLike | None]], runtime: str, *, batch: int | None = None,
            threads: int = 1, rounds: int = 10, warmup: int = 2, seed: int = 0, clock: str = "wall",
            fusion: bool = True) -> list[list[float]]:
    """Per net, ``rounds`` whole-forward times (ms) in ``runtime``; nets without weights get random ones."""
    if runtime not in RUNTIMES:
        raise DeepRebirthError(f"unknown runtime {runtime!r} ({', '.join(RUNTIMES)})")
    check_timing(threads=threads, rounds=rounds, warmup=warmup, clock=clock, batch=batch)
    with tempfile.TemporaryDirectory(prefix="deeprebirth-latency-") as tmp:
        pairs = []
        for i, (prototxt, weights) in enumerate(nets):
            if not Path(prototxt).is_file():
                raise DeepRebirthError("no such file", file=str(prototxt))
            if weights is None:
                weights = Path(tmp) / f"random{i}.caffemodel"
                random_caffemodel(prototxt, weights, seed)
            pairs.append((prototxt, weights))
        if not RUNTIMES[runtime].exported:
            return interleaved_latency(pairs, runtime=runtime, batch=batch, threads=threads, rounds=rounds,
                                       warmup=warmup, seed=seed, clock=clock, fusion=fusion)
        return exported_latency(pairs, runtime, Path(tmp), batch=batch, threads=threads, rounds=rounds,
                                 warmup=warmup, seed=seed, clock=clock)


def exported_latency(pairs: Sequence[tuple[PathLike, PathLike]], runtime: str, folder: Path, *, batch: int | None,
                      threads: int, rounds: int, warmup: int, seed: int, clock: str) -> list[list[float]]:
    models = []
    for i, (prototxt, weights) in enumerate(pairs):
        out = folder / f"net{i}{RUNTIMES[runtime].suffix}"
        result = export_files(prototxt, weights, out, ExportOptions(to=RUNTIMES[runtime].format, batch=batch))
        models.append({"path": str(out), "inputs": result.inputs, "outputs": result.outputs})
    request = {"runtime": runtime, "models": models, "threads": threads, "rounds": rounds, "warmup": warmup,
               "seed": seed, "clock": clock}
    times: list[list[float]] = run_job(_work, request, threads=threads, runner=runtime,
                                         what=", ".join(Path(p).name for p, _ in pairs))["times_ms"]
    return times


def _work(request: dict[str, Any]) -> dict[str, Any]:
    clock = CLOCKS[request["clock"]]
    runs = []
    for model in request["models"]:
        outputs = {name: tuple(shape) if shape else None for name, shape in model["outputs"].items()}
        session = open_session(request["runtime"], model["path"], outputs, request["threads"])
        rng = np.random.default_rng(request["seed"])
        feed = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in model["inputs"].items()}
        runs.append((session, feed))
    for _ in range(request["warmup"]):
        for session, feed in runs:
            session.run(feed)
    times: list[list[float]] = [[] for _ in runs]
    for _ in range(request["rounds"]):
        for k, (session, feed) in enumerate(runs):
            start = clock()
            session.run(feed)
            times[k].append((clock() - start) * 1e3)
    return {"times_ms": times}
