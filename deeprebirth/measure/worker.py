"""The one way every measurement runs: a job in a fresh isolated process (``deeprebirth.caffe.isolation``) whose
thread pools are sized before any library loads them, timed by one of ``CLOCKS``.

A fresh process, because OpenBLAS, OpenMP and MKL read their thread counts once, when first loaded: a thread count
can only be chosen before the process starts. It also gives a clean peak RSS per net, and a runtime that aborts
(Caffe's glog ``LOG(FATAL)``, a crash in a runtime's C++) kills only the worker, never the caller.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from deeprebirth.caffe.isolation import run_isolated
from deeprebirth.errors import DeepRebirthError

CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
_THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")

Job = Callable[[dict[str, Any]], dict[str, Any]]


def check_timing(*, threads: int = 1, rounds: int = 1, warmup: int = 0, clock: str = "wall",
                 batch: int | None = None) -> None:
    """The timing arguments every measurement takes, checked before any work."""
    if clock not in CLOCKS:
        raise DeepRebirthError(f"unknown clock {clock!r} ({', '.join(CLOCKS)})")
    if threads < 1:
        raise DeepRebirthError(f"threads must be at least 1, got {threads}")
    if rounds < 1 or warmup < 0:
        raise DeepRebirthError("rounds must be at least 1 and warm-up rounds at least 0")
    if batch is not None and batch < 1:
        raise DeepRebirthError(f"batch must be at least 1, got {batch}")


def run_job(job: Job, request: dict[str, Any], *, threads: int, what: str, runner: str = "Caffe") -> dict[str, Any]:
    """``job(request)`` in a fresh isolated process limited to ``threads``; ``what`` (the nets) and ``runner``
    (what ran them) word the error when the process dies."""
    if threads < 1:
        raise DeepRebirthError(f"threads must be at least 1, got {threads}")
    env = {name: str(threads) for name in _THREAD_VARIABLES}
    result: dict[str, Any] = run_isolated(_one_line_errors, job, request, what=what, env=env, runner=runner)
    return result


def _one_line_errors(job: Job, request: dict[str, Any]) -> dict[str, Any]:
    try:
        return job(request)
    except DeepRebirthError:
        raise
    except Exception as err:  # noqa: BLE001 - a runtime's own exception types become one line for the caller
        raise DeepRebirthError(f"{type(err).__name__}: {err}") from None
