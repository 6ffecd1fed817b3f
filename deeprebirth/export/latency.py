"""Whole-forward latency of a net in a deployment runtime: the same measurement ``deeprebirth.profile`` makes in
Caffe and OpenCV (warm-up, then interleaved rounds A B A B ..., medians), for ONNX Runtime, MNN and ncnn.

Each net is exported to the runtime's format first (``export.api``; random weights when none are given), then all
nets are loaded in one fresh worker process (``python -m deeprebirth.export.latency REQUEST RESULT``) and run in
turn, so slow drift of a shared machine hits every net alike and a runtime crash kills only the worker. Sessions
are the ones ``--check`` uses: ``threads`` intra-op threads, fp32 (MNN ``precision: high``; ncnn fp16 off).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from deeprebirth.errors import DeepRebirthError
from deeprebirth.model import PathLike

RUNTIMES = ("caffe", "opencv", "onnxruntime", "mnn", "ncnn")
EXPORTED = {"onnxruntime": "onnx", "mnn": "mnn", "ncnn": "ncnn"}
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def latency(nets: Sequence[tuple[PathLike, PathLike | None]], runtime: str, *, batch: int | None = None,
            threads: int = 1, rounds: int = 10, warmup: int = 2, seed: int = 0, clock: str = "wall",
            fusion: bool = True) -> list[list[float]]:
    """Per net, ``rounds`` whole-forward times (ms) in ``runtime``; nets without weights get random ones."""
    from deeprebirth.profile import interleaved_latency, random_caffemodel

    if runtime not in RUNTIMES:
        raise DeepRebirthError(f"unknown runtime {runtime!r} ({', '.join(RUNTIMES)})")
    if clock not in CLOCKS:
        raise DeepRebirthError(f"unknown clock {clock!r} ({', '.join(CLOCKS)})")
    if threads < 1 or rounds < 1 or warmup < 0:
        raise DeepRebirthError("threads and rounds must be at least 1, warm-up rounds at least 0")
    with tempfile.TemporaryDirectory(prefix="deeprebirth-latency-") as tmp:
        pairs = []
        for i, (prototxt, weights) in enumerate(nets):
            if not Path(prototxt).is_file():
                raise DeepRebirthError("no such file", file=str(prototxt))
            if weights is None:
                weights = Path(tmp) / f"random{i}.caffemodel"
                random_caffemodel(prototxt, weights, seed)
            pairs.append((prototxt, weights))
        if runtime in ("caffe", "opencv"):
            return interleaved_latency(pairs, runtime=runtime, batch=batch, threads=threads, rounds=rounds,
                                       warmup=warmup, seed=seed, clock=clock, fusion=fusion)
        return exported_latency(pairs, runtime, Path(tmp), batch=batch, threads=threads, rounds=rounds,
                                 warmup=warmup, seed=seed, clock=clock)


def exported_latency(pairs: Sequence[tuple[PathLike, PathLike]], runtime: str, folder: Path, *, batch: int | None,
                      threads: int, rounds: int, warmup: int, seed: int, clock: str) -> list[list[float]]:
    from deeprebirth.export.api import ExportOptions, export_files

    models = []
    for i, (prototxt, weights) in enumerate(pairs):
        suffix = {"onnx": ".onnx", "mnn": ".mnn", "ncnn": ""}[EXPORTED[runtime]]
        result = export_files(prototxt, weights, folder / f"net{i}{suffix}",
                              ExportOptions(to=EXPORTED[runtime], batch=batch))
        models.append({"path": str(folder / f"net{i}{suffix}"), "inputs": result.inputs, "outputs": result.outputs})
    request = {"runtime": runtime, "models": models, "threads": threads, "rounds": rounds, "warmup": warmup,
               "seed": seed, "clock": clock}
    times: list[list[float]] = run_worker(request, folder)["times_ms"]
    return times


def run_worker(request: dict[str, Any], folder: Path) -> dict[str, Any]:
    """Run ``request`` in a fresh ``python -m deeprebirth.export.latency`` limited to ``request["threads"]``."""
    runtime, threads = request["runtime"], request["threads"]
    request_path, result_path = folder / "request.json", folder / "result.json"
    request_path.write_text(json.dumps(request))
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads))
    package_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH", "")) if p)
    done = subprocess.run([sys.executable, "-m", "deeprebirth.export.latency", str(request_path), str(result_path)],
                          env=env, capture_output=True, text=True, check=False)
    if not result_path.exists():
        lines = [line for line in (done.stderr + done.stdout).splitlines() if line.strip()]
        raise DeepRebirthError(f"{runtime} crashed while timing: {lines[-1].strip() if lines else 'no message'}")
    found: dict[str, Any] = json.loads(result_path.read_text())
    if "error" in found:
        raise DeepRebirthError(found["error"])
    return found


def _work(request: dict[str, Any]) -> dict[str, Any]:
    from deeprebirth.export.runtimes import open_session

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


def median(times: Sequence[float]) -> float:
    return statistics.median(times)


def _worker_main(argv: Sequence[str]) -> int:
    request_path, result_path = argv
    request = json.loads(Path(request_path).read_text())
    try:
        if request.get("job") == "layers":
            from deeprebirth.export.layer_times import work_layers

            result = work_layers(request)
        else:
            result = _work(request)
    except DeepRebirthError as err:
        result = {"error": str(err)}
    except Exception as err:  # noqa: BLE001 - any failure becomes one line for the caller
        result = {"error": f"{type(err).__name__}: {err}"}
    Path(result_path).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1:]))
